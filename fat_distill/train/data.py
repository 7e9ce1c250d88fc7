"""From a manifest frame to what the training loop consumes: datasets, label map, P×K batches."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fat_distill.data.image_dataset import ManifestImageDataset
from fat_distill.data.sampler import IdentityBatchSampler
from fat_distill.data.transforms import build_transforms
from fat_distill.train.config import TrainConfig

log = logging.getLogger("fat_distill.train")


@dataclass
class TrainData:
    """Training images with augmentation, the same images with eval transforms, and the batches."""

    dataset: ManifestImageDataset
    feature_dataset: ManifestImageDataset
    batch_sampler: IdentityBatchSampler
    label_map: dict[Hashable, int]

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


def build_train_data(
    frame: pd.DataFrame,
    root: str | Path,
    config: TrainConfig,
    *,
    label_column: str = "pid",
    label_map: Mapping[Hashable, int] | None = None,
    train_mask: np.ndarray | None = None,
    allow_outside_root: bool = False,
) -> TrainData:
    """Datasets and a P×K batch sampler over the rows of ``frame``.

    Args:
        frame: training rows (sample_id, path, label column), in the order dataset indices follow.
        root: folder the ``path`` column is relative to.
        label_column: ``pid`` (given labels) or ``true_pid`` (the oracle).
        label_map: label → class index; default: built from ``frame`` (sorted labels).
        train_mask: ``(len(frame),)`` bool: only these rows are sampled (e.g. confident samples).
        allow_outside_root: permit paths that leave ``root`` (see :mod:`fat_distill.data.paths`).
    """
    frame = frame.reset_index(drop=True)
    train_tf = build_transforms(tuple(config.image_size), train=True, flip_p=config.flip_p, pad=config.resolved().pad,
                                random_erasing_p=config.random_erasing_p)
    eval_tf = build_transforms(tuple(config.image_size), train=False)
    dataset = ManifestImageDataset(frame, root, transform=train_tf, label_column=label_column, label_map=label_map,
                                   allow_outside_root=allow_outside_root)
    # Same rows and root, already checked: the second dataset need not walk the paths again.
    feature_dataset = ManifestImageDataset(frame, root, transform=eval_tf, label_column=label_column,
                                           label_map=dataset.label_map, allow_outside_root=True)
    sampler = IdentityBatchSampler(dataset.labels, batch_identities(dataset.labels, config.batch_p, train_mask),
                                   config.batch_k, seed=config.seed, train_mask=train_mask)
    return TrainData(dataset=dataset, feature_dataset=feature_dataset, batch_sampler=sampler,
                     label_map=dataset.label_map)
