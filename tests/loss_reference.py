"""What the brute-force loss references share: the distance between two samples, as the library defines it."""

from __future__ import annotations

import torch

FLOOR = 1e-12  # the library's squared-distance clamp, part of the distance's definition


def dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of two vectors with the squared distance clamped at ``FLOOR`` (finite gradients at 0)."""
    return torch.sqrt(((a - b) ** 2).sum().clamp_min(FLOOR))
