"""Euclidean (not squared) distances with finite gradients at zero distance."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
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



# torch warns once per process that sparse CSR tensors are "beta"; the one use
# here (a sampling pattern for sampled_addmm) is covered by our own tests.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state", category=UserWarning)


def _sampled_dots(a: Tensor, b: Tensor, crow: Tensor, col: Tensor) -> Tensor:
    """``a[r] . b[col[n]]`` for every entry ``n`` of a CSR pattern (rows of ``a`` by ``crow``).

    One SDDMM (``torch.sparse.sampled_addmm``): reads only the rows it needs and
    writes one value per entry, never an (entries, D) gathered copy.
    """
    pattern = torch.sparse_csr_tensor(
        crow, col, a.new_zeros(col.numel()), size=(a.shape[0], b.shape[0]), check_invariants=False
    )
    return torch.sparse.sampled_addmm(pattern, a, b.t(), beta=0.0).values()


def _row_squared_norms(table: Tensor, rows: Tensor) -> Tensor:
    """``(M,)`` squared norms of ``table``'s ``rows`` (sorted, distinct), 0 elsewhere: O(len(rows)*D), not O(M*D)."""
    num_rows = table.shape[0]
    crow = torch.zeros(num_rows + 1, dtype=torch.long, device=table.device)
    crow[rows + 1] = 1
    crow = crow.cumsum(0)
    squared = table.new_zeros(num_rows)
    squared[rows] = _sampled_dots(table, table, crow, rows)
    return squared


class _GatheredSquaredDistances(torch.autograd.Function):
    """Squared distances from ``x[i]`` to ``table[index[i, j]]``; see :func:`gathered_squared_distances`."""

    @staticmethod
    def forward(ctx, x, table, index, present, normalize_x, table_scale, table_squared):
        rows, width = index.shape
        x_squared = torch.linalg.vector_norm(x, dim=1).square()
        # CSR wants each row's columns sorted and distinct; absent entries sort last and are dropped.
        key = index.masked_fill(~present, table.shape[0])
        sorted_columns, order = key.sort(dim=1)
        keep = sorted_columns < table.shape[0]
        if bool((keep[:, 1:] & (sorted_columns[:, 1:] == sorted_columns[:, :-1])).any()):
            raise ValueError("gathered_squared_distances: a row of index names the same table row twice")
        crow = torch.zeros(rows + 1, dtype=torch.long, device=x.device)
        crow[1:] = keep.sum(dim=1).cumsum(0)
        columns = sorted_columns[keep]
        in_order = x.new_zeros(rows, width)
        in_order[keep] = _sampled_dots(x, table, crow, columns)
        dots = torch.empty_like(in_order).scatter_(1, order, in_order)

        safe_index = index.masked_fill(~present, 0)
        if table_squared is None:
            table_squared = _row_squared_norms(table, columns.unique())
        row_squared = table_squared.to(x.dtype)[safe_index]
        row_scale = None
        if table_scale is not None:
            row_scale = table_scale.to(x.dtype)[safe_index]
            dots = dots * row_scale
            row_squared = row_squared * row_scale * row_scale
        if normalize_x:
            scale = x_squared.clamp_min(1e-24).rsqrt()
            # |x / |x||^2 is constant (1, or 0 for a zero row): no gradient to carry.
            out = (x_squared * scale * scale).unsqueeze(1) + row_squared - 2.0 * scale.unsqueeze(1) * dots
        else:
            scale = None
            out = x_squared.unsqueeze(1) + row_squared - 2.0 * dots
        ctx.normalize_x = normalize_x
        ctx.save_for_backward(x, table, safe_index, present, dots, x_squared, scale, row_scale)
        return out.masked_fill(~present, 0.0)

    @staticmethod
    def backward(ctx, grad_out):
        x, table, safe_index, present, dots, x_squared, scale, row_scale = ctx.saved_tensors
        grad_out = grad_out.masked_fill(~present, 0.0)
        # d out[i, j] / d x[i] = -2 s_i t'_j + (2 s_i^3 q_ij x_i if normalised else 2 x_i), with
        # t'_j the (scaled) table row, q_ij = x_i . t'_j and s_i = 1 / |x_i|. The sum over j of
        # the first part is an embedding bag: the gathered rows are never materialised.
        weights = -2.0 * grad_out
        if row_scale is not None:
            weights = weights * row_scale
        if ctx.normalize_x:
            weights = weights * scale.unsqueeze(1)
            # Below the clamp s is constant (F.normalize's eps): no gradient through it.
            coefficient = torch.where(
                x_squared >= 1e-24, 2.0 * scale.pow(3) * (grad_out * dots).sum(dim=1), torch.zeros_like(x_squared)
            )
        else:
            coefficient = 2.0 * grad_out.sum(dim=1)
        grad_x = F.embedding_bag(safe_index, table, per_sample_weights=weights, mode="sum")
        grad_x.addcmul_(x, coefficient.unsqueeze(1))
        return grad_x, None, None, None, None, None, None


