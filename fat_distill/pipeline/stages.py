"""The pipeline's stages as plain functions: manifest paths and a config section in, output paths out.

Each stage reads manifests (and checkpoints) and writes manifests, checkpoints and
plots under the folders it is given; it returns a JSON-ready dict of what it
wrote. Nothing here knows about Prefect: ``flows/`` wraps each function in a
cached, device-scheduled task, and :func:`fat_distill.pipeline.direct.run_direct`
calls them one after another.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fat_distill.config_hash import config_hash
from fat_distill.distill import (
    DatasetInput,
    StudentConfig,
    TeacherConfig,
    evaluate_noise_detection,
    evaluate_student,
    load_dataset,
    make_soft_labels,
    round_manifest_path,
    run_teacher_fold,
    run_teacher_round,
    teacher_checkpoints,
    train_student,
)
from fat_distill.distill.cleanlab_baseline import CleanlabConfig, find_label_issues_manifest
from fat_distill.manifests import parent_ref, read_manifest, read_manifest_meta, write_manifest
from fat_distill.pipeline.config import DataSection, NoiseSection
from fat_distill.train import recording_fits, summarise_fits

log = logging.getLogger("fat_distill.pipeline")

Outputs = dict[str, str]

#: Output fields that say how a training stage's call went (not files): see :func:`split_training`.
TRAINING_FIELDS = ("resumed_from_epoch", "ran_epochs")


def split_training(outputs: dict) -> tuple[dict, dict]:
    """A stage's outputs without, and with only, its :data:`TRAINING_FIELDS`.

    They describe the call that computed the outputs (it continued from the checkpoint of
    epoch ``resumed_from_epoch`` and trained ``ran_epochs`` epochs), so a run records them
    only when the stage ran, never when its result came from cache.
    """
    files = {k: v for k, v in outputs.items() if k not in TRAINING_FIELDS}
    training = {k: outputs[k] for k in TRAINING_FIELDS if k in outputs}
    return files, training


def training_entry(previous: dict, training: dict) -> dict:
    """The run.json fields to set for a stage call: ``training``, and None over a previous attempt's values."""
    return {**{k: None for k in TRAINING_FIELDS if previous.get(k) is not None}, **training}


def log_resume(stage: str, training: dict) -> None:
    """Say in the run's log that ``stage`` continued from an epoch checkpoint (not when it started over)."""
    if training.get("resumed_from_epoch"):
        log.info("stage %s resumed from epoch %d (trained %d more epoch(s))", stage,
                 training["resumed_from_epoch"], training.get("ran_epochs", 0))


def data_stage(config: DataSection, work_dir: str | Path) -> Outputs:
    """Make the clean ``dataset`` manifest: synthesise + index, index a folder, or validate a given manifest."""
    from fat_distill.data import generate_synthetic_reid, index_dataset

    work_dir = Path(work_dir)
    out = work_dir / "dataset.parquet"
    if config.source == "manifest":
        # This run's config decides, not a permission the given manifest may carry; data.root, when
        # set, replaces the recorded root (a moved image folder, or a manifest rewritten by pandas,
        # Polars or DuckDB, which drop the record).
        given = load_dataset(config.manifest, root=config.root, allow_outside_root=config.allow_outside_root)
        _check_files_exist(given)
        extra = {key: value for key, value in given.meta.extra.items() if key != "allow_outside_root"}
        frame = given.frame
        if config.skip_bad:
            frame, bad = _without_unreadable(frame, given.root, full=config.verify)
            extra["bad_images"] = len(bad)
        write_manifest(frame, out, "dataset", stage="data.manifest", config_hash=config_hash(config),
                       parents=[parent_ref(config.manifest, given.meta)],
                       extra={**extra, "dataset_root": str(given.root.resolve()), **_permission(config)})
        return {"dataset": str(out)}
    if config.source == "synth":
        s = config.synth
        root = work_dir / "images"
        done = root / "synth.json"
        if not done.exists():  # synth.json is written last: its absence means an unfinished tree
            generate_synthetic_reid(root, identities=s.identities, cameras=s.cameras,
                                    images_per_identity=s.images_per_identity, size=tuple(s.size), seed=s.seed,
                                    distractors=s.distractors, junk=s.junk, overwrite=root.exists())
        result = index_dataset(root, "market1501")
        layout = "market1501"
    else:
        root = Path(config.root)
        layout = config.layout
        result = index_dataset(root, layout, camera_regex=config.camera_regex,
                               split_identities=config.split_identities, seed=config.split_seed,
                               verify=config.verify, skip_bad=config.skip_bad,
                               allow_outside_root=config.allow_outside_root)
    if result.structure:
        log.info("data: %s: %s", root, result.describe_structure())
    for warning in result.warnings:
        log.warning("data: %s", warning)
    frame, bad_images = result.frame, list(result.bad_images)
    if config.source == "folder" and config.skip_bad and not config.verify:
        # index_dataset decodes only with verify; the quick check finds truncated and non-image files.
        frame, quick_bad = _without_unreadable(frame, root, full=False)
        bad_images += quick_bad
    write_manifest(frame, out, "dataset", stage="data.index", config_hash=config_hash(config),
                   extra={"dataset_root": str(Path(root).resolve()), "layout": layout,
                          "bad_images": len(bad_images), "unparsed": len(result.unparsed),
                          **({"folders_structure": result.structure} if result.structure else {}),
                          **_permission(config)})
    return {"dataset": str(out)}


