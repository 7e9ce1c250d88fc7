"""FAT: the fast-approximated triplet loss against dataset-level identity centres."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from fat_distill.losses.centre_bank import CENTRE_MODES, CentreBank, nearest_centres
from fat_distill.losses.distances import SQUARED_DISTANCE_FLOOR, gathered_squared_distances, squared_distance_matrix
from fat_distill.losses.output import (
    IdentityLoss,
    LossOutput,
    check_embeddings_and_labels,
    check_label_range,
    fraction,
    masked_mean,
)

Aggregation = Literal["hardest", "mean", "topk"]
Cohesion = Literal["max_radius", "mean"]
Negatives = Literal["all_centres", "centre_shortlist", "batch_hardest"]
NEGATIVES = ("all_centres", "centre_shortlist", "batch_hardest")


def _root(squared: Tensor) -> Tensor:
    return squared.clamp_min(SQUARED_DISTANCE_FLOOR).sqrt()


class FATLoss(IdentityLoss):
    """Fast-Approximated Triplet loss (Yuan et al., arXiv 1912.07863), SPEC §1.1.

    Bounds the triplet ``d(a,p) - d(a,n)`` by point-to-set distances to identity
    centres plus cluster radii, and minimises the bound::

        p2s(i)  = agg_{n in N(i)} [ d(f_i, c_{y_i}) - d(f_i, n) + margin ]_+
        L_coh   = max_i d(f_i, c_{y_i})        ("max_radius": largest radius among the
                                                batch's clusters, the paper)
                | mean_i d(f_i, c_{y_i})       ("mean": the authors' code)
        L_FAT   = mean_i p2s(i) + cohesion_weight * L_coh

    The positive is always the sample's own centre. The negatives ``N(i)``
    (``negatives``; the reference code's ``--neg-set``):

    - ``"all_centres"`` (default, ``ctrdAll``): every other valid centre. Exact;
      O(B*C*D): one (B, C) distance GEMM forward and one backward.
    - ``"centre_shortlist"`` (``ctrdHM``): the ``k`` valid centres nearest to the
      sample's *own class centre*, from the neighbour list a :class:`CentreBank`
      keeps (``loss.new_centre_bank(...)`` builds one with ``k`` neighbours and
      documents when the list is rebuilt). An approximation of ``"all_centres"``:
      a centre close to the sample but not to its class centre is missed. O(B*k*D)
      per step: each sample's k centres are gathered, no (B, C) matrix. With a
      centre *tensor* instead of a bank the list is computed on every call
      (O(C^2*D)), which is only meant for tests and small C.
    - ``"batch_hardest"`` (``batchNeg``, the reference code's default): the ``k``
      in-batch samples of other identities nearest to the sample, detached (no
      gradient through the negative, as in the reference), measured between
      normalised features when ``normalize``. O(B^2*D) for the mining GEMM (no
      gradient) plus O(B*k*D). Needs no negative centre; a batch of one identity
      has no negatives.

    ``aggregation`` over ``N(i)``: ``"hardest"`` takes the negative nearest to the
    sample; ``"mean"`` the mean over the *violating* ones (non-zero hinges, 0 if
    none); ``"topk"`` the mean of the hinges at the ``k`` nearest to the sample.
    With ``"centre_shortlist"`` and ``"batch_hardest"`` ``N(i)`` already holds
    (at most) ``k`` negatives, so ``"topk"`` is the mean over all of them: the
    reference code's reduction (``F.triplet_margin_loss`` averaged over its 5
    negatives). Where a sample has fewer than ``k`` negatives (few valid centres,
    padding in the list, few other identities in the batch) it averages over
    those it has; the reference code instead cuts every sample of the batch to
    the smallest such count.

    Centres are dataset-level and detached; gradient flows through the embeddings
    only. (Distances come from ``|f|^2 + |c|^2 - 2 f.c``, so in float32 distances
    below ~1e-3 * |f| are rounding noise; see ``squared_distance_matrix``.)

    ``normalize=True, centre_mode=4, margin=0.1`` is normalised FAT; use
    :meth:`FATLoss.normalised`.

    Args:
        margin: hinge margin m (1.0 for raw features, ~0.1 normalised).
        normalize: L2-normalise the embeddings before measuring distances.
        centre_mode: which of the paper's centre modes the centres must have been
            built with (see ``CENTRE_MODES``); a :class:`CentreBank` with another
            mode is refused. Default: 4 if ``normalize`` else 1.
        aggregation: ``"hardest"``, ``"mean"`` or ``"topk"`` (see above).
        k: negatives per sample for ``"centre_shortlist"`` and ``"batch_hardest"``,
            and for ``"topk"`` (the reference code uses 5).
        cohesion: ``"max_radius"`` or ``"mean"`` (see above).
        cohesion_weight: lambda_coh (reference code: 0.1 raw, 1.0 normalised).
        negatives: ``"all_centres"``, ``"centre_shortlist"`` or ``"batch_hardest"``.

    Samples whose own class has no valid centre are skipped entirely; samples with
    no negative contribute only to cohesion. ``mean_i`` is over the samples that
    have a p2s term.

    Output (``compute``): ``per_sample`` is p2s(i); ``terms`` are ``{"p2s",
    "cohesion"}`` (cohesion weighted); ``active_fraction`` counts the hinge terms
    the aggregation looked at (one per sample for hardest, k for topk, every
    negative in ``N(i)`` for mean); ``stats`` has ``pos_dist`` (mean distance to
    own centre), ``neg_dist`` (mean distance to the nearest negative in ``N(i)``,
    a centre or, for ``"batch_hardest"``, a sample), ``max_radius``.
    """

    def __init__(
        self,
        margin: float = 1.0,
        normalize: bool = False,
        centre_mode: int | None = None,
        aggregation: Aggregation = "hardest",
        k: int = 5,
        cohesion: Cohesion = "max_radius",
        cohesion_weight: float = 0.1,
        negatives: Negatives = "all_centres",
    ) -> None:
        super().__init__()
        if centre_mode is None:
            centre_mode = 4 if normalize else 1
        if centre_mode not in CENTRE_MODES:
            raise ValueError(f"FATLoss: centre_mode must be one of {sorted(CENTRE_MODES)}, got {centre_mode!r}")
        if aggregation not in ("hardest", "mean", "topk"):
            raise ValueError(f"FATLoss: aggregation must be 'hardest', 'mean' or 'topk', got {aggregation!r}")
        if cohesion not in ("max_radius", "mean"):
            raise ValueError(f"FATLoss: cohesion must be 'max_radius' or 'mean', got {cohesion!r}")
        if negatives not in NEGATIVES:
            raise ValueError(f"FATLoss: negatives must be one of {', '.join(map(repr, NEGATIVES))}, got {negatives!r}")
        if k < 1:
            raise ValueError(f"FATLoss: k must be >= 1, got {k}")
        if cohesion_weight < 0:
            raise ValueError(f"FATLoss: cohesion_weight must be >= 0, got {cohesion_weight}")
        self.margin = float(margin)
        self.normalize = normalize
        self.centre_mode = centre_mode
        self.aggregation = aggregation
        self.k = k
        self.cohesion = cohesion
        self.cohesion_weight = float(cohesion_weight)
        self.negatives = negatives

    @classmethod
    def normalised(cls, margin: float = 0.1, **overrides) -> FATLoss:
        """Normalised FAT: L2-normalised features, centre mode 4, margin 0.1."""
        overrides.setdefault("centre_mode", 4)
        return cls(margin=margin, normalize=True, **overrides)

    def new_centre_bank(
        self,
        num_classes: int,
        dim: int,
        mode: Literal["epoch", "ema"] = "ema",
        momentum: float = 0.9,
        shortlist_refresh: int = 100,
    ) -> CentreBank:
        """A :class:`CentreBank` built with this loss's centre mode.

        With ``negatives="centre_shortlist"`` the bank keeps each centre's ``k``
        nearest centres, rebuilt at each :meth:`CentreBank.refresh` and, with
        ``mode="ema"``, every ``shortlist_refresh`` updates.
        """
        if self.negatives != "centre_shortlist":
            return CentreBank(num_classes, dim, mode=mode, momentum=momentum, centre_mode=self.centre_mode)
        return CentreBank(
            num_classes, dim, mode=mode, momentum=momentum, centre_mode=self.centre_mode,
            shortlist_k=self.k, shortlist_refresh=shortlist_refresh,
        )

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, normalize={self.normalize}, centre_mode={self.centre_mode}, "
            f"aggregation={self.aggregation!r}, k={self.k}, cohesion={self.cohesion!r}, "
            f"cohesion_weight={self.cohesion_weight}, negatives={self.negatives!r}"
        )

    def _resolve_centres(self, centres: CentreBank | Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
        if isinstance(centres, CentreBank):
            if valid is not None:
                raise ValueError("FATLoss: pass `valid` only with a centre tensor; a CentreBank carries its own")
            if centres.centre_mode != self.centre_mode:
                raise ValueError(
                    f"FATLoss: the CentreBank was built with centre_mode={centres.centre_mode} "
                    f"({CENTRE_MODES[centres.centre_mode]}) but this loss expects "
                    f"centre_mode={self.centre_mode} ({CENTRE_MODES[self.centre_mode]}); build the bank "
                    "with loss.new_centre_bank(...) or pass the matching centre_mode to FATLoss"
                )
            if self.negatives == "centre_shortlist" and centres.shortlist_k < self.k:
                raise ValueError(
                    f"FATLoss(negatives='centre_shortlist', k={self.k}): the CentreBank keeps "
                    f"{centres.shortlist_k} neighbours per centre; build it with loss.new_centre_bank(...) "
                    f"or CentreBank(..., shortlist_k={self.k})"
                )
            return centres.centres, centres.valid
        if not isinstance(centres, Tensor) or centres.dim() != 2:
            raise TypeError(
                "FATLoss: centres must be a CentreBank or a (num_classes, dim) tensor, got "
                f"{type(centres).__name__}{'' if not isinstance(centres, Tensor) else tuple(centres.shape)}"
            )
        if valid is None:
            valid = torch.ones(centres.shape[0], dtype=torch.bool, device=centres.device)
        elif valid.dtype != torch.bool or valid.shape != (centres.shape[0],):
            raise ValueError(
                f"FATLoss: valid must be a bool tensor of shape ({centres.shape[0]},), "
                f"got {valid.dtype} {tuple(valid.shape)}"
            )
        return centres, valid

    def compute(
        self,
        embeddings: Tensor,
        labels: Tensor,
        centres: CentreBank | Tensor,
        valid: Tensor | None = None,
    ) -> LossOutput:
        """FAT loss of a batch against dataset-level centres.

        Args:
            embeddings: ``(B, D)`` batch embeddings (any floating dtype; half
                precision is computed in float32).
            labels: ``(B,)`` class indices in ``[0, C)``.
            centres: a :class:`CentreBank`, or a ``(C, D)`` centre tensor.
            valid: with a centre tensor, optional ``(C,)`` bool of usable centres.

        Returns:
            :class:`LossOutput`.
        """
        features, labels = check_embeddings_and_labels(embeddings, labels, "FATLoss")
        centre_tensor, valid = self._resolve_centres(centres, valid)
        num_classes, dim = centre_tensor.shape
        if dim != features.shape[1]:
            raise ValueError(
                f"FATLoss: embeddings have dim {features.shape[1]} but centres have dim {dim}; "
                "build the centres from the same embedding head"
            )
        check_label_range(labels, num_classes, "FATLoss")
        if centre_tensor.device != features.device:
            raise ValueError(
                f"FATLoss: centres are on {centre_tensor.device} but embeddings on {features.device}; "
                "move the CentreBank (or centre tensor) once with .to(embeddings.device) rather than "
                "copying the centres every step"
            )
        valid = valid.to(features.device)
        centre_tensor = centre_tensor.detach()
        if not isinstance(centres, CentreBank):
            # Invalid rows of a user tensor may hold anything (NaN included); zero them
            # so that even masked-out terms cannot carry NaN into the gradient. A
            # bank's invalid rows are zero by construction.
            centre_tensor = torch.where(valid.unsqueeze(1), centre_tensor, 0.0)
        centre_tensor = centre_tensor.to(features.dtype)
        own_valid = valid[labels]

        if self.negatives == "all_centres":
            pos_squared, squared, candidates = self._all_centres(features, labels, centre_tensor, valid)
        elif self.negatives == "centre_shortlist":
            shortlist = (
                centres.shortlist[:, : self.k] if isinstance(centres, CentreBank)
                else nearest_centres(centre_tensor, valid, self.k)
            )
            pos_squared, squared, candidates = self._centre_shortlist(
                features, labels, centre_tensor, valid, shortlist
            )
        else:
            pos_squared, squared, candidates = self._batch_hardest(features, labels, centre_tensor)
        pos_dist = _root(pos_squared)
        counted = own_valid & candidates.any(dim=1)
        p2s, considered, active, nearest_dist = self._aggregate(pos_dist, squared, candidates, counted)

        p2s_loss = masked_mean(p2s, counted)
        if self.cohesion == "mean":
            cohesion = masked_mean(pos_dist, own_valid)
        else:
            cohesion = torch.where(own_valid, pos_dist, torch.zeros_like(pos_dist)).amax()
        weighted_cohesion = self.cohesion_weight * cohesion
        loss = p2s_loss + weighted_cohesion

        pos_detached = pos_dist.detach()
        return LossOutput(
            loss=loss,
            per_sample=torch.where(counted, p2s, torch.zeros_like(p2s)).detach(),
            active_fraction=fraction(active, considered),
            terms={"p2s": p2s_loss.detach(), "cohesion": weighted_cohesion.detach()},
            stats={
                "pos_dist": masked_mean(pos_detached, own_valid),
                "neg_dist": masked_mean(nearest_dist, counted),
                "max_radius": torch.where(own_valid, pos_detached, torch.zeros_like(pos_detached)).amax(),
            },
        )

    # Each negative set returns (pos_squared (B,), squared (B, m), candidates (B, m)):
    # squared distances to the own centre and to m negative slots, and which slots
    # hold a real negative.

    def _all_centres(self, features: Tensor, labels: Tensor, centres: Tensor, valid: Tensor):
        # One GEMM gives every sample-to-centre distance; positives, the selected
        # negatives and their gradients all come from this (B, C) matrix. Beyond the
        # GEMM (and its transpose in backward) only the squared norms touch the
        # (B, D) features: no normalised copy, no gathered centres.
        batch, num_classes = features.shape[0], centres.shape[0]
        squared = squared_distance_matrix(features, centres, normalize_x=self.normalize)
        pos_squared = squared.gather(1, labels.unsqueeze(1)).squeeze(1)
        candidates = valid.unsqueeze(0).expand(batch, num_classes).clone()
        candidates[torch.arange(batch, device=features.device), labels] = False
        return pos_squared, squared, candidates

    def _centre_shortlist(self, features: Tensor, labels: Tensor, centres: Tensor, valid: Tensor,
                          shortlist: Tensor):
        # Own centre in column 0, the class's k neighbours after it: B*(k+1)
        # sampled distances, no (B, C) matrix.
        neighbours = shortlist.to(features.device)[labels]
        # A list older than the centres' validity (a tensor's, or a bank whose
        # centre was dropped by refresh) must not hand out an invalid centre.
        candidates = (neighbours >= 0) & (neighbours != labels.unsqueeze(1))
        candidates &= valid[neighbours.clamp_min(0)]
        index = torch.cat([labels.unsqueeze(1), neighbours], dim=1)
        present = torch.cat([torch.ones_like(candidates[:, :1]), candidates], dim=1)
        squared = gathered_squared_distances(features, centres, index, present, normalize_x=self.normalize)
        return squared[:, 0], squared[:, 1:], candidates

    def _batch_hardest(self, features: Tensor, labels: Tensor, centres: Tensor):
        pos_squared = gathered_squared_distances(
            features, centres, labels.unsqueeze(1), normalize_x=self.normalize
        ).squeeze(1)
        other = labels.unsqueeze(1) != labels.unsqueeze(0)
        take = min(self.k, features.shape[0] - 1)
        with torch.no_grad():
            # Mining: every in-batch squared distance, one GEMM without gradient;
            # the differentiable distances of the chosen few are recomputed below.
            detached = features.detach()
            sample_squared = torch.linalg.vector_norm(detached, dim=1).square()
            scale = sample_squared.clamp_min(1e-24).rsqrt() if self.normalize else None
            between = F.normalize(detached, dim=1) if self.normalize else detached
            mined = squared_distance_matrix(between, between)
            mined.masked_fill_(~other, float("inf"))
            chosen = mined.topk(take, dim=1, largest=False).indices
        candidates = other.gather(1, chosen)
        # The negatives are detached samples (normalised when the anchors are):
        # the gradient reaches the anchor only, as in the reference code.
        squared = gathered_squared_distances(
            features, detached, chosen, candidates, normalize_x=self.normalize,
            table_scale=scale, table_squared=sample_squared,
        )
        return pos_squared, squared, candidates

    def _aggregate(self, pos_dist: Tensor, squared: Tensor, candidates: Tensor, counted: Tensor):
        """p2s(i) over each sample's candidate negatives; returns (p2s, considered, active, nearest)."""
        if not bool(counted.any()):
            # No negative anywhere: only cohesion remains; keep p2s in the graph.
            nothing = torch.zeros(pos_dist.shape[0], 1, dtype=torch.bool, device=pos_dist.device)
            return pos_dist * 0.0, nothing, nothing, torch.zeros_like(pos_dist)
        if self.aggregation == "mean":
            dist = _root(squared)
            considered = candidates & counted.unsqueeze(1)
            hinge = torch.where(
                considered, F.relu(pos_dist.unsqueeze(1) - dist + self.margin), torch.zeros_like(dist)
            )
            active = hinge > 0
            p2s = hinge.sum(dim=1) / active.sum(dim=1).clamp_min(1)
            nearest = dist.detach().masked_fill(~candidates, float("inf")).amin(dim=1)
            return p2s, considered, active, nearest
        take = 1 if self.aggregation == "hardest" else min(self.k, squared.shape[1])
        with torch.no_grad():
            chosen = squared.masked_fill(~candidates, float("inf")).topk(take, dim=1, largest=False).indices
        neg_dist = _root(squared.gather(1, chosen))  # (B, take), nearest first
        considered = candidates.gather(1, chosen) & counted.unsqueeze(1)
        hinge = torch.where(
            considered, F.relu(pos_dist.unsqueeze(1) - neg_dist + self.margin), torch.zeros_like(neg_dist)
        )
        # Each sample averages over the negatives it has (fewer than k when short).
        p2s = hinge.sum(dim=1) / considered.sum(dim=1).clamp_min(1)
        return p2s, considered, hinge > 0, neg_dist[:, 0].detach()
