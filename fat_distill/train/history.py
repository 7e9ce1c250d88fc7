"""A training stage's per-epoch history on disk: ``history.parquet`` beside its checkpoints, optionally TensorBoard.

``fit`` keeps the history as a list of dicts, one per epoch (loss, every loss term and
statistic of the objective, ``images_per_s``, ``seconds``, ``lr``, …); the checkpoints
carry it, so a resumed stage knows its earlier epochs. :class:`EpochRecorder` writes
that list as ``history.parquet`` after every epoch (atomically, whole, so a resumed
stage's file is complete) and, given a folder, the same scalars as TensorBoard events.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fat_distill.atomic import atomic_write

log = logging.getLogger("fat_distill.train")

HISTORY_NAME = "history.parquet"


def history_path(checkpoint_dir: str | Path) -> Path:
    """Where a stage's history goes: ``checkpoint_dir/history.parquet``."""
    return Path(checkpoint_dir) / HISTORY_NAME


def history_frame(history: list[dict[str, float]]) -> pd.DataFrame:
    """The history as a table: ``epoch`` (1 for the first, as the logs count), then one column per statistic."""
    frame = pd.DataFrame(history)
    frame.insert(0, "epoch", range(1, len(history) + 1))
    return frame.astype({c: "float64" for c in frame.columns if c != "epoch"}).astype({"epoch": "int64"})


def write_history(checkpoint_dir: str | Path, history: list[dict[str, float]]) -> Path:
    """Write ``history`` to ``checkpoint_dir/history.parquet`` atomically (the whole history, every time)."""
    path = history_path(checkpoint_dir)
    table = pa.Table.from_pandas(history_frame(history), preserve_index=False)
    atomic_write(path, lambda handle: pq.write_table(table, handle), fsync=False)
    return path


def read_history(path: str | Path) -> pd.DataFrame:
    """A stage's history: ``history.parquet`` itself or the checkpoint folder holding it."""
    path = Path(path)
    return pd.read_parquet(path / HISTORY_NAME if path.is_dir() else path)


def require_tensorboard(setting: str = "run.tensorboard") -> None:
    """Fail early and plainly when TensorBoard logging is asked for but its package is missing.

    Raises:
        RuntimeError: ``tensorboard`` cannot be imported.
    """
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"{setting} is on, but the tensorboard package is not installed ({exc}); install it with "
                           "`pip install 'fat-distill[tensorboard]'` or set it to false") from None


class EpochRecorder:
    """Records a stage's finished epochs: ``history.parquet`` and, optionally, TensorBoard scalars.

    TensorBoard events go to ``tensorboard_dir/<stage>``, tagged ``train/<statistic>`` with the
    epoch (1-based) as step. On resume, :meth:`resume` logs the restored epochs that the
    history file did not have yet (the stage was killed between its checkpoint and the
    file), so TensorBoard holds every epoch once, and at worst one of them twice.

    Args:
        checkpoint_dir: the stage's checkpoint folder (the history file goes there).
        stage: the stage's name (``teacher.round0.fold1``, ``student.distilled``).
        tensorboard_dir: the run's TensorBoard folder, or None for no TensorBoard events.
    """

    def __init__(self, checkpoint_dir: str | Path, stage: str, tensorboard_dir: str | Path | None = None):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.stage = stage
        self._writer = None
        if tensorboard_dir is not None:
            require_tensorboard()
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(Path(tensorboard_dir) / stage))

    def resume(self, history: list[dict[str, float]]) -> None:
        """The stage starts with ``history`` (restored from its checkpoint): write it, log what is missing."""
        if not history:
            return
        recorded = self._recorded_epochs()
        for epoch in range(recorded, len(history)):
            self._log(epoch, history[epoch])
        write_history(self.checkpoint_dir, history)

    def epoch_done(self, history: list[dict[str, float]]) -> None:
        """An epoch finished (its checkpoint written): log its scalars, then rewrite the history file."""
        self._log(len(history) - 1, history[-1])
        write_history(self.checkpoint_dir, history)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> EpochRecorder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _log(self, epoch: int, stats: dict[str, float]) -> None:
        if self._writer is None:
            return
        for name, value in stats.items():
            if value is not None and math.isfinite(float(value)):
                self._writer.add_scalar(f"train/{name}", float(value), global_step=epoch + 1)
        self._writer.flush()

    def _recorded_epochs(self) -> int:
        path = history_path(self.checkpoint_dir)
        if not path.exists():
            return 0
        try:
            return pq.ParquetFile(path).metadata.num_rows
        except (OSError, pa.ArrowException) as exc:
            log.warning("%s: %s is unreadable (%s); it is written again", self.stage, path, exc)
            return 0


__all__ = ["HISTORY_NAME", "EpochRecorder", "history_frame", "history_path", "read_history", "require_tensorboard",
           "write_history"]
