"""Euclidean (not squared) distances with finite gradients at zero distance."""

from __future__ import annotations

import torch
from torch import Tensor

# Squared distances are clamped to this before the square root: d/dx sqrt(x) is
# infinite at 0, so coincident points (all-equal or all-zero features, a sample
# sitting on its centre) would otherwise give NaN gradients. Below the clamp the
# gradient is exactly 0, which is the right answer for "already at distance 0".
SQUARED_DISTANCE_FLOOR = 1e-12


def squared_distance_matrix(x: Tensor, y: Tensor, normalize_x: bool = False) -> Tensor:
    """All-pairs squared Euclidean distances via one matrix product.

    ``|x|^2 + |y|^2 - 2 x.y`` costs one GEMM, O(N*M*D), and only O(N*M) beyond it,
    which is what makes batch-to-centre distances cheap. It loses precision to
    cancellation for nearly equal points (absolute error ~1e-7 * |x|^2 in float32),
    which is harmless for ranking and for the hinge losses but means distances
    below ~1e-3 * |x| are noise.

    Args:
        x: ``(N, D)``.
        y: ``(M, D)``.
        normalize_x: measure from ``x / max(|x|, 1e-12)`` (``F.normalize``) without
            materialising the normalised copy: the scale is applied to the
            ``(N, M)`` products instead of the ``(N, D)`` features, which saves
            memory passes over the larger tensor whenever M < D.

    Returns:
        ``(N, M)`` squared distances (may be slightly negative from rounding;
        clamp before a square root).
    """
    # Norms rather than (x * x).sum(): no (N, D) temporary, which on CPU is a fresh
    # allocation (and page faults) per call; the norm's gradient is 0 at 0. The
    # fused addmm / addcmul likewise save (N, M) temporaries.
    x_squared = torch.linalg.vector_norm(x, dim=1).square()
    y_squared = torch.linalg.vector_norm(y, dim=1).square()
    if not normalize_x:
        return torch.addmm(x_squared.unsqueeze(1) + y_squared.unsqueeze(0), x, y.t(), alpha=-2.0)
    # max(|x|, 1e-12) as F.normalize, clamped *before* the root so that a zero
    # row gets a zero (not NaN) gradient.
    scale = x_squared.clamp_min(1e-24).rsqrt()
    # |x / |x||^2 is constant (1, or 0 for a zero row): no gradient to carry.
    unit_squared = (x_squared * scale * scale).detach()
    base = unit_squared.unsqueeze(1) + y_squared.unsqueeze(0)
    return torch.addcmul(base, x @ y.t(), scale.unsqueeze(1), value=-2.0)


def distance_matrix(x: Tensor, y: Tensor) -> Tensor:
    """All-pairs Euclidean distances via one GEMM (see :func:`squared_distance_matrix`).

    Args:
        x: ``(N, D)``.
        y: ``(M, D)``.

    Returns:
        ``(N, M)`` distances, ``>= sqrt(SQUARED_DISTANCE_FLOOR)``.
    """
    return squared_distance_matrix(x, y).clamp_min(SQUARED_DISTANCE_FLOOR).sqrt()


def paired_distance(x: Tensor, y: Tensor) -> Tensor:
    """Euclidean distance between matching rows, from the explicit difference.

    Exact for nearly equal points and O(D) per pair, so gradients of selected pairs
    cost O(B*D) rather than a second GEMM.

    Args:
        x: ``(..., D)``.
        y: ``(..., D)``, broadcastable against ``x``.

    Returns:
        ``(...)`` distances, ``>= sqrt(SQUARED_DISTANCE_FLOOR)``.
    """
    difference = x - y
    return (difference * difference).sum(dim=-1).clamp_min(SQUARED_DISTANCE_FLOOR).sqrt()
