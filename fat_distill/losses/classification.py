"""Cross-entropy against hard, label-smoothed or soft (teacher) targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fat_distill.losses.output import (
    IdentityLoss,
    LossOutput,
    check_label_range,
    compute_dtype,
    fraction,
)

SoftTargets = Tensor | tuple[Tensor, Tensor]


def _check_logits(logits: Tensor, where: str) -> Tensor:
    if logits.dim() != 2 or logits.shape[0] == 0:
        raise ValueError(
            f"{where}: logits must be a non-empty (batch, num_classes) tensor, got shape {tuple(logits.shape)}"
        )
    if not logits.is_floating_point():
        raise TypeError(f"{where}: logits must be floating point, got {logits.dtype}")
    return logits.to(compute_dtype(logits))


def _ce_output(per_sample: Tensor, log_probs: Tensor, target_class: Tensor, name: str) -> LossOutput:
    loss = per_sample.mean()
    every = torch.ones_like(per_sample, dtype=torch.bool)
    return LossOutput(
        loss=loss,
        per_sample=per_sample.detach(),
        active_fraction=fraction(per_sample.detach() > 0, every),
        terms={name: loss.detach()},
        stats={"accuracy": (log_probs.detach().argmax(dim=1) == target_class).float().mean()},
    )


class LabelSmoothingCrossEntropy(IdentityLoss):
    """Cross-entropy with label smoothing (Szegedy et al.; torchreid's ``CrossEntropyLoss``).

    Target ``(1 - smoothing) * onehot(y) + smoothing / C``, the same as
    ``F.cross_entropy(..., label_smoothing=smoothing)``; ``smoothing=0`` is plain
    cross-entropy. Smoothing keeps the classifier from over-fitting identities
    with few images.

    Args:
        smoothing: epsilon in ``[0, 1)``.

    Output: ``per_sample`` is each sample's cross-entropy; ``terms`` ``{"ce"}``;
    ``stats`` ``{"accuracy"}`` (argmax == label).
    """

    def __init__(self, smoothing: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"LabelSmoothingCrossEntropy: smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = float(smoothing)

    def extra_repr(self) -> str:
        return f"smoothing={self.smoothing}"

    def compute(self, logits: Tensor, labels: Tensor) -> LossOutput:
        """Args:
            logits: ``(B, C)`` classifier outputs.
            labels: ``(B,)`` class indices in ``[0, C)``.
        """
        where = "LabelSmoothingCrossEntropy"
        logits = _check_logits(logits, where)
        if labels.dim() != 1 or labels.shape[0] != logits.shape[0] or labels.is_floating_point():
            raise ValueError(
                f"{where}: labels must be integer class indices of shape ({logits.shape[0]},), "
                f"got {labels.dtype} {tuple(labels.shape)}"
            )
        labels = labels.to(logits.device, torch.long)
        check_label_range(labels, logits.shape[1], where)
        log_probs = F.log_softmax(logits, dim=1)
        nll = -log_probs.gather(1, labels.unsqueeze(1)).squeeze(1)
        uniform = -log_probs.mean(dim=1)
        per_sample = (1.0 - self.smoothing) * nll + self.smoothing * uniform
        return _ce_output(per_sample, log_probs, labels, "ce")


def dense_soft_targets(soft_targets: SoftTargets, num_classes: int, where: str) -> Tensor:
    """Validate soft targets and return them dense.

    Args:
        soft_targets: ``(B, C)`` probabilities, or sparse top-k ``(ids, probs)``
            with ``ids`` ``(B, k)`` integer class indices (negative = padding,
            ignored) and ``probs`` ``(B, k)`` floats, as in the ``soft_labels``
            manifest.
        num_classes: C, the logits' width.
        where: caller name for error messages.

    Returns:
        ``(B, C)`` non-negative float tensor (not yet renormalised).
    """
    if isinstance(soft_targets, tuple):
        if len(soft_targets) != 2:
            raise ValueError(f"{where}: sparse soft targets must be (ids, probs), got {len(soft_targets)} items")
        ids, probs = soft_targets
        if ids.dim() != 2 or ids.shape != probs.shape or ids.is_floating_point():
            raise ValueError(
                f"{where}: sparse soft targets need integer ids and float probs of the same (B, k) "
                f"shape, got ids {ids.dtype} {tuple(ids.shape)}, probs {probs.dtype} {tuple(probs.shape)}"
            )
        ids = ids.long()
        if ids.numel() and int(ids.max()) >= num_classes:
            raise ValueError(
                f"{where}: soft-target ids must be < {num_classes} (the number of logits), "
                f"got max id {int(ids.max())}; the soft labels were made for another class set"
            )
        padding = ids < 0
        dense = torch.zeros(ids.shape[0], num_classes, dtype=compute_dtype(probs), device=probs.device)
        dense.scatter_add_(
            1, ids.clamp_min(0), torch.where(padding, torch.zeros_like(probs), probs).to(dense.dtype)
        )
    else:
        if soft_targets.dim() != 2 or soft_targets.shape[1] != num_classes:
            raise ValueError(
                f"{where}: dense soft targets must be (B, {num_classes}), got shape {tuple(soft_targets.shape)}"
            )
        dense = soft_targets.to(compute_dtype(soft_targets))
    if bool((dense < 0).any()):
        raise ValueError(f"{where}: soft targets must be probabilities (>= 0); found negative values")
    return dense


class SoftTargetCrossEntropy(IdentityLoss):
    """Cross-entropy against soft (teacher) targets: ``-sum_c q_c log softmax(z)_c``.

    Args:
        renormalize: rescale each target row to sum to 1. Top-k sparse targets
            drop the tail mass, which would otherwise shrink the loss scale by a
            sample-dependent factor. A row with zero mass is an error.
        smoothing: epsilon in ``[0, 1)``: the target becomes ``(1 - smoothing) * q + smoothing / C``
            (after renormalising), label smoothing applied to a soft target; 0 keeps ``q``.

    Output: ``per_sample`` is each sample's cross-entropy; ``terms`` ``{"ce"}``;
    ``stats`` ``{"accuracy"}`` (argmax of logits == argmax of target).
    """

    def __init__(self, renormalize: bool = True, smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"SoftTargetCrossEntropy: smoothing must be in [0, 1), got {smoothing}")
        self.renormalize = renormalize
        self.smoothing = float(smoothing)

    def extra_repr(self) -> str:
        return f"renormalize={self.renormalize}, smoothing={self.smoothing}"

    def compute(self, logits: Tensor, soft_targets: SoftTargets) -> LossOutput:
        """Args:
            logits: ``(B, C)`` classifier outputs.
            soft_targets: ``(B, C)`` probabilities or sparse ``(ids (B, k), probs (B, k))``.
        """
        where = "SoftTargetCrossEntropy"
        logits = _check_logits(logits, where)
        targets = dense_soft_targets(soft_targets, logits.shape[1], where).to(logits.device, logits.dtype)
        if targets.shape[0] != logits.shape[0]:
            raise ValueError(
                f"{where}: {targets.shape[0]} soft-target rows for {logits.shape[0]} logits rows"
            )
        if self.renormalize:
            mass = targets.sum(dim=1, keepdim=True)
            empty = (mass.squeeze(1) <= 0).nonzero().flatten()
            if empty.numel():
                raise ValueError(
                    f"{where}: soft-target rows {empty[:5].tolist()} have zero probability mass; "
                    "every sample needs at least one positive target probability"
                )
            targets = targets / mass
        predicted = targets.argmax(dim=1)
        if self.smoothing > 0:
            targets = (1 - self.smoothing) * targets + self.smoothing / targets.shape[1]
        log_probs = F.log_softmax(logits, dim=1)
        per_sample = -(targets * log_probs).sum(dim=1)
        return _ce_output(per_sample, log_probs, predicted, "ce")
