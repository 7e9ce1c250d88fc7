"""Teacher rounds: train a classifier, score every train sample's confidence, retrain on the confident.

A round r trains ``config.train.epochs`` (E) epochs of cross-entropy on the
train rows confident after round r−1 (round 0: every train row, noisy labels
included, since early epochs fit the easy, mostly clean samples first), predicts
class probabilities for *all* train rows, scores them with
:func:`~fat_distill.distill.confidence.score_confidence` and writes
``teacher_round_{r}.parquet`` (a ``teacher_round`` manifest, labels as pids).

Scoring is ``in_sample`` (the round's model scores every row, including those it
trained on) or ``oof`` (K fold models; fold k's model trains on the other folds'
confident rows and scores fold k). Folds are independent:
:func:`run_teacher_fold` trains one, so an orchestrator can run them in parallel
on different devices, then call :func:`run_teacher_round`, which finds them done.

Layout of ``out_dir``::

    teacher_round_0.parquet, teacher_round_1.parquet, ...
    round-0/            epoch checkpoints + final.pt + stage.json (in_sample)
    round-0/fold-0/     the same per fold (oof)

A killed run resumes mid-round from the epoch checkpoints; a round whose
manifest exists with the same settings and inputs is skipped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fat_distill.data.image_dataset import build_label_map
from fat_distill.distill._common import (
    DatasetInput,
    align_to_rows,
    claim_directory,
    label_map_inverse,
    load_dataset,
    load_model,
    load_weights,
    manifest_hash,
    new_model,
    predict_logits,
    stage_settings,
    train_rows,
)
from fat_distill.distill.confidence import ConfidenceScores, confident_set_change, score_confidence
from fat_distill.distill.config import TeacherConfig
from fat_distill.manifests import ManifestError, parent_ref, read_manifest, read_manifest_meta, write_manifest
from fat_distill.train import build_objective, build_train_data, fit
from fat_distill.train.history import history_path, read_history
from fat_distill.train.model_card import class_pids_of, describe_model

log = logging.getLogger("fat_distill.distill")

PathLike = str | os.PathLike


def round_manifest_path(out_dir: PathLike, round: int) -> Path:
    """``out_dir/teacher_round_{round}.parquet``."""
    return Path(out_dir) / f"teacher_round_{round}.parquet"


def round_dir(out_dir: PathLike, round: int) -> Path:
    """Checkpoint folder of a round (in-sample scoring)."""
    return Path(out_dir) / f"round-{round}"


def fold_dir(out_dir: PathLike, round: int, fold: int) -> Path:
    """Checkpoint folder of one fold of a round (out-of-fold scoring)."""
    return round_dir(out_dir, round) / f"fold-{fold}"


def teacher_checkpoints(out_dir: PathLike, round: int, config: TeacherConfig) -> list[Path]:
    """The final weights of a round: ``[round-r/final.pt]``, or one per fold (in fold order) for oof."""
    if config.scoring == "oof":
        return [fold_dir(out_dir, round, k) / "final.pt" for k in range(config.folds)]
    return [round_dir(out_dir, round) / "final.pt"]


@dataclass
class TeacherResult:
    """What :func:`run_teacher` produced.

    Attributes:
        round_manifests: ``teacher_round_{r}.parquet`` of every round run, in order.
        checkpoints: the final round's weights (one file, or one per fold for oof);
            pass them to :func:`~fat_distill.distill.soft_labels.make_soft_labels`.
        changes: fraction of confident flags that changed from round r−1 to r, for r >= 1.
        stopped_early: the rounds stopped because a change was <= ``tolerance``.
    """

    round_manifests: list[Path]
    checkpoints: list[Path]
    changes: list[float] = field(default_factory=list)
    stopped_early: bool = False

    @property
    def final_round_manifest(self) -> Path:
        return self.round_manifests[-1]

    @property
    def final_round(self) -> int:
        return len(self.round_manifests) - 1


def assign_folds(frame: pd.DataFrame, folds: int, seed: int = 0) -> np.ndarray:
    """Out-of-fold assignment of train rows, grouped by image and stratified by given label.

    Rows sharing an image ``path`` (``multi`` duplicates) share a fold, so no fold
    model has seen a held-out image under another label. Within each identity the
    images are shuffled (``seed``) and dealt round-robin, starting where the
    previous identity stopped, so folds differ in size by at most one image group
    and every identity with at least ``folds`` images appears in every fold.

    Args:
        frame: train rows with ``path`` and ``pid``, in dataset order.
        folds: K >= 2.
        seed: seed of the shuffles; keep it fixed across rounds.

    Returns:
        ``(len(frame),)`` int64 fold of each row, in [0, K).
    """
    if folds < 2:
        raise ValueError(f"assign_folds: folds must be >= 2, got {folds}")
    paths = frame["path"].astype(str).to_numpy()
    # One group per image; its label is that of the first row of the image (sorted by sample_id).
    order = np.lexsort((frame["sample_id"].astype(str).to_numpy(), paths))
    unique_paths, first = np.unique(paths[order], return_index=True)
    group_pid = frame["pid"].to_numpy()[order[first]]
    rng = np.random.default_rng(seed)
    group_fold = np.empty(len(unique_paths), dtype=np.int64)
    cursor = 0
    for pid in np.unique(group_pid):
        groups = rng.permutation(np.flatnonzero(group_pid == pid))
        group_fold[groups] = (cursor + np.arange(len(groups))) % folds
        cursor = (cursor + len(groups)) % folds
    return group_fold[np.searchsorted(unique_paths, paths)]


@dataclass
class _RoundInputs:
    """Everything a round needs, read once: train rows, label map, confident mask, folds, run key."""

    dataset: DatasetInput
    train: pd.DataFrame
    label_map: dict[Hashable, int]
    labels: np.ndarray  # (N,) class index of the given pid
    confident: np.ndarray  # (N,) bool: rows the round may train on
    folds: np.ndarray | None  # (N,) fold ids (oof)
    prev_path: Path | None
    key: dict


def _round_inputs(dataset_manifest: PathLike, prev_round_manifest: PathLike | None, config: TeacherConfig,
                  round: int) -> _RoundInputs:
    where = f"teacher round {round}"
    if round < 0:
        raise ValueError(f"{where}: round must be >= 0")
    if (round == 0) != (prev_round_manifest is None):
        raise ValueError(f"{where}: round 0 starts from the given labels (prev_round_manifest=None); round r >= 1 "
                         "needs the manifest of round r−1")
    dataset = load_dataset(dataset_manifest)
    train = train_rows(dataset.frame, where)
    label_map = build_label_map(train["pid"])
    labels = np.array([label_map[p] for p in train["pid"].tolist()], dtype=np.int64)
    confident = np.ones(len(train), dtype=bool)
    prev_path = None
    if prev_round_manifest is not None:
        prev_path = Path(prev_round_manifest)
        prev = read_manifest(prev_path, "teacher_round")
        prev_round = int(prev["round"].iloc[0]) if len(prev) else -1
        if prev_round != round - 1:
            raise ValueError(f"{where}: {prev_path} is the manifest of round {prev_round}, expected round {round - 1}")
        confident = align_to_rows(prev, train, "confident", prev_path).astype(bool)
    folds = assign_folds(train, config.folds, config.train.seed) if config.scoring == "oof" else None
    key = {"stage": f"teacher.round{round}", "round_hash": config.round_hash(), "dataset": dataset.content_hash,
           "previous": None if prev_path is None else manifest_hash(prev_path)}
    return _RoundInputs(dataset, train, label_map, labels, confident, folds, prev_path, key)


def _train_model(inputs: _RoundInputs, config: TeacherConfig, round: int, mask: np.ndarray, directory: Path,
                 init_from: Path | None, device, stage: str, progress: bool, tensorboard_dir: PathLike | None):
    train = config.train.resolved("teacher")  # unset epochs are a round's, not a student's
    settings = stage_settings(device, train)
    data = build_train_data(inputs.train, inputs.dataset.root, train, label_map=inputs.label_map,
                            train_mask=mask, allow_outside_root=inputs.dataset.allow_outside_root,
                            cache_dir=inputs.dataset.image_cache_dir, progress=progress)
    model = new_model(train, data.num_classes, settings)
    if init_from is not None:
        if not init_from.is_file():
            raise FileNotFoundError(f"{stage}: retrain='continue' starts from {init_from}, which does not exist; "
                                    f"run round {round - 1} first")
        load_weights(model, init_from, settings.device)
    objective = build_objective("ce", model=model, num_classes=data.num_classes, num_samples=len(data.dataset),
                                image_size=tuple(train.image_size), target="hard")
    # The teacher's only use of its features (logits for soft labels) runs without flip averaging.
    card = describe_model(train, class_pids_of(inputs.label_map), kind="teacher", method="teacher",
                          stage=stage, flip_test=False)
    result = fit(model, objective, data.dataset, data.batch_sampler, config=train, settings=settings,
                 checkpoint_dir=directory, stage=stage, feature_dataset=data.feature_dataset, progress=progress,
                 tensorboard_dir=tensorboard_dir, model_card=card.to_dict())
    return model, data, settings, result


def near_chance_warning(accuracy: float | None, num_classes: int, round: int, config: TeacherConfig) -> str | None:
    """A warning when a teacher round's model barely learned its training rows, else None.

    Near chance is a final-epoch train accuracy below twice chance (2 / C) or below 20 %: the
    round's confidence and soft labels are then noise, and every later stage inherits that. The
    message names the settings that usually fix it, with their current (resolved) values.

    Args:
        accuracy: the round's train accuracy on the rows it trained on (last epoch; mean over folds for oof).
        num_classes: C, the identities it classifies.
        round: r, for the message.
        config: the teacher's settings.
    """
    if accuracy is None or num_classes < 1:
        return None
    floor = max(2.0 / num_classes, 0.2)
    if accuracy >= floor:
        return None
    train = config.train.resolved("teacher")
    return (f"teacher round {round} ended at {100 * accuracy:.1f}% train accuracy on its training rows "
            f"(chance {100 / num_classes:.1f}%, warning below {100 * floor:.0f}%): its confidence and soft labels "
            f"are close to noise. Raise teacher.train.epochs (now {train.epochs}) or change teacher.train.lr "
            f"(now {train.lr:g}, {train.regime} regime), or pick a model that learns this data "
            f"(teacher.train.model, now {train.model}; see benchmarks/README.md, \"Backbones\")")


def _final_accuracy(history: list[dict[str, float]]) -> float | None:
    return float(history[-1]["accuracy"]) if history and "accuracy" in history[-1] else None


def keep_identities_in_every_fold(confident: np.ndarray, labels: np.ndarray, folds: np.ndarray,
                                  confidence: np.ndarray) -> np.ndarray:
    """Confident flags such that every fold model of the next round trains on every identity.

    Fold ``k``'s model trains on the confident rows outside fold ``k``
    (:func:`fold_train_mask`). ``min_confident_per_identity`` counts over the whole
    train set, so an identity whose confident rows all sit in fold ``k`` would be
    missing from that model, and all its rows in fold ``k`` would then look
    mislabelled. For each such (identity, fold) the most confident row of the
    identity outside fold ``k`` is kept confident.

    Args:
        confident: ``(N,)`` bool, the rule's decision.
        labels: ``(N,)`` int class index of the given label.
        folds: ``(N,)`` fold of each row.
        confidence: ``(N,)`` the rule's confidence (ties broken by row order).

    Returns:
        ``(N,)`` bool: ``confident`` with the fewest rows added (none when nothing is missing).
    """
    confident = np.asarray(confident, dtype=bool).copy()
    labels, folds = np.asarray(labels, dtype=np.int64), np.asarray(folds, dtype=np.int64)
    num_classes, num_folds = int(labels.max()) + 1, int(folds.max()) + 1
    rows = np.zeros((num_classes, num_folds), dtype=np.int64)
    kept = np.zeros((num_classes, num_folds), dtype=np.int64)
    np.add.at(rows, (labels, folds), 1)
    np.add.at(kept, (labels, folds), confident.astype(np.int64))
    # An identity is missing from fold k's training set if it has rows outside k but none of them is confident.
    missing = (rows.sum(1, keepdims=True) - rows > 0) & (kept.sum(1, keepdims=True) - kept == 0)
    for label, fold in zip(*np.nonzero(missing)):
        outside = np.flatnonzero((labels == label) & (folds != fold))
        if confident[outside].any():  # an earlier promotion already covers this fold
            continue
        confident[outside[np.argmax(np.asarray(confidence)[outside])]] = True
    return confident


def fold_train_mask(confident: np.ndarray, folds: np.ndarray, fold: int) -> np.ndarray:
    """Rows fold ``fold``'s model trains on: confident and not in the held-out fold.

    Args:
        confident: ``(N,)`` bool, confident after the previous round (all True in round 0).
        folds: ``(N,)`` fold of each row (:func:`assign_folds`).
        fold: the held-out fold.

    Returns:
        ``(N,)`` bool.
    """
    return np.asarray(confident, dtype=bool) & (np.asarray(folds) != fold)


def run_teacher_fold(dataset_manifest: PathLike, prev_round_manifest: PathLike | None, config: TeacherConfig,
                     round: int, fold: int, out_dir: PathLike, device: str | torch.device | None = "auto", *,
                     progress: bool = False, tensorboard_dir: PathLike | None = None) -> Path:
    """Train the model of one fold of an out-of-fold round (independent of the other folds).

    Fold k's model trains E epochs of cross-entropy on the rows confident after
    round r−1 that are not in fold k; its checkpoints and ``history.parquet`` go to
    ``out_dir/round-{r}/fold-{k}/`` (resumed if the run was killed); with
    ``tensorboard_dir`` its epochs are also logged there (see :func:`fat_distill.train.fit`).

    Returns:
        the fold model's ``final.pt``.
    """
    if config.scoring != "oof":
        raise ValueError("run_teacher_fold is for scoring='oof'; with in_sample scoring call run_teacher_round")
    if not 0 <= fold < config.folds:
        raise ValueError(f"fold must be in [0, {config.folds}), got {fold}")
    inputs = _round_inputs(dataset_manifest, prev_round_manifest, config, round)
    return _run_fold(inputs, config, round, fold, Path(out_dir), device, progress, tensorboard_dir)


def _run_fold(inputs: _RoundInputs, config: TeacherConfig, round: int, fold: int, out_dir: Path, device,
              progress: bool, tensorboard_dir: PathLike | None = None) -> Path:
    stage = f"teacher.round{round}.fold{fold}"
    directory = fold_dir(out_dir, round, fold)
    mask = fold_train_mask(inputs.confident, inputs.folds, fold)
    claim_directory(directory, {**inputs.key, "fold": fold, "train_rows": int(mask.sum())}, stage)
    init = _continue_from(inputs, config, out_dir, round, fold)
    _, _, _, result = _train_model(inputs, config, round, mask, directory, init, device, stage, progress,
                                   tensorboard_dir)
    return result.final_checkpoint


def _continue_from(inputs: _RoundInputs, config: TeacherConfig, out_dir: Path, round: int,
                   fold: int | None = None) -> Path | None:
    """``retrain='continue'``: the previous round's final weights (of the same fold for oof), else None.

    They sit beside ``out_dir`` when this folder ran that round; a round taken from another
    run's cache keeps them in that run's folder, which its manifest records.
    """
    if config.retrain != "continue" or not round:
        return None
    local = (round_dir(out_dir, round - 1) if fold is None else fold_dir(out_dir, round - 1, fold)) / "final.pt"
    if local.is_file() or inputs.prev_path is None:
        return local
    recorded = read_manifest_meta(inputs.prev_path).extra.get("checkpoints") or []
    index = 0 if fold is None else fold
    if index < len(recorded) and Path(recorded[index]).is_file():
        return Path(recorded[index])
    return local


def _fold_accuracy(out_dir: Path, round: int, fold: int) -> float | None:
    """The last epoch's train accuracy of a finished fold model (its history.parquet; None if absent)."""
    path = history_path(fold_dir(out_dir, round, fold))
    if not path.exists():
        return None
    history = read_history(path)
    return float(history["accuracy"].iloc[-1]) if len(history) and "accuracy" in history.columns else None


