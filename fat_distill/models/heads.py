"""The BNNeck embedding head and the structure every model's forward returns.

BNNeck (Luo et al., "Bag of Tricks and A Strong Baseline for Deep Person
Re-identification", 2019) puts a BatchNorm1d between the metric-learning feature
and the classifier, so the triplet/FAT loss and the cross-entropy loss act on
two differently-normalised views of one vector instead of fighting over it:

    feature map ──pool──▶ [linear] ──▶ f_t ──BN (bias frozen)──▶ f_i ──linear (no bias)──▶ logits
                                        │                        │
                         metric losses (FAT, triplet)      retrieval at eval
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

POOLINGS = ("avg", "max")


@dataclass
class EmbeddingOutput:
    """What a model's forward returns.

    Attributes:
        features: ``f_t``, shape (B, D): the vector before the BNNeck. Feed it to
            metric losses (FAT, triplet, centre).
        bn_features: ``f_i``, shape (B, D): ``features`` after the BNNeck's
            BatchNorm. Use it for retrieval at evaluation (``model.eval()``; the
            BatchNorm then uses its running statistics).
        logits: shape (B, C), or ``None`` for a feature-only model
            (``num_classes=0``). Feed it to cross-entropy.
        branches: for multi-branch models (JLML), each branch's own output, by
            branch name; a multi-loss model applies its losses per branch (see
            :meth:`branch_outputs`). Empty for single-branch models.
    """

    features: Tensor
    bn_features: Tensor
    logits: Tensor | None
    branches: dict[str, EmbeddingOutput] = field(default_factory=dict)

    def branch_outputs(self) -> list[EmbeddingOutput]:
        """The outputs that each carry their own losses.

        ``[self]`` for a single-branch model; the per-branch outputs for a
        multi-loss model such as JLML, whose paper trains one classifier per branch.
        """
        return list(self.branches.values()) if self.branches else [self]


def global_pool(feature_map: Tensor, pooling: str) -> Tensor:
    """Pool a feature map over its spatial dimensions.

    Args:
        feature_map: shape (B, C, H, W).
        pooling: ``"avg"`` or ``"max"``.

    Returns:
        shape (B, C).
    """
    if pooling == "avg":
        return feature_map.mean(dim=(2, 3))
    if pooling == "max":
        return feature_map.amax(dim=(2, 3))
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


class BNNeckHead(nn.Module):
    """Pooled feature → optional projection → BNNeck → bias-free classifier.

    Args:
        in_features: width of the pooled input vector.
        embedding_dim: width of ``features``/``bn_features``. ``None`` or equal to
            ``in_features`` keeps the pooled vector as is (Bag of Tricks uses
            2048-d ResNet-50 features directly); otherwise a linear layer
            projects to it.
        num_classes: number of identities the classifier predicts; ``0`` builds
            no classifier and ``logits`` is ``None``.
        always_project: build the linear projection even when ``embedding_dim``
            equals ``in_features`` (JLML's per-branch feature-selection layer).
    """

    def __init__(self, in_features: int, embedding_dim: int | None = None, num_classes: int = 0, *,
                 always_project: bool = False) -> None:
        super().__init__()
        if in_features < 1:
            raise ValueError(f"in_features must be >= 1, got {in_features}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = feature-only model), got {num_classes}")
        embedding_dim = in_features if embedding_dim is None else embedding_dim
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1 or None (keep the backbone width), got {embedding_dim}")
        self.in_features = in_features
        self.embedding_dim = embedding_dim
        self.num_classes = num_classes

        self.projection: nn.Module = (
            nn.Identity() if embedding_dim == in_features and not always_project
            else nn.Linear(in_features, embedding_dim)
        )
        self.bottleneck = nn.BatchNorm1d(embedding_dim)
        # A learnable BN shift would move f_i off the origin; the classifier has
        # no bias either, so logits stay a pure angular/scale function of f_i
        # (Bag of Tricks §3.4).
        self.bottleneck.bias.requires_grad_(False)
        self.classifier: nn.Linear | None = (
            nn.Linear(embedding_dim, num_classes, bias=False) if num_classes > 0 else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as in Bag of Tricks: Kaiming projection, BN (1, 0), classifier N(0, 0.001)."""
        if isinstance(self.projection, nn.Linear):
            nn.init.kaiming_normal_(self.projection.weight, mode="fan_out")
            nn.init.zeros_(self.projection.bias)
        nn.init.ones_(self.bottleneck.weight)
        nn.init.zeros_(self.bottleneck.bias)
        if self.classifier is not None:
            # Small weights keep the initial softmax near uniform, so early CE
            # gradients do not swamp the metric loss.
            nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, pooled: Tensor) -> EmbeddingOutput:
        """Args:
            pooled: shape (B, in_features).

        Returns:
            :class:`EmbeddingOutput` with (B, embedding_dim) features and
            (B, num_classes) logits (``None`` if ``num_classes == 0``).
        """
        features = self.projection(pooled)
        bn_features = self.bottleneck(features)
        logits = self.classifier(bn_features) if self.classifier is not None else None
        return EmbeddingOutput(features=features, bn_features=bn_features, logits=logits)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, embedding_dim={self.embedding_dim}, num_classes={self.num_classes}"


def check_image_batch(images: Tensor) -> None:
    """Fail early, with the shape, on anything that is not a (B, 3, H, W) float batch."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"expected an image batch of shape (B, 3, H, W), got {tuple(images.shape)}; "
            "greyscale images must be expanded to 3 channels (the image dataset does this)"
        )
    if not torch.is_floating_point(images):
        raise TypeError(
            f"expected a floating-point image batch, got dtype {images.dtype}; "
            "apply the transforms from fat_distill.data.transforms.build_transforms first"
        )
