"""Training objectives: what a stage optimises, from a model output and a batch.

An objective turns ``(EmbeddingOutput, labels, dataset indices)`` into a
:class:`~fat_distill.losses.LossOutput`. It may keep state that must be
checkpointed with the model (FAT's centre bank), per-sample data looked up by
dataset index (teacher soft targets, the confident mask), and hooks the loop
calls after each step (EMA centre update) or at the start of an epoch (a full
feature pass for epoch-refreshed centres).

Multi-branch models (JLML) get the objective applied to every branch and the
results summed, with each branch's terms prefixed by its name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from fat_distill.losses import (
    BatchHardTripletLoss,
    CentreBank,
    FATLoss,
    HybridFATLoss,
    IdentityLoss,
    LabelSmoothingCrossEntropy,
    LossOutput,
    MarginSampleMiningLoss,
    QuadrupletLoss,
    SoftTargetCrossEntropy,
)
from fat_distill.models import EmbeddingOutput

OBJECTIVES = ("ce", "ce_triplet", "ce_msml", "ce_quadruplet", "fat_hybrid")


class SampleTable(nn.Module):
    """Per-sample data of the training set, looked up by dataset index.

    Buffers (saved with the objective):
        soft_ids: ``(N, k)`` int64 class indices of the teacher's top-k (−1 = padding).
        soft_probs: ``(N, k)`` float32 probabilities.
        confident: ``(N,)`` bool; only confident samples build FAT centres.
    """

    def __init__(self, num_samples: int, soft_ids: Tensor | None = None, soft_probs: Tensor | None = None,
                 confident: Tensor | None = None) -> None:
        super().__init__()
        if (soft_ids is None) != (soft_probs is None):
            raise ValueError("soft_ids and soft_probs go together")
        if soft_ids is not None and (soft_ids.shape != soft_probs.shape or soft_ids.shape[0] != num_samples):
            raise ValueError(f"soft targets must be (N={num_samples}, k), got {tuple(soft_ids.shape)} "
                             f"and {tuple(soft_probs.shape)}")
        if confident is not None and confident.shape != (num_samples,):
            raise ValueError(f"confident mask must be ({num_samples},), got {tuple(confident.shape)}")
        self.has_soft = soft_ids is not None
        self.register_buffer("soft_ids", soft_ids.long() if soft_ids is not None else torch.empty(0, 0, dtype=torch.long))
        self.register_buffer("soft_probs", soft_probs.float() if soft_probs is not None else torch.empty(0, 0))
        self.register_buffer("confident", confident.bool() if confident is not None
                             else torch.ones(num_samples, dtype=torch.bool))

    def soft_targets(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        return self.soft_ids[indices], self.soft_probs[indices]


class Objective(nn.Module, ABC):
    """Base class. Subclasses implement :meth:`compute_branch`."""

    #: whether the loop must call :meth:`refresh` with a full feature pass each epoch
    needs_feature_pass: bool = False

    def __init__(self, samples: SampleTable) -> None:
        super().__init__()
        self.samples = samples

    @abstractmethod
    def compute_branch(self, name: str, output: EmbeddingOutput, labels: Tensor, indices: Tensor) -> LossOutput:
        """The loss of one branch's output (``name`` is "" for single-branch models)."""

    def compute(self, output: EmbeddingOutput, labels: Tensor, indices: Tensor) -> LossOutput:
        branches = output.branches or {"": output}
        results = {name: self.compute_branch(name, out, labels, indices) for name, out in branches.items()}
        if len(results) == 1:
            return next(iter(results.values()))
        return _sum_outputs(results)

    def after_step(self, output: EmbeddingOutput, labels: Tensor, indices: Tensor) -> None:
        """Called after each optimiser step with the (detached) batch output."""

    def refresh(self, features: dict[str, Tensor], labels: Tensor, indices: Tensor) -> None:
        """Called at the start of an epoch with the whole training set's features per branch."""


def _sum_outputs(results: dict[str, LossOutput]) -> LossOutput:
    loss = sum(r.loss for r in results.values())
    per_sample = sum(r.per_sample for r in results.values())
    active = torch.stack([r.active_fraction.float() for r in results.values()]).mean()
    terms = {f"{name}.{k}": v for name, r in results.items() for k, v in r.terms.items()}
    stats = {f"{name}.{k}": v for name, r in results.items() for k, v in r.stats.items()}
    return LossOutput(loss=loss, per_sample=per_sample, active_fraction=active, terms=terms, stats=stats)


def _require_logits(output: EmbeddingOutput, where: str) -> Tensor:
    if output.logits is None:
        raise ValueError(f"{where} needs classifier logits, but the model was built with num_classes=0")
    return output.logits


