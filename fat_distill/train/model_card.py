"""The model card: what a trained checkpoint needs to be rebuilt and fed without the pipeline's config.

Training writes the card into ``final.pt`` under :data:`MODEL_CARD_KEY` (see
:func:`fat_distill.train.fit`'s ``model_card``); :mod:`fat_distill.inference`
reads it back to build the architecture, resize and normalise images the way
evaluation does, and name the identity of each classifier output. It is a
plain JSON-ready dict inside the checkpoint, so ``torch.load(weights_only=True)``
still reads the file and exports (TorchScript, ONNX, Parquet) can carry it as text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from fat_distill.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fat_distill.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fat_distill.train.config import TrainConfig

MODEL_CARD_KEY = "model_card"
#: Bumped when a field changes meaning; readers refuse cards of a newer version.
CARD_VERSION = 1


class ModelCardError(CheckpointError):
    """A checkpoint has no model card (written before cards existed) or an unreadable one."""


@dataclass(frozen=True)
class ModelCard:
    """How to rebuild, feed and read a trained embedding model.

    Attributes:
        kind: ``"student"`` (the distilled student or a baseline) or ``"teacher"``.
        method: the student method (``distilled``, ``ce_triplet`` …), or ``"teacher"``.
        stage: the training stage that wrote it, e.g. ``student.ce_triplet`` or ``teacher.round1``.
        model: name in :data:`fat_distill.models.MODELS`.
        embedding_dim: width D of the retrieval embedding (``model.embed``).
        num_classes: classifier outputs C.
        last_stride: the backbone's last stride (changes the feature-map size, not the weights' shapes).
        image_size: ``(height, width)`` images are resized to.
        mean / std: per-channel normalisation after scaling pixels to [0, 1].
        class_pids: ``(C,)`` the identity label (pid) of each classifier output, in class-index order.
        label_column: the manifest column those pids came from (``pid``, ``true_pid`` for the oracle).
        flip_test: retrieval features average each image with its mirror image.
        distance: the retrieval distance, ``"cosine"`` or ``"euclidean"``.
        fat_distill_version: the library version that trained it.
        card_version: :data:`CARD_VERSION` of the format.
    """

    kind: Literal["student", "teacher"]
    method: str
    stage: str
    model: str
    embedding_dim: int
    num_classes: int
    last_stride: int
    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_pids: tuple[int, ...]
    label_column: str
    flip_test: bool
    distance: str
    fat_distill_version: str
    card_version: int = CARD_VERSION

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (tuples become lists), as stored in checkpoints and exports."""
        return json.loads(json.dumps(asdict(self)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "model card") -> ModelCard:
        """Validate and rebuild a card from :meth:`to_dict`'s form.

        Raises:
            ModelCardError: a field is missing or has the wrong type, or the card is of a newer format.
        """
        if not isinstance(data, Mapping):
            raise ModelCardError(f"{where}: the model card is a {type(data).__name__}, not a mapping")
        version = data.get("card_version")
        if not isinstance(version, int) or version > CARD_VERSION:
            raise ModelCardError(f"{where}: model card version {version!r} is not readable by this fat-distill "
                                 f"(reads up to {CARD_VERSION}); upgrade fat-distill")
        missing = sorted(set(cls.__dataclass_fields__) - set(data))
        if missing:
            raise ModelCardError(f"{where}: the model card lacks {missing}; re-run the stage that trained it")
        try:
            card = cls(
                kind=str(data["kind"]), method=str(data["method"]), stage=str(data["stage"]), model=str(data["model"]),
                embedding_dim=int(data["embedding_dim"]), num_classes=int(data["num_classes"]),
                last_stride=int(data["last_stride"]), image_size=_ints(data["image_size"], 2),
                mean=_floats(data["mean"]), std=_floats(data["std"]),
                class_pids=tuple(int(p) for p in data["class_pids"]), label_column=str(data["label_column"]),
                flip_test=bool(data["flip_test"]), distance=str(data["distance"]),
                fat_distill_version=str(data["fat_distill_version"]), card_version=version,
            )
        except (TypeError, ValueError) as exc:
            raise ModelCardError(f"{where}: the model card is damaged ({exc}); re-run the stage that trained it") \
                from exc
        if len(card.class_pids) != card.num_classes:
            raise ModelCardError(f"{where}: the model card names {len(card.class_pids)} class pids for "
                                 f"{card.num_classes} classes; re-run the stage that trained it")
        return card

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "model card") -> ModelCard:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelCardError(f"{where}: the model card is not JSON ({exc})") from exc
        return cls.from_dict(data, where)


