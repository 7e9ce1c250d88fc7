"""Using a trained model outside the pipeline: find its checkpoint, rebuild it, embed image files.

A student's ``final.pt`` carries a model card
(:class:`fat_distill.train.model_card.ModelCard`), so nothing here needs the
run's config::

    import fat_distill
    from fat_distill.inference import embed_images, find_images

    model = fat_distill.load_student("demo-20250101", method="distilled")
    features = embed_images(model, "photos/")          # (N, D), unit L2 norm
    paths = find_images("photos/")                     # row i of features is paths[i]

:func:`embed_images` computes exactly what evaluation computes
(:func:`fat_distill.evaluate.extract_manifest_features`: eval transforms, BNNeck
embedding, flip averaging when the card says ``flip_test``, L2 normalisation).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from rich import get_console
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fat_distill.atomic import atomic_write, temporary_sibling
from fat_distill.data.image_dataset import decode_image_file
from fat_distill.data.transforms import build_transforms
from fat_distill.models import EmbeddingModel, build_model
from fat_distill.pipeline.runs import RUN_FILE, find_run, load_run_json
from fat_distill.train.checkpoint import FINAL_NAME, CheckpointError, load_checkpoint
from fat_distill.train.device import resolve_device
from fat_distill.train.model_card import ModelCard, card_of_state

#: File suffixes :func:`find_images` collects (matched case-insensitively).
EMBED_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
#: Parquet schema-metadata keys of :func:`write_embeddings`.
CARD_METADATA_KEY = "fat_distill.model_card"
SOURCE_METADATA_KEY = "fat_distill.embedding"

_UNREADABLE_HINT = "remove or replace that file and run again"


# --------------------------------------------------------------------------- finding and loading a model

def run_checkpoints(run_dir: str | os.PathLike) -> dict[str, Path]:
    """``{method: final.pt}`` of every trained student and baseline of a run folder.

    A stage taken from Prefect's cache records the checkpoint of the run that
    computed it (in ``run.json``); a stage trained in this run has it under
    ``stages/student/<method>/final.pt``. Both are found.
    """
    run_dir = Path(run_dir)
    found: dict[str, Path] = {}
    for name, entry in sorted(((load_run_json(run_dir) or {}).get("stages") or {}).items()):
        recorded = (entry.get("outputs") or {}).get("checkpoint") if name.startswith("student.") else None
        if recorded:
            recorded = Path(recorded)
            # Relative paths were relative to where the pipeline ran, normally the runs root's parent.
            candidates = [recorded] if recorded.is_absolute() else [recorded, run_dir.parent.parent / recorded]
            existing = next((c for c in candidates if c.is_file()), None)
            if existing is not None:
                found[name.removeprefix("student.")] = existing
    for final in sorted((run_dir / "stages" / "student").glob(f"*/{FINAL_NAME}")):
        found.setdefault(final.parent.name, final)
    return found


def resolve_checkpoint(source: str | os.PathLike, method: str = "distilled",
                       runs_root: str | os.PathLike = "runs") -> Path:
    """The ``final.pt`` that ``source`` names.

    Args:
        source: a run id (or a unique prefix of one) under ``runs_root``, a run
            folder, a checkpoint folder holding ``final.pt``, or a ``.pt`` file.
        method: which student of a run: ``distilled`` or a baseline (``ce_triplet`` …).
            Not used when ``source`` is a checkpoint or its folder.
        runs_root: where run ids are looked up.

    Raises:
        FileNotFoundError: no such run or file, or the run has no trained ``method``
            (the message lists the methods it has).
        ValueError: a run-id prefix matches several runs.
    """
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        if (path / RUN_FILE).is_file():
            return _method_checkpoint(path, method)
        if (path / FINAL_NAME).is_file():
            return path / FINAL_NAME
        raise FileNotFoundError(f"{path} is neither a run folder (no {RUN_FILE}) nor a training folder (no "
                                f"{FINAL_NAME}); give a run id, a run folder or a final.pt")
    if path.suffix == ".pt":
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return _method_checkpoint(find_run(runs_root, str(source)), method)


def _method_checkpoint(run_dir: Path, method: str) -> Path:
    checkpoints = run_checkpoints(run_dir)
    if method in checkpoints:
        return checkpoints[method]
    have = ", ".join(sorted(checkpoints)) or "none (no student or baseline finished training)"
    raise FileNotFoundError(f"run {run_dir.name} has no trained {method!r} model; it has: {have}. "
                            "Choose one of those with --method (or method=)")


def model_from_card(card: ModelCard) -> EmbeddingModel:
    """The untrained architecture a card describes (no pretrained weights are loaded)."""
    return build_model(card.model, card.num_classes, embedding_dim=card.embedding_dim, last_stride=card.last_stride)


def load_model_checkpoint(checkpoint: str | os.PathLike, device: str | torch.device = "cpu") -> EmbeddingModel:
    """Rebuild the model of a ``final.pt`` from its model card and load its weights.

    Returns:
        the :class:`~fat_distill.models.EmbeddingModel` on ``device`` in eval mode, with
        ``model.model_card`` (:class:`ModelCard`) and ``model.checkpoint`` (its path) set.

    Raises:
        CheckpointError: the file is missing or damaged, or its weights do not fit its card.
        fat_distill.train.ModelCardError: the checkpoint has no model card (written before cards existed).
    """
    checkpoint = Path(checkpoint)
    device = resolve_device(device)
    state = load_checkpoint(checkpoint, map_location=device)
    card = card_of_state(state, str(checkpoint))
    if "model" not in state:
        raise CheckpointError(f"{checkpoint} holds no 'model' weights; pass a final.pt written by training")
    model = model_from_card(card)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{checkpoint}: the weights do not fit the model its card describes ({exc})") from exc
    model.to(device).eval()
    model.model_card = card
    model.checkpoint = checkpoint
    return model


def load_student(run_id_or_path: str | os.PathLike, method: str = "distilled", runs_root: str | os.PathLike = "runs",
                 device: str | torch.device = "cpu") -> EmbeddingModel:
    """A trained student or baseline, ready for inference.

    Args:
        run_id_or_path: a run id (or a unique prefix), a run folder, or a ``final.pt``
            (see :func:`resolve_checkpoint`).
        method: ``distilled`` (the student) or a baseline name (``ce``, ``ce_triplet`` …).
        runs_root: the folder run ids are looked up in.
        device: ``"cpu"``, ``"cuda:N"`` or ``"auto"``.

    Returns:
        the model in eval mode; ``model.embed(images)`` gives (B, D) BNNeck embeddings of
        normalised images, ``model.model_card`` says how to prepare them. Use
        :func:`embed_images` to embed files as evaluation does.

    Raises:
        FileNotFoundError: no such run or checkpoint, or the run lacks ``method``.
        fat_distill.train.ModelCardError: the checkpoint predates model cards.
        CheckpointError: the checkpoint is damaged.
    """
    return load_model_checkpoint(resolve_checkpoint(run_id_or_path, method, runs_root), device)


# --------------------------------------------------------------------------- embedding image files

def find_images(folder: str | os.PathLike) -> list[Path]:
    """Every image file under ``folder`` (recursively; :data:`EMBED_SUFFIXES`), sorted by relative path.

    Raises:
        NotADirectoryError: ``folder`` is not a folder.
        ValueError: it holds no image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder")
    files = sorted((p for p in folder.rglob("*") if p.suffix.lower() in EMBED_SUFFIXES and p.is_file()),
                   key=lambda p: p.relative_to(folder).as_posix())
    if not files:
        raise ValueError(f"{folder} holds no image ({', '.join(EMBED_SUFFIXES)}, searched recursively)")
    return files


