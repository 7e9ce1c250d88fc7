"""Dataset-level identity centres for FAT: a full-pass refresh or an EMA memory bank."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fat_distill.losses.distances import squared_distance_matrix

CENTRE_MODES = {
    1: "mean of raw features",
    2: "mean of L2-normalised features",
    3: "L2-normalised mean of raw features",
    4: "L2-normalised mean of L2-normalised features",
}


def _check_centre_mode(centre_mode: int, where: str) -> None:
    if centre_mode not in CENTRE_MODES:
        modes = ", ".join(f"{k} ({v})" for k, v in CENTRE_MODES.items())
        raise ValueError(f"{where}: centre_mode must be one of {modes}; got {centre_mode!r}")


def class_means(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    normalize_features: bool,
    confident_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-class mean of (optionally L2-normalised) features over confident samples.

    Args:
        features: ``(N, D)`` floating tensor; not differentiated through.
        labels: ``(N,)`` integer class indices in ``[0, num_classes)``.
        num_classes: C, the number of identities.
        normalize_features: L2-normalise each feature before averaging (modes 2, 4).
        confident_mask: optional ``(N,)`` bool; only ``True`` samples contribute.
            Default: every sample.

    Returns:
        ``(means, counts)``: ``(C, D)`` float32 means (zero rows for classes without a
        contributing sample) and ``(C,)`` int64 contributing-sample counts.
    """
    where = "class_means"
    if features.dim() != 2:
        raise ValueError(f"{where}: features must be (N, dim), got shape {tuple(features.shape)}")
    if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"{where}: labels must be (N,) = ({features.shape[0]},), got shape {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"{where}: labels must be integer class indices, got {labels.dtype}")
    features = features.detach().float()
    labels = labels.to(features.device, torch.long)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{where}: labels must lie in [0, {num_classes}), got values in "
            f"[{int(labels.min())}, {int(labels.max())}]; map pids to contiguous class indices first"
        )
    if confident_mask is not None:
        confident_mask = confident_mask.to(features.device)
        if confident_mask.dtype != torch.bool or confident_mask.shape != labels.shape:
            raise ValueError(
                f"{where}: confident_mask must be a bool tensor of shape {tuple(labels.shape)}, "
                f"got {confident_mask.dtype} {tuple(confident_mask.shape)}"
            )
        features, labels = features[confident_mask], labels[confident_mask]
    if normalize_features:
        features = F.normalize(features, dim=1)
    sums = torch.zeros(num_classes, features.shape[1], device=features.device)
    sums.index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes)
    means = sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype)
    return means, counts


def finish_centres(means: Tensor, centre_mode: int) -> Tensor:
    """Turn per-class means into centres: modes 3 and 4 L2-normalise the mean.

    Args:
        means: ``(C, D)`` output of :func:`class_means` (normalised features for 2, 4).
        centre_mode: 1-4, see ``CENTRE_MODES``.

    Returns:
        ``(C, D)`` centres; an all-zero mean stays zero (no NaN).
    """
    _check_centre_mode(centre_mode, "finish_centres")
    return F.normalize(means, dim=1) if centre_mode in (3, 4) else means


