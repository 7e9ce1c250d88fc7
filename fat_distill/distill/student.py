"""The student and its baselines: trained by one function, evaluated on query/gallery by another.

``method`` picks what the student learns from (see
:class:`~fat_distill.distill.config.StudentConfig`): the teacher's soft labels
(``distilled``), or the given labels with CE, CE + batch-hard triplet or hybrid
FAT (the baselines), or the true labels (``oracle``). Everything else — model,
sampler, optimiser, schedule, evaluation — is shared, so the methods differ
only in their labels and loss.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fat_distill.config_hash import config_hash
from fat_distill.data.image_dataset import build_label_map
from fat_distill.distill._common import (
    DatasetInput,
    align_to_rows,
    claim_directory,
    load_dataset,
    load_model,
    manifest_hash,
    new_model,
    query_and_gallery,
    stage_settings,
    train_rows,
)
from fat_distill.distill.config import ROW_FILTER_METHODS, StudentConfig
from fat_distill.distill.label_audit import propose_actions
from fat_distill.distill.soft_labels import soft_targets_for
from fat_distill.manifests import parent_ref, read_manifest, write_manifest
from fat_distill.train import DeviceSettings, build_objective, build_train_data, fit
from fat_distill.train.data import cache_policy
from fat_distill.train.distributed import TrainingSetup, fit_distributed, is_data_parallel
from fat_distill.train.model_card import class_pids_of, describe_model

log = logging.getLogger("fat_distill.distill")

PathLike = str | os.PathLike


@dataclass
class StudentResult:
    """A trained student or baseline.

    Attributes:
        checkpoint: its ``final.pt`` (model and objective state).
        label_map: ``{pid: class index}`` of its classifier (``true_pid`` for the oracle).
        history: per-epoch training statistics from :func:`fat_distill.train.fit`.
        method: the :class:`StudentConfig` method.
    """

    checkpoint: Path
    label_map: dict[Hashable, int]
    history: list[dict[str, float]]
    method: str


def student_training_rows(frame: pd.DataFrame, config: StudentConfig) -> tuple[pd.DataFrame, str]:
    """The train rows a method trains on, and the column holding their labels.

    Every method uses the train rows with an identity (pid > 0) and their given
    ``pid``, except the oracle: it uses ``true_pid`` and drops ``multi`` duplicate
    rows (under the true label each repeats a clean row of the same image).

    Raises:
        ValueError: the oracle on a manifest without ``true_pid`` (or with missing values).
    """
    where = f"student.{config.method}"
    train = train_rows(frame, where)
    if config.method != "oracle":
        return train, "pid"
    if "true_pid" not in train.columns or train["true_pid"].isna().any():
        what = "has no true_pid column" if "true_pid" not in train.columns else (
            f"lacks true_pid on {int(train['true_pid'].isna().sum())} train row(s)")
        raise ValueError(f"{where}: the oracle trains on the true labels, but the dataset manifest {what}; "
                         "use a manifest made by `fat-distill data corrupt` (it records the truth) or pick "
                         "another method")
    if "noise_kind" in train.columns:
        train = train[train["noise_kind"].fillna("clean") != "multi"].reset_index(drop=True)
    train = train.assign(true_pid=train["true_pid"].astype(np.int64))
    return train, "true_pid"


#: method → (schema of its row-filter manifest, boolean column, whether True means "train on it").
_ROW_FILTERS = {"filtered": ("teacher_round", "confident", True), "cleanlab": ("label_issues", "flagged", False)}


def filter_training_rows(train: pd.DataFrame, rows_manifest: PathLike, method: str) -> pd.DataFrame:
    """The train rows a row-filter method keeps: ``filtered`` the confident rows of a ``teacher_round``
    manifest, ``cleanlab`` the rows a ``label_issues`` manifest does not flag.

    Raises:
        ManifestError: the manifest lacks train rows of the dataset.
        ValueError: it keeps no row.
    """
    schema, column, keep_if = _ROW_FILTERS[method]
    path = Path(rows_manifest)
    flags = align_to_rows(read_manifest(path, schema), train, column, path).astype(bool)
    kept = train[flags == keep_if].reset_index(drop=True)
    if kept.empty:
        raise ValueError(f"student.{method}: {path} keeps none of the {len(train)} train rows, so there is "
                         "nothing to train on")
    log.info("student.%s: training on %d of %d train rows (%s)", method, len(kept), len(train), path.name)
    return kept


def student_label_map(frame: pd.DataFrame, config: StudentConfig) -> dict[Hashable, int]:
    """``{label: class index}`` of a method's classifier, rebuilt from the dataset manifest frame."""
    train, column = student_training_rows(frame, config)
    return build_label_map(train[column])


