"""P×K identity sampling: every batch holds P identities with K images each.

Metric losses (batch-hard triplet, FAT's in-batch negatives) need positives and
negatives inside each batch; uniform random batches from a ReID set with ~20
images per identity and hundreds of identities contain almost no positives.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
from torch.utils.data import Sampler


class IdentitySampler(Sampler[int]):
    """Yields dataset indices, P identities × K images per batch, batch after batch.

    Per epoch (torchreid's ``RandomIdentitySampler`` semantics): each identity's
    trainable indices are shuffled and cut into chunks of K (an identity with
    fewer than K is sampled with replacement up to K; a remainder shorter than K
    is dropped), so every identity appears and every trainable sample is used
    about once. Batches take one chunk from each of P distinct identities. Unlike
    torchreid, which picks identities uniformly, identities are picked with
    probability proportional to their remaining chunks, so identities with many
    images are not left over (and dropped) once the small ones run out.

    The order depends only on ``(seed, epoch)``: call :meth:`set_epoch` before
    each epoch (as with ``DistributedSampler``), and save :meth:`state_dict` in
    checkpoints to resume the same sequence.

    Use with ``DataLoader(dataset, batch_size=p * k, sampler=sampler)``, or use
    :class:`IdentityBatchSampler` as ``batch_sampler``.

    Args:
        labels: shape (N,), the identity label of each dataset index (any
            hashable values; ints as in the manifest's ``pid`` column).
        p: identities per batch.
        k: images per identity per batch.
        seed: base seed of the per-epoch shuffles.
        train_mask: shape (N,), bool; samples with ``False`` (e.g. not confident)
            are never yielded and identities without any ``True`` sample are
            skipped. ``None`` trains on all samples.
        drop_last: ``True`` drops the chunks left when fewer than P identities
            remain; ``False`` yields them as one last, smaller batch (one chunk
            for each remaining identity, so still a multiple of K long).

    Raises:
        ValueError: ``p`` or ``k`` < 1, a ``train_mask`` of the wrong length, or
            fewer than P identities with a trainable sample.
    """

    def __init__(
        self,
        labels: Sequence | np.ndarray,
        p: int,
        k: int,
        *,
        seed: int = 0,
        train_mask: Sequence[bool] | np.ndarray | None = None,
        drop_last: bool = True,
    ) -> None:
        if p < 1 or k < 1:
            raise ValueError(f"IdentitySampler needs p >= 1 identities and k >= 1 images per batch, got p={p}, k={k}")
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must be one-dimensional (one label per dataset index), got shape {labels.shape}")
        if train_mask is None:
            mask = np.ones(len(labels), dtype=bool)
        else:
            mask = np.asarray(train_mask)
            if mask.shape != labels.shape:
                raise ValueError(
                    f"train_mask has shape {mask.shape} but labels has shape {labels.shape}; "
                    "give one flag per dataset index"
                )
            if mask.dtype != bool:
                raise ValueError(f"train_mask must be boolean, got dtype {mask.dtype}")
        self.p = p
        self.k = k
        self.seed = seed
        self.epoch = 0
        self.drop_last = drop_last

        trainable = np.flatnonzero(mask)
        # Sorted identities and sorted index lists: the plan must not depend on
        # dict or hash ordering, only on (seed, epoch).
        identities, inverse = np.unique(labels[trainable], return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        boundaries = np.flatnonzero(np.diff(inverse[order])) + 1
        self.identities = identities
        self.indices_by_identity: list[np.ndarray] = np.split(trainable[order], boundaries) if len(trainable) else []
        num_all = len(np.unique(labels)) if len(labels) else 0
        if len(identities) < p:
            raise ValueError(
                f"IdentitySampler needs at least p={p} identities with a trainable sample, but only "
                f"{len(identities)} exist ({num_all} identities in labels, {num_all - len(identities)} without "
                f"any train_mask=True sample, {len(trainable)} of {len(labels)} samples trainable); "
                "lower p or mark more samples for training"
            )
        # The plan is cached per (seed, epoch) so __len__ and __iter__ agree exactly.
        self._plan_key: tuple[int, int] | None = None
        self._plan: list[np.ndarray] = []

    @property
    def num_identities(self) -> int:
        """Identities with at least one trainable sample."""
        return len(self.identities)

    @property
    def batch_size(self) -> int:
        """P·K, the size of every full batch."""
        return self.p * self.k

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        """``{"seed", "epoch"}``: all that is needed to reproduce the order after a restart."""
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restore :meth:`state_dict`'s output."""
        missing = {"seed", "epoch"} - set(state)
        if missing:
            raise KeyError(f"IdentitySampler state is missing {sorted(missing)}; got keys {sorted(state)}")
        self.seed = int(state["seed"])
        self.set_epoch(int(state["epoch"]))

    def epoch_batches(self) -> list[np.ndarray]:
        """The current epoch's batches, each an int64 array of P·K dataset indices
        (the last one shorter if ``drop_last=False`` left a remainder). Cached per epoch."""
        if self._plan_key != (self.seed, self.epoch):
            self._plan = self._make_plan()
            self._plan_key = (self.seed, self.epoch)
        return self._plan

    def _make_plan(self) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch])
        chunks_by_identity: list[list[np.ndarray]] = []
        for indices in self.indices_by_identity:
            if len(indices) < self.k:
                indices = rng.choice(indices, size=self.k, replace=True)
            else:
                indices = rng.permutation(indices)
            num_chunks = len(indices) // self.k
            chunks_by_identity.append([indices[i * self.k : (i + 1) * self.k] for i in range(num_chunks)])

        remaining = np.array([len(chunks) for chunks in chunks_by_identity], dtype=np.int64)
        taken = np.zeros(len(remaining), dtype=np.int64)
        batches: list[np.ndarray] = []
        while np.count_nonzero(remaining) >= self.p:
            chosen = rng.choice(len(remaining), size=self.p, replace=False, p=remaining / remaining.sum())
            batches.append(np.concatenate([chunks_by_identity[i][taken[i]] for i in chosen]))
            taken[chosen] += 1
            remaining[chosen] -= 1
        if not self.drop_last and remaining.any():
            leftover = rng.permutation(np.flatnonzero(remaining))
            batches.append(np.concatenate([chunks_by_identity[i][taken[i]] for i in leftover]))
        return [batch.astype(np.int64, copy=False) for batch in batches]

    def __iter__(self) -> Iterator[int]:
        for batch in self.epoch_batches():
            yield from batch.tolist()

    def __len__(self) -> int:
        """Exact number of indices this epoch yields."""
        return sum(len(batch) for batch in self.epoch_batches())

    def num_batches(self) -> int:
        """Exact number of batches this epoch yields."""
        return len(self.epoch_batches())