def compute_centres(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    centre_mode: int = 4,
    confident_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Identity centres from a full pass over the training features.

    Args:
        features: ``(N, D)``.
        labels: ``(N,)`` class indices in ``[0, num_classes)``.
        num_classes: C.
        centre_mode: 1 mean of raw, 2 mean of normalised, 3 normalised mean of raw,
            4 normalised mean of normalised (the paper's best, default).
        confident_mask: optional ``(N,)`` bool; only confident samples form centres.

    Returns:
        ``(centres, valid)``: ``(C, D)`` float32 and ``(C,)`` bool, ``False`` for
        classes without a confident sample (their centre row is zero).
    """
    _check_centre_mode(centre_mode, "compute_centres")
    means, counts = class_means(features, labels, num_classes, centre_mode in (2, 4), confident_mask)
    return finish_centres(means, centre_mode), counts > 0


# Query centres per block of nearest_centres: block x C distances of float32 at
# most about 64 MiB, so C = 85,000 identities never needs a (C, C) matrix.
_NEIGHBOUR_BLOCK_ELEMENTS = 1 << 24


@torch.no_grad()
def nearest_centres(centres: Tensor, valid: Tensor, k: int) -> Tensor:
    """Each centre's ``k`` nearest *other* valid centres: the FAT short list of negatives.

    Exact (brute force over every pair, Euclidean distance), computed in blocks
    of query centres: O(C^2 * D) multiply-adds and O(block * C) memory. The
    result is a function of the centres (``torch.topk`` is deterministic for a
    given input and device; exact ties are broken by it).

    Args:
        centres: ``(C, D)`` centres.
        valid: ``(C,)`` bool; invalid centres are never neighbours and get no list.
        k: neighbours per centre, ``>= 1``.

    Returns:
        ``(C, k)`` int64 class indices, nearest first; ``-1`` pads the rows of
        invalid centres and the tail of rows with fewer than ``k`` valid others.
    """
    if centres.dim() != 2:
        raise ValueError(f"nearest_centres: centres must be (C, D), got shape {tuple(centres.shape)}")
    num_classes = centres.shape[0]
    if valid.dtype != torch.bool or valid.shape != (num_classes,):
        raise ValueError(
            f"nearest_centres: valid must be a bool tensor of shape ({num_classes},), "
            f"got {valid.dtype} {tuple(valid.shape)}"
        )
    if k < 1:
        raise ValueError(f"nearest_centres: k must be >= 1, got {k}")
    valid = valid.to(centres.device)
    neighbours = torch.full((num_classes, k), -1, dtype=torch.long, device=centres.device)
    take = min(k, num_classes)
    # Self and invalid centres are +inf and come out as -1.
    block = max(1, _NEIGHBOUR_BLOCK_ELEMENTS // num_classes)
    centres = centres.float() if centres.dtype != torch.float64 else centres
    for start in range(0, num_classes, block):
        stop = min(num_classes, start + block)
        squared = squared_distance_matrix(centres[start:stop], centres)
        squared.masked_fill_(~valid.unsqueeze(0), float("inf"))
        rows = torch.arange(stop - start, device=centres.device)
        squared[rows, rows + start] = float("inf")  # a centre is not its own neighbour
        chosen_dist, chosen = squared.topk(take, dim=1, largest=False)
        chosen[torch.isinf(chosen_dist)] = -1
        chosen[~valid[start:stop]] = -1
        neighbours[start:stop, :take] = chosen
    return neighbours


class CentreBank(nn.Module):
    """Dataset-level centres of every identity, kept as module buffers.

    Buffers move with ``.to(device)`` and are saved in ``state_dict()``, so a
    checkpoint resumes with the same centres. Centres never receive gradients.

    Two ways to keep them current (``mode``):

    - ``"epoch"``: :meth:`refresh` from a full pass over the training set once per
      epoch (the authors' reference code). :meth:`update` is refused.
    - ``"ema"``: :meth:`update` from every batch, no extra pass (ours);
      :meth:`refresh` may still be used to initialise.

    Only confident samples contribute. A class that never had a confident sample is
    marked invalid: FAT excludes it from the negatives and skips samples labelled
    with it, so it can never produce NaN.

    With ``shortlist_k > 0`` the bank also keeps each centre's ``shortlist_k``
    nearest other valid centres (:func:`nearest_centres`), the negatives of
    ``FATLoss(negatives="centre_shortlist")``. The list is rebuilt at explicit
    points only, so a run and its resumption see the same lists:

    - by :meth:`refresh` (every epoch with ``mode="epoch"``), after the centres;
    - with ``mode="ema"``, by the first :meth:`update` and then by every
      ``shortlist_refresh``-th update after the last rebuild;
    - by :meth:`rebuild_shortlist`.

    Between rebuilds the list is stale: a centre that became valid since the last
    rebuild has no list yet (its samples get cohesion only) and is nobody's
    negative. A rebuild costs O(C^2 * D), amortised over ``shortlist_refresh``
    steps (or an epoch) against the O(B*k*D) of each step; at face-recognition
    scale (C ~ 10^5) prefer ``mode="epoch"`` or a long ``shortlist_refresh``.

    Args:
        num_classes: C, the number of training identities.
        dim: D, the embedding dimension.
        mode: ``"epoch"`` or ``"ema"``.
        momentum: EMA weight of the *old* value: ``mean <- momentum * mean +
            (1 - momentum) * batch_mean``. Higher is smoother but lags the model more.
        centre_mode: 1-4 (see ``CENTRE_MODES``); 4 is the default of normalised FAT.
        shortlist_k: neighbours kept per centre; 0 (default) keeps no short list.
        shortlist_refresh: with ``mode="ema"`` and a short list, rebuild it every
            this many updates (``>= 1``). Not used with ``mode="epoch"``, whose
            centres (and list) change only at :meth:`refresh`.

    Buffers:
        centres: ``(C, D)`` float32, what FAT uses.
        running_mean: ``(C, D)`` float32, the averaged (possibly normalised)
            features before the mode 3/4 normalisation; the EMA acts on this.
        valid: ``(C,)`` bool.
        counts: ``(C,)`` int64, confident samples seen (last refresh, or cumulative
            EMA updates since then).
        shortlist: ``(C, shortlist_k)`` int64 neighbour classes, nearest first,
            ``-1`` padding (only with ``shortlist_k > 0``).
        shortlist_age: 0-d int64, updates since the last rebuild; ``-1`` before
            the first (only with ``shortlist_k > 0``).
    """

    centres: Tensor
    running_mean: Tensor
    valid: Tensor
    counts: Tensor
    shortlist: Tensor
    shortlist_age: Tensor

    def __init__(
        self,
        num_classes: int,
        dim: int,
        mode: Literal["epoch", "ema"] = "epoch",
        momentum: float = 0.9,
        centre_mode: int = 4,
        shortlist_k: int = 0,
        shortlist_refresh: int = 0,
    ) -> None:
        super().__init__()
        if num_classes < 1 or dim < 1:
            raise ValueError(f"CentreBank: num_classes and dim must be >= 1, got {num_classes}, {dim}")
        if mode not in ("epoch", "ema"):
            raise ValueError(f"CentreBank: mode must be 'epoch' or 'ema', got {mode!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"CentreBank: momentum must be in [0, 1), got {momentum}")
        _check_centre_mode(centre_mode, "CentreBank")
        if shortlist_k < 0 or shortlist_refresh < 0:
            raise ValueError(
                f"CentreBank: shortlist_k and shortlist_refresh must be >= 0, got {shortlist_k}, {shortlist_refresh}"
            )
        if shortlist_k and mode == "ema" and shortlist_refresh < 1:
            raise ValueError(
                "CentreBank: an EMA bank with a short list needs shortlist_refresh >= 1 (rebuild the "
                "neighbour list every that many updates); otherwise it would never be rebuilt"
            )
        self.num_classes = num_classes
        self.dim = dim
        self.mode = mode
        self.momentum = momentum
        self.centre_mode = centre_mode
        self.shortlist_k = shortlist_k
        self.shortlist_refresh = shortlist_refresh
        self.register_buffer("centres", torch.zeros(num_classes, dim))
        self.register_buffer("running_mean", torch.zeros(num_classes, dim))
        self.register_buffer("valid", torch.zeros(num_classes, dtype=torch.bool))
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.long))
        if shortlist_k:
            # Registered only when used, so banks without a list keep their state_dict
            # (and old checkpoints still load).
            self.register_buffer("shortlist", torch.full((num_classes, shortlist_k), -1, dtype=torch.long))
            self.register_buffer("shortlist_age", torch.tensor(-1, dtype=torch.long))

    def extra_repr(self) -> str:
        shortlist = (
            f", shortlist_k={self.shortlist_k}, shortlist_refresh={self.shortlist_refresh}"
            if self.shortlist_k else ""
        )
        return (
            f"num_classes={self.num_classes}, dim={self.dim}, mode={self.mode!r}, "
            f"momentum={self.momentum}, centre_mode={self.centre_mode}{shortlist}"
        )

    @torch.no_grad()
    def rebuild_shortlist(self) -> None:
        """Recompute every centre's nearest other valid centres now (see :func:`nearest_centres`)."""
        if not self.shortlist_k:
            raise RuntimeError(
                "CentreBank.rebuild_shortlist: this bank keeps no short list; build it with shortlist_k >= 1 "
                "(FATLoss(negatives='centre_shortlist').new_centre_bank(...) does)"
            )
        self.shortlist.copy_(nearest_centres(self.centres, self.valid, self.shortlist_k))
        self.shortlist_age.fill_(0)

    def _check_dim(self, features: Tensor, where: str) -> None:
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(
                f"CentreBank.{where}: features must be (N, {self.dim}), got shape {tuple(features.shape)}"
            )

    @torch.no_grad()
    def refresh(self, features: Tensor, labels: Tensor, confident_mask: Tensor | None = None) -> None:
        """Recompute every centre from a full pass; classes absent from it become invalid.

        Args:
            features: ``(N, D)`` features of the whole training set.
            labels: ``(N,)`` class indices in ``[0, C)``.
            confident_mask: optional ``(N,)`` bool; only confident samples count.
        """
        self._check_dim(features, "refresh")
        device = self.centres.device
        means, counts = class_means(
            features.to(device),
            labels.to(device),
            self.num_classes,
            self.centre_mode in (2, 4),
            None if confident_mask is None else confident_mask.to(device),
        )
        self.running_mean.copy_(means)
        self.counts.copy_(counts)
        self.valid.copy_(counts > 0)
        self.centres.copy_(finish_centres(means, self.centre_mode))
        if self.shortlist_k:
            self.rebuild_shortlist()

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor, confident_mask: Tensor | None = None) -> None:
        """EMA step from one batch (``mode="ema"`` only).

        A class seen for the first time takes the batch mean as it is (no blending
        with the zero initial value); classes absent from the batch are unchanged.
        With a short list, this update counts towards its next rebuild (also when
        no sample of the batch was confident).

        Args:
            features: ``(B, D)`` batch embeddings (detached here).
            labels: ``(B,)`` class indices in ``[0, C)``.
            confident_mask: optional ``(B,)`` bool; only confident samples count.
        """
        if self.mode != "ema":
            raise RuntimeError(
                "CentreBank.update: this bank was built with mode='epoch', whose centres come "
                "from refresh() over the full training set once per epoch; build it with "
                "mode='ema' to update from batches"
            )
        self._check_dim(features, "update")
        device = self.centres.device
        features, labels = features.to(device), labels.to(device)
        if confident_mask is not None:
            confident_mask = confident_mask.to(device)
            if confident_mask.dtype != torch.bool or confident_mask.shape != labels.shape:
                raise ValueError(
                    f"CentreBank.update: confident_mask must be a bool tensor of shape "
                    f"{tuple(labels.shape)}, got {confident_mask.dtype} {tuple(confident_mask.shape)}"
                )
            features, labels = features[confident_mask], labels[confident_mask]
        if labels.numel():
            self._blend(features, labels)
        if self.shortlist_k:
            age = int(self.shortlist_age)
            if age < 0 or age + 1 >= self.shortlist_refresh:
                self.rebuild_shortlist()
            else:
                self.shortlist_age.fill_(age + 1)

    def _blend(self, features: Tensor, labels: Tensor) -> None:
        # Work on the batch's classes only: O(B*D) per step instead of O(C*D).
        classes, inverse = torch.unique(labels, return_inverse=True)
        if int(classes[0]) < 0 or int(classes[-1]) >= self.num_classes:
            raise ValueError(
                f"CentreBank.update: labels must lie in [0, {self.num_classes}), got values in "
                f"[{int(classes[0])}, {int(classes[-1])}]; map pids to contiguous class indices first"
            )
        means, counts = class_means(features, inverse, classes.numel(), self.centre_mode in (2, 4))
        seen_before = self.valid[classes].unsqueeze(1)
        blended = self.momentum * self.running_mean[classes] + (1.0 - self.momentum) * means
        running = torch.where(seen_before, blended, means)  # first sight: the batch mean as it is
        self.running_mean[classes] = running
        self.centres[classes] = finish_centres(running, self.centre_mode)
        self.counts.index_add_(0, classes, counts)
        self.valid[classes] = True