def _ints(values: Sequence[Any], n: int) -> tuple[int, ...]:
    values = tuple(int(v) for v in values)
    if len(values) != n or min(values) < 1:
        raise ValueError(f"expected {n} positive ints, got {list(values)}")
    return values


def _floats(values: Sequence[Any]) -> tuple[float, float, float]:
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ValueError(f"expected 3 per-channel values, got {list(values)}")
    return values  # type: ignore[return-value]


def embedding_width(config: TrainConfig) -> int:
    """The embedding width D a TrainConfig gives (``embedding_dim``, or the backbone's own width when None)."""
    from fat_distill.models import build_model

    if config.embedding_dim is not None:
        return int(config.embedding_dim)
    # Built on the meta device: shapes only, no memory and no initialisation cost (resnet50 in ~40 ms).
    with torch.device("meta"):
        return int(build_model(config.model, 0, last_stride=config.last_stride).embedding_dim)


def describe_model(config: TrainConfig, class_pids: Sequence[int], *, kind: Literal["student", "teacher"],
                   method: str, stage: str, label_column: str = "pid", flip_test: bool = True,
                   distance: str = "cosine") -> ModelCard:
    """The card of a model trained with ``config`` on classes ``class_pids`` (class index order).

    The image size and normalisation are those of the evaluation transforms
    (:func:`fat_distill.data.transforms.build_transforms` with ``train=False``).
    """
    import fat_distill

    return ModelCard(
        kind=kind, method=method, stage=stage, model=config.model, embedding_dim=embedding_width(config),
        num_classes=len(class_pids), last_stride=config.last_stride,
        image_size=(int(config.image_size[0]), int(config.image_size[1])),
        mean=_floats(IMAGENET_MEAN), std=_floats(IMAGENET_STD),
        class_pids=tuple(int(p) for p in class_pids), label_column=label_column, flip_test=bool(flip_test),
        distance=distance, fat_distill_version=fat_distill.__version__,
    )


def class_pids_of(label_map: Mapping[Any, int]) -> list[int]:
    """``{pid: class index}`` → ``[pid of class 0, pid of class 1, …]``."""
    pids = [0] * len(label_map)
    for pid, index in label_map.items():
        pids[int(index)] = int(pid)
    return pids


def card_of_state(state: Mapping[str, Any], where: str) -> ModelCard:
    """The card stored in a loaded checkpoint ``state``.

    Raises:
        ModelCardError: the checkpoint has none (it predates model cards) or it is damaged.
    """
    if MODEL_CARD_KEY not in state:
        raise ModelCardError(
            f"{where} has no model card: it was written by a fat-distill that did not record the architecture, "
            "image size and normalisation in its checkpoints. Re-run its training stage with this version "
            "(`fat-distill resume RUN_ID`, or train_student on the same folder): the trained weights are kept "
            "and the card is added")
    return ModelCard.from_dict(state[MODEL_CARD_KEY], str(where))


def read_model_card(checkpoint: str | os.PathLike) -> ModelCard:
    """The card of a ``final.pt`` (see :func:`card_of_state`)."""
    return card_of_state(load_checkpoint(checkpoint), str(checkpoint))


def store_model_card(path: str | os.PathLike, state: dict[str, Any], card: Mapping[str, Any]) -> bool:
    """Rewrite the checkpoint ``path`` (already loaded as ``state``) with ``card`` unless it holds that card.

    Brings a ``final.pt`` of a finished run up to date without retraining: one
    written before cards existed, or whose evaluation-only settings
    (``flip_test``, ``distance``) changed since. An unchanged card leaves the file
    untouched (same bytes, same modification time).

    Returns:
        whether the file was rewritten.
    """
    card = dict(card)
    if state.get(MODEL_CARD_KEY) == card:
        return False
    state[MODEL_CARD_KEY] = card
    save_checkpoint(Path(path), state)
    return True
