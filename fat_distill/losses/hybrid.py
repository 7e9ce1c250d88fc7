"""Hybrid loss: FAT plus cross-entropy, the student's objective in SPEC §1.1-1.2."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from fat_distill.losses.centre_bank import CentreBank
from fat_distill.losses.classification import (
    LabelSmoothingCrossEntropy,
    SoftTargetCrossEntropy,
    SoftTargets,
)
from fat_distill.losses.fat import FATLoss
from fat_distill.losses.output import IdentityLoss, LossOutput


class HybridFATLoss(IdentityLoss):
    """``L = L_FAT + ce_weight * CE(logits, target)``.

    The paper adds cross-entropy to normalised FAT because it stabilises training;
    with teacher soft labels as the CE target this is the distilled student's loss.

    Args:
        fat: the FAT part, usually ``FATLoss.normalised()``.
        ce_weight: lambda_ce (1.0 in the reference settings).
        target: ``"hard"`` one-hot labels, ``"smooth"`` label-smoothed labels, or
            ``"soft"`` teacher probabilities passed as ``soft_targets``.
        smoothing: epsilon for ``target="smooth"``.
        soft_smoothing: epsilon of label smoothing on the soft targets (``target="soft"``; 0 = as given).

    Output: ``per_sample`` is ``p2s(i) + ce_weight * ce(i)``; ``terms`` are
    ``{"p2s", "cohesion", "ce"}`` (weighted, summing to the loss);
    ``active_fraction`` is FAT's; ``stats`` are FAT's plus ``accuracy``.
    """

    def __init__(
        self,
        fat: FATLoss,
        ce_weight: float = 1.0,
        target: Literal["hard", "smooth", "soft"] = "hard",
        smoothing: float = 0.1,
        soft_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(fat, FATLoss):
            raise TypeError(f"HybridFATLoss: fat must be a FATLoss, got {type(fat).__name__}")
        if target not in ("hard", "smooth", "soft"):
            raise ValueError(f"HybridFATLoss: target must be 'hard', 'smooth' or 'soft', got {target!r}")
        if ce_weight < 0:
            raise ValueError(f"HybridFATLoss: ce_weight must be >= 0, got {ce_weight}")
        self.fat = fat
        self.ce_weight = float(ce_weight)
        self.target = target
        self.smoothing = float(smoothing)
        if target == "soft":
            self.cross_entropy: IdentityLoss = SoftTargetCrossEntropy(smoothing=soft_smoothing)
        else:
            self.cross_entropy = LabelSmoothingCrossEntropy(smoothing if target == "smooth" else 0.0)

    def extra_repr(self) -> str:
        return f"ce_weight={self.ce_weight}, target={self.target!r}, smoothing={self.smoothing}"

    def compute(
        self,
        embeddings: Tensor,
        logits: Tensor,
        labels: Tensor,
        centres: CentreBank | Tensor,
        soft_targets: SoftTargets | None = None,
        valid: Tensor | None = None,
    ) -> LossOutput:
        """Args:
            embeddings: ``(B, D)`` embeddings for FAT.
            logits: ``(B, C)`` classifier outputs for CE.
            labels: ``(B,)`` class indices (FAT's positives; CE target unless soft).
            centres: :class:`CentreBank` or ``(C, D)`` tensor (see :class:`FATLoss`).
            soft_targets: required iff ``target="soft"``: ``(B, C)`` probabilities
                or sparse ``(ids (B, k), probs (B, k))``.
            valid: optional ``(C,)`` bool with a centre tensor.
        """
        if self.target == "soft" and soft_targets is None:
            raise ValueError("HybridFATLoss(target='soft'): pass the teacher's soft_targets")
        if self.target != "soft" and soft_targets is not None:
            raise ValueError(
                f"HybridFATLoss(target={self.target!r}) would ignore the soft_targets given; "
                "build it with target='soft' to train on them"
            )
        if logits.shape[0] != embeddings.shape[0]:
            raise ValueError(
                f"HybridFATLoss: {logits.shape[0]} logits rows for {embeddings.shape[0]} embeddings"
            )
        fat_out = self.fat.compute(embeddings, labels, centres, valid)
        if self.target == "soft":
            ce_out = self.cross_entropy.compute(logits, soft_targets)
        else:
            ce_out = self.cross_entropy.compute(logits, labels)
        weighted_ce = self.ce_weight * ce_out.loss
        return LossOutput(
            loss=fat_out.loss + weighted_ce,
            per_sample=fat_out.per_sample + self.ce_weight * ce_out.per_sample,
            active_fraction=fat_out.active_fraction,
            terms={**fat_out.terms, "ce": weighted_ce.detach()},
            stats={**fat_out.stats, **ce_out.stats},
        )
