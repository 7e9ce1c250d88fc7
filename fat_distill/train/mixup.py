"""Mixup for identity batches: blend each image with another of the batch, and the loss with its label.

Zhang et al., "mixup: Beyond Empirical Risk Minimization" (ICLR 2018): training on
``x̃ = λ·x_i + (1−λ)·x_j`` with the loss ``λ·L(y_i) + (1−λ)·L(y_j)`` keeps a network
from memorising single samples, which is how it fits noisy labels.

Metric losses need one identity per sample (the P×K sampler, batch mining, FAT
centres), so λ is folded to ``max(λ, 1−λ) >= 0.5``: every blended image is mostly
its own sample, keeps its own label for mining and centre updates, and the second
term scores the same features against the partner's labels, targets and indices.
The loss is linear in the two objective calls, so any :class:`~fat_distill.train.objectives.Objective`
(hard, smoothed or soft cross-entropy, batch hard, FAT) mixes without knowing it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fat_distill.losses.output import LossOutput

#: Mixed into the seed, so mixup's draws are a stream of their own beside the augmentations of the same batch.
_STREAM = 0x6D6978


@dataclass(frozen=True)
class MixupParams:
    """One batch's draw: ``lam`` in [0.5, 1] and ``perm``, the partner index of each sample."""

    lam: float
    perm: Tensor


def mixup_params(batch_size: int, alpha: float, *, seed: int, epoch: int, batch: int,
                 device: torch.device | str = "cpu") -> MixupParams:
    """λ ~ Beta(α, α) folded to ``max(λ, 1−λ)`` and a random permutation, seeded by ``(seed, epoch, batch)``.

    A resumed run draws the same λ and partners for the same batch.

    Raises:
        ValueError: ``alpha <= 0`` or ``batch_size < 1``.
    """
    if alpha <= 0:
        raise ValueError(f"mixup alpha must be > 0, got {alpha}")
    if batch_size < 1:
        raise ValueError(f"mixup needs a batch of at least 1 sample, got {batch_size}")
    rng = np.random.default_rng([int(seed) % 2**64, int(epoch), int(batch), _STREAM])
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(batch_size)).to(device)
    return MixupParams(lam=max(lam, 1.0 - lam), perm=perm)


def mix_images(images: Tensor, params: MixupParams) -> Tensor:
    """``λ·images + (1−λ)·images[perm]`` (float images, any device)."""
    if not images.is_floating_point():
        raise TypeError(f"mixup blends normalised float images, got {images.dtype}; augment (normalise) first")
    return images.mul(params.lam).add_(images[params.perm], alpha=1.0 - params.lam)


def mixup_loss(objective, output, labels: Tensor, indices: Tensor, params: MixupParams) -> LossOutput:
    """``λ·objective(output, labels) + (1−λ)·objective(output, labels[perm])`` on the blended batch's output.

    The partner term looks up the partner's per-sample data (soft targets) through ``indices[perm]``.
    Terms and statistics are mixed with the same weights, so the training log reads as without mixup.
    """
    own = objective.compute(output, labels, indices)
    if params.lam >= 1.0:
        return own
    partner = objective.compute(output, labels[params.perm], indices[params.perm])
    lam = params.lam

    def blend(a, b):
        return lam * a + (1.0 - lam) * b

    return LossOutput(
        loss=blend(own.loss, partner.loss),
        per_sample=blend(own.per_sample, partner.per_sample),
        active_fraction=blend(own.active_fraction.float(), partner.active_fraction.float()),
        terms={k: blend(v, partner.terms[k]) if k in partner.terms else v for k, v in own.terms.items()},
        stats={k: blend(v, partner.stats[k]) if k in partner.stats else v for k, v in own.stats.items()},
    )
