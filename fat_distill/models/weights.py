"""Loading pretrained backbone weights from a local file (never from the network)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

# The ImageNet classifier of a torchvision checkpoint: our heads replace it.
IGNORED_PREFIXES = ("fc.",)
MAX_LISTED_KEYS = 5


class WeightsError(ValueError):
    """A weights file is missing, unreadable, or does not fit the backbone."""


def _first(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    more = len(keys) - MAX_LISTED_KEYS
    return shown + (f" (+{more} more)" if more > 0 else "")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a checkpoint file.

    Accepts a plain state dict (``torch.save(model.state_dict(), path)``, the
    format of torchvision's ImageNet files) or a checkpoint dict holding it under
    ``"model"`` or ``"state_dict"``.

    Raises:
        WeightsError: the file is missing, is not a PyTorch checkpoint, or holds
            no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(
            f"weights file {str(path)!r} does not exist; pretrained weights are never downloaded: "
            "save a torchvision state dict there first (e.g. torch.save(torchvision.models.resnet50("
            "weights='IMAGENET1K_V1').state_dict(), path) on a machine with network access) or pass weights=None"
        )
    try:
        # weights_only: a checkpoint is data, never code to execute.
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a foreign file makes the unpickler raise almost anything
        raise WeightsError(
            f"weights file {str(path)!r} is not a readable PyTorch checkpoint ({type(error).__name__}: {error}); "
            "expected a file written by torch.save(state_dict, path)"
        ) from error
    if isinstance(loaded, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in loaded.items()
    ):
        raise WeightsError(
            f"weights file {str(path)!r} holds a {type(loaded).__name__}, not a state dict of tensors; "
            "expected torch.save(model.state_dict(), path) or {'model': state_dict}"
        )
    return dict(loaded)


def load_backbone_weights(
    backbone: nn.Module, path: str | Path, *, ignored_prefixes: tuple[str, ...] = IGNORED_PREFIXES
) -> None:
    """Load a local state dict into ``backbone``, requiring every key and shape to match.

    Args:
        backbone: the module to fill (e.g. ``model.backbone``).
        path: a checkpoint file; see :func:`read_state_dict` for accepted layouts.
        ignored_prefixes: keys in the file starting with these are dropped before
            matching (the ImageNet ``fc.*`` classifier by default).

    Raises:
        WeightsError: unreadable file, or keys missing from the file, keys the
            backbone does not have, or shape mismatches (the first few of each are
            named).
    """
    path = Path(path)
    state_dict = {
        key: value for key, value in read_state_dict(path).items() if not key.startswith(ignored_prefixes)
    }
    expected = backbone.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key} (file {tuple(state_dict[key].shape)}, model {tuple(expected[key].shape)})"
        for key in expected
        if key in state_dict and state_dict[key].shape != expected[key].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} keys missing from the file: {_first(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} keys the model does not have: {_first(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {_first(mismatched)}")
    if problems:
        raise WeightsError(
            f"weights file {str(path)!r} does not fit {type(backbone).__name__}: "
            + "; ".join(problems)
            + ". Check that the file was saved from the same architecture (e.g. resnet50 weights for 'resnet50')."
        )
    backbone.load_state_dict(state_dict, strict=True)
    logger.info("loaded %d backbone tensors from %s", len(state_dict), path)
