"""Embedding models: backbones with BNNeck heads, JLML, and the name → constructor registry."""

from fat_distill.models.backbones import ResNetBackbone, SmallCNN
from fat_distill.models.embedding import BNNeckModel, EmbeddingModel
from fat_distill.models.heads import BNNeckHead, EmbeddingOutput
from fat_distill.models.jlml import JLMLBackbone, JLMLModel
from fat_distill.models.registry import MODELS, available_models, build_model
from fat_distill.models.sparsity import group_l21_norm, group_norms, prox_group_l21_, zero_group_fraction
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
    "group_l21_norm",
    "group_norms",
    "load_backbone_weights",
    "prox_group_l21_",
    "read_state_dict",
    "zero_group_fraction",
]
