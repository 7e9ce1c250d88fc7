"""Centre loss (Wen et al., ECCV 2016): pull each embedding towards a learned class centre."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fat_distill.losses.output import (
    IdentityLoss,
    LossOutput,
    check_embeddings_and_labels,
    check_label_range,
    fraction,
)


class CentreLoss(IdentityLoss):
    """``mean_i ||f_i - c_{y_i}||^2`` with learnable centres (torchreid's ``CenterLoss`` scale).

    Unlike FAT's detached dataset-level centres, these centres are parameters:
    put ``loss.parameters()`` in the optimiser (Wen et al. update them with their
    own rate alpha; a separate parameter group does the same). Squared distance is
    the loss's definition. Used next to cross-entropy, which keeps classes apart.

    Args:
        num_classes: C.
        dim: D, the embedding dimension.

    Output: ``per_sample`` is each squared distance; ``terms`` ``{"centre"}``;
    ``stats`` ``pos_dist`` (mean non-squared distance).
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        if num_classes < 1 or dim < 1:
            raise ValueError(f"CentreLoss: num_classes and dim must be >= 1, got {num_classes}, {dim}")
        self.num_classes = num_classes
        self.dim = dim
        self.centres = nn.Parameter(torch.randn(num_classes, dim))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}"

    def compute(self, embeddings: Tensor, labels: Tensor) -> LossOutput:
        """Args:
            embeddings: ``(B, D)``.
            labels: ``(B,)`` class indices in ``[0, C)``.
        """
        features, labels = check_embeddings_and_labels(embeddings, labels, "CentreLoss")
        if features.shape[1] != self.dim:
            raise ValueError(f"CentreLoss: embeddings have dim {features.shape[1]}, centres {self.dim}")
        check_label_range(labels, self.num_classes, "CentreLoss")
        dtype = torch.promote_types(features.dtype, self.centres.dtype)
        difference = features.to(dtype) - self.centres.to(dtype)[labels]
        per_sample = (difference * difference).sum(dim=1)
        loss = per_sample.mean()
        every = torch.ones_like(labels, dtype=torch.bool)
        return LossOutput(
            loss=loss,
            per_sample=per_sample.detach(),
            active_fraction=fraction(per_sample.detach() > 0, every),
            terms={"centre": loss.detach()},
            stats={"pos_dist": per_sample.detach().sqrt().mean()},
        )