def distilled_targets(soft_labels_manifest: PathLike, train: pd.DataFrame, label_map: dict, config: StudentConfig):
    """The distilled student's rows and targets: ``(train, ids, probs, confident, label_column)``.

    Rows the teacher flagged are kept with their soft label, relabelled to the teacher's top-1
    identity or dropped (``config.flagged_rows``); ``label_column`` holds the hard label FAT and
    the P×K sampler use.
    """
    soft = read_manifest(soft_labels_manifest, "soft_labels")
    indexed = soft.set_index("sample_id").loc[train["sample_id"]]
    confident = indexed["confident"].to_numpy(dtype=bool).copy()
    # Top-1 of the soft labels (rows are sorted by probability); pids outside the map fall back to the given one.
    top1 = np.array([int(v[0]) for v in indexed["topk_ids"]], dtype=np.int64)
    top1_prob = np.array([float(v[0]) for v in indexed["topk_probs"]], dtype=np.float64)
    given = train["pid"].to_numpy()
    known = np.array([p in label_map for p in top1.tolist()])
    top1 = np.where(known, top1, given)
    if config.flag_disagreeing:
        disagreeing = confident & (top1 != given)
        confident &= ~disagreeing
        log.info("student.distilled: %d kept row(s) flagged because the teacher's top-1 identity is not the given "
                 "label (flag_disagreeing)", int(disagreeing.sum()))
    if not confident.any():
        raise ValueError(f"{soft_labels_manifest}: no sample is confident, so no FAT centre can be built; "
                         "relax the teacher's confidence rule" + (" or set student.flag_disagreeing: false"
                                                                  if config.flag_disagreeing else ""))
    label_column = "pid"
    if config.label_source == "teacher":
        train = train.assign(teacher_pid=top1)
        label_column = "teacher_pid"
    if config.flagged_rows != "soft":
        if config.flagged_rows == "relabel":  # the rule `fat-distill labels export` proposes
            actions = propose_actions(~confident, given, top1, np.where(known, top1_prob, 0.0),
                                      config.relabel_min_prob)
        else:
            actions = np.where(confident, "keep", "drop")
        keep = actions != "drop"
        relabelled = np.where(actions == "relabel", top1, train[label_column].to_numpy())
        train = train.assign(student_pid=relabelled)[keep].reset_index(drop=True)
        confident = confident[keep]
        label_column = "student_pid"
        log.info("student.distilled: %d flagged row(s) relabelled, %d dropped (flagged_rows=%s)",
                 int((actions == "relabel").sum()), int((~keep).sum()), config.flagged_rows)
    ids, probs = soft_targets_for(soft, train["sample_id"].tolist(), label_map)
    confident = torch.from_numpy(confident)
    if config.given_label_weight > 0:
        ids, probs = mix_given_label(ids, probs, train["pid"].map(label_map).to_numpy(), confident,
                                     config.given_label_weight)
    return train, ids, probs, confident, label_column


