"""Embedding models: backbones with BNNeck heads, JLML, and the name → constructor registry."""

from fat_distill.models.backbones import ResNetBackbone, SmallCNN
from fat_distill.models.embedding import BNNeckModel, EmbeddingModel
from fat_distill.models.heads import BNNeckHead, EmbeddingOutput
from fat_distill.models.jlml import JLMLBackbone, JLMLModel
from fat_distill.models.registry import MODELS, available_models, build_model
from fat_distill.models.weights import WeightsError, load_backbone_weights, read_state_dict

__all__ = [
    "MODELS",
    "BNNeckHead",
    "BNNeckModel",
    "EmbeddingModel",
    "EmbeddingOutput",
    "JLMLBackbone",
    "JLMLModel",
    "ResNetBackbone",
    "SmallCNN",
    "WeightsError",
    "available_models",
    "build_model",
    "load_backbone_weights",
    "read_state_dict",
]
