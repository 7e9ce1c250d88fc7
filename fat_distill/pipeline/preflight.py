"""Checks before the first stage: what would otherwise fail hours into a run fails in seconds.

:func:`preflight` checks everything knowable from the config and the disk
before any stage starts:

* every image the run will read (train, query, gallery) opens: a quick
  header-and-end check by default, a full decode with ``data.verify``;
* the pretrained weights files exist and fit their models, and each model
  takes its ``image_size`` (one forward pass of two blank images);
* the devices (``run.devices``, ``train.devices``) exist on this machine;
* the output folders are writable, and their disk has room for the run's
  checkpoints (an estimate from the models' sizes).

All problems are reported together in one :class:`PreflightError`; bad images
in a :class:`BadImagesError` that names them and how to leave them out.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fat_distill.disk import describe_os_error, free_bytes

if TYPE_CHECKING:
    from fat_distill.pipeline.config import PipelineConfig
    from fat_distill.train.config import TrainConfig

log = logging.getLogger("fat_distill.pipeline")

#: Bad images named in an error message; the rest are counted.
SHOWN_BAD_IMAGES = 10
#: Headroom over the checkpoint estimate: manifests, plots, logs, the filesystem's own reserve.
DISK_HEADROOM = 1.25
_MB = 1024 * 1024


class PreflightError(ValueError):
    """The run cannot start: ``problems`` lists every reason found, one line each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        head = "the run cannot start" + (f" ({len(problems)} problems)" if len(problems) > 1 else "")
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in problems))


class BadImagesError(PreflightError):
    """Images the run would read are missing or cannot be decoded; ``bad_images`` holds (path, reason)."""

    def __init__(self, bad_images: list[tuple[str, str]], root: Path, checked: int, full: bool):
        self.bad_images = list(bad_images)
        shown = [f"{path}: {reason}" for path, reason in bad_images[:SHOWN_BAD_IMAGES]]
        more = len(bad_images) - len(shown)
        how = "decoded fully" if full else "quick header-and-end check"
        problem = (f"{len(bad_images)} of {checked} image(s) under {root} are missing or cannot be read "
                   f"({how}):\n    " + "\n    ".join(shown) + (f"\n    … and {more} more" if more > 0 else "")
                   + "\n  Replace or delete them, or leave them out of the run with --skip-bad "
                     "(--set data.skip_bad=true)")
        super().__init__([problem])


@dataclass
class PreflightReport:
    """What :func:`preflight` checked and found (nothing here stops the run)."""

    images_checked: int = 0
    bad_images: list[tuple[str, str]] = field(default_factory=list)
    training_stages: int = 0
    estimated_bytes: int = 0
    free_bytes: int | None = None
    warnings: list[str] = field(default_factory=list)


def preflight(config: PipelineConfig, *, check_images: bool = True, folders: list[Path] | None = None,
              ) -> PreflightReport:
    """Check a pipeline config against this machine before its first stage; returns what was checked.

    Args:
        config: the run's config.
        check_images: open every image the run reads (``data.verify``: decode fully).
        folders: extra folders that must be writable (e.g. the Prefect home).

    Raises:
        BadImagesError: images are missing or undecodable and ``data.skip_bad`` is false.
        PreflightError: anything else that would fail later (all problems listed).
        fat_distill.data.layouts.DatasetLayoutError: the dataset folder does not fit its layout.
    """
    report = PreflightReport()
    problems: list[str] = []
    trainings = _trainings(config)
    report.training_stages = sum(count for _, _, count in trainings)
    checkpoint_bytes = 0
    classes = _estimated_classes(config)
    for where, train, count in _distinct(trainings):
        problems += _check_devices(where, train.devices)
        size_problem, params = _check_model(where, train, classes)
        if size_problem:
            problems.append(size_problem)
        checkpoint_bytes += count * _checkpoint_bytes(train, params)
    problems += _check_devices("run", config.run.devices)
    outputs = [Path(config.run.runs_root), Path(config.run.manifests_root), *(folders or [])]
    for folder in outputs:
        problem = check_writable(folder)
        if problem:
            problems.append(problem)
    report.estimated_bytes = int(checkpoint_bytes * DISK_HEADROOM)
    free = free_bytes(config.run.runs_root)
    report.free_bytes = free
    if free is not None and report.estimated_bytes > free:
        problems.append(f"no space left for the run's checkpoints under {config.run.runs_root}: "
                        f"{free / _MB:.0f} MB free, the run needs about {report.estimated_bytes / _MB:.0f} MB "
                        f"({report.training_stages} training stage(s)); free some space, lower "
                        "train.keep_checkpoints, or set run.runs_root to a larger disk")
    if problems:
        raise PreflightError(problems)
    if check_images:
        _check_images(config, report)
    return report


