"""Pair-based losses: contrastive (Hadsell et al. 2006) and lifted structured (Song et al. 2016)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fat_distill.losses.distances import distance_matrix
from fat_distill.losses.output import (
    IdentityLoss,
    LossOutput,
    check_embeddings_and_labels,
    fraction,
    masked_mean,
)
from fat_distill.losses.triplet import pair_masks


def _mean_nonzero(terms: Tensor) -> Tensor:
    return terms.sum() / (terms > 0).sum().clamp_min(1)


class ContrastiveLoss(IdentityLoss):
    """Contrastive loss over all pairs of the batch, in pytorch-metric-learning's form.

    Positive pairs pay ``[d - pos_margin]_+`` (pulled together until closer than
    ``pos_margin``), negative pairs ``[neg_margin - d]_+`` (pushed apart until
    farther than ``neg_margin``). Each of the two is averaged over its non-zero
    terms (pml's ``AvgNonZeroReducer``), so the many easy negatives do not drown
    the hard ones. Cost O(B^2*D).

    Args:
        pos_margin: distance below which positive pairs cost nothing.
        neg_margin: distance above which negative pairs cost nothing.

    Output: ``per_sample[i]`` is the mean pair term over ``j != i``; ``terms``
    ``{"pos", "neg"}``; ``active_fraction`` over all pairs; ``stats`` ``pos_dist``,
    ``neg_dist`` (mean over positive / negative pairs).
    """

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0) -> None:
        super().__init__()
        self.pos_margin = float(pos_margin)
        self.neg_margin = float(neg_margin)

    def extra_repr(self) -> str:
        return f"pos_margin={self.pos_margin}, neg_margin={self.neg_margin}"

    def compute(self, embeddings: Tensor, labels: Tensor) -> LossOutput:
        """Args:
            embeddings: ``(B, D)``.
            labels: ``(B,)`` identity labels.
        """
        features, labels = check_embeddings_and_labels(embeddings, labels, "ContrastiveLoss")
        positive, negative = pair_masks(labels)
        dist = distance_matrix(features, features)
        zeros = torch.zeros_like(dist)
        # Ordered pairs: (i, j) and (j, i) both count, which leaves each average unchanged.
        pos_terms = torch.where(positive, F.relu(dist - self.pos_margin), zeros)
        neg_terms = torch.where(negative, F.relu(self.neg_margin - dist), zeros)
        pos_loss, neg_loss = _mean_nonzero(pos_terms), _mean_nonzero(neg_terms)
        pairs = positive | negative
        per_sample = (pos_terms + neg_terms).sum(dim=1) / (pairs.sum(dim=1)).clamp_min(1)
        plain = dist.detach()
        return LossOutput(
            loss=pos_loss + neg_loss,
            per_sample=per_sample.detach(),
            active_fraction=fraction((pos_terms > 0) | (neg_terms > 0), pairs),
            terms={"pos": pos_loss.detach(), "neg": neg_loss.detach()},
            stats={"pos_dist": masked_mean(plain, positive), "neg_dist": masked_mean(plain, negative)},
        )


class LiftedStructuredLoss(IdentityLoss):
    """Lifted structured embedding loss: every positive pair against all negatives.

    For each positive pair (i, j), with N_i the batch samples of other identities::

        J_ij = log( sum_{k in N_i} exp(margin - d_ik) + sum_{l in N_j} exp(margin - d_jl) ) + d_ij
        L    = 1 / (2 |P|) * sum_{(i,j) in P} [J_ij]_+^2

    over unordered positive pairs P that have negatives. The log-sum-exp is a
    smooth hardest-negative, so all negatives get gradient. Cost O(B^2*D).

    Args:
        margin: the margin inside the log-sum-exp.

    Output: ``per_sample[i]`` is the mean of ``[J_ij]_+^2 / 2`` over i's positive
    pairs; ``terms`` ``{"lifted"}``; ``active_fraction`` the share of pairs with
    ``J > 0``; ``stats`` ``pos_dist``, ``neg_dist``.
    """

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__()
        self.margin = float(margin)

    def extra_repr(self) -> str:
        return f"margin={self.margin}"

    def compute(self, embeddings: Tensor, labels: Tensor) -> LossOutput:
        """Args:
            embeddings: ``(B, D)``.
            labels: ``(B,)`` identity labels.
        """
        features, labels = check_embeddings_and_labels(embeddings, labels, "LiftedStructuredLoss")
        positive, negative = pair_masks(labels)
        dist = distance_matrix(features, features)
        # A finite stand-in for -inf: exp() of it is 0, and rows without any
        # negative still give finite log-sum-exps and gradients (they are masked out).
        absent = torch.finfo(dist.dtype).min
        negative_logits = torch.where(negative, self.margin - dist, torch.full_like(dist, absent))
        per_anchor = torch.logsumexp(negative_logits, dim=1)
        lifted = torch.logaddexp(per_anchor.unsqueeze(1), per_anchor.unsqueeze(0)) + dist
        pairs = positive & negative.any(dim=1, keepdim=True)
        upper = torch.ones_like(pairs).triu(diagonal=1)
        unordered = pairs & upper
        squared = torch.where(pairs, F.relu(lifted) ** 2, torch.zeros_like(dist))
        loss = torch.where(unordered, squared, torch.zeros_like(dist)).sum() / (2 * unordered.sum().clamp_min(1))
        per_sample = squared.sum(dim=1) / (2 * pairs.sum(dim=1).clamp_min(1))
        plain = dist.detach()
        return LossOutput(
            loss=loss,
            per_sample=per_sample.detach(),
            active_fraction=fraction(lifted.detach() > 0, unordered),
            terms={"lifted": loss.detach()},
            stats={"pos_dist": masked_mean(plain, positive), "neg_dist": masked_mean(plain, negative)},
        )