def _check_files_exist(given: DatasetInput) -> None:
    """Refuse a given manifest whose images are not under its root (a wrong data.root, or moved files)."""
    from fat_distill.data.images import find_missing_files

    paths = given.frame["path"].astype(str).tolist()
    missing = find_missing_files(given.root, paths)
    if missing:
        row = missing[0]
        raise ValueError(
            f"{given.path}: {len(missing)} of {len(paths)} image file(s) are missing under the dataset root "
            f"{str(given.root)!r}, first row {row} (sample_id {given.frame['sample_id'].iloc[row]!r}, path "
            f"{paths[row]!r}). Set data.root to the folder the manifest's paths are relative to "
            f"(--set data.root=DIR), or remove those rows.")
def _without_unreadable(frame, root: Path, *, full: bool):
    """``frame`` without the rows whose image is missing or undecodable (``data.skip_bad``); (frame, bad)."""
    from fat_distill.data.images import find_unreadable_images

    bad = find_unreadable_images(root, frame["path"].astype(str).drop_duplicates().tolist(), full=full)
    if not bad:
        return frame, bad
    names = {path for path, _ in bad}
    log.warning("data: left out %d missing/unreadable image(s) (data.skip_bad), e.g. %s", len(bad),
                ", ".join(sorted(names)[:5]))
    return frame[~frame["path"].astype(str).isin(names)].reset_index(drop=True), bad


def _permission(config: DataSection) -> dict:
    """The manifest's record that later stages may read outside the dataset root (absent unless granted)."""
    return {"allow_outside_root": True} if config.allow_outside_root else {}


def noise_stage(dataset: str | Path, config: NoiseSection, work_dir: str | Path) -> Outputs:
    """Inject label noise into the train split (or only add the truth columns when disabled / rate 0)."""
    from fat_distill.data import corrupt_labels

    frame = read_manifest(dataset, "dataset")
    meta = frame.attrs["manifest"]
    out = Path(work_dir) / "dataset_noisy.parquet"
    if config.enabled:
        root = meta.extra.get("dataset_root")
        image_root = Path(root) if root and Path(root).is_dir() else None
        pairing = None
        if config.kind in ("pair", "mix"):
            pairing = config.pairing or ("mean_image" if image_root else "derangement")
        frame = corrupt_labels(frame, rate=config.rate, kind=config.kind, seed=config.seed,
                               image_root=image_root if pairing == "mean_image" else None, pairing=pairing,
                               allow_outside_root=bool(meta.extra.get("allow_outside_root", False)))
    write_manifest(frame, out, "dataset", stage="noise", config_hash=config_hash(config),
                   parents=[parent_ref(dataset, meta)], extra={**meta.extra, "noise": config.model_dump(mode="json")})
    return {"dataset": str(out)}


def teacher_fold_stage(dataset: str | Path, previous_round: str | None, config: TeacherConfig, round: int,
                       fold: int, work_dir: str | Path, device: str = "auto", progress: bool = False,
                       tensorboard_dir: str | None = None) -> Outputs:
    """Train one out-of-fold teacher model of a round (folds are independent: schedule them in parallel)."""
    with recording_fits() as fits:
        checkpoint = run_teacher_fold(dataset, previous_round, config, round, fold, work_dir, device,
                                      progress=progress, tensorboard_dir=tensorboard_dir)
    return {"checkpoint": str(checkpoint), **summarise_fits(fits)}


