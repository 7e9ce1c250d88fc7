"""In-batch triplet losses: batch hard, batch all (Hermans et al. 2017) and improved triplet."""

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
    masked_mean,
)


def pair_masks(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Positive and negative pair masks of a batch.

    Args:
        labels: ``(B,)`` integer labels.

    Returns:
        ``(positive, negative)``, both ``(B, B)`` bool; ``positive`` excludes the
        diagonal (a sample is not its own positive).
    """
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    eye = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


@torch.no_grad()
def batch_hard_indices(features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For every anchor, its farthest positive and nearest negative in the batch.

    Args:
        features: ``(B, D)``.
        labels: ``(B,)``.

    Returns:
        ``(positive_index, negative_index, has_triplet)``, each ``(B,)``;
        ``has_triplet`` is ``False`` for anchors with no other sample of their
        identity or no sample of another identity (their indices are meaningless).
    """
    positive, negative = pair_masks(labels)
    dist = distance_matrix(features, features)
    positive_index = dist.masked_fill(~positive, float("-inf")).argmax(dim=1)
    negative_index = dist.masked_fill(~negative, float("inf")).argmin(dim=1)
    return positive_index, negative_index, positive.any(dim=1) & negative.any(dim=1)


def _mined_distances(features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    positive_index, negative_index, has_triplet = batch_hard_indices(features, labels)
    # Recomputed from differences: exact, and the backward costs O(B*D), not a GEMM.
    pos_dist = paired_distance(features, features[positive_index])
    neg_dist = paired_distance(features, features[negative_index])
    return pos_dist, neg_dist, has_triplet


class BatchHardTripletLoss(IdentityLoss):
    """Batch-hard triplet loss: each anchor's hardest positive and hardest negative.

    ``mean_a [ max_p d(a,p) - min_n d(a,n) + margin ]_+`` over anchors that have a
    positive and a negative in the batch (use a P x K sampler, K >= 2). Cost
    O(B^2*D) for the mining GEMM (no gradient) plus O(B*D) for the loss.

    Args:
        margin: hinge margin, or ``"soft"`` for the soft margin
            ``log(1 + exp(d_ap - d_an))`` the paper recommends.

    Output: ``per_sample`` is each anchor's term; ``terms`` ``{"triplet"}``;
    ``active_fraction`` is the share of anchors with ``d_ap - d_an + margin > 0``
    (margin 0 for soft); ``stats`` ``pos_dist``, ``neg_dist`` (mean hardest distances).
    """

    def __init__(self, margin: float | Literal["soft"] = 0.3) -> None:
        super().__init__()
        if margin != "soft" and not isinstance(margin, (int, float)):
            raise ValueError(f"BatchHardTripletLoss: margin must be a number or 'soft', got {margin!r}")
        self.margin = margin

    def extra_repr(self) -> str:
        return f"margin={self.margin!r}"

    def compute(self, embeddings: Tensor, labels: Tensor) -> LossOutput:
        """Args:
            embeddings: ``(B, D)``.
            labels: ``(B,)`` identity labels (any integers).
        """
        features, labels = check_embeddings_and_labels(embeddings, labels, "BatchHardTripletLoss")
        pos_dist, neg_dist, has_triplet = _mined_distances(features, labels)
        gap = pos_dist - neg_dist
        if self.margin == "soft":
            term, violated = F.softplus(gap), gap > 0
        else:
            term, violated = F.relu(gap + float(self.margin)), gap + float(self.margin) > 0
        loss = masked_mean(term, has_triplet)
        return LossOutput(
            loss=loss,
            per_sample=torch.where(has_triplet, term, torch.zeros_like(term)).detach(),
            active_fraction=fraction(violated, has_triplet),
            terms={"triplet": loss.detach()},
            stats={
                "pos_dist": masked_mean(pos_dist.detach(), has_triplet),
                "neg_dist": masked_mean(neg_dist.detach(), has_triplet),
            },
        )


class BatchAllTripletLoss(IdentityLoss):
    """Batch-all triplet loss: every valid (anchor, positive, negative) of the batch.

    Terms ``[d(a,p) - d(a,n) + margin]_+`` for all ``a != p`` of one identity and
    ``n`` of another. With ``ignore_zero`` the sum is divided by the number of
    non-zero terms (the batch-hard paper's "!= 0" average): easy triplets would
    otherwise dilute the gradient as training progresses. Memory O(B^3).

    Args:
        margin: hinge margin.
        ignore_zero: average over active (non-zero) triplets instead of all valid ones.

    Output: ``per_sample[a]`` is the same average over anchor ``a``'s triplets;
    ``terms`` ``{"triplet"}``; ``active_fraction`` is active / valid triplets;
    ``stats`` ``pos_dist``, ``neg_dist`` (mean over positive / negative pairs),
    ``num_triplets``.
    """

    def __init__(self, margin: float = 0.3, ignore_zero: bool = True) -> None:
        super().__init__()
        self.margin = float(margin)
        self.ignore_zero = ignore_zero

    def extra_repr(self) -> str:
        return f"margin={self.margin}, ignore_zero={self.ignore_zero}"

    def compute(self, embeddings: Tensor, labels: Tensor) -> LossOutput:
        """Args:
            embeddings: ``(B, D)``.
            labels: ``(B,)`` identity labels.
        """
        features, labels = check_embeddings_and_labels(embeddings, labels, "BatchAllTripletLoss")
        positive, negative = pair_masks(labels)
        dist = distance_matrix(features, features)
        valid = positive.unsqueeze(2) & negative.unsqueeze(1)  # (a, p, n)
        term = F.relu(dist.unsqueeze(2) - dist.unsqueeze(1) + self.margin)
        term = torch.where(valid, term, torch.zeros_like(term))
        active = term > 0
        denominator = active if self.ignore_zero else valid
        loss = term.sum() / denominator.sum().clamp_min(1)
        per_sample = term.sum(dim=(1, 2)) / denominator.sum(dim=(1, 2)).clamp_min(1)
        plain = dist.detach()
        return LossOutput(
            loss=loss,
            per_sample=per_sample.detach(),
            active_fraction=fraction(active, valid),
            terms={"triplet": loss.detach()},
            stats={
                "pos_dist": masked_mean(plain, positive),
                "neg_dist": masked_mean(plain, negative),
                "num_triplets": valid.sum().float(),
            },
        )


class ImprovedTripletLoss(IdentityLoss):
    """Improved triplet loss (Cheng et al., CVPR 2016) on batch-hard triplets.

    The plain triplet only orders ``d(a,p)`` against ``d(a,n)``; the improved loss
    adds an absolute bound on the positive distance so that identities also
    become compact::

        [d_ap - d_an + margin]_+ + pos_weight * [d_ap - pos_margin]_+

    with ``d_ap`` the hardest positive and ``d_an`` the hardest negative of each
    anchor, averaged over anchors that have both.

    Args:
        margin: relative (triplet) margin.
        pos_margin: absolute bound on the positive distance (tau_2).
        pos_weight: weight of the absolute term (beta).

    Output: ``per_sample`` is each anchor's sum of both terms; ``terms``
    ``{"triplet", "positive"}`` (weighted); ``active_fraction`` over both hinge
    terms of every anchor; ``stats`` ``pos_dist``, ``neg_dist``.
    """

    def __init__(self, margin: float = 0.3, pos_margin: float = 0.1, pos_weight: float = 1.0) -> None:
        super().__init__()
        self.margin = float(margin)
        self.pos_margin = float(pos_margin)
        self.pos_weight = float(pos_weight)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, pos_margin={self.pos_margin}, pos_weight={self.pos_weight}"

    def compute(self, embeddings: Tensor, labels: Tensor) -> LossOutput:
        """Args:
            embeddings: ``(B, D)``.
            labels: ``(B,)`` identity labels.
        """
        features, labels = check_embeddings_and_labels(embeddings, labels, "ImprovedTripletLoss")
        pos_dist, neg_dist, has_triplet = _mined_distances(features, labels)
        relative = F.relu(pos_dist - neg_dist + self.margin)
        absolute = F.relu(pos_dist - self.pos_margin)
        triplet_loss = masked_mean(relative, has_triplet)
        positive_loss = self.pos_weight * masked_mean(absolute, has_triplet)
        per_sample = relative + self.pos_weight * absolute
        active = torch.stack([relative > 0, absolute > 0], dim=1)
        return LossOutput(
            loss=triplet_loss + positive_loss,
            per_sample=torch.where(has_triplet, per_sample, torch.zeros_like(per_sample)).detach(),
            active_fraction=fraction(active, has_triplet.unsqueeze(1).expand_as(active)),
            terms={"triplet": triplet_loss.detach(), "positive": positive_loss.detach()},
            stats={
                "pos_dist": masked_mean(pos_dist.detach(), has_triplet),
                "neg_dist": masked_mean(neg_dist.detach(), has_triplet),
            },
        )