class IdentityBatchSampler(Sampler[list[int]]):
    """:class:`IdentitySampler` yielding whole batches, for ``DataLoader(batch_sampler=...)``.

    Takes the same arguments as :class:`IdentitySampler`; ``set_epoch``,
    ``state_dict`` and ``load_state_dict`` act on the wrapped sampler
    (``.sampler``). ``len()`` is the number of batches.

    For data-parallel training each rank takes its share of the epoch's batches
    (:meth:`shard`, or ``num_replicas``/``rank`` here): batch ``i`` of the
    single-process order goes to rank ``i % num_replicas``. Every rank computes
    the same plan from ``(seed, epoch)``, so the shares are disjoint, their union
    is the single-process epoch, and a run is reproducible for a given seed. When
    the number of batches is not a multiple of ``num_replicas`` the last
    ``len % num_replicas`` batches are dropped, so every rank takes the same
    number of steps (data-parallel ranks must step together).

    Args:
        num_replicas: how many ranks share the epoch (1 = no sharding).
        rank: which share this sampler yields, in ``[0, num_replicas)``.
    """

    def __init__(
        self,
        labels: Sequence | np.ndarray,
        p: int,
        k: int,
        *,
        seed: int = 0,
        train_mask: Sequence[bool] | np.ndarray | None = None,
        drop_last: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        _check_shard(rank, num_replicas)
        self.sampler = IdentitySampler(labels, p, k, seed=seed, train_mask=train_mask, drop_last=drop_last)
        self.num_replicas = num_replicas
        self.rank = rank

    def shard(self, rank: int, num_replicas: int) -> IdentityBatchSampler:
        """A view yielding only ``rank``'s share of each epoch's batches.

        The view shares the wrapped :class:`IdentitySampler` (seed, epoch, cached
        plan) with ``self``: ``set_epoch`` on either selects the epoch for both.
        """
        _check_shard(rank, num_replicas)
        view = copy.copy(self)
        view.num_replicas, view.rank = num_replicas, rank
        return view

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.sampler.load_state_dict(state)

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.sampler.epoch_batches()
        usable = len(batches) - len(batches) % self.num_replicas
        for batch in batches[self.rank : usable : self.num_replicas]:
            yield batch.tolist()

    def __len__(self) -> int:
        return self.sampler.num_batches() // self.num_replicas


def _check_shard(rank: int, num_replicas: int) -> None:
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(
            f"IdentityBatchSampler sharding needs num_replicas >= 1 and 0 <= rank < num_replicas, "
            f"got rank={rank}, num_replicas={num_replicas}"
        )