def mix_given_label(ids: torch.Tensor, probs: torch.Tensor, given: np.ndarray, confident: torch.Tensor,
                    weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse targets ``w·one-hot(given) + (1−w)·soft`` for confident rows; other rows keep ``soft``.

    Args:
        ids / probs: ``(N, k)`` class indices (−1 padding) and probabilities of the soft labels.
        given: ``(N,)`` class index of each row's given label.
        confident: ``(N,)`` bool.
        weight: w in [0, 1].

    Returns:
        ``(N, k+1)`` ids and probs; the given label is prepended (duplicates add up when made dense).
    """
    w = torch.where(confident, torch.tensor(float(weight)), torch.tensor(0.0)).to(probs.dtype)
    # np.array copies: a frame's column array can be read-only, which torch.from_numpy warns about
    given_ids = torch.from_numpy(np.array(given, dtype=np.int64)).to(ids.dtype).unsqueeze(1)
    mixed_ids = torch.cat([given_ids, ids], dim=1)
    mixed_probs = torch.cat([w.unsqueeze(1), probs * (1 - w).unsqueeze(1)], dim=1)
    return mixed_ids, mixed_probs


def train_student(
    dataset_manifest: PathLike,
    config: StudentConfig,
    out_dir: PathLike,
    device: str | torch.device | None = "auto",
    *,
    soft_labels_manifest: PathLike | None = None,
    rows_manifest: PathLike | None = None,
    progress: bool = False,
    tensorboard_dir: PathLike | None = None,
) -> StudentResult:
    """Train the student (``distilled``) or a baseline on the train split of a ``dataset`` manifest.

    Checkpoints go to ``out_dir`` (epoch files, ``final.pt``, ``stage.json``); a killed
    run resumes from the last epoch and a finished one is loaded, not retrained. A
    folder holding a run of another method, config or input is refused. ``final.pt``
    carries a model card (:class:`fat_distill.train.model_card.ModelCard`: architecture,
    image size, normalisation, class → pid, flip test, distance), so
    :func:`fat_distill.load_student` can rebuild the model without this config.

    Args:
        dataset_manifest: the ``dataset`` manifest (noisy ``pid``; ``true_pid`` for the oracle).
        config: the student's settings; ``config.method`` picks the method.
        out_dir: checkpoint folder of this method.
        device: ``"auto"``, ``"cpu"`` or ``"cuda:N"``. Not used when ``config.train.devices``
            has two or more entries: training then runs data-parallel on those devices
            (:func:`fat_distill.train.fit_distributed`, one spawned process per device).
        soft_labels_manifest: the teacher's ``soft_labels`` manifest; required for
            ``distilled``, refused for the other methods (they do not use it).
        rows_manifest: the rows a row-filter method trains on, required for them and refused
            otherwise: ``filtered`` takes the final ``teacher_round`` manifest (its confident rows),
            ``cleanlab`` the ``label_issues`` manifest (its rows not flagged). The classifier keeps
            every train identity, so its shape does not depend on the filter.
        progress: show training progress bars.
        tensorboard_dir: also log each epoch as TensorBoard scalars under ``tensorboard_dir/student.<method>``
            (every epoch also goes to ``out_dir/history.parquet``).

    Returns:
        :class:`StudentResult`.
    """
    method = config.method
    stage = f"student.{method}"
    if method == "distilled" and soft_labels_manifest is None:
        raise ValueError(f"{stage}: the distilled student learns from the teacher's soft labels; pass "
                         "soft_labels_manifest (made by make_soft_labels)")
    if method != "distilled" and soft_labels_manifest is not None:
        raise ValueError(f"{stage}: method {method!r} trains on hard labels and would ignore soft_labels_manifest; "
                         "use method='distilled' or drop the argument")
    if (method in ROW_FILTER_METHODS) != (rows_manifest is not None):
        raise ValueError(f"{stage}: " + (f"method {method!r} trains on the rows another stage keeps; pass "
                                         "rows_manifest (filtered: the final teacher_round manifest, cleanlab: "
                                         "the label_issues manifest)" if rows_manifest is None else
                                         f"method {method!r} trains on every train row and would ignore "
                                         "rows_manifest; drop the argument"))
    dataset = load_dataset(dataset_manifest)
    train, label_column = student_training_rows(dataset.frame, config)
    label_map = build_label_map(train[label_column])
    if rows_manifest is not None:
        train = filter_training_rows(train, rows_manifest, method)
    card = describe_model(config.train, class_pids_of(label_map), kind="student", method=method, stage=stage,
                          label_column=label_column, flip_test=config.flip_test, distance=config.distance)
    soft_ids = soft_probs = confident = None
    if method == "distilled":
        train, soft_ids, soft_probs, confident, label_column = distilled_targets(
            soft_labels_manifest, train, label_map, config)

    out_dir = Path(out_dir)
    claim_directory(out_dir, {"stage": stage, "config": config.training_hash(), "dataset": dataset.content_hash,
                              "soft_labels": manifest_hash(soft_labels_manifest),
                              **({"rows": manifest_hash(rows_manifest)} if rows_manifest is not None else {})}, stage)
    setup = functools.partial(_student_setup, train, dataset.root, label_column, label_map, soft_ids, soft_probs,
                              confident, config, allow_outside_root=dataset.allow_outside_root,
                              cache_dir=dataset.image_cache_dir, progress=progress)
    if is_data_parallel(config.train):
        if device not in (None, "auto"):
            log.info("%s: train.devices %s set, so the device argument %s is not used", stage,
                     config.train.devices, device)
        result = fit_distributed(setup, config=config.train, checkpoint_dir=out_dir, stage=stage, progress=progress,
                                 tensorboard_dir=tensorboard_dir, model_card=card.to_dict())
    else:
        settings = stage_settings(device, config.train)
        parts = setup(settings)
        result = fit(parts.model, parts.objective, parts.dataset, parts.batch_sampler, config=config.train,
                     settings=settings, checkpoint_dir=out_dir, stage=stage, feature_dataset=parts.feature_dataset,
                     progress=progress, tensorboard_dir=tensorboard_dir,
                     model_card=card.to_dict())
    return StudentResult(checkpoint=result.final_checkpoint, label_map=label_map, history=result.history,
                         method=method)


def _student_setup(train: pd.DataFrame, root: Path, label_column: str, label_map: dict[Hashable, int],
                   soft_ids: torch.Tensor | None, soft_probs: torch.Tensor | None, confident: torch.Tensor | None,
                   config: StudentConfig, settings: DeviceSettings, *, allow_outside_root: bool = False,
                   cache_dir: Path | None = None, progress: bool = False) -> TrainingSetup:
    """The student's data, model and objective on one device (each data-parallel rank calls it too)."""
    data = build_train_data(train, root, config.train, label_column=label_column, label_map=label_map,
                            allow_outside_root=allow_outside_root, cache_dir=cache_dir, progress=progress)
    model = new_model(config.train, data.num_classes, settings)
    hard_target = "smooth" if config.smoothing > 0 else "hard"
    objective = build_objective(
        config.objective, model=model, num_classes=data.num_classes, num_samples=len(data.dataset),
        image_size=tuple(config.train.image_size), soft_ids=soft_ids, soft_probs=soft_probs, confident=confident,
        smoothing=config.smoothing, soft_smoothing=config.soft_smoothing, ce_weight=config.ce_weight,
        triplet_margin=config.triplet_margin,
        fat_margin=config.fat_margin, fat_aggregation=config.fat_aggregation, fat_cohesion=config.fat_cohesion,
        fat_cohesion_weight=config.fat_cohesion_weight, fat_negatives=config.fat_negatives, fat_k=config.fat_k,
        fat_shortlist_refresh=config.fat_shortlist_refresh, centre_update=config.centre_update,
        centre_momentum=config.centre_momentum, target="soft" if config.method == "distilled" else hard_target,
    )
    return TrainingSetup(model=model, objective=objective, dataset=data.dataset, batch_sampler=data.batch_sampler,
                         feature_dataset=data.feature_dataset)


def student_features(dataset: DatasetInput, checkpoint: PathLike, config: StudentConfig,
                     parts: Mapping[str, pd.DataFrame], device: str | torch.device | None = "auto"
                     ) -> dict[str, torch.Tensor]:
    """Embeddings of a trained student for some row sets of its dataset, as evaluation computes them.

    Args:
        dataset: the ``dataset`` manifest the student was trained on (:func:`load_dataset`).
        checkpoint: the student's ``final.pt``.
        config: the settings it was trained with (model, image size, flip test).
        parts: ``{name: rows of dataset.frame}``, e.g. ``{"query": …, "gallery": …}``.
        device: ``"auto"``, ``"cpu"`` or ``"cuda:N"``.

    Returns:
        ``{name: (len(rows), D) float32 CPU tensor}``, L2-normalised, flip-averaged when ``config.flip_test``.
    """
    from fat_distill.evaluate import extract_manifest_features

    settings = stage_settings(device, config.train)
    model = load_model(config.train, len(student_label_map(dataset.frame, config)), checkpoint, settings)
    return {name: extract_manifest_features(model, rows, dataset.root, image_size=tuple(config.train.image_size),
                                            batch_size=max(64, config.train.batch_size), device=settings.device,
                                            num_workers=config.train.num_workers, flip=config.flip_test,
                                            allow_outside_root=dataset.allow_outside_root,
                                            cache=cache_policy(config.train, dataset.image_cache_dir))
            for name, rows in parts.items()}


def evaluate_student(
    dataset_manifest: PathLike,
    checkpoint: PathLike,
    config: StudentConfig,
    out_path: PathLike,
    device: str | torch.device | None = "auto",
    plots_dir: PathLike | None = None,
) -> Path:
    """Rank the gallery for every query with a trained student and write a ``metrics`` manifest.

    Features are the model's BNNeck embeddings (flip-averaged when
    ``config.flip_test``), ranked by ``config.distance`` under the Market-1501
    protocol (:func:`fat_distill.evaluate.evaluate_retrieval`). The manifest has
    stage ``student.<method>`` and metrics rank1, rank5, rank10, mAP, mINP,
    num_valid_queries, num_queries; ``plots_dir`` gets ``cmc_<method>.png``.

    Args:
        dataset_manifest: the ``dataset`` manifest with query and gallery rows.
        checkpoint: the student's ``final.pt`` (``StudentResult.checkpoint``).
        config: the settings it was trained with (model, image size, method).
        out_path: the ``metrics`` manifest to write.
        device: ``"auto"``, ``"cpu"`` or ``"cuda:N"``.
        plots_dir: where to write the CMC plot (None: no plot).

    Returns:
        ``out_path``.
    """
    from fat_distill.evaluate import evaluate_retrieval, plot_cmc

    stage = f"student.{config.method}"
    dataset = load_dataset(dataset_manifest)
    query, gallery = query_and_gallery(dataset, stage, "retrieval evaluation")
    features = student_features(dataset, checkpoint, config, {"query": query, "gallery": gallery}, device)
    result = evaluate_retrieval(features["query"], features["gallery"],
                                query["pid"].to_numpy(dtype=np.int64, copy=True),
                                gallery["pid"].to_numpy(dtype=np.int64, copy=True),
                                query["camid"].to_numpy(dtype=np.int64, copy=True),
                                gallery["camid"].to_numpy(dtype=np.int64, copy=True), metric=config.distance)
    values = result.as_dict()
    metrics = pd.DataFrame({"stage": stage, "metric": list(values), "value": [float(v) for v in values.values()]})
    out_path = Path(out_path)
    write_manifest(metrics, out_path, "metrics", stage=stage, config_hash=config_hash(config),
                   parents=[parent_ref(dataset.path)], extra={"checkpoint": str(checkpoint)})
    if plots_dir is not None:
        plot_cmc({config.method: result}, Path(plots_dir) / f"cmc_{config.method}.png")
    log.info("%s: rank-1 %.1f%%, mAP %.1f%% (%d valid queries)", stage, 100 * result.rank1, 100 * result.mAP,
             result.num_valid_queries)
    return out_path