def _oof_logits(inputs: _RoundInputs, config: TeacherConfig, round: int, out_dir: Path, device, progress: bool,
                tensorboard_dir: PathLike | None) -> np.ndarray:
    """``(N, C)`` out-of-fold logits: fold k's model (trained, or found done) scores the rows of fold k."""
    logits = np.zeros((len(inputs.train), len(inputs.label_map)), dtype=np.float32)
    settings = stage_settings(device, config.train)
    data = build_train_data(inputs.train, inputs.dataset.root, config.train, label_map=inputs.label_map,
                            allow_outside_root=inputs.dataset.allow_outside_root,
                            cache_dir=inputs.dataset.image_cache_dir)
    for fold in range(config.folds):
        checkpoint = _run_fold(inputs, config, round, fold, out_dir, device, progress, tensorboard_dir)
        held_out = np.flatnonzero(inputs.folds == fold)
        model = load_model(config.train, len(inputs.label_map), checkpoint, settings)
        logits[held_out] = predict_logits(model, data.feature_dataset, settings, indices=held_out,
                                          batch_size=max(64, config.train.batch_size),
                                          num_workers=config.train.num_workers)
    return logits


def out_of_fold_probabilities(dataset_manifest: PathLike, config: TeacherConfig, out_dir: PathLike,
                              device: str | torch.device | None = "auto", *, progress: bool = False,
                              tensorboard_dir: PathLike | None = None
                              ) -> tuple[pd.DataFrame, dict[Hashable, int], np.ndarray, np.ndarray]:
    """Class probabilities of every train row from the K fold models of an out-of-fold round 0.

    Fold k's model trains ``config.train`` on the given labels of the rows outside fold k
    (:func:`run_teacher_fold`; done folds are reused) and scores fold k, so no row is scored by
    a model that saw it: the input :func:`cleanlab.filter.find_label_issues` expects.

    Args:
        dataset_manifest: the ``dataset`` manifest.
        config: settings with ``scoring='oof'``; ``folds`` is K, ``train`` each fold model's training.
        out_dir: where the fold models go (``round-0/fold-k/``).

    Returns:
        ``(train, label_map, labels, probs)``: the train rows in dataset order with their ``fold``
        column added, ``{pid: class index}``, the ``(N,)`` class index of each given label and the
        ``(N, C)`` float64 out-of-fold probabilities.
    """
    if config.scoring != "oof":
        raise ValueError("out_of_fold_probabilities needs scoring='oof' (K fold models)")
    inputs = _round_inputs(dataset_manifest, None, config, 0)
    logits = _oof_logits(inputs, config, 0, Path(out_dir), device, progress, tensorboard_dir)
    probs = torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()
    return inputs.train.assign(fold=inputs.folds), inputs.label_map, inputs.labels, probs


