"""Embedding models: a backbone feature map pooled into a BNNeck head."""

from __future__ import annotations

from torch import Tensor, nn

from fat_distill.models.heads import POOLINGS, BNNeckHead, EmbeddingOutput, check_image_batch, global_pool


class EmbeddingModel(nn.Module):
    """Common interface of every model in :data:`fat_distill.models.MODELS`.

    ``forward(images)`` takes a (B, 3, H, W) float batch and returns an
    :class:`EmbeddingOutput`:

    * ``features`` (f_t) → metric losses (FAT, triplet) during training;
    * ``logits`` → cross-entropy (``None`` when ``num_classes == 0``);
    * ``bn_features`` (f_i) → retrieval; :meth:`embed` returns them.

    Subclasses set ``backbone`` (the part pretrained weights load into) and the
    embedding width and class count.
    """

    backbone: nn.Module

    def __init__(self, embedding_dim: int, num_classes: int) -> None:
        super().__init__()
        self._embedding_dim = embedding_dim
        self._num_classes = num_classes

    @property
    def embedding_dim(self) -> int:
        """Width D of ``features``, ``bn_features`` and of :meth:`embed`'s output."""
        return self._embedding_dim

    @property
    def num_classes(self) -> int:
        """Number of classifier outputs; 0 for a feature-only model."""
        return self._num_classes

    def embed(self, images: Tensor) -> Tensor:
        """Retrieval embeddings: the BNNeck features (Bag of Tricks' choice at test time).

        Call under ``model.eval()`` (and ``torch.inference_mode()``) so the BatchNorm
        uses its running statistics and the result does not depend on the batch.

        Args:
            images: shape (B, 3, H, W), float, normalised.

        Returns:
            shape (B, embedding_dim).
        """
        return self(images).bn_features


class BNNeckModel(EmbeddingModel):
    """Backbone → global pooling → :class:`BNNeckHead`.

    Args:
        backbone: maps (B, 3, H, W) to (B, out_channels, H', W').
        out_channels: channels of the backbone's feature map.
        num_classes: identities the classifier predicts; 0 = feature-only model.
        embedding_dim: ``None`` keeps ``out_channels``; otherwise a linear layer projects to it.
        pooling: ``"avg"`` or ``"max"`` global pooling of the feature map.
    """

    def __init__(
        self,
        backbone: nn.Module,
        out_channels: int,
        num_classes: int,
        *,
        embedding_dim: int | None = None,
        pooling: str = "avg",
    ) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        head = BNNeckHead(out_channels, embedding_dim, num_classes)
        super().__init__(head.embedding_dim, num_classes)
        self.backbone = backbone
        self.pooling = pooling
        self.head = head

    def forward(self, images: Tensor) -> EmbeddingOutput:
        """Args:
            images: shape (B, 3, H, W), float.

        Returns:
            :class:`EmbeddingOutput` with (B, D) features and bn_features and
            (B, C) logits or ``None``.
        """
        check_image_batch(images)
        return self.head(global_pool(self.backbone(images), self.pooling))