# --------------------------------------------------------------------------- what trains


def _trainings(config: PipelineConfig) -> list[tuple[str, TrainConfig, int]]:
    """(config field, train settings, how many fit stages use them) for every training stage of the run."""
    teacher = config.teacher
    per_round = 1 + (teacher.folds if teacher.scoring == "oof" else 0)
    out = [("teacher.train", teacher.train, teacher.rounds * per_round),
           ("student.train", config.student.train, 1 + len(config.baselines))]
    return out


def _distinct(trainings: list[tuple[str, TrainConfig, int]]) -> list[tuple[str, TrainConfig, int]]:
    seen: dict[str, tuple[str, TrainConfig, int]] = {}
    for where, train, count in trainings:
        key = train.model_dump_json()
        if key in seen:
            name, first, total = seen[key]
            seen[key] = (name, first, total + count)
        else:
            seen[key] = (where, train, count)
    return list(seen.values())


def _estimated_classes(config: PipelineConfig) -> int:
    """Identities the classifiers will have (exact for synthetic data; a typical size otherwise)."""
    if config.data.source == "synth":
        return max(2, config.data.synth.identities // 2)
    return 1000


# --------------------------------------------------------------------------- devices, models, disk


def _check_devices(where: str, devices: list[str]) -> list[str]:
    from fat_distill.train import resolve_device

    problems = []
    for name in devices:
        if name == "auto":
            continue
        try:
            resolve_device(name)
        except (ValueError, RuntimeError) as exc:
            field_name = "run.devices" if where == "run" else f"{where}.devices"
            problems.append(f"{field_name}: {exc}")
    return problems


def _check_model(where: str, train: TrainConfig, classes: int) -> tuple[str | None, int]:
    """Build the model with its weights and pass two blank images of ``image_size``; (problem, parameters)."""
    import torch

    from fat_distill.models import build_model

    height, width = train.image_size
    try:
        with torch.random.fork_rng(devices=[]):
            model = build_model(train.model, classes, embedding_dim=train.embedding_dim, weights=train.weights,
                                last_stride=train.last_stride)
    except (KeyError, ValueError, OSError, RuntimeError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        return f"{where}: model {train.model!r}{' with weights ' + train.weights if train.weights else ''}: " \
               f"{message}", 0
    params = sum(p.numel() for p in model.parameters())
    try:
        model.eval()
        with torch.inference_mode():
            model(torch.zeros(2, 3, height, width))
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return (f"{where}.image_size {[height, width]} is too small for model {train.model!r} ({first}); "
                "use a larger image_size"), params
    return None, params


def _checkpoint_bytes(train: TrainConfig, params: int) -> int:
    """Bytes one training stage leaves on disk: ``keep_checkpoints`` epoch checkpoints and ``final.pt``.

    An epoch checkpoint holds the weights and the optimiser's state (Adam: two
    more tensors per weight, SGD with momentum: one); while the next one is
    written, one more exists.
    """
    weights = 4 * params
    optimiser = {"sgd": 1 if train.momentum > 0 else 0}.get(train.optimizer, 2)
    epoch_checkpoint = weights * (1 + optimiser)
    return (train.keep_checkpoints + 1) * epoch_checkpoint + weights


def check_writable(folder: str | os.PathLike) -> str | None:
    """None if files can be created in ``folder``, else a one-line reason naming it.

    A folder that does not exist yet is judged by its nearest existing parent (where the run
    will create it); nothing is left behind.
    """
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"could not write into {folder}: {existing} is a file, not a folder"
    probe = existing / f".fat-distill-write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return describe_os_error(exc, folder, action="write into")
    return None


# --------------------------------------------------------------------------- images


def _check_images(config: PipelineConfig, report: PreflightReport) -> None:
    from fat_distill.data.images import find_unreadable_images

    listed = _listed_images(config)
    if listed is None:
        return
    root, paths = listed
    full = config.data.verify
    bad = find_unreadable_images(root, paths, full=full)
    report.images_checked = len(paths)
    report.bad_images = bad
    if bad and not config.data.skip_bad:
        raise BadImagesError(bad, root, len(paths), full)
    if bad:
        report.warnings.append(f"{len(bad)} unreadable image(s) will be left out (data.skip_bad), e.g. "
                               + ", ".join(path for path, _ in bad[:3]))


def _listed_images(config: PipelineConfig) -> tuple[Path, list[str]] | None:
    """(root, relative paths) of every image the run reads; None for synthetic data (made by the run)."""
    data = config.data
    if data.source == "synth":
        return None
    if data.source == "manifest":
        from fat_distill.distill import load_dataset

        given = load_dataset(data.manifest, root=data.root, allow_outside_root=data.allow_outside_root)
        return given.root, given.frame["path"].astype(str).drop_duplicates().tolist()
    from fat_distill.data import index_dataset

    result = index_dataset(Path(data.root), data.layout, camera_regex=data.camera_regex,
                           split_identities=data.split_identities, seed=data.split_seed, skip_bad=True,
                           allow_outside_root=data.allow_outside_root)
    paths = result.frame["path"].astype(str).tolist() + [path for path, _ in result.bad_images]
    return Path(data.root), paths


def dataset_manifest_problems(path: str | os.PathLike, frame) -> list[str]:
    """What makes a dataset manifest unusable beyond its schema: train identities that reappear in
    query/gallery, and images missing under its dataset root (when that root is here); [] if none."""
    problems = []
    known = frame[frame["pid"] > 0]
    train = set(known.loc[known["split"] == "train", "pid"])
    shared = sorted(train & set(known.loc[known["split"] != "train", "pid"]))
    if shared:
        shown = ", ".join(str(pid) for pid in shared[:SHOWN_BAD_IMAGES])
        problems.append(f"{len(shared)} identit{'y is' if len(shared) == 1 else 'ies are'} in both train and "
                        f"query/gallery (pid {shown}{' …' if len(shared) > SHOWN_BAD_IMAGES else ''}): evaluation "
                        "needs identities unseen in training; split by identity (e.g. data index "
                        "--split-identities)")
    root = frame.attrs["manifest"].extra.get("dataset_root")
    if root:
        root = Path(root) if Path(root).is_absolute() else Path(path).parent / root
    if root and root.is_dir():
        missing = [p for p in frame["path"].astype(str).drop_duplicates() if not (root / p).is_file()]
        if missing:
            shown = ", ".join(missing[:SHOWN_BAD_IMAGES])
            problems.append(f"{len(missing)} image(s) missing under {root}: {shown}"
                            + (f" (+{len(missing) - SHOWN_BAD_IMAGES} more)" if len(missing) > SHOWN_BAD_IMAGES else ""))
    return problems


__all__ = ["BadImagesError", "PreflightError", "PreflightReport", "check_writable", "dataset_manifest_problems",
           "preflight"]
