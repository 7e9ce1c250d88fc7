"""Epoch checkpoints: written atomically, loadable with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import torch

from fat_distill.atomic import atomic_write

CHECKPOINT_PATTERN = re.compile(r"^epoch-(\d{4,})\.pt$")
FINAL_NAME = "final.pt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged or does not fit the model it is loaded into."""


def checkpoint_path(directory: str | os.PathLike, epoch: int) -> Path:
    return Path(directory) / f"epoch-{epoch:04d}.pt"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` through a temporary file and a rename (never half-written)."""
    return atomic_write(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code from pickles)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for damaged files
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({exc}); delete it to restart that epoch") from exc


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The epoch checkpoint with the highest epoch number in ``directory`` (None if none)."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for entry in directory.iterdir():
        m = CHECKPOINT_PATTERN.match(entry.name)
        if m and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), entry)
    return None if best is None else best[1]


def rng_state() -> dict[str, Any]:
    """Every random state training draws from (torch CPU/CUDA and Python's ``random``)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _python_state_to_tensor()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    _python_state_from_tensor(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_tensor() -> torch.Tensor:
    # random.getstate() holds a tuple of 625 ints: keep it as a tensor so weights_only loading works.
    version, internal, gauss = random.getstate()
    return torch.tensor([version, *internal, -1 if gauss is None else 0], dtype=torch.int64)


def _python_state_from_tensor(t: torch.Tensor) -> None:
    values = [int(v) for v in t.tolist()]
    random.setstate((values[0], tuple(values[1:-1]), None))
