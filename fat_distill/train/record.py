"""What the training inside a block did: which epoch each model continued from, how many it ran.

A pipeline stage calls library functions (``run_teacher_round``, ``train_student``) that call
:func:`fat_distill.train.fit` zero or more times (a round whose models are finished trains
nothing; an out-of-fold round trains one model per fold). The stage wants to report whether
its training *continued* from an epoch checkpoint after a kill or started over, without
every function in between passing that back::

    with recording_fits() as fits:
        run_teacher_round(...)
    summarise_fits(fits)   # {"resumed_from_epoch": 2, "ran_epochs": 2}

Each call that trains, from scratch or from an epoch checkpoint, is recorded; one that finds
its model finished (``final.pt``) is not. The record is a context variable: it follows the
code into threads that copy the caller's context (the device pool's threads do), and
concurrent stages each see only their own fits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fat_distill.train.loop import FitResult

_FITS: ContextVar[list[FitResult] | None] = ContextVar("fat_distill_recorded_fits", default=None)


@contextmanager
def recording_fits() -> Iterator[list[FitResult]]:
    """Collect the :class:`FitResult` of every ``fit`` / ``fit_distributed`` call that trains inside the block."""
    fits: list[FitResult] = []
    token = _FITS.set(fits)
    try:
        yield fits
    finally:
        _FITS.reset(token)


def record_fit(result: FitResult) -> FitResult:
    """Add ``result`` to the innermost active :func:`recording_fits` block (if any); returns it unchanged."""
    fits = _FITS.get()
    if fits is not None:
        fits.append(result)
    return result


def summarise_fits(fits: list[FitResult]) -> dict[str, Any]:
    """How a stage's training went, for its run.json entry.

    Returns:
        ``{}`` when nothing was trained in the block (every model was already finished);
        otherwise ``resumed_from_epoch``: the earliest epoch a model continued from (0 =
        started from scratch; N = continued after the checkpoint of epoch N), and
        ``ran_epochs``: the epochs trained in the block, summed over models (0 when a stage
        was killed after its last epoch checkpoint and only had to write the final weights).
    """
    if not fits:
        return {}
    return {"resumed_from_epoch": min(f.resumed_from_epoch for f in fits),
            "ran_epochs": sum(f.ran_epochs for f in fits)}


__all__ = ["record_fit", "recording_fits", "summarise_fits"]