class ImageFiles(Dataset):
    """Image files, decoded and transformed; ``dataset[i]`` is ``(image, 0, i)`` like ManifestImageDataset's."""

    def __init__(self, paths: Sequence[str | os.PathLike], transform) -> None:
        self.paths = [Path(p) for p in paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        image = decode_image_file(self.paths[index], hint=_UNREADABLE_HINT)
        return self.transform(image), 0, index


def embed_images(
    model: EmbeddingModel,
    images: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    batch_size: int = 64,
    card: ModelCard | None = None,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    progress: bool = False,
    console: Console | None = None,
) -> Tensor:
    """L2-normalised retrieval embeddings of image files, as the pipeline's evaluation computes them.

    Each image is decoded to RGB, resized to the card's ``image_size`` and
    normalised with its mean/std (the evaluation transforms), embedded with
    ``model.embed`` (averaged with its mirror image when ``card.flip_test``) and
    scaled to unit length.

    Args:
        model: from :func:`load_student` (its ``model_card`` is used), or any
            EmbeddingModel together with ``card``.
        images: a folder (every image under it, in :func:`find_images` order) or a
            sequence of image file paths (kept in that order).
        batch_size: images per forward pass (twice that with flip averaging).
        card: overrides ``model.model_card``.
        device: where to run; default: where the model's parameters are.
        num_workers: DataLoader processes decoding images.
        progress: show a Rich progress bar.

    Returns:
        shape (N, D), float32, on the CPU; row i is image i.

    Raises:
        ValueError: no card, no image, or batch_size < 1.
        fat_distill.data.ImageDecodeError: a file is missing or not a readable image (it is named).
    """
    card = card if card is not None else getattr(model, "model_card", None)
    if not isinstance(card, ModelCard):
        raise ValueError("embed_images needs the model's card (image size, normalisation, flip test): pass a model "
                         "from fat_distill.load_student or card=")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    paths = find_images(images) if isinstance(images, (str, os.PathLike)) else [Path(p) for p in images]
    if not paths:
        raise ValueError("embed_images: no image paths given")
    from fat_distill.evaluate import extract_features

    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    transform = build_transforms(card.image_size, train=False, mean=card.mean, std=card.std)
    loader = DataLoader(ImageFiles(paths, transform), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    with _progress_bar(progress, console, len(paths)) as advance:
        features, indices = extract_features(model, _counted(loader, advance), device, flip=card.flip_test)
    ordered = torch.empty_like(features)
    ordered[indices] = features
    return ordered


class _progress_bar:
    """Context manager yielding ``advance(n)`` of a Rich bar over ``total`` images; a no-op without ``enabled``."""

    def __init__(self, enabled: bool, console: Console | None, total: int) -> None:
        # Not on a pipe or in a log file: there a transient bar only leaves a blank line.
        enabled = enabled and (console or get_console()).is_terminal
        self.bar = Progress(TextColumn("[bold]embed[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TimeRemainingColumn(), console=console, transient=True) if enabled else None
        self.total = total
        self.task = None

    def __enter__(self):
        if self.bar is not None:
            self.bar.start()
            self.task = self.bar.add_task("embed", total=self.total)
        return self.advance

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=n)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


def _counted(loader: Iterable, advance) -> Iterator:
    for batch in loader:
        yield batch
        advance(len(batch[0]))


# --------------------------------------------------------------------------- writing embeddings

def check_writable(out: str | os.PathLike) -> Path:
    """Fail now, before any work, if ``out`` cannot be written (creates its missing parent folders).

    Raises:
        IsADirectoryError: ``out`` is a folder.
        OSError (PermissionError, NotADirectoryError …): its folder cannot be created or written;
            the message names ``out``.
    """
    out = Path(out)
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder; give a file name, e.g. {out / 'features.parquet'}")
    blocker = next((parent for parent in out.parents if parent.exists() and not parent.is_dir()), None)
    if blocker is not None:
        raise NotADirectoryError(f"cannot write {out}: {blocker} is a file, not a folder; choose another --out")
    probe = temporary_sibling(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe.touch()
    except OSError as exc:
        raise type(exc)(f"cannot write {out}: {exc.strerror or exc}; choose another --out") from exc
    probe.unlink()
    return out


def write_embeddings(out: str | os.PathLike, sample_ids: Sequence[str], paths: Sequence[str], features: Tensor,
                     card: ModelCard, source: dict[str, Any] | None = None) -> Path:
    """Write embeddings to Parquet atomically: one row per image.

    Columns: ``sample_id`` (string), ``path`` (string) and ``embedding``
    (``list<float32>``, the row of ``features``). The schema metadata holds the
    model card as JSON under :data:`CARD_METADATA_KEY` and ``source`` (run,
    method, checkpoint …) under :data:`SOURCE_METADATA_KEY`.

    Args:
        out: the Parquet file (written through a temporary file and a rename).
        sample_ids / paths: ``(N,)`` each.
        features: ``(N, D)`` float.
        card: the model's card.
        source: JSON-ready provenance.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    features = features.detach().to("cpu", torch.float32)
    n = len(sample_ids)
    if len(paths) != n or features.shape[0] != n or features.ndim != 2:
        raise ValueError(f"write_embeddings: {n} sample_ids, {len(paths)} paths and features of shape "
                         f"{tuple(features.shape)} do not match")
    dim = features.shape[1]
    values = pa.array(features.numpy().reshape(-1), type=pa.float32())
    offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32), type=pa.int32())
    table = pa.table({"sample_id": pa.array([str(s) for s in sample_ids], pa.string()),
                      "path": pa.array([str(p) for p in paths], pa.string()),
                      "embedding": pa.ListArray.from_arrays(offsets, values)})
    metadata = {CARD_METADATA_KEY: card.to_json(),
                SOURCE_METADATA_KEY: json.dumps({**(source or {}), "num_images": n, "embedding_dim": dim},
                                                sort_keys=True, default=str)}
    table = table.replace_schema_metadata(metadata)
    return atomic_write(out, lambda handle: pq.write_table(table, handle))


def read_embeddings_card(path: str | os.PathLike) -> ModelCard:
    """The model card stored in an embeddings Parquet file by :func:`write_embeddings`."""
    import pyarrow.parquet as pq

    metadata = pq.read_schema(path).metadata or {}
    raw = metadata.get(CARD_METADATA_KEY.encode())
    if raw is None:
        raise ValueError(f"{path} has no {CARD_METADATA_KEY} in its schema metadata; it was not written by "
                         "`fat-distill embed`")
    return ModelCard.from_json(raw, str(path))


__all__ = [
    "CARD_METADATA_KEY", "EMBED_SUFFIXES", "ImageFiles", "SOURCE_METADATA_KEY", "check_writable", "embed_images",
    "find_images", "load_model_checkpoint", "load_student", "model_from_card", "read_embeddings_card",
    "resolve_checkpoint", "run_checkpoints", "write_embeddings",
]