def gathered_squared_distances(
    x: Tensor,
    table: Tensor,
    index: Tensor,
    present: Tensor | None = None,
    normalize_x: bool = False,
    table_scale: Tensor | None = None,
    table_squared: Tensor | None = None,
) -> Tensor:
    """Squared distances from each row of ``x`` to its own few rows of a constant table.

    ``out[i, j] = |x_i - t_{index[i, j]}|^2`` with ``x_i`` L2-normalised when
    ``normalize_x`` (as ``F.normalize``) and ``t_r = table_scale[r] * table[r]``,
    computed as ``|x|^2 + |t|^2 - 2 x.t`` like :func:`squared_distance_matrix`,
    in O(N*m*D) multiply-adds: one sampled matrix product forward (reading only
    the named rows) and one embedding bag backward, never a gathered
    ``(N, m, D)`` copy and never a pass over the whole table. This is what lets
    each sample's short list of negatives cost O(B*k*D) instead of a (B, C) GEMM.

    The gradient flows to ``x`` only; ``table``, ``table_scale`` and
    ``table_squared`` are constants (FAT's centres, or detached in-batch samples).

    Args:
        x: ``(N, D)`` float32 or float64.
        table: ``(M, D)``; cast to ``x``'s dtype.
        index: ``(N, m)`` int64 row indices into ``table``; each row's present
            entries must be distinct.
        present: optional ``(N, m)`` bool; absent entries (any index value,
            e.g. ``-1`` padding) are not computed, hold 0 and get no gradient.
        normalize_x: measure from ``x / max(|x|, 1e-12)``.
        table_scale: optional ``(M,)`` per-row factor of the table (e.g. the
            inverse norms of detached samples, to measure between unit vectors).
        table_squared: optional ``(M,)`` squared norms of the *unscaled* table
            rows when the caller has them; otherwise computed for the rows used.

    Returns:
        ``(N, m)`` squared distances (may be slightly negative from rounding;
        clamp before a square root).
    """
    if x.dim() != 2 or table.dim() != 2 or x.shape[1] != table.shape[1]:
        raise ValueError(
            f"gathered_squared_distances: x must be (N, D) and table (M, D), got {tuple(x.shape)} "
            f"and {tuple(table.shape)}"
        )
    if index.dim() != 2 or index.shape[0] != x.shape[0] or index.dtype != torch.long:
        raise ValueError(
            f"gathered_squared_distances: index must be an int64 (N={x.shape[0]}, m) tensor, "
            f"got {index.dtype} {tuple(index.shape)}"
        )
    if present is None:
        present = torch.ones_like(index, dtype=torch.bool)
    elif present.shape != index.shape or present.dtype != torch.bool:
        raise ValueError(
            f"gathered_squared_distances: present must be a bool tensor of shape {tuple(index.shape)}, "
            f"got {present.dtype} {tuple(present.shape)}"
        )
    if index.numel() == 0:
        return x.new_zeros(index.shape) + 0.0 * x.sum()
    low, high = torch.aminmax(index.masked_fill(~present, 0))
    if int(low) < 0 or int(high) >= table.shape[0]:
        raise ValueError(f"gathered_squared_distances: present index entries must lie in [0, {table.shape[0]})")
    table = table.detach().to(x.dtype).contiguous()
    return _GatheredSquaredDistances.apply(
        x.contiguous(), table, index, present, normalize_x,
        None if table_scale is None else table_scale.detach(),
        None if table_squared is None else table_squared.detach(),
    )
