"""What to do after a failed run: the CLI's hint below the error, and only a hint that can help.

A plain ``fat-distill resume RUN`` repeats the saved config: it helps when the
cause was outside the config (a full disk, a read-only folder, a damaged image
or checkpoint since replaced, a killed process). A diverging loss or a setting
the data cannot satisfy fails the same way again, so the hint then shows how to
resume with a change (``--set``), which re-runs the changed section's stages and
everything after them (:mod:`fat_distill.pipeline.rerun`).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fat_distill.pipeline.config import PipelineConfig

__all__ = ["failure_advice", "train_section"]

_OUTSIDE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def train_section(stage: str) -> str:
    """The config section holding the training settings of a stage: ``teacher.round1`` → ``teacher.train``."""
    return "teacher.train" if stage.startswith("teacher") else "student.train"


def _divergence_advice(exc, run_id: str, config: PipelineConfig) -> str:
    section = train_section(exc.stage)
    train = (config.teacher.train.resolved("teacher") if section.startswith("teacher")
             else config.student.train.resolved("student"))
    lower = f"{train.lr / 10:g}"
    clip = "" if train.grad_clip is not None else f" or add --set {section}.grad_clip=5"
    return (f"{section}.lr is {train.lr:g} ({train.optimizer}); resume with a smaller one{clip}, e.g.\n"
            f"  fat-distill resume {run_id} --set {section}.lr={lower}\n"
            f"resuming with a changed {section.split('.')[0]} section discards that stage's checkpoints and "
            "re-runs it and every stage after it")


def failure_advice(exc: BaseException, run_id: str, config: PipelineConfig) -> str | None:
    """The hint printed below a failed run's error, or None when the message itself says what to do.

    Args:
        exc: what the run raised.
        run_id: the run, for the ``resume`` command line.
        config: the run's config (names the current values in the advice).
    """
    from fat_distill.data.image_dataset import ImageDecodeError
    from fat_distill.data.layouts import UnreadableImageError
    from fat_distill.pipeline.overrides import ConfigError
    from fat_distill.train import CheckpointError, NonFiniteLossError

    resume = f"fat-distill resume {run_id}"
    if isinstance(exc, NonFiniteLossError):
        return _divergence_advice(exc, run_id, config)
    if isinstance(exc, OSError) and exc.errno in _OUTSIDE_ERRNOS:
        return f"fix that (free space, or make the folder writable), then continue with: {resume}"
    if isinstance(exc, (ImageDecodeError, UnreadableImageError)):
        return (f"replace the image, then continue with: {resume}; or leave unreadable images out: "
                f"{resume} --set data.skip_bad=true (re-runs every stage)")
    if isinstance(exc, CheckpointError):
        return f"delete the checkpoint named above (its epoch is trained again), then continue with: {resume}"
    if isinstance(exc, (ConfigError, ValueError, KeyError)):
        return (f"change the setting named above and resume with it, e.g. {resume} --set SECTION.FIELD=VALUE "
                "(re-runs that section's stages and every stage after them), or start a new run")
    if isinstance(exc, (FileNotFoundError, FileExistsError)):
        return f"restore or remove the file named above, then continue with: {resume}"
    return f"if the cause is fixed outside the config, continue with: {resume}"
