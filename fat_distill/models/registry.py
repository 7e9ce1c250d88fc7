"""Name → constructor registry of embedding models (a plain dict, no indirection)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fat_distill.models.backbones import ResNetBackbone, SmallCNN
from fat_distill.models.embedding import BNNeckModel, EmbeddingModel
from fat_distill.models.jlml import JLMLModel
from fat_distill.models.weights import load_backbone_weights


def build_small_cnn(
    num_classes: int, *, embedding_dim: int | None = None, last_stride: int = 1, pooling: str = "avg", width: int = 32
) -> BNNeckModel:
    """VGG-style :class:`SmallCNN`, 32-64-128-256 channels (~1.2 M parameters), with a BNNeck head.

    The from-scratch CPU backbone: it learns real photos (faces at 32×32, pedestrians at 128×64).
    """
    backbone = SmallCNN(width=width, last_stride=last_stride)
    return BNNeckModel(backbone, backbone.out_channels, num_classes, embedding_dim=embedding_dim, pooling=pooling)


def build_tiny_cnn(
    num_classes: int, *, embedding_dim: int | None = None, last_stride: int = 1, pooling: str = "avg", width: int = 16
) -> BNNeckModel:
    """:class:`SmallCNN` at half width, 16-32-64-128 channels (~0.3 M parameters): a quarter of ``small_cnn``'s
    compute, for the CPU demo and quick runs."""
    return build_small_cnn(num_classes, embedding_dim=embedding_dim, last_stride=last_stride, pooling=pooling,
                           width=width)


def build_resnet18(
    num_classes: int, *, embedding_dim: int | None = None, last_stride: int = 1, pooling: str = "avg"
) -> BNNeckModel:
    """torchvision ResNet-18 (512 channels) with a BNNeck head."""
    backbone = ResNetBackbone(18, last_stride=last_stride)
    return BNNeckModel(backbone, backbone.out_channels, num_classes, embedding_dim=embedding_dim, pooling=pooling)


def build_resnet50(
    num_classes: int, *, embedding_dim: int | None = None, last_stride: int = 1, pooling: str = "avg"
) -> BNNeckModel:
    """torchvision ResNet-50 (2048 channels) with a BNNeck head: the FAT paper's and Bag of Tricks' model."""
    backbone = ResNetBackbone(50, last_stride=last_stride)
    return BNNeckModel(backbone, backbone.out_channels, num_classes, embedding_dim=embedding_dim, pooling=pooling)


def build_jlml(
    num_classes: int,
    *,
    embedding_dim: int | None = None,
    last_stride: int = 1,
    pooling: str = "avg",
    width: int = 16,
    num_stripes: int = 4,
    share_stripe_weights: bool = False,
) -> JLMLModel:
    """:class:`JLMLModel`: global + striped local branch, one BNNeck head and classifier per branch."""
    return JLMLModel(
        num_classes,
        embedding_dim=embedding_dim,
        width=width,
        num_stripes=num_stripes,
        share_stripe_weights=share_stripe_weights,
        last_stride=last_stride,
        pooling=pooling,
    )


MODELS: dict[str, Callable[..., EmbeddingModel]] = {
    "small_cnn": build_small_cnn,
    "tiny_cnn": build_tiny_cnn,
    "resnet18": build_resnet18,
    "resnet50": build_resnet50,
    "jlml": build_jlml,
}


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`, sorted."""
    return sorted(MODELS)


def build_model(
    name: str,
    num_classes: int,
    *,
    embedding_dim: int | None = None,
    weights: str | Path | None = None,
    last_stride: int = 1,
    pooling: str = "avg",
    **options: object,
) -> EmbeddingModel:
    """Build a registered embedding model, optionally loading backbone weights from a local file.

    Args:
        name: one of :func:`available_models`.
        num_classes: identities the classifier predicts; 0 builds a feature-only
            model (``logits`` is ``None``) for inference.
        embedding_dim: width of the embedding; ``None`` keeps the backbone's
            width (512 for resnet18, 2048 for resnet50, ``8·width`` for small_cnn
            (256) and tiny_cnn (128), ``16·width`` for jlml).
        weights: path to a local checkpoint for the backbone: a torchvision state
            dict or ``{"model": state_dict}`` (``fc.*`` is ignored). ``None``
            leaves the random initialisation. Nothing is ever downloaded.
        last_stride: 1 (ReID default: a finer final feature map) or 2.
        pooling: ``"avg"`` or ``"max"`` global pooling.
        **options: model-specific options, e.g. ``width`` for small_cnn, tiny_cnn and jlml,
            ``num_stripes`` and ``share_stripe_weights`` for jlml.

    Raises:
        KeyError: unknown ``name``.
        fat_distill.models.WeightsError: the weights file is missing, unreadable or does not fit.
    """
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; available models: {', '.join(available_models())}")
    model = MODELS[name](
        num_classes, embedding_dim=embedding_dim, last_stride=last_stride, pooling=pooling, **options
    )
    if weights is not None:
        load_backbone_weights(model.backbone, weights)
    return model
