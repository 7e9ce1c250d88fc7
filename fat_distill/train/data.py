"""From a manifest frame to what the training loop consumes: the images, label map, P×K batches."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fat_distill.data.image_cache import CachePolicy, ImageCache, open_image_cache
from fat_distill.data.image_dataset import ManifestImageDataset
from fat_distill.data.sampler import IdentityBatchSampler
from fat_distill.train.config import TrainConfig

log = logging.getLogger("fat_distill.train")


@dataclass
class TrainData:
    """Training images (uint8 at the model's size), the batches, and the label map.

    ``feature_dataset`` is the same dataset: augmentation (training) and plain
    normalisation (feature passes) are applied to batches on the device
    (:mod:`fat_distill.data.batch_transforms`), not per sample.
    """

    dataset: ManifestImageDataset
    feature_dataset: ManifestImageDataset
    batch_sampler: IdentityBatchSampler
    label_map: dict[Hashable, int]
    cache: ImageCache | None = None

    @property
    def num_classes(self) -> int:
        return len(self.label_map)


def batch_identities(labels, batch_p: int, train_mask: np.ndarray | None = None) -> int:
    """P of the P×K sampler: ``batch_p``, or every trainable identity when a small dataset has fewer.

    A user's own folder of ten people should train with the defaults instead of
    failing on "needs at least p=16 identities"; the batch is then smaller.
    """
    labels = np.asarray(labels)
    trainable = labels if train_mask is None else labels[np.asarray(train_mask, dtype=bool)]
    available = len(np.unique(trainable))
    if 2 <= available < batch_p:
        log.warning("only %d identities to train on, fewer than batch_p=%d: each batch takes all %d",
                    available, batch_p, available)
        return available
    return batch_p


def cache_policy(config: TrainConfig, directory: str | Path | None = None) -> CachePolicy:
    """The decoded-image cache settings of ``config``; ``config.cache_dir`` wins over ``directory``
    (the caller's default folder, e.g. beside the dataset manifest)."""
    chosen = config.cache_dir or directory
    return CachePolicy(mode=config.cache, directory=Path(chosen) if chosen else None,
                       memory_budget_gb=config.cache_memory_gb, disk_budget_gb=config.cache_disk_gb)


def open_dataset(
    frame: pd.DataFrame,
    root: str | Path,
    config: TrainConfig,
    *,
    label_column: str = "pid",
    label_map: Mapping[Hashable, int] | None = None,
    allow_outside_root: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> ManifestImageDataset:
    """The rows of ``frame`` as uint8 images at ``config.image_size``, from the decoded-image cache when
    ``config.cache`` (and its budgets) allow; paths are checked before anything is decoded."""
    dataset = ManifestImageDataset(frame, root, label_column=label_column, label_map=label_map,
                                   allow_outside_root=allow_outside_root, image_size=tuple(config.image_size))
    cache = open_image_cache(root, dataset.paths, dataset.image_size, cache_policy(config, cache_dir),
                             sample_ids=dataset.sample_ids, progress=progress)
    if cache is not None:
        dataset.attach_cache(cache)
    return dataset


def build_train_data(
    frame: pd.DataFrame,
    root: str | Path,
    config: TrainConfig,
    *,
    label_column: str = "pid",
    label_map: Mapping[Hashable, int] | None = None,
    train_mask: np.ndarray | None = None,
    allow_outside_root: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> TrainData:
    """The dataset and a P×K batch sampler over the rows of ``frame``.

    Args:
        frame: training rows (sample_id, path, label column), in the order dataset indices follow.
        root: folder the ``path`` column is relative to.
        label_column: ``pid`` (given labels) or ``true_pid`` (the oracle).
        label_map: label → class index; default: built from ``frame`` (sorted labels).
        train_mask: ``(len(frame),)`` bool: only these rows are sampled (e.g. confident samples).
        allow_outside_root: permit paths that leave ``root`` (see :mod:`fat_distill.data.paths`).
        cache_dir: folder of the decoded-image cache when ``config.cache_dir`` is unset
            (the stages pass ``.image_cache/`` beside the dataset manifest); ``None``: no
            file, so ``cache: auto`` can only keep the images in memory.
        progress: show a progress bar while the cache is built.
    """
    frame = frame.reset_index(drop=True)
    dataset = open_dataset(frame, root, config, label_column=label_column, label_map=label_map,
                           allow_outside_root=allow_outside_root, cache_dir=cache_dir, progress=progress)
    sampler = IdentityBatchSampler(dataset.labels, batch_identities(dataset.labels, config.batch_p, train_mask),
                                    config.batch_k, seed=config.seed,
                                   train_mask=train_mask)
    return TrainData(dataset=dataset, feature_dataset=dataset, batch_sampler=sampler,
                     label_map=dataset.label_map, cache=dataset.cache)
