"""Batches of uint8 images for training and feature passes.

A dataset backed by the decoded-image cache (:mod:`fat_distill.data.image_cache`)
is read in the training process itself: each batch is one gather from the
array, cheaper than handing it over from a worker process. Otherwise images are
decoded and resized per sample by DataLoader worker processes (``num_workers``,
by default from the machine's CPU count), kept alive across epochs and loading
ahead. Either way a batch is ``(images, labels, indices)``: ``(B, 3, H, W)``
uint8, ``(B,)`` int64 class indices, ``(B,)`` int64 dataset indices; the
normalisation and augmentation follow on the device
(:mod:`fat_distill.data.batch_transforms`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

#: Batches each DataLoader worker loads ahead.
PREFETCH_FACTOR = 4
#: At most this many worker processes with ``num_workers: auto``.
MAX_AUTO_WORKERS = 8


def resolve_num_workers(setting: int | Literal["auto"], *, cached: bool) -> int:
    """Worker processes for a loader: ``setting`` itself, or for ``"auto"`` none when the images
    are cached (a gather needs no worker) and one per CPU but one (at most 8) when they are decoded."""
    if setting == "auto":
        if cached:
            return 0
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(0, min(MAX_AUTO_WORKERS, cpus - 1))
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise ValueError(f"num_workers must be 'auto' or an int >= 0, got {setting!r}")
    return setting


def sequential_batches(indices: int | Sequence[int] | np.ndarray, batch_size: int) -> list[list[int]]:
    """``indices`` (or ``range(indices)`` for an int) cut into consecutive batches of ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = list(range(indices)) if isinstance(indices, int) else [int(i) for i in indices]
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


class ImageBatches:
    """Iterate ``(images, labels, indices)`` for each batch of dataset indices ``batches`` yields.

    Iterating again starts another pass over ``batches`` (e.g. the next epoch of a
    :class:`~fat_distill.data.sampler.IdentityBatchSampler`); worker processes, if
    any, persist between passes. Call :meth:`close` (or drop the object) to end them.

    Args:
        dataset: yields ``(image, label, index)``; a cached
            :class:`~fat_distill.data.image_dataset.ManifestImageDataset` is read
            by whole-batch gathers in this process when there are no workers.
        batches: an iterable of index lists (a batch sampler, or :func:`sequential_batches`).
        num_workers: DataLoader worker processes, or ``"auto"`` (:func:`resolve_num_workers`).
        pin_memory: page-lock batches for asynchronous copies to a GPU.
        persistent_workers: keep the workers between passes.
        seed: seeds the DataLoader's own generator, so loading never draws from
            torch's global random state (training results do not depend on how
            images are loaded).
    """

    def __init__(self, dataset: Dataset, batches: Iterable[Sequence[int]], *,
                 num_workers: int | Literal["auto"] = "auto", pin_memory: bool = False,
                 persistent_workers: bool = True, seed: int = 0) -> None:
        self.dataset = dataset
        self.batches = batches
        self.pin_memory = pin_memory
        cached = bool(getattr(dataset, "cached", False))
        self.num_workers = resolve_num_workers(num_workers, cached=cached)
        self.direct = cached and self.num_workers == 0
        self._closed = False
        self._loader: DataLoader | None = None
        if not self.direct:
            workers = self.num_workers
            self._loader = DataLoader(
                dataset, batch_sampler=batches, num_workers=workers, pin_memory=pin_memory,
                persistent_workers=persistent_workers and workers > 0,
                prefetch_factor=PREFETCH_FACTOR if workers > 0 else None,
                generator=torch.Generator().manual_seed(int(seed) % 2**63),
            )

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        if self._closed:
            raise RuntimeError("ImageBatches: iterated after close()")
        if self._loader is not None:
            yield from self._loader
            return
        labels = self.dataset.labels
        for batch in self.batches:
            batch = np.asarray(batch, dtype=np.int64)
            images = self.dataset.image_batch(batch)
            if self.pin_memory:
                images = images.pin_memory()
            yield images, torch.from_numpy(labels[batch]), torch.from_numpy(batch)

    def close(self) -> None:
        """End the worker processes (dropping the DataLoader ends its persistent workers)."""
        self._loader = None
        self._closed = True