def teacher_round_stage(dataset: str | Path, previous_round: str | None, config: TeacherConfig, round: int,
                        work_dir: str | Path, device: str = "auto", progress: bool = False,
                        tensorboard_dir: str | None = None) -> Outputs:
    """Run one teacher round (training, or reusing finished fold models) and score every train sample."""
    with recording_fits() as fits:
        path = run_teacher_round(dataset, previous_round, config, round, work_dir, device, progress=progress,
                                 tensorboard_dir=tensorboard_dir)
    meta = read_manifest_meta(path)
    return {"teacher_round": str(path), "change": meta.extra.get("change"),
            "confident_fraction": meta.extra.get("confident_fraction"),
            "train_accuracy": meta.extra.get("train_accuracy"),
            "checkpoints": [str(p) for p in teacher_checkpoints(work_dir, round, config)], **summarise_fits(fits)}


def soft_labels_stage(dataset: str | Path, final_round: str | Path, checkpoints: list[str] | list[list[str]],
                      config: TeacherConfig, work_dir: str | Path, device: str = "auto") -> Outputs:
    """Soft labels (softmax at temperature T, top-k) from the final teacher round's model(s), or from the mean
    over rounds when ``checkpoints`` holds one list per round."""
    out = Path(work_dir) / "soft_labels.parquet"
    make_soft_labels(dataset, checkpoints, final_round, config, out, device)
    return {"soft_labels": str(out)}


def student_stage(dataset: str | Path, soft_labels: str | None, config: StudentConfig, work_dir: str | Path,
                  device: str = "auto", progress: bool = False, tensorboard_dir: str | None = None,
                  rows: str | None = None) -> Outputs:
    """Train the distilled student or a baseline (``config.method``); ``rows``: a row-filter method's manifest."""
    with recording_fits() as fits:
        result = train_student(dataset, config, work_dir, device,
                               soft_labels_manifest=soft_labels if config.method == "distilled" else None,
                               rows_manifest=rows, progress=progress, tensorboard_dir=tensorboard_dir)
    return {"checkpoint": str(result.checkpoint), "method": config.method, **summarise_fits(fits)}


def cleanlab_stage(dataset: str | Path, config: CleanlabConfig, teacher: TeacherConfig, work_dir: str | Path,
                   device: str = "auto", progress: bool = False, tensorboard_dir: str | None = None) -> Outputs:
    """The cleanlab baseline's filter: K fold models (reused when done), then find_label_issues."""
    with recording_fits() as fits:
        path = find_label_issues_manifest(dataset, config, teacher, work_dir, device, progress=progress,
                                          tensorboard_dir=tensorboard_dir)
    meta = read_manifest_meta(path)
    return {"label_issues": str(path), "flagged": meta.extra.get("flagged"), "kept": meta.extra.get("kept"),
            **summarise_fits(fits)}


def evaluate_stage(dataset: str | Path, checkpoint: str | Path, config: StudentConfig, work_dir: str | Path,
                   plots_dir: str | Path, device: str = "auto") -> Outputs:
    """Query/gallery retrieval metrics of a trained student or baseline, and its CMC plot."""
    out = Path(work_dir) / f"metrics_{config.method}.parquet"
    evaluate_student(dataset, checkpoint, config, out, device, plots_dir=plots_dir)
    return {"metrics": str(out), "plot": str(Path(plots_dir) / f"cmc_{config.method}.png")}


def noise_report_stage(dataset: str | Path, teacher_round: str | Path, work_dir: str | Path,
                       plots_dir: str | Path) -> Outputs:
    """How well the final teacher round found the injected noise (needs the ground truth)."""
    out = Path(work_dir) / "metrics_noise_detection.parquet"
    evaluate_noise_detection(dataset, teacher_round, out, plots_dir=plots_dir)
    plots = sorted(str(p) for p in Path(plots_dir).glob("*.png") if "confidence" in p.name or "noise" in p.name)
    return {"metrics": str(out), "plots": plots}


def label_audit_stage(dataset: str | Path, rounds: list[str], work_dir: str | Path, plots_dir: str | Path) -> Outputs:
    """What the teacher rounds think of the given labels (no ground truth needed): metrics, identities, a plot."""
    from fat_distill.distill import audit_labels

    return audit_labels(dataset, rounds, work_dir, plots_dir=plots_dir)


__all__ = [
    "Outputs", "cleanlab_stage", "data_stage", "evaluate_stage", "label_audit_stage", "log_resume", "noise_report_stage", "noise_stage",
    "round_manifest_path", "soft_labels_stage", "split_training", "student_stage", "teacher_fold_stage",
    "teacher_round_stage", "training_entry",
]
