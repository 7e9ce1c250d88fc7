"""Cooperative cancellation: a long stage stops at its next batch boundary when asked to.

A signal handler (the CLI's, on Ctrl-C or SIGTERM) calls :func:`request_cancel`;
the training loop, feature extraction and the data-parallel launcher call
:func:`check_cancelled` between batches and raise :class:`RunCancelled`, so the
stage ends with its last epoch checkpoint in place (a resume continues from it,
as after a kill) and nothing half-written under a final name.

Two levels of request exist:

* the process-wide one (:func:`request_cancel`): every stage of the process stops;
* a :class:`CancelToken` made current with :func:`cancel_scope`: only the stages
  run inside that scope stop (one run of a sweep whose other stage failed).

The library never installs signal handlers itself.
"""

from __future__ import annotations

import contextvars
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["CancelToken", "RunCancelled", "cancel_reason", "cancel_requested", "cancel_scope", "cancel_signal",
           "check_cancelled", "describe_signal", "request_cancel", "reset_cancel"]


class RunCancelled(Exception):
    """A stage stopped early because the run was cancelled (a signal, or another stage of the run failed).

    Attributes:
        reason: why the run was cancelled, e.g. ``"SIGINT (Ctrl-C)"``.
        signum: the signal that asked for it, if one did.
    """

    def __init__(self, message: str, reason: str = "", signum: int | None = None):
        super().__init__(message)
        self.reason = reason
        self.signum = signum


class CancelToken:
    """A one-way flag with a reason: once cancelled, it stays cancelled."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""
        self.signum: int | None = None

    def cancel(self, reason: str, signum: int | None = None) -> None:
        """Ask every stage watching this token to stop (the first reason given is kept)."""
        if not self._event.is_set():
            self.reason, self.signum = reason, signum
            self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)


_PROCESS = CancelToken()
_SCOPE: contextvars.ContextVar[CancelToken | None] = contextvars.ContextVar("fat_distill_cancel_scope", default=None)


def describe_signal(signum: int) -> str:
    name = signal.Signals(signum).name
    return f"{name} (Ctrl-C)" if signum == signal.SIGINT else name


def request_cancel(signum: int | None = None, reason: str | None = None) -> None:
    """Ask every stage of this process to stop at its next batch boundary (safe in a signal handler)."""
    _PROCESS.cancel(reason or (describe_signal(signum) if signum is not None else "cancelled"), signum)


def reset_cancel() -> None:
    """Forget a process-wide request (a long-lived process that starts another run)."""
    global _PROCESS
    _PROCESS = CancelToken()


def _active() -> CancelToken | None:
    if _PROCESS.cancelled:
        return _PROCESS
    scoped = _SCOPE.get()
    return scoped if scoped is not None and scoped.cancelled else None


def cancel_requested() -> bool:
    """Whether this process, or the current :func:`cancel_scope`, was asked to stop."""
    return _active() is not None


def cancel_reason() -> str | None:
    token = _active()
    return token.reason if token is not None else None


def cancel_signal() -> int | None:
    """The signal of the process-wide request (None: no request, or one without a signal)."""
    return _PROCESS.signum if _PROCESS.cancelled else None


def check_cancelled(where: str) -> None:
    """Raise :class:`RunCancelled` naming ``where`` if a stop was requested; otherwise return at once.

    Args:
        where: what stops, for the message, e.g. ``"stage 'teacher round 0', epoch 3, batch 7"``.
    """
    token = _active()
    if token is not None:
        raise RunCancelled(f"{where}: stopped ({token.reason})", token.reason, token.signum)


@contextmanager
def cancel_scope(token: CancelToken) -> Iterator[CancelToken]:
    """Make ``token`` the one :func:`check_cancelled` watches (besides the process-wide request) here.

    The scope is a context variable: threads started with a copy of this context
    (``contextvars.copy_context().run``) watch it too.
    """
    reset = _SCOPE.set(token)
    try:
        yield token
    finally:
        _SCOPE.reset(reset)