class ClassificationObjective(Objective):
    """Cross-entropy on the classifier: hard labels, label smoothing, or the teacher's soft labels.

    This is the teacher's objective (hard labels) and the "CE only" baseline.
    """

    def __init__(self, samples: SampleTable, *, smoothing: float = 0.0, soft: bool = False,
                 soft_smoothing: float = 0.0) -> None:
        super().__init__(samples)
        if soft and not samples.has_soft:
            raise ValueError("soft cross-entropy needs soft targets (a soft_labels manifest)")
        self.soft = soft
        self.ce: IdentityLoss = (SoftTargetCrossEntropy(smoothing=soft_smoothing) if soft
                                 else LabelSmoothingCrossEntropy(smoothing))

    def compute_branch(self, name, output, labels, indices):
        logits = _require_logits(output, "cross-entropy")
        if self.soft:
            return self.ce.compute(logits, self.samples.soft_targets(indices))
        return self.ce.compute(logits, labels)


class MetricObjective(Objective):
    """Cross-entropy + an in-batch metric loss on the pre-BNNeck features.

    With ``BatchHardTripletLoss(0.3)`` this is the usual strong ReID baseline
    (Bag of Tricks). With ``soft=True`` the cross-entropy uses the teacher's soft
    targets while the metric loss uses the hard labels (the distilled student with
    ``metric_term: batch_hard``).
    """

    def __init__(self, samples: SampleTable, metric_loss: IdentityLoss, *, ce_weight: float = 1.0,
                 smoothing: float = 0.1, soft: bool = False, soft_smoothing: float = 0.0) -> None:
        super().__init__(samples)
        if soft and not samples.has_soft:
            raise ValueError("soft cross-entropy needs soft targets (a soft_labels manifest)")
        self.metric_loss = metric_loss
        self.soft = soft
        self.ce: IdentityLoss = (SoftTargetCrossEntropy(smoothing=soft_smoothing) if soft
                                 else LabelSmoothingCrossEntropy(smoothing))
        self.ce_weight = ce_weight

    def compute_branch(self, name, output, labels, indices):
        metric = self.metric_loss.compute(output.features, labels)
        logits = _require_logits(output, "cross-entropy")
        ce = self.ce.compute(logits, self.samples.soft_targets(indices) if self.soft else labels)
        terms = {"metric": metric.loss.detach(), "ce": (self.ce_weight * ce.loss).detach()}
        return LossOutput(
            loss=metric.loss + self.ce_weight * ce.loss,
            per_sample=metric.per_sample + self.ce_weight * ce.per_sample,
            active_fraction=metric.active_fraction,
            terms=terms,
            stats={**metric.stats, **ce.stats},
        )


class FATObjective(Objective):
    """Hybrid FAT: FAT against dataset-level centres + cross-entropy (hard, smoothed or soft).

    Centres come from a :class:`CentreBank` per branch, fed by confident samples
    only: updated from every batch (``centre_update="ema"``) or recomputed from a
    full feature pass at the start of each epoch (``"epoch"``, the reference code).
    Before the first update a bank has no valid centre and FAT contributes 0
    (cross-entropy still trains the model); with ``"ema"`` the bank fills within
    the first batches. With ``FATLoss(negatives="centre_shortlist")`` each bank
    also keeps the centres' neighbour lists, rebuilt at each epoch refresh or,
    with ``"ema"``, every ``shortlist_refresh`` steps (saved with the objective,
    so a resumed run continues the same schedule).
    """

    def __init__(self, samples: SampleTable, fat: FATLoss, *, num_classes: int, branch_dims: dict[str, int],
                 ce_weight: float = 1.0, target: Literal["hard", "smooth", "soft"] = "hard",
                 smoothing: float = 0.1, soft_smoothing: float = 0.0, centre_update: Literal["ema", "epoch"] = "ema",
                 momentum: float = 0.9, shortlist_refresh: int = 100) -> None:
        super().__init__(samples)
        if target == "soft" and not samples.has_soft:
            raise ValueError("target='soft' needs soft targets (a soft_labels manifest)")
        self.hybrid = HybridFATLoss(fat, ce_weight=ce_weight, target=target, smoothing=smoothing,
                                    soft_smoothing=soft_smoothing)
        self.centre_update = centre_update
        self.needs_feature_pass = centre_update == "epoch"
        self.banks = nn.ModuleDict({
            _bank_key(name): fat.new_centre_bank(num_classes, dim, mode=centre_update, momentum=momentum,
                                                 shortlist_refresh=shortlist_refresh)
            for name, dim in branch_dims.items()
        })

    def bank(self, name: str) -> CentreBank:
        return self.banks[_bank_key(name)]

    def compute_branch(self, name, output, labels, indices):
        soft = self.samples.soft_targets(indices) if self.hybrid.target == "soft" else None
        return self.hybrid.compute(output.features, _require_logits(output, "hybrid FAT"), labels,
                                   self.bank(name), soft_targets=soft)

    @torch.no_grad()
    def after_step(self, output, labels, indices):
        if self.centre_update != "ema":
            return
        confident = self.samples.confident[indices]
        for name, out in (output.branches or {"": output}).items():
            self.bank(name).update(out.features.detach().float(), labels, confident)

    @torch.no_grad()
    def refresh(self, features, labels, indices):
        confident = self.samples.confident[indices]
        for name, feats in features.items():
            self.bank(name).refresh(feats.float(), labels, confident)


