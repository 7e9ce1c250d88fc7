"""Exporting a trained model as one self-contained file: TorchScript or ONNX, with its model card inside.

The exported graph is :class:`ImageEmbedder`:

* input ``images``: float32, shape (B, 3, H, W), RGB, pixel values in **[0, 1]**,
  already resized to the card's ``image_size`` (H, W) — resize with antialiasing
  (``torchvision.transforms.v2.Resize(size, antialias=True)`` on the uint8 image,
  then divide by 255) to match evaluation exactly;
* inside: the card's mean/std normalisation, the BNNeck embedding, averaging with
  the mirror image when the card says ``flip_test``, L2 normalisation;
* output ``embeddings``: float32, shape (B, D), unit L2 norm — compare with a dot
  product (cosine similarity).

The batch size is free; H and W are not checked but other sizes give other embeddings.
The model card (:class:`fat_distill.train.model_card.ModelCard`) travels as JSON:
TorchScript keeps it in the archive's extra file ``model_card.json``
(``torch.jit.load(path, _extra_files={"model_card.json": ""})``), ONNX in the
model's ``metadata_props`` under ``fat_distill.model_card``. Files are written
through a temporary file and a rename.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fat_distill.atomic import atomic_write
from fat_distill.models import EmbeddingModel
from fat_distill.train.model_card import ModelCard, ModelCardError

EXPORT_FORMATS = ("torchscript", "onnx")
TORCHSCRIPT_CARD_FILE = "model_card.json"
ONNX_CARD_KEY = "fat_distill.model_card"
INPUT_NAME, OUTPUT_NAME = "images", "embeddings"


class ImageEmbedder(nn.Module):
    """A trained model with its preprocessing and post-processing: [0, 1] images in, unit embeddings out.

    Args:
        model: an EmbeddingModel (e.g. from :func:`fat_distill.load_student`).
        card: its card; default ``model.model_card``.
    """

    def __init__(self, model: EmbeddingModel, card: ModelCard | None = None) -> None:
        super().__init__()
        card = card if card is not None else getattr(model, "model_card", None)
        if not isinstance(card, ModelCard):
            raise ValueError("ImageEmbedder needs the model's card: pass a model from fat_distill.load_student "
                             "or card=")
        self.model = model
        self.card = card
        self.flip = bool(card.flip_test)
        self.register_buffer("mean", torch.tensor(card.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(card.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        """Args:
            images: (B, 3, H, W) float32 RGB in [0, 1], resized to ``card.image_size``.

        Returns:
            (B, D) float32 embeddings of unit L2 norm.
        """
        normalised = (images - self.mean) / self.std
        embeddings = self.model.embed(normalised)
        if self.flip:
            # Summing before normalising is averaging: the mean's direction (as in evaluation).
            embeddings = embeddings + self.model.embed(torch.flip(normalised, dims=[3]))
        return F.normalize(embeddings.float(), dim=1)


def _example_input(card: ModelCard, device: torch.device) -> Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, *card.image_size, generator=generator).to(device)


def export_torchscript(model: EmbeddingModel, out: str | os.PathLike, card: ModelCard | None = None) -> Path:
    """Trace :class:`ImageEmbedder` of ``model`` and save it with its card (see the module docstring).

    Returns:
        ``out``.
    """
    embedder = ImageEmbedder(model, card).eval()
    example = _example_input(embedder.card, next(model.parameters()).device)
    extra = {TORCHSCRIPT_CARD_FILE: embedder.card.to_json()}
    with torch.no_grad(), _quiet_torchscript():
        traced = torch.jit.trace(embedder, example)
        return atomic_write(out, lambda handle: torch.jit.save(traced, handle, _extra_files=extra))


@contextmanager
def _quiet_torchscript() -> Iterator[None]:
    # The shape checks in the model's forward become constants of the trace, which is what we want,
    # and torch.jit's deprecation notices are not actionable for someone exporting or loading a file.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+.* is deprecated", category=FutureWarning)
        yield


def export_onnx(model: EmbeddingModel, out: str | os.PathLike, card: ModelCard | None = None) -> Path:
    """Export :class:`ImageEmbedder` of ``model`` to ONNX (dynamic batch) with the card in its metadata.

    Needs the ``onnx`` extra (``pip install 'fat-distill[onnx]'``: onnx, onnxscript, onnxruntime).

    Returns:
        ``out``.

    Raises:
        ImportError: onnx or onnxscript is not installed (the message says how to install them).
    """
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"ONNX export needs the onnx extra ({exc.name} is missing): "
                          "pip install 'fat-distill[onnx]'") from exc
    embedder = ImageEmbedder(model, card).eval()
    example = _example_input(embedder.card, next(model.parameters()).device)
    with torch.no_grad():
        program = torch.onnx.export(embedder, (example,), dynamo=True, input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                    external_data=False, verbose=False)
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = ONNX_CARD_KEY, embedder.card.to_json()
    return atomic_write(out, lambda handle: handle.write(proto.SerializeToString()))


def export_model(model: EmbeddingModel, out: str | os.PathLike, format: Literal["torchscript", "onnx"],
                 card: ModelCard | None = None) -> Path:
    """:func:`export_torchscript` or :func:`export_onnx` by name."""
    if format == "torchscript":
        return export_torchscript(model, out, card)
    if format == "onnx":
        return export_onnx(model, out, card)
    raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}")


def load_torchscript(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.jit.ScriptModule,
                                                                                          ModelCard]:
    """A TorchScript export and its card.

    Raises:
        ModelCardError: the archive has no ``model_card.json`` (not written by :func:`export_torchscript`).
    """
    extra = {TORCHSCRIPT_CARD_FILE: ""}
    with _quiet_torchscript():
        module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    if not extra[TORCHSCRIPT_CARD_FILE]:
        raise ModelCardError(f"{path} has no {TORCHSCRIPT_CARD_FILE}; it was not exported by fat-distill")
    return module, ModelCard.from_json(extra[TORCHSCRIPT_CARD_FILE], str(path))


def read_onnx_card(path: str | os.PathLike) -> ModelCard:
    """The card in an ONNX export's metadata."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for entry in proto.metadata_props:
        if entry.key == ONNX_CARD_KEY:
            return ModelCard.from_json(entry.value, str(path))
    raise ModelCardError(f"{path} has no {ONNX_CARD_KEY} metadata; it was not exported by fat-distill")


__all__ = ["EXPORT_FORMATS", "ImageEmbedder", "export_model", "export_onnx", "export_torchscript", "load_torchscript",
           "read_onnx_card"]
