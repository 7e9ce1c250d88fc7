"""Noise robustness: noise detection of the teacher vs cleanlab, and the distilled student vs the baselines.

For every (dataset, noise rate, seed) condition this script

1. injects ``mix`` noise (flip, pair, outlier in equal parts) into the train
   split with :func:`fat_distill.data.corrupt_labels`;
2. (a) trains the out-of-fold teacher round 0 and gives its out-of-fold
   predicted probabilities, unchanged, to ``cleanlab.filter.find_label_issues``
   and to our confidence rules (:func:`fat_distill.distill.score_confidence`),
   then runs each full multi-round teacher asked for (``--teachers``) and scores
   its final confident set against the ground truth (precision, recall, F1 of
   flagging the noisy train rows); with ``--equal-budget`` cleanlab also gets the
   teacher's training budget, in two ways: out-of-fold models trained rounds × E
   epochs (the epochs the teacher's last ``continue`` model has seen), and cleanlab
   iterated like the teacher (flag, retrain the fold models on the kept rows, flag
   again) for the same number of rounds of E epochs;
3. (b) trains the distilled student on the soft labels of the first teacher
   (``--distill-all``: also one student per further teacher, ``distilled@<teacher>``) and
   the baselines ``ce``, ``ce_triplet``, ``fat_hybrid_noisy`` and ``oracle``,
   all with the same model and schedule, and evaluates mAP / rank-1 on
   query/gallery; for every method it also measures the accuracy of the trained
   model on its own training labels (eval transforms), overall and on the noisy
   rows, which says whether the baselines fitted the noise.

Rows are appended to ``detection.csv`` and ``retrieval.csv`` under ``--out`` as
soon as they are measured, and ``summary.md`` (mean and range over seeds) is
rewritten after every condition, so a run cut short still leaves a table. A
finished (condition, method) row is skipped when the script runs again.

Example (the numbers in ``benchmarks/README.md``)::

    .venv/bin/python benchmarks/bench_noise.py --datasets synth orl --rates 0 0.2 0.4 --seeds 0 1 \\
        --out benchmarks/results/noise
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fat_distill.data import build_label_map, corrupt_labels, generate_synthetic_reid, index_dataset
from fat_distill.distill import (
    StudentConfig,
    TeacherConfig,
    assign_folds,
    evaluate_student,
    keep_identities_in_every_fold,
    make_soft_labels,
    run_teacher,
    run_teacher_round,
    score_confidence,
    student_training_rows,
    round_dir,
    round_manifest_path,
    teacher_checkpoints,
    train_student,
)
from fat_distill.distill._common import load_model, predict_logits, stage_settings
from fat_distill.evaluate import noise_detection_report
from fat_distill.manifests import parent_ref, read_manifest, write_manifest
from fat_distill.train import TrainConfig, build_train_data

log = logging.getLogger("bench_noise")

BASELINES = ("ce", "ce_triplet", "ce_msml", "ce_quadruplet", "fat_hybrid_noisy", "oracle")
METHODS = ("distilled",) + BASELINES
# What a run trains unless --methods says otherwise (the triplet follow-ups are opt-in).
DEFAULT_METHODS = ("distilled", "ce", "ce_triplet", "fat_hybrid_noisy", "oracle")
DEFAULT_ORL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "orl_faces"
DETECTION_FILE, RETRIEVAL_FILE, SUMMARY_FILE = "detection.csv", "retrieval.csv", "summary.md"


@dataclass(frozen=True)
class TeacherVariant:
    """One full teacher to run: ``<scoring>:<rule>:<retrain>[:<epochs>]``, e.g. ``oof:gmm:fresh``.

    ``epochs`` (optional) replaces E, the epochs of each round, for this teacher only:
    ``oof:gmm:fresh:30`` next to ``oof:gmm:continue`` with E = 10 and 3 rounds gives
    the fresh teacher's every model the 30 epochs the continued last model has seen.
    """

    scoring: str
    rule: str
    retrain: str
    epochs: int | None = None

    @classmethod
    def parse(cls, text: str) -> TeacherVariant:
        parts = text.split(":")
        if (len(parts) not in (3, 4) or parts[0] not in ("oof", "in_sample")
                or parts[1] not in ("gmm", "threshold", "quantile") or parts[2] not in ("fresh", "continue")
                or (len(parts) == 4 and not (parts[3].isdigit() and int(parts[3]) > 0))):
            raise argparse.ArgumentTypeError(
                f"teacher {text!r} must be <scoring>:<rule>:<retrain>[:<epochs per round>] with scoring "
                "oof|in_sample, rule gmm|threshold|quantile, retrain fresh|continue, epochs a positive integer "
                "(e.g. oof:gmm:fresh or oof:gmm:fresh:30)")
        return cls(*parts[:3], epochs=int(parts[3]) if len(parts) == 4 else None)

    @property
    def name(self) -> str:
        base = f"{self.scoring}:{self.rule}:{self.retrain}"
        return base if self.epochs is None else f"{base}:{self.epochs}"


@dataclass
class Condition:
    """One (dataset, noise rate, seed) cell of the benchmark and its files."""

    dataset: str
    rate: float
    seed: int
    manifest: Path
    work: Path

    @property
    def key(self) -> dict:
        return {"dataset": self.dataset, "rate": self.rate, "seed": self.seed}


# --------------------------------------------------------------------------- data


def synth_root(work: Path, seed: int, *, identities: int, images_per_identity: int,
               size: tuple[int, int]) -> Path:
    """Generate (once) the synthetic Market-1501-layout dataset of ``seed`` and return its root."""
    root = work / "data" / f"synth-{identities}x{images_per_identity}-{size[0]}x{size[1]}-seed{seed}"
    if not (root / "synth.json").is_file():
        generate_synthetic_reid(root, identities=identities, images_per_identity=images_per_identity, size=size,
                                seed=seed, overwrite=True)
    return root


def clean_frame(dataset: str, root: Path, seed: int) -> pd.DataFrame:
    """The clean ``dataset`` frame: synthetic data in the Market layout; ORL with half its identities as test."""
    if dataset == "synth":
        return index_dataset(root, "market1501").frame
    # ORL has one folder per person and no cameras: half the people are test identities
    # (one query image each, nine gallery images), the other half train.
    return index_dataset(root, "folders", split_identities=0.5, seed=seed).frame


def noisy_manifest(frame: pd.DataFrame, root: Path, rate: float, seed: int, path: Path) -> Path:
    """Corrupt the train split with ``mix`` noise (flip, pair, outlier) and write the ``dataset`` manifest.

    Args:
        frame: clean ``dataset`` frame.
        root: dataset root (pair partners are the nearest identities by mean image).
        rate: fraction of noisy train rows in [0, 1).
        seed: seed of the noise.
        path: manifest to write (kept when it exists: the noise is deterministic).
    """
    if not path.is_file():
        noisy = corrupt_labels(frame, rate=rate, kind="mix", seed=seed, image_root=root)
        write_manifest(noisy, path, "dataset", stage="bench.noise",
                       extra={"dataset_root": str(root.resolve()), "rate": rate, "seed": seed})
    return path


def train_truth(manifest: Path) -> pd.DataFrame:
    """Train rows of a noisy manifest with ``is_noisy`` (``noise_kind != "clean"``)."""
    frame = read_manifest(manifest, "dataset")
    train = frame[(frame["split"] == "train") & (frame["pid"] != 0)].reset_index(drop=True)
    return train.assign(is_noisy=train["noise_kind"].astype(str).to_numpy() != "clean")


# --------------------------------------------------------------------------- (a) noise detection


def detection_row(is_noisy: np.ndarray, flagged: np.ndarray, confidence: np.ndarray | None = None) -> dict:
    """Precision, recall and F1 of ``flagged`` as a detector of ``is_noisy``.

    Args:
        is_noisy: ``(N,)`` bool ground truth.
        flagged: ``(N,)`` bool, True = called noisy.
        confidence: ``(N,)`` higher = cleaner, for AUROC (None: not reported).

    Returns:
        ``precision, recall, f1, auroc`` (NaN where undefined, e.g. recall at 0 % noise),
        ``flagged_fraction`` and ``noise_rate``.
    """
    is_noisy, flagged = np.asarray(is_noisy, dtype=bool), np.asarray(flagged, dtype=bool)
    report = noise_detection_report(np.zeros(len(flagged)) if confidence is None else confidence, ~flagged,
                                    noise_kind=np.where(is_noisy, "noisy", "clean"))
    row = {name: float(report.loc["all", name]) for name in ("precision", "recall", "f1", "auroc")}
    if confidence is None:
        row["auroc"] = math.nan
    if not is_noisy.any():
        # No positives: precision/F1 are undefined; a flag can only be a false alarm.
        row.update(precision=math.nan, recall=math.nan, f1=math.nan)
    row.update(flagged_fraction=float(flagged.mean()), noise_rate=float(is_noisy.mean()))
    return row


def oof_probabilities(condition: Condition, config: TeacherConfig,
                      out_dir: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold predicted probabilities of the train rows: the oof teacher's round 0.

    Runs (or reuses) round 0 of an out-of-fold teacher on all train rows, then
    predicts every row with the fold model that did not train on it.

    Args:
        condition: the condition.
        config: the teacher's settings (its ``train.epochs`` is what the fold models train).
        out_dir: the teacher folder (default: the full oof teacher's, whose round 0 this is).

    Returns:
        ``(labels, probs)``: ``(N,)`` class index of the given pid and ``(N, C)``
        probabilities, rows in the order of :func:`train_truth`.
    """
    if config.scoring != "oof":
        config = config.model_copy(update={"scoring": "oof"})
        out_dir = out_dir or condition.work / "oof-round0"
    # Round 0 of an oof teacher is exactly this: share it with the full teacher's folder.
    out_dir = out_dir or condition.work / f"teacher-{variant_folder(config)}"
    run_teacher_round(condition.manifest, None, config, 0, out_dir, "cpu")
    return fold_probabilities(condition, config, out_dir, 0)


