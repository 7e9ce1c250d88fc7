"""Margin sample mining loss (MSML, Xiao et al. 2017): the batch's hardest positive vs hardest negative pair."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from fat_distill.losses.distances import distance_matrix, paired_distance
from fat_distill.losses.output import (
    IdentityLoss,
    LossOutput,
    check_embeddings_and_labels,
    fraction,
)
from fat_distill.losses.triplet import pair_masks


@torch.no_grad()
def closest_pair(distances: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
    """The closest pair of samples among the allowed pairs of a batch.

    Args:
        distances: ``(B, B)`` symmetric distance matrix.
        allowed: ``(B, B)`` bool, symmetric: which pairs may be chosen (e.g. the
            negative mask of :func:`~fat_distill.losses.pair_masks`).

    Returns:
        ``(pair, found)``: ``pair`` a ``(2,)`` int64 tensor of sample indices with
        ``pair[0] < pair[1]``, and ``found``, a 0-d bool tensor: whether any pair
        is allowed (``pair`` is meaningless when not).
    """
    # Upper triangle: each unordered pair once, so pair[0] < pair[1] even where
    # GEMM rounding leaves the matrix slightly asymmetric.
    allowed = torch.triu(allowed, diagonal=1)
    flat = distances.masked_fill(~allowed, float("inf")).argmin()
    size = distances.shape[1]
    return torch.stack([flat // size, flat % size]), allowed.any()


class MarginSampleMiningLoss(IdentityLoss):
    """Margin sample mining loss (MSML; Xiao et al., "Margin Sample Mining Loss: A Deep
    Learning Based Method for Person Re-identification", arXiv 1710.00478).

    Batch-hard triplet mines per anchor; MSML mines the whole batch at once: the
    hardest positive pair (the two samples of one identity farthest apart) against
    the hardest negative pair (the two samples of different identities closest
    together), which need not share a sample::

        [ max_{y_a = y_p, a != p} d(a,p) - min_{y_m != y_n} d(m,n) + margin ]_+

    One term per batch, so the gradient reaches at most four samples; use large
    P x K batches. Mining costs one O(B^2*D) GEMM without gradient, the loss and
    its per-anchor terms O(B*D).

    Args:
        margin: hinge margin, or ``"soft"`` for ``log(1 + exp(d_pos - d_neg))`` as in
            :class:`~fat_distill.losses.BatchHardTripletLoss`. Default 0.6, the
            value of the authors' code (L2-normalised features); with raw
            (un-normalised) features a margin in the scale of the triplet's 0.3 is
            the usual starting point.

    Output: ``per_sample[a]`` is ``[max_p d(a,p) - min_{m,n} d(m,n) + margin]_+``,
    anchor ``a``'s hardest positive against the batch's hardest negative pair; the
    batch reduction is a max, so ``loss == per_sample.max()`` and the two samples of
    the hardest positive pair hold it. Anchors with no positive hold 0, and so does
    every anchor in a batch without a negative pair (the loss is then 0, with a
    zero gradient). ``active_fraction`` is the share of anchors with a positive
    whose term is non-zero (``d_pos - d_neg + margin > 0``, margin 0 for soft): how
    many samples still sit farther from their own identity than the closest
    pair of different identities does. ``terms`` ``{"msml"}``; ``stats``
    ``pos_dist`` (hardest positive pair) and ``neg_dist`` (hardest negative pair),
    0 when the pair does not exist.
    """

    def __init__(self, margin: float | Literal["soft"] = 0.6) -> None:
        super().__init__()
        if margin != "soft" and not isinstance(margin, (int, float)):
            raise ValueError(f"MarginSampleMiningLoss: margin must be a number or 'soft', got {margin!r}")
        self.margin = margin

    def extra_repr(self) -> str:
        return f"margin={self.margin!r}"

    def compute(self, embeddings: Tensor, labels: Tensor) -> LossOutput:
        """Args:
            embeddings: ``(B, D)``.
            labels: ``(B,)`` identity labels (any integers).
        """
        features, labels = check_embeddings_and_labels(embeddings, labels, "MarginSampleMiningLoss")
        positive, negative = pair_masks(labels)
        has_positive = positive.any(dim=1)
        with torch.no_grad():
            dist = distance_matrix(features, features)
            positive_index = dist.masked_fill(~positive, float("-inf")).argmax(dim=1)
        negative_pair, has_negative_pair = closest_pair(dist, negative)

        # Recomputed from differences: exact, and the backward costs O(B*D), not a GEMM.
        pos_dist = paired_distance(features, features[positive_index])
        neg_dist = paired_distance(features[negative_pair[0]], features[negative_pair[1]])
        gap = pos_dist - neg_dist
        if self.margin == "soft":
            term, violated = F.softplus(gap), gap > 0
        else:
            term, violated = F.relu(gap + float(self.margin)), gap + float(self.margin) > 0
        valid = has_positive & has_negative_pair
        per_sample = torch.where(valid, term, torch.zeros_like(term))
        # The hardest positive pair is the anchor with the largest term (the hinge is
        # monotone in d_pos). Both samples of that pair hold it exactly; indexing one
        # of them rather than .max() over anchors makes the gradient that of the one
        # pair term, whatever rule max uses to split a gradient between ties.
        hardest = torch.where(has_positive, pos_dist.detach(), torch.full_like(pos_dist, float("-inf"))).argmax()
        loss = per_sample[hardest]
        zero = torch.zeros_like(neg_dist.detach())
        plain_pos = torch.where(has_positive.any(), pos_dist.detach()[hardest], zero)
        plain_neg = torch.where(has_negative_pair, neg_dist.detach(), zero)
        return LossOutput(
            loss=loss,
            per_sample=per_sample.detach(),
            active_fraction=fraction(violated, valid),
            terms={"msml": loss.detach()},
            stats={"pos_dist": plain_pos, "neg_dist": plain_neg},
        )
