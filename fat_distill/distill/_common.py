"""What the teacher and student stages share: reading the dataset manifest, building models,
predicting logits, and guarding output folders against runs of another configuration."""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from fat_distill.cancel import check_cancelled
from fat_distill.data.batch_transforms import to_model_input
from fat_distill.data.image_cache import CACHE_DIRNAME
from fat_distill.data.loading import ImageBatches, sequential_batches
from fat_distill.data.paths import check_sample_paths
from fat_distill.manifests import ManifestError, ManifestMeta, read_manifest, read_manifest_meta
from fat_distill.models import EmbeddingModel, build_model
from fat_distill.train import CheckpointError, DeviceSettings, TrainConfig, device_settings, resolve_device

log = logging.getLogger("fat_distill.distill")

DISTRACTOR_PID = 0
STAGE_MARKER = "stage.json"


@dataclass
class DatasetInput:
    """A validated ``dataset`` manifest with the folder its image paths are relative to."""

    path: Path
    frame: pd.DataFrame
    root: Path
    meta: ManifestMeta
    allow_outside_root: bool = False

    @property
    def content_hash(self) -> str:
        return self.meta.content_hash or ""

    @property
    def image_cache_dir(self) -> Path:
        """Default folder of the decoded-image cache: ``.image_cache/`` beside the manifest
        (``train.cache_dir`` overrides it; see :mod:`fat_distill.data.image_cache`)."""
        return self.path.parent / CACHE_DIRNAME


def load_dataset(path: str | os.PathLike, *, root: str | os.PathLike | None = None,
                 allow_outside_root: bool | None = None) -> DatasetInput:
    """Read a ``dataset`` manifest, resolve its image root and check that every path stays inside it.

    The root is ``root`` when given, else the manifest's ``extra["dataset_root"]``
    (a relative recorded root is taken relative to the manifest's folder). A
    manifest filtered in pandas, Polars or DuckDB and written back has lost that
    record (and the rest of fat-distill's metadata), so it needs ``root``; moving
    the image folder needs it too.

    Args:
        path: the ``dataset`` manifest.
        root: the folder its ``path`` column is relative to; overrides the recorded
            root. A relative ``root`` is taken relative to the working directory.
        allow_outside_root: permit absolute paths, ``..`` escapes and symlinks
            leaving the root. ``None`` follows the manifest: ``True`` only if it
            was indexed (or accepted by a pipeline) with ``--allow-outside-root``,
            recorded as ``extra["allow_outside_root"]``.

    Raises:
        ManifestError: the manifest is missing or invalid.
        ValueError: no root is given or recorded, or the root is not a folder.
        UnsafeSamplePathError: a path leaves the root (the row and sample_id are named).
    """
    path = Path(path)
    frame = read_manifest(path, "dataset")
    meta: ManifestMeta = frame.attrs["manifest"]
    if root is not None:
        root = Path(root).expanduser()
        where = "the dataset root given"
    else:
        recorded = meta.extra.get("dataset_root")
        if not recorded:
            raise ValueError(
                f"{path}: the dataset manifest records no dataset root (extra['dataset_root']; a manifest written "
                "back by pandas, Polars or DuckDB loses it), so its image paths cannot be resolved. Pass the folder "
                "its paths are relative to: --set data.root=DIR in a pipeline (data.source: manifest), "
                "root=DIR in Python, or re-create the manifest with `fat-distill data index`")
        root = Path(recorded)
        if not root.is_absolute():
            root = path.parent / root
        where = "the recorded dataset root"
    if not root.is_dir():
        raise ValueError(f"{path}: {where} {str(root)!r} is not a folder; pass the folder the images are in now "
                         "(--set data.root=DIR, root=DIR) or re-index the dataset where they are")
    if allow_outside_root is None:
        allow_outside_root = bool(meta.extra.get("allow_outside_root", False))
    check_sample_paths(frame["path"].astype(str).tolist(), root, sample_ids=frame["sample_id"].astype(str).tolist(),
                       allow_outside_root=allow_outside_root, where=str(path))
    return DatasetInput(path=path, frame=frame, root=root, meta=meta, allow_outside_root=allow_outside_root)


def query_and_gallery(dataset: DatasetInput, where: str, purpose: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The query and gallery rows of a dataset manifest (fresh indexes); an error if either is empty."""
    frame = dataset.frame
    query = frame[frame["split"] == "query"].reset_index(drop=True)
    gallery = frame[frame["split"] == "gallery"].reset_index(drop=True)
    if query.empty or gallery.empty:
        raise ValueError(f"{where}: {dataset.path} has {len(query)} query and {len(gallery)} gallery rows; "
                         f"{purpose} needs both")
    return query, gallery


def train_rows(frame: pd.DataFrame, where: str) -> pd.DataFrame:
    """The rows the teacher and student train on: split "train", distractors (pid 0) left out."""
    train = frame[frame["split"] == "train"]
    distractors = int((train["pid"] == DISTRACTOR_PID).sum())
    if distractors:
        log.info("%s: %d train row(s) with pid 0 (distractors) are not trained on", where, distractors)
        train = train[train["pid"] != DISTRACTOR_PID]
    if train.empty:
        raise ValueError(f"{where}: the dataset manifest has no train rows with an identity (pid > 0)")
    return train.reset_index(drop=True)


def stage_settings(device: str | torch.device | None, config: TrainConfig) -> DeviceSettings:
    return device_settings(resolve_device(device), amp=config.amp, channels_last=config.channels_last)


def new_model(config: TrainConfig, num_classes: int, settings: DeviceSettings, *,
              pretrained: bool = True) -> EmbeddingModel:
    """A freshly initialised model on the stage's device.

    The initialisation is seeded by ``config.seed`` without touching the caller's
    random state. ``pretrained=False`` skips ``config.weights`` (for a model whose
    whole state is about to be loaded from a checkpoint).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_model(config.model, num_classes, embedding_dim=config.embedding_dim,
                            weights=config.weights if pretrained else None, last_stride=config.last_stride)
    return model.to(settings.device)


def load_weights(model: nn.Module, checkpoint: str | os.PathLike, device: torch.device) -> nn.Module:
    """Load the ``model`` entry of a training checkpoint (``final.pt``) into ``model``."""
    from fat_distill.train import load_checkpoint

    state = load_checkpoint(checkpoint, map_location=device)
    if "model" not in state:
        raise CheckpointError(f"{checkpoint} holds no 'model' weights; pass a final.pt written by training")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{checkpoint} does not fit the model built from the config ({exc}); "
                              "was it trained with another model, embedding_dim or label set?") from exc
    return model