def fold_probabilities(condition: Condition, config: TeacherConfig, out_dir: Path,
                       round: int) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold probabilities of every train row from the fold models of an oof teacher round already run.

    Returns:
        ``(labels, probs)`` as :func:`oof_probabilities`.
    """
    train = train_truth(condition.manifest)
    label_map = build_label_map(train["pid"])
    labels = np.array([label_map[p] for p in train["pid"].tolist()], dtype=np.int64)
    settings = stage_settings("cpu", config.train)
    root = Path(read_manifest(condition.manifest).attrs["manifest"].extra["dataset_root"])
    data = build_train_data(train, root, config.train, label_map=label_map)
    folds = assign_folds(train, config.folds, config.train.seed)
    logits = np.zeros((len(train), len(label_map)), dtype=np.float32)
    for fold, checkpoint in enumerate(teacher_checkpoints(out_dir, round, config)):
        held_out = np.flatnonzero(folds == fold)
        model = load_model(config.train, len(label_map), checkpoint, settings)
        logits[held_out] = predict_logits(model, data.feature_dataset, settings, indices=held_out)
    probs = torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()
    return labels, probs


def compare_detectors(labels: np.ndarray, probs: np.ndarray, is_noisy: np.ndarray,
                      config: TeacherConfig, source: str = "oof round 0") -> list[dict]:
    """cleanlab and our confidence rules on the same out-of-fold probabilities.

    Args:
        labels: ``(N,)`` given labels as class indices.
        probs: ``(N, C)`` out-of-fold predicted probabilities.
        is_noisy: ``(N,)`` ground truth.
        config: gives our rules' threshold, quantile and per-identity minimum.
        source: where the probabilities come from (the rows' ``source``).

    Returns:
        one :func:`detection_row` per detector, with ``detector`` and ``source`` set.
    """
    from cleanlab.filter import find_label_issues

    rows = []
    p_given = probs[np.arange(len(labels)), labels]
    for filter_by in ("prune_by_noise_rate", "both", "confident_learning"):
        started = time.perf_counter()
        flagged = find_label_issues(labels, probs, filter_by=filter_by)
        rows.append({"detector": f"cleanlab:{filter_by}", **detection_row(is_noisy, flagged, p_given),
                     "seconds": time.perf_counter() - started})
    for rule in ("gmm", "threshold", "quantile"):
        started = time.perf_counter()
        scores = score_confidence(labels, probs, rule=rule, threshold=config.threshold, quantile=config.quantile,
                                  min_per_class=config.min_confident_per_identity, gmm_seed=config.train.seed)
        rows.append({"detector": f"ours:{rule}", **detection_row(is_noisy, ~scores.confident, scores.confidence),
                     "seconds": time.perf_counter() - started})
    return [{**row, "source": source} for row in rows]


def variant_folder(config: TeacherConfig) -> str:
    """Folder name of a teacher config's run (``<scoring>-<rule>-<retrain>-<E>ep``)."""
    return f"{config.scoring}-{config.rule}-{config.retrain}-{config.train.epochs}ep"


def teacher_config(train: TrainConfig, variant: TeacherVariant, rounds: int,
                   temperature: float | None = None) -> TeacherConfig:
    """The library's TeacherConfig defaults, with the variant's scoring, rule, retraining, E and T (if given)."""
    extra = {} if temperature is None else {"temperature": temperature}
    if variant.epochs is not None:
        train = train.model_copy(update={"epochs": variant.epochs})
    return TeacherConfig(train=train, rounds=rounds, scoring=variant.scoring, rule=variant.rule,
                         retrain=variant.retrain, **extra)


def equal_epoch_cleanlab(condition: Condition, config: TeacherConfig, is_noisy: np.ndarray) -> list[dict]:
    """cleanlab (and our rules) on out-of-fold probabilities of fold models trained ``rounds × E`` epochs.

    The teacher's fold models of its last round (``retrain="continue"``) have trained
    ``rounds × E`` epochs in all; these fold models train as many, in one go on every
    train row, so cleanlab's probabilities cost the same epochs as the teacher's.

    Returns:
        :func:`compare_detectors` rows, ``source`` = ``"oof 1 round × <epochs> ep"``.
    """
    epochs = config.rounds * config.train.epochs
    long = config.model_copy(update={"rounds": 1, "scoring": "oof",
                                     "train": config.train.model_copy(update={"epochs": epochs})})
    labels, probs = oof_probabilities(condition, long, condition.work / f"oof-round0-{epochs}ep")
    return compare_detectors(labels, probs, is_noisy, long, source=f"oof 1 round × {epochs} ep")


def iterated_cleanlab(condition: Condition, config: TeacherConfig, is_noisy: np.ndarray,
                      filter_by: str = "prune_by_noise_rate") -> dict:
    """cleanlab iterated like the teacher: flag, retrain the fold models on the kept rows, flag again.

    Round r trains the ``config.folds`` out-of-fold models exactly as the teacher's
    round r (E epochs, ``config.retrain``: from round r−1's fold weights or new), on
    the rows cleanlab kept after round r−1 (round 0: all rows, i.e. the teacher's own
    round 0, copied from its folder when present), then gives the round's out-of-fold
    probabilities to ``cleanlab.filter.find_label_issues``. As in the teacher, an
    identity whose kept rows would all sit in one fold keeps its most probable row
    outside that fold (:func:`keep_identities_in_every_fold`) for training only. The
    last round's cleanlab flags are scored; there is no early stop, all ``rounds`` run.

    Returns:
        one :func:`detection_row` with ``detector`` = ``cleanlab-iterated:<filter_by>``.
    """
    from cleanlab.filter import find_label_issues

    config = config.model_copy(update={"scoring": "oof"})
    out_dir = condition.work / f"cleanlab-iterated-{variant_folder(config)}"
    teacher_dir = condition.work / f"teacher-{variant_folder(config)}"
    if round_manifest_path(teacher_dir, 0).is_file() and not round_manifest_path(out_dir, 0).exists():
        # Round 0 trains on every row whatever the filter: the teacher's round 0 is this round 0.
        shutil.copytree(round_dir(teacher_dir, 0), round_dir(out_dir, 0))
        shutil.copy2(round_manifest_path(teacher_dir, 0), round_manifest_path(out_dir, 0))
    started = time.perf_counter()
    train = train_truth(condition.manifest)
    folds = assign_folds(train, config.folds, config.train.seed)
    previous: Path | None = None
    for r in range(config.rounds):
        scored = run_teacher_round(condition.manifest, previous, config, r, out_dir, "cpu")
        labels, probs = fold_probabilities(condition, config, out_dir, r)
        p_given = probs[np.arange(len(labels)), labels]
        flagged = find_label_issues(labels, probs, filter_by=filter_by)
        kept = keep_identities_in_every_fold(~flagged, labels, folds, p_given)
        frame = read_manifest(scored, "teacher_round").set_index("sample_id").loc[train["sample_id"]].reset_index()
        previous = out_dir / f"cleanlab_round_{r}.parquet"
        write_manifest(frame.assign(confident=kept), previous, "teacher_round", stage=f"bench.cleanlab_round{r}",
                       parents=[parent_ref(scored)], extra={"round": r, "filter_by": filter_by})
    row = detection_row(is_noisy, flagged, p_given)
    return {**row, "detector": f"cleanlab-iterated:{filter_by}",
            "source": f"final round {config.rounds - 1} ({config.rounds} × {config.train.epochs} ep)",
            "rounds_run": config.rounds, "seconds": time.perf_counter() - started}


def run_full_teacher(condition: Condition, config: TeacherConfig, variant: TeacherVariant) -> tuple[dict, Path]:
    """Run a multi-round teacher; score its final confident set and write its soft labels.

    Returns:
        ``(detection row, soft_labels manifest)``.
    """
    out_dir = condition.work / f"teacher-{variant_folder(config)}"
    started = time.perf_counter()
    result = run_teacher(condition.manifest, config, out_dir, "cpu")
    soft = make_soft_labels(condition.manifest, result.checkpoints, result.final_round_manifest, config,
                            out_dir / "soft_labels.parquet", "cpu")
    seconds = time.perf_counter() - started
    scored = read_manifest(result.final_round_manifest, "teacher_round").set_index("sample_id")
    train = train_truth(condition.manifest)
    scored = scored.loc[train["sample_id"]]
    row = detection_row(train["is_noisy"].to_numpy(), ~scored["confident"].to_numpy(dtype=bool),
                        scored["confidence"].to_numpy(dtype=np.float64))
    row.update(detector=f"teacher:{variant.name}", source=f"final round {result.final_round}",
               rounds_run=result.final_round + 1, seconds=seconds)
    return row, soft


# --------------------------------------------------------------------------- (b) students


def fit_on_training_labels(manifest: Path, config: StudentConfig, checkpoint: Path) -> dict:
    """How well a trained model reproduces its own training labels (eval transforms, no flip).

    ``train_acc`` is the accuracy on the labels it trained on (given pids; true pids
    for the oracle), ``clean_acc`` on the clean rows, and ``noisy_fit`` the fraction
    of noisy rows predicted as their *given* (wrong) label: memorised noise.
    """
    frame = read_manifest(manifest, "dataset")
    root = Path(frame.attrs["manifest"].extra["dataset_root"])
    train, column = student_training_rows(frame, config)
    label_map = build_label_map(train[column])
    settings = stage_settings("cpu", config.train)
    data = build_train_data(train, root, config.train, label_column=column, label_map=label_map)
    model = load_model(config.train, len(label_map), checkpoint, settings)
    pred = predict_logits(model, data.feature_dataset, settings).argmax(axis=1)
    target = np.array([label_map[p] for p in train[column].tolist()])
    noisy = train["noise_kind"].astype(str).to_numpy() != "clean"
    given = np.array([label_map.get(p, -1) for p in train["pid"].tolist()])
    return {"train_acc": float((pred == target).mean()),
            "clean_acc": float((pred == target)[~noisy].mean()) if (~noisy).any() else math.nan,
            "noisy_fit": float((pred == given)[noisy].mean()) if noisy.any() else math.nan}


def run_method(condition: Condition, method: str, train: TrainConfig, soft_labels: Path | None,
               name: str | None = None) -> dict:
    """Train and evaluate one student method; returns its retrieval and fit numbers.

    ``name`` (default: the method) labels the row and the folder, e.g. ``distilled@in_sample:gmm:continue``.
    """
    name = name or method
    config = StudentConfig(train=train, method=method)
    out_dir = condition.work / f"student-{name.replace(':', '-').replace('@', '-')}"
    started = time.perf_counter()
    result = train_student(condition.manifest, config, out_dir, "cpu",
                           soft_labels_manifest=soft_labels if method == "distilled" else None)
    train_seconds = time.perf_counter() - started
    metrics_path = evaluate_student(condition.manifest, result.checkpoint, config, out_dir / "metrics.parquet", "cpu")
    metrics = read_manifest(metrics_path, "metrics").set_index("metric")["value"]
    row = {"method": name, "mAP": float(metrics["mAP"]), "rank1": float(metrics["rank1"]),
           "train_seconds": train_seconds}
    row.update(fit_on_training_labels(condition.manifest, config, result.checkpoint))
    return row


# --------------------------------------------------------------------------- results


def _done(path: Path, key: dict, column: str, value: str, source: str | None = None) -> bool:
    if not path.is_file():
        return False
    table = pd.read_csv(path)
    mask = (table["dataset"] == key["dataset"]) & np.isclose(table["rate"], key["rate"]) & (
        table["seed"] == key["seed"]) & (table[column] == value)
    if source is not None:
        mask &= table["source"] == source
    return bool(mask.any())


def append_rows(path: Path, rows: Sequence[dict]) -> None:
    """Append rows to a CSV (header written with the first row)."""
    frame = pd.DataFrame(list(rows))
    if path.is_file():
        frame = pd.concat([pd.read_csv(path), frame], ignore_index=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    frame.to_csv(tmp, index=False, float_format="%.4f")
    tmp.replace(path)


def _mean_range(values: pd.Series, scale: float = 1.0, digits: int = 1) -> str:
    values = values.dropna() * scale
    if values.empty:
        return "–"
    if len(values) == 1:
        return f"{values.iloc[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ({values.min():.{digits}f}–{values.max():.{digits}f})"


def summarise(out: Path) -> str:
    """Markdown tables (mean and min–max over seeds) of the CSVs under ``out``; also written to summary.md."""
    parts = []
    det_path, ret_path = out / DETECTION_FILE, out / RETRIEVAL_FILE
    if det_path.is_file():
        det = pd.read_csv(det_path)
        parts.append("### (a) Noise detection (precision / recall / F1 in %, flagged = % of train rows flagged)\n")
        parts.append("| dataset | noise | detector | source | seeds | precision | recall | F1 | AUROC | flagged |")
        parts.append("|---|---|---|---|---|---|---|---|---|---|")
        for (dataset, rate, detector, source), g in det.groupby(["dataset", "rate", "detector", "source"],
                                                                sort=True):
            parts.append(f"| {dataset} | {rate:.0%} | {detector} | {source} | {g['seed'].nunique()} | "
                         f"{_mean_range(g['precision'], 100)} | {_mean_range(g['recall'], 100)} | "
                         f"{_mean_range(g['f1'], 100)} | {_mean_range(g['auroc'], 100)} | "
                         f"{_mean_range(g['flagged_fraction'], 100)} |")
        parts.append("")
    if ret_path.is_file():
        ret = pd.read_csv(ret_path)
        order = {m: i for i, m in enumerate(METHODS)}
        order.update({m: 0.5 for m in ret["method"].unique() if str(m).startswith("distilled@")})
        parts.append("### (b) Retrieval (mAP / rank-1 in %) and fit of the training labels\n")
        parts.append("train acc = accuracy on the labels the model trained on (eval transforms); noisy fit = "
                     "% of noisy rows predicted as their given (wrong) label.\n")
        parts.append("| dataset | noise | method | seeds | mAP | rank-1 | train acc | clean acc | noisy fit | "
                     "train s |")
        parts.append("|---|---|---|---|---|---|---|---|---|---|")
        groups = ret.groupby(["dataset", "rate", "method"], sort=False)
        for (dataset, rate, method), g in sorted(groups, key=lambda kv: (kv[0][0], kv[0][1],
                                                                        order.get(kv[0][2], 99))):
            parts.append(f"| {dataset} | {rate:.0%} | {method} | {g['seed'].nunique()} | "
                         f"{_mean_range(g['mAP'], 100)} | {_mean_range(g['rank1'], 100)} | "
                         f"{_mean_range(g['train_acc'], 100)} | {_mean_range(g['clean_acc'], 100)} | "
                         f"{_mean_range(g['noisy_fit'], 100)} | "
                         # < 1 s: the run was found finished in the work dir and loaded, not timed.
                         f"{_mean_range(g['train_seconds'].where(g['train_seconds'] >= 1), 1, 0)} |")
        parts.append("")
        parts.append(gap_table(ret))
    text = "\n".join(parts) + "\n"
    (out / SUMMARY_FILE).write_text(text)
    return text


def gap_table(ret: pd.DataFrame) -> str:
    """Per (dataset, noise, seed, student): the fraction of the mAP gap (best noisy baseline → oracle) closed."""
    lines = ["| dataset | noise | seed | student | best noisy baseline | its mAP | student mAP | oracle mAP | "
             "gap closed |", "|---|---|---|---|---|---|---|---|---|"]
    noisy_baselines = [m for m in BASELINES if m != "oracle"]
    for (dataset, rate, seed), g in ret.groupby(["dataset", "rate", "seed"], sort=True):
        by_method = g.drop_duplicates("method", keep="last").set_index("method")["mAP"]
        present = [m for m in noisy_baselines if m in by_method.index]
        students = [m for m in by_method.index if str(m).startswith("distilled")]
        if rate == 0 or not present or "oracle" not in by_method or not students:
            continue
        best = max(present, key=lambda m: by_method[m])
        gap = by_method["oracle"] - by_method[best]
        for student in students:
            closed = (by_method[student] - by_method[best]) / gap if gap > 0 else math.nan
            lines.append(f"| {dataset} | {rate:.0%} | {seed} | {student} | {best} | {100 * by_method[best]:.1f} | "
                         f"{100 * by_method[student]:.1f} | {100 * by_method['oracle']:.1f} | "
                         f"{'–' if math.isnan(closed) else f'{100 * closed:.0f} %'} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


# --------------------------------------------------------------------------- driver


def run_condition(condition: Condition, args: argparse.Namespace, teacher_train: TrainConfig,
                  student_train: TrainConfig) -> None:
    """(a) and (b) for one condition, appending rows as they are measured."""
    out = Path(args.out)
    key = condition.key
    truth = train_truth(condition.manifest)
    is_noisy = truth["is_noisy"].to_numpy()
    variants = args.teachers
    base = teacher_config(teacher_train, variants[0], args.rounds, args.temperature)
    det_path, ret_path = out / DETECTION_FILE, out / RETRIEVAL_FILE

    if not _done(det_path, key, "detector", "ours:gmm", "oof round 0"):
        started = time.perf_counter()
        labels, probs = oof_probabilities(condition, base)
        log.info("%s: out-of-fold round 0 in %.0f s", condition.key, time.perf_counter() - started)
        append_rows(det_path, [{**key, **row} for row in compare_detectors(labels, probs, is_noisy, base)])
    if args.equal_budget:
        epochs = base.rounds * base.train.epochs
        if not _done(det_path, key, "detector", "ours:gmm", f"oof 1 round × {epochs} ep"):
            started = time.perf_counter()
            rows = equal_epoch_cleanlab(condition, base, is_noisy)
            log.info("%s: out-of-fold models of %d epochs in %.0f s", key, epochs, time.perf_counter() - started)
            append_rows(det_path, [{**key, **row} for row in rows])
        if not _done(det_path, key, "detector", "cleanlab-iterated:prune_by_noise_rate"):
            row = iterated_cleanlab(condition, base, is_noisy)
            log.info("%s: cleanlab iterated %d rounds: F1 %.3f in %.0f s", key, base.rounds, row["f1"],
                     row["seconds"])
            append_rows(det_path, [{**key, **row}])

    students: list[tuple[str, Path]] = []  # (row name, soft labels) of each distilled student to train
    for i, variant in enumerate(variants):
        config = teacher_config(teacher_train, variant, args.rounds, args.temperature)
        student = "distilled" if i == 0 else f"distilled@{variant.name}"
        needed = ("distilled" in args.methods and (i == 0 or args.distill_all)
                  and not _done(ret_path, key, "method", student))
        if _done(det_path, key, "detector", f"teacher:{variant.name}") and not needed:
            continue
        try:
            row, soft = run_full_teacher(condition, config, variant)
        except ValueError as error:
            if i == 0:
                raise
            # A variant that cannot run here (e.g. a fold left without some identity) is a result too.
            log.warning("%s teacher %s failed: %s", key, variant.name, error)
            append_rows(det_path, [{**key, "detector": f"teacher:{variant.name}", "source": "failed",
                                    "error": str(error).split(";")[0]}])
            continue
        log.info("%s teacher %s: F1 %.3f in %.0f s", key, variant.name, row["f1"], row["seconds"])
        if not _done(det_path, key, "detector", f"teacher:{variant.name}"):
            append_rows(det_path, [{**key, **row}])
        if needed:
            students.append((student, soft))

    for student, soft in students:
        row = run_method(condition, "distilled", student_train, soft, name=student)
        log.info("%s %s: mAP %.3f rank-1 %.3f (%.0f s)", key, student, row["mAP"], row["rank1"],
                 row["train_seconds"])
        append_rows(ret_path, [{**key, **row}])
    for method in args.methods:
        if method == "distilled" or _done(ret_path, key, "method", method):
            continue
        if method == "oracle" and condition.rate == 0 and "fat_hybrid_noisy" in args.methods:
            # Without noise the oracle's labels, rows, seed and loss are fat_hybrid_noisy's: same run.
            continue
        row = run_method(condition, method, student_train, None)
        log.info("%s %s: mAP %.3f rank-1 %.3f train acc %.3f (%.0f s)", key, method, row["mAP"], row["rank1"],
                 row["train_acc"], row["train_seconds"])
        append_rows(ret_path, [{**key, **row}])
    summarise(out)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["synth", "orl"], choices=["synth", "orl"])
    parser.add_argument("--rates", nargs="+", type=float, default=[0.0, 0.2, 0.4])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--epochs", type=int, default=40, help="epochs of every student and baseline")
    parser.add_argument("--teacher-epochs", type=int, default=10, help="E: epochs of each teacher round")
    parser.add_argument("--rounds", type=int, default=3, help="teacher rounds (at most)")
    parser.add_argument("--teachers", nargs="+", type=TeacherVariant.parse,
                        default=[TeacherVariant("oof", "gmm", "fresh")],
                        help="full teachers to run, <scoring>:<rule>:<retrain>; the first feeds the student")
    parser.add_argument("--temperature", type=float, default=None,
                        help="T of the soft labels (default: TeacherConfig's)")
    parser.add_argument("--methods", nargs="*", default=list(DEFAULT_METHODS), choices=list(METHODS),
                        help="students to train (none: detection only)")
    parser.add_argument("--equal-budget", action="store_true",
                        help="also give cleanlab the first teacher's training budget: out-of-fold models of "
                             "rounds × E epochs, and cleanlab iterated (flag, retrain on the kept rows) for "
                             "as many rounds of E epochs")
    parser.add_argument("--distill-all", action="store_true",
                        help="train a distilled student on every teacher's soft labels, not only the first's")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--random-erasing", type=float, default=0.0, help="random erasing probability")
    parser.add_argument("--synth-identities", type=int, default=200)
    parser.add_argument("--synth-images", type=int, default=10, help="images per synthetic identity")
    parser.add_argument("--synth-size", nargs=2, type=int, default=[64, 32])
    parser.add_argument("--orl-root", type=Path, default=DEFAULT_ORL)
    parser.add_argument("--orl-size", nargs=2, type=int, default=[56, 46])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/fat_distill_bench_noise"),
                        help="scratch: datasets, checkpoints, manifests")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/noise"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 beats 2 on a shared 2-core machine (OpenMP threads wait for each other)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 24 synthetic identities × 6 images, 1 epoch, 2 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.synth_identities, args.synth_images, args.synth_size = 24, 6, [32, 16]
        args.epochs, args.teacher_epochs, args.rounds = 1, 1, 2
        args.orl_size = [32, 24]
    return args


def main(argv: Sequence[str] | None = None) -> pd.DataFrame | None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for dataset in args.datasets:
        if dataset == "orl" and not Path(args.orl_root).is_dir():
            log.warning("ORL faces not found at %s; skipping the orl dataset (pass --orl-root)", args.orl_root)
            continue
        size = tuple(args.synth_size if dataset == "synth" else args.orl_size)
        common = dict(image_size=size, lr=args.lr, random_erasing_p=args.random_erasing, keep_checkpoints=1,
                      pad=max(2, size[0] // 12))
        if dataset == "orl" or args.quick:
            # ORL has 20 train identities, fewer once outlier noise holds some out: P = 16 may not fit.
            common.update(batch_p=8 if dataset == "orl" else 4, batch_k=4 if dataset == "orl" else 2)
        frames: dict[int, tuple[Path, pd.DataFrame]] = {}
        # Rates outer, seeds inner: a run cut short still has every seed of the first rates.
        for rate in args.rates:
            for seed in args.seeds:
                if seed not in frames:
                    if dataset == "synth":
                        root = synth_root(args.work_dir, seed, identities=args.synth_identities,
                                          images_per_identity=args.synth_images, size=size)
                    else:
                        root = Path(args.orl_root).resolve()
                    frames[seed] = root, clean_frame(dataset, root, seed)
                root, frame = frames[seed]
                teacher_train = TrainConfig(epochs=args.teacher_epochs, seed=seed, **common)
                student_train = TrainConfig(epochs=args.epochs, seed=seed, **common)
                work = args.work_dir / dataset / f"rate{rate:g}-seed{seed}"
                work.mkdir(parents=True, exist_ok=True)
                manifest = noisy_manifest(frame, root, rate, seed, work / "dataset.parquet")
                condition = Condition(dataset, rate, seed, manifest, work)
                t0 = time.perf_counter()
                run_condition(condition, args, teacher_train, student_train)
                log.info("condition %s done in %.0f s (total %.0f s)", condition.key, time.perf_counter() - t0,
                         time.perf_counter() - started)
    text = summarise(out)
    print(text)
    log.info("bench_noise: finished in %.0f s", time.perf_counter() - started)
    return pd.read_csv(out / RETRIEVAL_FILE) if (out / RETRIEVAL_FILE).is_file() else None


if __name__ == "__main__":
    main()
