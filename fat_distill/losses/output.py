"""The result every loss returns: the scalar plus the per-sample terms it came from."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class LossOutput:
    """What a loss computed, for the optimiser and for the training log.

    Attributes:
        loss: 0-d tensor, differentiable; the value to call ``.backward()`` on.
            float32 for float16/bfloat16/float32 inputs, float64 for float64 inputs.
        per_sample: ``(B,)`` detached tensor: each sample's sample-level part of the
            loss before the batch reduction (what each loss averages is documented on
            the class). Samples that had no valid term (no positive, no negative, no
            valid centre) hold 0. Batch-level terms such as FAT's max-radius cohesion
            are not split across samples.
        active_fraction: 0-d detached tensor in [0, 1]: the fraction of the
            elementary terms the loss looked at (hinge terms, triplets, pairs,
            samples) that are non-zero, i.e. still push the embedding. With hard
            mining, watch this and the distance statistics rather than the loss value
            (Hermans et al., "In Defense of the Triplet Loss"). 0 when nothing was
            looked at.
        terms: named, *weighted* components as detached 0-d tensors; their sum
            equals ``loss`` (e.g. ``{"p2s": ..., "cohesion": ...}`` for FAT, where
            ``cohesion`` already includes its weight).
        stats: detached 0-d diagnostics that are not part of the sum (mean
            positive / negative distance, max radius, accuracy, ...).
    """

    loss: Tensor
    per_sample: Tensor
    active_fraction: Tensor
    terms: dict[str, Tensor]
    stats: dict[str, Tensor] = field(default_factory=dict)


class IdentityLoss(nn.Module, ABC):
    """Base class: ``compute(...)`` returns a :class:`LossOutput`, ``forward`` its scalar.

    ``loss_fn(...)`` therefore drops in wherever a plain PyTorch loss is expected,
    and ``loss_fn.compute(...)`` gives the detail a training loop logs. Subclasses
    implement only ``compute``.
    """

    @abstractmethod
    def compute(self, *args, **kwargs) -> LossOutput:
        """Compute the loss and its per-sample detail (arguments as in ``forward``)."""

    def forward(self, *args, **kwargs) -> Tensor:
        return self.compute(*args, **kwargs).loss


def compute_dtype(tensor: Tensor) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32.

    Half precision (float16/bfloat16) distances lose too much to cancellation in
    ``|x|^2 + |y|^2 - 2 x.y`` and overflow in squared norms, so losses upcast.
    """
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def check_embeddings_and_labels(
    embeddings: Tensor, labels: Tensor, where: str
) -> tuple[Tensor, Tensor]:
    """Validate shapes, upcast embeddings to the compute dtype, labels to int64.

    Args:
        embeddings: ``(B, D)`` floating tensor.
        labels: ``(B,)`` integer tensor.
        where: name of the calling loss, used in error messages.

    Returns:
        ``(embeddings, labels)`` as ``(B, D)`` float32/float64 and ``(B,)`` int64.
    """
    if embeddings.dim() != 2:
        raise ValueError(
            f"{where}: embeddings must be (batch, dim), got shape {tuple(embeddings.shape)}; "
            "flatten or pool the backbone output first"
        )
    if not embeddings.is_floating_point():
        raise TypeError(f"{where}: embeddings must be floating point, got {embeddings.dtype}")
    if embeddings.shape[0] == 0:
        raise ValueError(f"{where}: the batch is empty; check the sampler and the dataset split")
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"{where}: labels must be (batch,) = ({embeddings.shape[0]},) to match the "
            f"embeddings, got shape {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(
            f"{where}: labels must be an integer tensor of class indices, got {labels.dtype}"
        )
    return embeddings.to(compute_dtype(embeddings)), labels.to(device=embeddings.device, dtype=torch.long)


def check_label_range(labels: Tensor, num_classes: int, where: str) -> None:
    """Raise if any label is outside ``[0, num_classes)`` (saves a CUDA device assert)."""
    if labels.numel() == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"{where}: labels must be class indices in [0, {num_classes}), got values in "
            f"[{low}, {high}]; map the dataset's pids to contiguous indices first "
            "(distractors, pid 0, belong to the gallery, not to training)"
        )


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` holds; 0 (still in the graph) when it never does."""
    count = mask.sum().clamp_min(1)
    return torch.where(mask, values, torch.zeros_like(values)).sum() / count


def fraction(mask: Tensor, of: Tensor) -> Tensor:
    """``mask.sum() / of.sum()`` as a detached float tensor; 0 when ``of`` is empty."""
    return ((mask & of).sum() / of.sum().clamp_min(1)).detach().float()