def load_model(config: TrainConfig, num_classes: int, checkpoint: str | os.PathLike,
               settings: DeviceSettings) -> EmbeddingModel:
    """The model ``config`` describes, with the weights of a training checkpoint, on the stage's device."""
    return load_weights(new_model(config, num_classes, settings, pretrained=False), checkpoint, settings.device)


@torch.inference_mode()
def predict_logits(model: nn.Module, dataset: Dataset, settings: DeviceSettings, *, batch_size: int = 128,
                   num_workers: int | str = "auto",
                   indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Classifier logits of ``dataset`` (eval transforms, no flip), in dataset order.

    Runs in float32 even where training used mixed precision: bf16 logits carry
    about 3 significant digits, too coarse for probabilities compared against a
    threshold or fitted by a mixture.

    Args:
        dataset: yields ``(image, label, index)``; uint8 images are normalised on the device.
        num_workers: DataLoader workers decoding uncached images (``"auto"``: from the machine).
        indices: only these dataset indices (default: all).

    Returns:
        ``(N, C)`` float32 logits (N = ``len(indices)`` or ``len(dataset)``).
    """
    batches = sequential_batches(len(dataset) if indices is None else indices, batch_size)
    loader = ImageBatches(dataset, batches, num_workers=num_workers, pin_memory=settings.pin_memory,
                          persistent_workers=False)
    was_training = model.training
    model.eval()
    chunks = []
    for images, _, _ in loader:
        check_cancelled("class-probability pass")
        images = to_model_input(images.to(settings.device, non_blocking=settings.non_blocking))
        out = model(settings.to_device(images))
        if out.logits is None:
            raise ValueError("predicting class probabilities needs a classifier, but the model has num_classes=0")
        chunks.append(out.logits.float().cpu())
    model.train(was_training)
    if not chunks:
        return np.zeros((0, getattr(model, "num_classes", 0)), dtype=np.float32)
    return torch.cat(chunks).numpy()


def align_to_rows(manifest: pd.DataFrame, train: pd.DataFrame, column: str, path: Path) -> np.ndarray:
    """``manifest[column]`` in the order of ``train``'s sample_ids (every train row must be present)."""
    indexed = manifest.set_index("sample_id")[column]
    missing = ~train["sample_id"].isin(indexed.index)
    if missing.any():
        first = train["sample_id"][missing].iloc[0]
        raise ManifestError(path, f"lacks {int(missing.sum())} train sample(s) of the dataset, first {first!r}; "
                                  "it was made from another dataset manifest", column="sample_id")
    return indexed.loc[train["sample_id"]].to_numpy()


def label_map_inverse(label_map: Mapping[Hashable, int]) -> np.ndarray:
    """``(C,)`` int64 array: class index → label (pid)."""
    inverse = np.empty(len(label_map), dtype=np.int64)
    for label, index in label_map.items():
        inverse[index] = int(label)
    return inverse


def claim_directory(directory: Path, key: Mapping[str, Any], what: str) -> None:
    """Mark ``directory`` as holding the checkpoints of the run identified by ``key``.

    ``fit`` resumes from whatever checkpoints a folder holds when the training
    settings match, but it cannot see what the stage trained *on* (the confident
    set, the soft labels): this marker, written before training, makes a folder
    left by another configuration or input an error instead of a silent resume.

    Raises:
        CheckpointError: the folder holds a run with another key, or checkpoints without a marker.
    """
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / STAGE_MARKER
    key = json.loads(json.dumps(dict(key), sort_keys=True, default=str))
    if marker.exists():
        try:
            found = json.loads(marker.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{marker} is damaged ({exc}); delete {directory} to retrain {what}") from exc
        if found != key:
            differ = sorted(k for k in set(found) | set(key) if found.get(k) != key.get(k))
            raise CheckpointError(
                f"{directory} holds {what} of another configuration or input (differs in {differ}); "
                f"delete {directory} to retrain it, or choose another output folder")
        return
    if any(directory.glob("*.pt")):
        raise CheckpointError(f"{directory} holds checkpoints but no {STAGE_MARKER}, so it cannot tell which "
                              f"run they belong to; delete {directory} to retrain {what}")
    tmp = directory / f".{STAGE_MARKER}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(key, sort_keys=True, indent=1))
    os.replace(tmp, marker)


def manifest_hash(path: str | os.PathLike | None) -> str | None:
    """The content hash recorded in a manifest's metadata (None for no manifest)."""
    if path is None:
        return None
    return read_manifest_meta(path).content_hash