def _round_is_done(path: Path, key: dict, parents: list[Path]) -> bool:
    if not path.exists():
        return False
    try:
        meta = read_manifest_meta(path)
    except ManifestError:
        return False
    expected = [manifest_hash(p) for p in parents]
    return (meta.schema == "teacher_round" and meta.config_hash == key["round_hash"]
            and [p.get("content_hash") for p in meta.parents] == expected)


def run_teacher_round(dataset_manifest: PathLike, prev_round_manifest: PathLike | None, config: TeacherConfig,
                      round: int, out_dir: PathLike, device: str | torch.device | None = "auto", *,
                      progress: bool = False, tensorboard_dir: PathLike | None = None) -> Path:
    """Run (or skip, when already done) one teacher round and write its ``teacher_round`` manifest.

    Args:
        dataset_manifest: the ``dataset`` manifest (its train rows are trained on and scored).
        prev_round_manifest: ``teacher_round_{r-1}.parquet``, or None for round 0.
        config: the teacher's settings.
        round: r, 0-based.
        out_dir: the teacher's folder (manifests and checkpoints, see the module docstring).
        device: ``"auto"``, ``"cpu"`` or ``"cuda:N"``.
        progress: show training progress bars.
        tensorboard_dir: also log each model's epochs as TensorBoard scalars under ``tensorboard_dir/<stage>``.

    Returns:
        ``out_dir/teacher_round_{r}.parquet``.
    """
    out_dir = Path(out_dir)
    inputs = _round_inputs(dataset_manifest, prev_round_manifest, config, round)
    path = round_manifest_path(out_dir, round)
    parents = [inputs.dataset.path] + ([inputs.prev_path] if inputs.prev_path else [])
    if _round_is_done(path, inputs.key, parents):
        log.info("teacher round %d: %s is up to date, skipped", round, path)
        return path

    n = len(inputs.train)
    if config.scoring == "in_sample":
        stage = f"teacher.round{round}"
        directory = round_dir(out_dir, round)
        claim_directory(directory, {**inputs.key, "train_rows": int(inputs.confident.sum())}, stage)
        init = _continue_from(inputs, config, out_dir, round)
        model, data, settings, fitted = _train_model(inputs, config, round, inputs.confident, directory, init,
                                                     device, stage, progress, tensorboard_dir)
        train_accuracy = _final_accuracy(fitted.history)
        logits = predict_logits(model, data.feature_dataset, settings, batch_size=max(64, config.train.batch_size),
                                num_workers=config.train.num_workers)
        fold_of_row = None
    else:
        logits = _oof_logits(inputs, config, round, out_dir, device, progress, tensorboard_dir)
        fold_of_row = inputs.folds
        accuracies = [a for k in range(config.folds) if (a := _fold_accuracy(out_dir, round, k)) is not None]
        train_accuracy = float(np.mean(accuracies)) if accuracies else None

    warning = near_chance_warning(train_accuracy, len(inputs.label_map), round, config)
    if warning:
        log.warning("%s", warning)
    probs = torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()
    scores = score_confidence(inputs.labels, probs, rule=config.rule, threshold=config.threshold,
                              quantile=config.quantile, min_per_class=config.min_confident_per_identity,
                              gmm_seed=config.train.seed)
    promoted = 0
    if fold_of_row is not None and config.min_confident_per_identity > 0:
        kept = keep_identities_in_every_fold(scores.confident, inputs.labels, fold_of_row, scores.confidence)
        promoted = int((kept & ~scores.confident).sum())
        if promoted:
            log.info("teacher round %d: %d sample(s) kept confident so every fold model of the next round trains "
                     "on every identity", round, promoted)
        scores = dataclasses.replace(scores, confident=kept)
    frame = _round_frame(inputs, scores, round, fold_of_row)
    change = None if round == 0 else confident_set_change(inputs.confident, scores.confident)
    write_manifest(frame, path, "teacher_round", stage=f"teacher.round{round}", config_hash=inputs.key["round_hash"],
                   parents=[parent_ref(p) for p in parents],
                   extra={"round": round, "rule": config.rule, "scoring": config.scoring,
                          "confidence_cut": _confidence_cut(config),
                          "confident_fraction": float(scores.confident.mean()), "change": change,
                          "kept_for_folds": promoted, "train_accuracy": train_accuracy, "warning": warning,
                          "checkpoints": [str(p) for p in teacher_checkpoints(out_dir, round, config)]})
    log.info("teacher round %d: %d of %d samples confident (%.1f%%)%s", round, int(scores.confident.sum()), n,
             100 * scores.confident.mean(), "" if change is None else f", {100 * change:.1f}% changed")
    return path


