"""Identity-embedding losses: the FAT family, triplet baselines, cross-entropy variants.

One contract for every loss (an :class:`IdentityLoss`, a ``torch.nn.Module``):

- ``loss_fn(...)`` returns the scalar loss (0-d tensor), so it drops in wherever a
  PyTorch loss does;
- ``loss_fn.compute(...)`` returns a :class:`LossOutput` with that scalar plus the
  detail a training loop logs: ``per_sample`` ``(B,)`` terms, ``active_fraction``
  (share of hinge terms / triplets / pairs still non-zero), ``terms`` (named,
  weighted components whose sum is the loss) and ``stats`` (distance diagnostics).

``loss`` is differentiable; everything else in a ``LossOutput`` is detached.

Distances are Euclidean, not squared, with squared distances clamped before the
square root so coincident points give finite (zero) gradients. float16/bfloat16
inputs are computed in float32 and the loss is float32; float64 stays float64.

Losses:

- :class:`FATLoss` (+ :meth:`FATLoss.normalised`) with a :class:`CentreBank` of
  dataset-level centres; its negatives are every other centre, a per-class short
  list of the nearest centres (O(B*k*D) a step), or the hardest in-batch samples;
  :class:`HybridFATLoss` adds cross-entropy (hard, smoothed or soft teacher targets).
- Baselines: :class:`BatchHardTripletLoss`, :class:`BatchAllTripletLoss`,
  :class:`ImprovedTripletLoss`, :class:`MarginSampleMiningLoss` (MSML),
  :class:`QuadrupletLoss`, :class:`ContrastiveLoss`,
  :class:`LiftedStructuredLoss`, :class:`CentreLoss`,
  :class:`LabelSmoothingCrossEntropy`, :class:`SoftTargetCrossEntropy`.

Example::

    fat = FATLoss.normalised()
    bank = fat.new_centre_bank(num_classes=751, dim=2048, mode="ema")
    out = fat.compute(embeddings, labels, bank)
    out.loss.backward()
    bank.update(embeddings, labels, confident_mask)
    log(active=out.active_fraction.item(), **{k: v.item() for k, v in out.terms.items()})
"""

from fat_distill.losses.centre_bank import (
    CENTRE_MODES,
    CentreBank,
    class_means,
    compute_centres,
    finish_centres,
    nearest_centres,
)
from fat_distill.losses.centre_loss import CentreLoss
from fat_distill.losses.classification import (
    LabelSmoothingCrossEntropy,
    SoftTargetCrossEntropy,
)
from fat_distill.losses.distances import distance_matrix, gathered_squared_distances, paired_distance
from fat_distill.losses.fat import FATLoss
from fat_distill.losses.hybrid import HybridFATLoss
from fat_distill.losses.margin_mining import MarginSampleMiningLoss, closest_pair
from fat_distill.losses.output import IdentityLoss, LossOutput
from fat_distill.losses.pairs import ContrastiveLoss, LiftedStructuredLoss
from fat_distill.losses.quadruplet import QuadrupletLoss, hardest_foreign_pairs
from fat_distill.losses.triplet import (
    BatchAllTripletLoss,
    BatchHardTripletLoss,
    ImprovedTripletLoss,
    batch_hard_indices,
    pair_masks,
)

# Name -> class, for configs and the CLI: explicit arguments, no registry magic.
LOSSES: dict[str, type[IdentityLoss]] = {
    "fat": FATLoss,
    "hybrid_fat": HybridFATLoss,
    "batch_hard_triplet": BatchHardTripletLoss,
    "batch_all_triplet": BatchAllTripletLoss,
    "improved_triplet": ImprovedTripletLoss,
    "margin_sample_mining": MarginSampleMiningLoss,
    "quadruplet": QuadrupletLoss,
    "contrastive": ContrastiveLoss,
    "lifted_structured": LiftedStructuredLoss,
    "centre": CentreLoss,
    "label_smoothing_ce": LabelSmoothingCrossEntropy,
    "soft_target_ce": SoftTargetCrossEntropy,
}

__all__ = [
    "CENTRE_MODES",
    "LOSSES",
    "BatchAllTripletLoss",
    "BatchHardTripletLoss",
    "CentreBank",
    "CentreLoss",
    "ContrastiveLoss",
    "FATLoss",
    "HybridFATLoss",
    "IdentityLoss",
    "ImprovedTripletLoss",
    "LabelSmoothingCrossEntropy",
    "LiftedStructuredLoss",
    "LossOutput",
    "MarginSampleMiningLoss",
    "QuadrupletLoss",
    "SoftTargetCrossEntropy",
    "batch_hard_indices",
    "class_means",
    "closest_pair",
    "compute_centres",
    "distance_matrix",
    "finish_centres",
    "gathered_squared_distances",
    "hardest_foreign_pairs",
    "nearest_centres",
    "pair_masks",
    "paired_distance",
]
