"""Training defaults that depend on the regime: a backbone trained from scratch, or one with pretrained weights.

A :class:`~fat_distill.train.TrainConfig` leaves ``lr``, ``epochs`` and ``warmup_epochs`` unset (None) by
default; :meth:`~fat_distill.train.TrainConfig.resolved` fills them from :data:`REGIME_DEFAULTS`:

- ``scratch`` (``weights: null``): a randomly initialised network needs a large step and many epochs.
  Adam 3e-3 takes ``small_cnn`` to >= 95 % train accuracy on clean ORL faces and synthetic data in
  20 epochs (benchmarks/README.md, "Backbones"), where the pretrained default 3.5e-4 left every model on
  real faces below 10 % (issue 12).
- ``pretrained`` (``weights: PATH``): Bag of Tricks' Adam 3.5e-4 with a linear warm-up, which fine-tunes
  without wrecking the pretrained features; the paper's 5 epochs a teacher round.

The teacher's ``epochs`` are those of one round. A value written in the config always wins.
"""

from __future__ import annotations

from typing import Literal

Regime = Literal["scratch", "pretrained"]
Role = Literal["teacher", "student"]

#: regime → field → value; ``epochs`` is per role (a teacher round, or a student / baseline).
REGIME_DEFAULTS: dict[str, dict[str, object]] = {
    "scratch": {"lr": 3e-3, "warmup_epochs": 1.0, "epochs": {"teacher": 20, "student": 35}},
    "pretrained": {"lr": 3.5e-4, "warmup_epochs": 1.0, "epochs": {"teacher": 5, "student": 10}},
}

#: The fields a regime fills when the config leaves them unset.
REGIME_FIELDS = ("lr", "epochs", "warmup_epochs")


def regime_of(weights: str | None) -> Regime:
    """``"pretrained"`` when a weights file is given, else ``"scratch"``."""
    return "scratch" if weights is None else "pretrained"


def regime_default(regime: Regime, field: str, role: Role = "student") -> float | int:
    """The default of ``field`` (one of :data:`REGIME_FIELDS`) in ``regime`` for ``role``."""
    value = REGIME_DEFAULTS[regime][field]
    return value[role] if isinstance(value, dict) else value