def _bank_key(name: str) -> str:
    return name or "main"


def branch_dims(model: nn.Module, image_size: tuple[int, int]) -> dict[str, int]:
    """Feature width of each branch ("" for a single-branch model), from one dry forward pass."""
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    with torch.no_grad():
        out = model(torch.zeros(2, 3, *image_size, device=param.device, dtype=param.dtype))
    model.train(was_training)
    return {name: o.features.shape[1] for name, o in (out.branches or {"": out}).items()}


def build_objective(
    name: str,
    *,
    model: nn.Module,
    num_classes: int,
    num_samples: int,
    image_size: tuple[int, int],
    soft_ids: Tensor | None = None,
    soft_probs: Tensor | None = None,
    confident: Tensor | None = None,
    smoothing: float = 0.1,
    soft_smoothing: float = 0.0,
    ce_weight: float = 1.0,
    triplet_margin: float | str = 0.3,
    fat_margin: float = 0.1,
    fat_aggregation: str = "hardest",
    fat_cohesion: str = "mean",
    fat_cohesion_weight: float = 1.0,
    fat_negatives: str = "all_centres",
    fat_k: int = 5,
    fat_shortlist_refresh: int = 100,
    centre_update: str = "ema",
    centre_momentum: float = 0.9,
    target: str = "hard",
) -> Objective:
    """Build a named objective (one of :data:`OBJECTIVES`) from plain arguments.

    Args:
        name: ``ce`` (cross-entropy; ``target="soft"`` uses the soft labels),
            ``ce_triplet`` (label-smoothed CE + batch-hard triplet; with ``target="soft"``
            the CE uses the soft labels and the triplet the hard ones),
            ``ce_msml`` (label-smoothed CE + margin sample mining loss),
            ``ce_quadruplet`` (label-smoothed CE + hard-mined quadruplet loss) or
            ``fat_hybrid`` (normalised FAT + CE with ``target`` hard/smooth/soft).
        triplet_margin: the metric loss's margin for ``ce_triplet``, ``ce_msml``
            (both also take ``"soft"``) and ``ce_quadruplet`` (its triplet margin; the
            negative-pair margin is half of it).
        soft_smoothing: label smoothing of the soft targets (``target="soft"``).
        soft_ids / soft_probs: ``(N, k)`` teacher top-k class indices and probabilities, by dataset index.
        confident: ``(N,)`` bool, by dataset index: which samples build centres.
        fat_negatives / fat_k: ``fat_hybrid``'s negative set (``all_centres``,
            ``centre_shortlist`` or ``batch_hardest``) and its size k (also topk's k);
            see :class:`~fat_distill.losses.FATLoss`.
        fat_shortlist_refresh: steps between rebuilds of the centre short list
            with ``centre_update="ema"`` (epoch centres rebuild it at each refresh).
    """
    samples = SampleTable(num_samples, soft_ids, soft_probs, confident)
    if name == "ce":
        return ClassificationObjective(samples, smoothing=smoothing if target == "smooth" else 0.0,
                                       soft=target == "soft", soft_smoothing=soft_smoothing)
    if name == "ce_triplet":
        return MetricObjective(samples, BatchHardTripletLoss(triplet_margin), ce_weight=ce_weight, smoothing=smoothing,
                               soft=target == "soft", soft_smoothing=soft_smoothing)
    if name == "ce_msml":
        return MetricObjective(samples, MarginSampleMiningLoss(triplet_margin), ce_weight=ce_weight,
                               smoothing=smoothing)
    if name == "ce_quadruplet":
        if isinstance(triplet_margin, str):
            raise ValueError(f"objective 'ce_quadruplet' needs a numeric triplet_margin, got {triplet_margin!r}; "
                             "the soft margin is defined for ce_triplet and ce_msml only")
        return MetricObjective(samples, QuadrupletLoss(triplet_margin), ce_weight=ce_weight, smoothing=smoothing)
    if name == "fat_hybrid":
        fat = FATLoss.normalised(margin=fat_margin, aggregation=fat_aggregation, cohesion=fat_cohesion,
                                 cohesion_weight=fat_cohesion_weight, negatives=fat_negatives, k=fat_k)
        return FATObjective(samples, fat, num_classes=num_classes, branch_dims=branch_dims(model, image_size),
                            ce_weight=ce_weight, target=target, smoothing=smoothing, soft_smoothing=soft_smoothing,
                            centre_update=centre_update, momentum=centre_momentum,
                            shortlist_refresh=fat_shortlist_refresh)
    raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")


ObjectiveFactory = Callable[..., Objective]
