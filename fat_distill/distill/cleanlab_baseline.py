"""The ``cleanlab`` baseline's row filter: confident learning on K-fold out-of-fold probabilities.

What a practitioner would do instead of distilling: train K classifiers on the given labels, each
scoring the fold it did not see (:func:`~fat_distill.distill.teacher.out_of_fold_probabilities`, the
teacher's out-of-fold machinery), hand the probabilities to :func:`cleanlab.filter.find_label_issues`,
and retrain on the rows it does not flag (the ``cleanlab`` student method). The kept and flagged rows
are written as a ``label_issues`` manifest, so the filter can be audited and reused.

Layout of ``out_dir``::

    label_issues.parquet
    round-0/fold-k/      checkpoints of the fold models (as a teacher's out-of-fold round 0)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from fat_distill.config_hash import config_hash
from fat_distill.config_sections import Section
from fat_distill.distill._common import label_map_inverse, load_dataset
from fat_distill.distill.config import TeacherConfig
from fat_distill.distill.teacher import out_of_fold_probabilities
from fat_distill.manifests import parent_ref, write_manifest

log = logging.getLogger("fat_distill.distill")

PathLike = str | os.PathLike

LABEL_ISSUES_FILE = "label_issues.parquet"


class CleanlabConfig(Section):
    """Settings of the ``cleanlab`` baseline's filter (the retraining uses the student section's)."""

    folds: int = Field(5, ge=2, description="K fold models giving out-of-fold probabilities (cleanlab's default 5)")
    epochs: int | None = Field(
        None, ge=1, description="epochs of each fold model; None: one teacher round's (teacher.train.epochs, "
                                "resolved); the fold models otherwise train with teacher.train")
    filter_by: Literal["prune_by_noise_rate", "prune_by_class", "both", "confident_learning",
                       "predicted_neq_given", "low_normalized_margin", "low_self_confidence"] = Field(
        "prune_by_noise_rate", description="find_label_issues' filter_by (cleanlab's default)")

    def fold_teacher(self, teacher: TeacherConfig) -> TeacherConfig:
        """The out-of-fold teacher config whose round-0 fold models give the probabilities.

        Only what changes a fold model is carried over: the teacher's training settings (epochs
        replaced by :attr:`epochs` when set); the confidence rule and rounds play no part.
        """
        train = teacher.train.resolved("teacher")
        if self.epochs is not None:
            train = train.model_copy(update={"epochs": self.epochs})
        return TeacherConfig(train=train, rounds=1, scoring="oof", folds=self.folds)


def _find_label_issues():
    try:
        from cleanlab.filter import find_label_issues
    except ImportError as exc:  # pragma: no cover - cleanlab is a dependency; a broken install lands here
        raise ImportError("the cleanlab baseline needs the cleanlab package: pip install 'cleanlab>=2.9'") from exc
    return find_label_issues


def label_issues_frame(train: pd.DataFrame, label_map: dict, labels: np.ndarray, probs: np.ndarray,
                       filter_by: str = "prune_by_noise_rate") -> pd.DataFrame:
    """The ``label_issues`` rows: cleanlab's verdict on each train row's given label.

    Args:
        train: train rows with ``sample_id``, ``pid`` and ``fold``, in the order of ``labels``.
        label_map: ``{pid: class index}``.
        labels: ``(N,)`` class index of each given label.
        probs: ``(N, C)`` out-of-fold class probabilities.
        filter_by: :func:`cleanlab.filter.find_label_issues`' rule.
    """
    flagged = _find_label_issues()(labels, probs, filter_by=filter_by, n_jobs=1)
    to_pid = label_map_inverse(label_map)
    return pd.DataFrame({
        "sample_id": train["sample_id"].astype(str).to_numpy(),
        "given_label": train["pid"].to_numpy(dtype=np.int64),
        "pred_label": to_pid[probs.argmax(axis=1)],
        "label_quality": np.clip(probs[np.arange(len(labels)), labels], 0.0, 1.0).astype(np.float32),
        "flagged": np.asarray(flagged, dtype=bool),
        "fold": train["fold"].to_numpy(dtype=np.int32),
    })


def find_label_issues_manifest(dataset_manifest: PathLike, config: CleanlabConfig, teacher: TeacherConfig,
                               out_dir: PathLike, device: str | torch.device | None = "auto", *,
                               progress: bool = False, tensorboard_dir: PathLike | None = None) -> Path:
    """Train the K fold models (or reuse them), run confident learning, write ``out_dir/label_issues.parquet``.

    Args:
        dataset_manifest: the ``dataset`` manifest (its train rows, given labels).
        config: K, the fold models' epochs and cleanlab's rule.
        teacher: the teacher's settings; its ``train`` trains the fold models (see :meth:`CleanlabConfig.fold_teacher`).
        out_dir: the stage folder.
        device: ``"auto"``, ``"cpu"`` or ``"cuda:N"``.

    Returns:
        the ``label_issues`` manifest.
    """
    out_dir = Path(out_dir)
    fold_teacher = config.fold_teacher(teacher)
    train, label_map, labels, probs = out_of_fold_probabilities(dataset_manifest, fold_teacher, out_dir, device,
                                                                progress=progress, tensorboard_dir=tensorboard_dir)
    frame = label_issues_frame(train, label_map, labels, probs, config.filter_by)
    path = out_dir / LABEL_ISSUES_FILE
    dataset = load_dataset(dataset_manifest)
    flagged = int(frame["flagged"].sum())
    write_manifest(frame, path, "label_issues", stage="cleanlab",
                   config_hash=config_hash({"cleanlab": config, "fold_teacher": fold_teacher.round_hash()}),
                   parents=[parent_ref(dataset.path)],
                   extra={"folds": config.folds, "filter_by": config.filter_by, "flagged": flagged,
                          "kept": len(frame) - flagged, "epochs": fold_teacher.train.epochs})
    log.info("cleanlab: %d of %d train rows flagged (%.1f%%) by %s on %d-fold out-of-fold probabilities", flagged,
             len(frame), 100 * flagged / max(1, len(frame)), config.filter_by, config.folds)
    return path