def _confidence_cut(config: TeacherConfig) -> float | None:
    """The confidence below which the rule flags a sample (None: the quantile rule cuts per identity)."""
    return {"threshold": config.threshold, "gmm": 0.5}.get(config.rule)


def _round_frame(inputs: _RoundInputs, scores: ConfidenceScores, round: int,
                 folds: np.ndarray | None) -> pd.DataFrame:
    to_pid = label_map_inverse(inputs.label_map)
    frame = pd.DataFrame({
        "sample_id": inputs.train["sample_id"].astype(str).to_numpy(),
        "round": np.full(len(scores), round, dtype=np.int32),
        "given_label": inputs.train["pid"].to_numpy(dtype=np.int64),
        "pred_label": to_pid[scores.pred_label],
        "confidence": scores.confidence.astype(np.float32),
        "max_prob": np.clip(scores.max_prob, 0.0, 1.0).astype(np.float32),
        "entropy": scores.entropy.astype(np.float32),
        "confident": scores.confident.astype(bool),
        "loss": scores.loss.astype(np.float32),
    })
    if folds is not None:
        frame["fold"] = folds.astype(np.int32)
    return frame


def run_teacher(dataset_manifest: PathLike, config: TeacherConfig, out_dir: PathLike,
                device: str | torch.device | None = "auto", *, progress: bool = False,
                tensorboard_dir: PathLike | None = None) -> TeacherResult:
    """Run the teacher's rounds until ``config.rounds`` or until the confident set settles.

    Rounds already done (same settings, same inputs) are skipped, so calling this
    again after a crash or with a larger ``rounds`` only does the missing work.

    Args:
        dataset_manifest: the ``dataset`` manifest.
        config: the teacher's settings.
        out_dir: where manifests and checkpoints go.
        device: ``"auto"``, ``"cpu"`` or ``"cuda:N"``.
        progress: show training progress bars.
        tensorboard_dir: also log each model's epochs as TensorBoard scalars under ``tensorboard_dir/<stage>``.

    Returns:
        :class:`TeacherResult`.
    """
    out_dir = Path(out_dir)
    manifests: list[Path] = []
    changes: list[float] = []
    stopped_early = False
    previous: pd.DataFrame | None = None
    for r in range(config.rounds):
        path = run_teacher_round(dataset_manifest, manifests[-1] if manifests else None, config, r, out_dir, device,
                                 progress=progress, tensorboard_dir=tensorboard_dir)
        manifests.append(path)
        current = read_manifest(path, "teacher_round")
        if previous is not None:
            flags = current.set_index("sample_id")["confident"]
            before = previous.set_index("sample_id")["confident"].loc[flags.index]
            change = confident_set_change(before.to_numpy(), flags.to_numpy())
            changes.append(change)
            if change <= config.tolerance:
                stopped_early = r < config.rounds - 1
                if stopped_early:
                    log.info("teacher: confident set changed by %.2f%% <= tolerance %.2f%% after round %d; stopping",
                             100 * change, 100 * config.tolerance, r)
                break
        previous = current
    final_round = len(manifests) - 1
    return TeacherResult(round_manifests=manifests, checkpoints=teacher_checkpoints(out_dir, final_round, config),
                         changes=changes, stopped_early=stopped_early)
