"""Structured sparsity for feature-selection layers: the group-lasso (L2,1) norm and its proximal step.

JLML (Li, Zhu & Gong, IJCAI 2017) regularises each branch's feature-selection
layer so that whole input features are switched off rather than individual
weights shrunk, which makes the joint local/global learning less sensitive to
noisy and correlated features. For a weight ``W`` of shape ``(out, in)`` (a
``torch.nn.Linear``), group ``g`` is a set of input columns and::

    ||W||_{2,1} = sum_g sqrt(|g|) * ||W[:, g]||_F

A subgradient step only makes such groups small; the proximal step
(group soft-thresholding) makes them exactly zero, which is what lets one read
the selected features off the weights. Training applies it after each optimiser
step (``TrainConfig.group_lasso_weight``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _group_ids(weight: Tensor, groups: Tensor | None) -> tuple[Tensor, int]:
    if weight.ndim != 2:
        raise ValueError(f"group lasso expects a (out, in) weight matrix, got shape {tuple(weight.shape)}")
    if groups is None:
        return torch.arange(weight.shape[1], device=weight.device), weight.shape[1]
    groups = torch.as_tensor(groups, device=weight.device).long()
    if groups.shape != (weight.shape[1],):
        raise ValueError(f"groups must give one group id per input column ({weight.shape[1]}), "
                         f"got shape {tuple(groups.shape)}")
    if len(groups) and int(groups.min()) < 0:
        raise ValueError("group ids must be >= 0")
    return groups, int(groups.max()) + 1 if len(groups) else 0


def group_norms(weight: Tensor, groups: Tensor | None = None) -> Tensor:
    """The Frobenius norm of each group of input columns.

    Args:
        weight: ``(out, in)``.
        groups: ``(in,)`` group id of each input column (ids ``0..G-1``); ``None``
            makes every input column its own group (selects input features).

    Returns:
        ``(G,)`` norms (0 for a group id with no column).
    """
    ids, count = _group_ids(weight, groups)
    squares = weight.float().pow(2).sum(dim=0)
    per_group = torch.zeros(count, dtype=squares.dtype, device=weight.device).index_add(0, ids, squares)
    # sqrt'(0) is infinite: clamp inside so groups that are already zero get a zero gradient, not NaN.
    return per_group.clamp_min(torch.finfo(per_group.dtype).tiny).sqrt() * (per_group > 0)


def _group_sizes(ids: Tensor, count: int) -> Tensor:
    return torch.zeros(count, device=ids.device).index_add(0, ids, torch.ones(len(ids), device=ids.device))


def group_l21_norm(weight: Tensor, groups: Tensor | None = None) -> Tensor:
    """``sum_g sqrt(|g|) * ||W[:, g]||_F``, differentiable.

    Args:
        weight: ``(out, in)``.
        groups: ``(in,)`` group ids, or ``None`` for one group per input column.

    Returns:
        A 0-d float32 tensor.
    """
    ids, count = _group_ids(weight, groups)
    return (group_norms(weight, ids) * _group_sizes(ids, count).sqrt()).sum()


@torch.no_grad()
def prox_group_l21_(weight: Tensor, threshold: float, groups: Tensor | None = None) -> int:
    """In place, the proximal step of ``threshold * ||W||_{2,1}`` (group soft-thresholding).

    Each group is scaled by ``max(0, 1 - threshold * sqrt(|g|) / ||W[:, g]||)``:
    groups whose norm is at most ``threshold * sqrt(|g|)`` become exactly zero.
    After a gradient step of size ``lr``, ``threshold = lr * weight_of_penalty``
    makes the pair a proximal-gradient step.

    Args:
        weight: ``(out, in)``, modified in place.
        threshold: ``>= 0``.
        groups: ``(in,)`` group ids, or ``None`` for one group per input column.

    Returns:
        The number of groups that are zero afterwards.
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    ids, count = _group_ids(weight, groups)
    norms = group_norms(weight, ids)
    limit = threshold * _group_sizes(ids, count).sqrt()
    scale = torch.where(norms > limit, 1 - limit / norms.clamp_min(1e-30), torch.zeros_like(norms))
    weight.mul_(scale[ids].to(weight.dtype).unsqueeze(0))
    return int((norms <= limit).sum())


def zero_group_fraction(weight: Tensor, groups: Tensor | None = None) -> float:
    """Share of groups whose weights are all exactly zero (the features a layer has deselected)."""
    ids, count = _group_ids(weight, groups)
    if count == 0:
        return 0.0
    present = _group_sizes(ids, count) > 0
    zero = torch.zeros(count, dtype=torch.bool, device=weight.device)
    zero[present] = True
    nonzero_columns = (weight != 0).any(dim=0)
    zero.index_fill_(0, ids[nonzero_columns], False)
    return float(zero[present].float().mean())
