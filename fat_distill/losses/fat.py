"""FAT: the fast-approximated triplet loss against dataset-level identity centres."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from fat_distill.losses.centre_bank import CENTRE_MODES, CentreBank
from fat_distill.losses.distances import SQUARED_DISTANCE_FLOOR, squared_distance_matrix
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


def _root(squared: Tensor) -> Tensor:
    return squared.clamp_min(SQUARED_DISTANCE_FLOOR).sqrt()


class FATLoss(IdentityLoss):
    """Fast-Approximated Triplet loss (Yuan et al., arXiv 1912.07863), SPEC §1.1.

    Bounds the triplet ``d(a,p) - d(a,n)`` by point-to-set distances to identity
    centres plus cluster radii, and minimises the bound::

        p2s(i)  = agg_{k != y_i, k valid} [ d(f_i, c_{y_i}) - d(f_i, c_k) + margin ]_+
        L_coh   = max_i d(f_i, c_{y_i})        ("max_radius": largest radius among the
                                                batch's clusters, the paper)
                | mean_i d(f_i, c_{y_i})       ("mean": the authors' code)
        L_FAT   = mean_i p2s(i) + cohesion_weight * L_coh

    Centres are dataset-level and detached; gradient flows through the embeddings
    only. Cost O(B*C*D): one distance GEMM forward and one backward, linear in the
    number of identities; everything else is O(B*C). (Distances come from
    ``|f|^2 + |c|^2 - 2 f.c``, so in float32 distances below ~1e-3 * |f| are
    rounding noise; see ``squared_distance_matrix``.)

    ``normalize=True, centre_mode=4, margin=0.1`` is normalised FAT; use
    :meth:`FATLoss.normalised`.

    Args:
        margin: hinge margin m (1.0 for raw features, ~0.1 normalised).
        normalize: L2-normalise the embeddings before measuring distances.
        centre_mode: which of the paper's centre modes the centres must have been
            built with (see ``CENTRE_MODES``); a :class:`CentreBank` with another
            mode is refused. Default: 4 if ``normalize`` else 1.
        aggregation: over negative centres. ``"hardest"``: the nearest one.
            ``"mean"``: mean over the *violating* centres (non-zero hinges), 0 if
            none. ``"topk"``: mean of the hinges at the ``k`` nearest, or at all
            valid negatives when there are fewer than ``k``.
        k: number of negatives for ``"topk"`` (the reference code uses 5).
        cohesion: ``"max_radius"`` or ``"mean"`` (see above).
        cohesion_weight: lambda_coh (0.1 in the reference settings).

    Samples whose own class has no valid centre are skipped entirely; samples with
    no valid negative centre contribute only to cohesion. ``mean_i`` is over the
    samples that have a p2s term.

    Output (``compute``): ``per_sample`` is p2s(i); ``terms`` are ``{"p2s",
    "cohesion"}`` (cohesion weighted); ``active_fraction`` counts the hinge terms
    the aggregation looked at (one per sample for hardest, k for topk, every valid
    negative for mean); ``stats`` has ``pos_dist`` (mean distance to own centre),
    ``neg_dist`` (mean distance to nearest negative centre), ``max_radius``.
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

    @classmethod
    def normalised(cls, margin: float = 0.1, **overrides) -> FATLoss:
        """Normalised FAT: L2-normalised features, centre mode 4, margin 0.1."""
        overrides.setdefault("centre_mode", 4)
        return cls(margin=margin, normalize=True, **overrides)

    def new_centre_bank(
        self, num_classes: int, dim: int, mode: Literal["epoch", "ema"] = "ema", momentum: float = 0.9
    ) -> CentreBank:
        """A :class:`CentreBank` built with this loss's centre mode."""
        return CentreBank(num_classes, dim, mode=mode, momentum=momentum, centre_mode=self.centre_mode)

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, normalize={self.normalize}, centre_mode={self.centre_mode}, "
            f"aggregation={self.aggregation!r}, k={self.k}, cohesion={self.cohesion!r}, "
            f"cohesion_weight={self.cohesion_weight}"
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
        batch = features.shape[0]

        # One GEMM gives every sample-to-centre distance; positives, the selected
        # negatives and their gradients all come from this (B, C) matrix. Beyond the
        # GEMM (and its transpose in backward) only the squared norms touch the
        # (B, D) features: no normalised copy, no gathered centres.
        squared = squared_distance_matrix(features, centre_tensor, normalize_x=self.normalize)
        own_valid = valid[labels]
        pos_dist = _root(squared.gather(1, labels.unsqueeze(1)).squeeze(1))
        negative = valid.unsqueeze(0).expand(batch, num_classes).clone()
        negative[torch.arange(batch, device=features.device), labels] = False
        has_negative = negative.any(dim=1)
        counted = own_valid & has_negative
        num_negatives = int(valid.sum()) - 1  # every counted sample has the same negatives count

        if num_negatives < 1 or not bool(counted.any()):
            # No negative centre anywhere: only cohesion remains; keep p2s in the graph.
            p2s = pos_dist * 0.0
            considered = torch.zeros(batch, 1, dtype=torch.bool, device=features.device)
            active = considered
            nearest_dist = torch.zeros_like(pos_dist)
        elif self.aggregation == "mean":
            dist = _root(squared)
            considered = negative & counted.unsqueeze(1)
            hinge = torch.where(
                considered, F.relu(pos_dist.unsqueeze(1) - dist + self.margin), torch.zeros_like(dist)
            )
            active = hinge > 0
            p2s = hinge.sum(dim=1) / active.sum(dim=1).clamp_min(1)
            nearest_dist = dist.detach().masked_fill(~negative, float("inf")).amin(dim=1)
        else:
            take = 1 if self.aggregation == "hardest" else min(self.k, num_negatives)
            with torch.no_grad():
                chosen = squared.masked_fill(~negative, float("inf")).topk(take, dim=1, largest=False).indices
            neg_dist = _root(squared.gather(1, chosen))  # (B, take), nearest first
            considered = negative.gather(1, chosen) & counted.unsqueeze(1)
            hinge = torch.where(
                considered, F.relu(pos_dist.unsqueeze(1) - neg_dist + self.margin), torch.zeros_like(neg_dist)
            )
            active = hinge > 0
            p2s = hinge.sum(dim=1) / take
            nearest_dist = neg_dist[:, 0].detach()

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
