"""Quadruplet loss (Chen et al., CVPR 2017) with in-batch hard mining."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fat_distill.losses.distances import distance_matrix, paired_distance
from fat_distill.losses.margin_mining import closest_pair
from fat_distill.losses.output import (
    IdentityLoss,
    LossOutput,
    check_embeddings_and_labels,
    fraction,
    masked_mean,
)
from fat_distill.losses.triplet import pair_masks


@torch.no_grad()
def hardest_foreign_pairs(distances: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For every anchor, the closest pair of two other identities, neither the anchor's.

    The batch's closest negative pair serves every anchor whose identity is not in
    it; only the (at most two) identities of that pair need a second search with
    their samples removed, so three arg-mins over the ``(B, B)`` matrix suffice:
    O(B^2), not O(B^3).

    Args:
        distances: ``(B, B)`` symmetric distance matrix.
        labels: ``(B,)`` identity labels.

    Returns:
        ``(first, second, has_pair)``, each ``(B,)``: the pair's sample indices and
        whether such a pair exists (``False`` when the batch holds fewer than three
        identities; the indices are then meaningless).
    """
    _, negative = pair_masks(labels)
    pair, found = closest_pair(distances, negative)
    first, second, has_pair = pair[0].expand_as(labels), pair[1].expand_as(labels), found.expand_as(labels)
    for member in pair:
        own = labels == labels[member]
        others = ~own
        sub_pair, sub_found = closest_pair(distances, negative & others.unsqueeze(0) & others.unsqueeze(1))
        first = torch.where(own, sub_pair[0], first)
        second = torch.where(own, sub_pair[1], second)
        has_pair = torch.where(own, sub_found, has_pair)
    return first, second, has_pair


class QuadrupletLoss(IdentityLoss):
    """Quadruplet loss (Chen et al., "Beyond triplet loss: a deep quadruplet network for
    person re-identification", CVPR 2017), in-batch hard-mined.

    The triplet term only orders distances that share the anchor. The quadruplet
    term also pushes the anchor's positive distance below the distance of a
    negative pair that does not involve the anchor's identity at all, which
    shrinks intra-class spread relative to inter-class distances batch-wide::

        [d(a,p) - d(a,n) + margin]_+ + quadruplet_weight * [d(a,p) - d(m,n) + quadruplet_margin]_+

    with ``y_m != y_n``, ``y_m != y_a``, ``y_n != y_a``. Mining, per anchor as commonly
    implemented for P x K batches: ``p`` the farthest positive, ``n`` the nearest
    negative (batch hard), ``(m, n)`` the closest pair of two identities other than
    the anchor's. The loss is the mean over anchors that have a positive and a
    negative. A pair exists for every anchor as soon as the batch holds three
    identities; with two, no anchor has one and the loss is the batch-hard triplet
    loss (the quadruplet term is 0). Cost: one O(B^2*D) mining GEMM without gradient,
    O(B^2) for the pair search, O(B*D) for the loss.

    Args:
        margin: triplet margin (alpha_1).
        quadruplet_margin: margin of the negative-pair term (alpha_2). The paper
            makes it the weaker constraint, alpha_2 < alpha_1; ``None`` uses
            ``margin / 2`` (the 1 / 0.5 ratio of common implementations).
        quadruplet_weight: weight of the negative-pair term (1 in the paper).

    Output: ``per_sample[a]`` is anchor ``a``'s triplet term plus its weighted
    quadruplet term (0 for anchors without a triplet), so ``loss`` is the mean of
    ``per_sample`` over the anchors that have one; ``terms`` ``{"triplet",
    "quadruplet"}`` (weighted, over the same anchors); ``active_fraction`` over both hinge terms of
    every anchor that has them; ``stats`` ``pos_dist``, ``neg_dist``
    (mean hardest distances) and ``pair_dist`` (mean mined negative-pair distance).
    """

    def __init__(self, margin: float = 0.3, quadruplet_margin: float | None = None,
                 quadruplet_weight: float = 1.0) -> None:
        super().__init__()
        for name, value in (("margin", margin), ("quadruplet_margin", quadruplet_margin),
                            ("quadruplet_weight", quadruplet_weight)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"QuadrupletLoss: {name} must be a number, got {value!r} "
                                 "(the soft margin is not defined for the quadruplet term)")
        self.margin = float(margin)
        self.quadruplet_margin = self.margin / 2 if quadruplet_margin is None else float(quadruplet_margin)
        self.quadruplet_weight = float(quadruplet_weight)

    def extra_repr(self) -> str:
        return (f"margin={self.margin}, quadruplet_margin={self.quadruplet_margin}, "
                f"quadruplet_weight={self.quadruplet_weight}")

    def compute(self, embeddings: Tensor, labels: Tensor) -> LossOutput:
        """Args:
            embeddings: ``(B, D)``.
            labels: ``(B,)`` identity labels (any integers).
        """
        features, labels = check_embeddings_and_labels(embeddings, labels, "QuadrupletLoss")
        positive, negative = pair_masks(labels)
        has_triplet = positive.any(dim=1) & negative.any(dim=1)
        with torch.no_grad():
            dist = distance_matrix(features, features)
            positive_index = dist.masked_fill(~positive, float("-inf")).argmax(dim=1)
            negative_index = dist.masked_fill(~negative, float("inf")).argmin(dim=1)
            first, second, has_pair = hardest_foreign_pairs(dist, labels)
        has_quadruplet = has_triplet & has_pair

        # Recomputed from differences: exact, and the backward costs O(B*D), not a GEMM.
        pos_dist = paired_distance(features, features[positive_index])
        neg_dist = paired_distance(features, features[negative_index])
        # At most three distinct pairs serve the whole batch: measure each once, so
        # the backward scatters into 3 rows instead of accumulating B duplicates.
        size = labels.shape[0]
        distinct, which = torch.unique(first * size + second, return_inverse=True)
        pair_dist = paired_distance(features[distinct // size], features[distinct % size])[which]
        triplet = F.relu(pos_dist - neg_dist + self.margin)
        quadruplet = F.relu(pos_dist - pair_dist + self.quadruplet_margin)
        triplet = torch.where(has_triplet, triplet, torch.zeros_like(triplet))
        quadruplet = torch.where(has_quadruplet, quadruplet, torch.zeros_like(quadruplet))

        count = has_triplet.sum().clamp_min(1)
        triplet_loss = triplet.sum() / count
        quadruplet_loss = self.quadruplet_weight * quadruplet.sum() / count
        active = torch.stack([triplet > 0, quadruplet > 0], dim=1)
        valid = torch.stack([has_triplet, has_quadruplet], dim=1)
        return LossOutput(
            loss=triplet_loss + quadruplet_loss,
            per_sample=(triplet + self.quadruplet_weight * quadruplet).detach(),
            active_fraction=fraction(active, valid),
            terms={"triplet": triplet_loss.detach(), "quadruplet": quadruplet_loss.detach()},
            stats={
                "pos_dist": masked_mean(pos_dist.detach(), has_triplet),
                "neg_dist": masked_mean(neg_dist.detach(), has_triplet),
                "pair_dist": masked_mean(pair_dist.detach(), has_quadruplet),
            },
        )
