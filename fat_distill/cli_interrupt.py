"""Ctrl-C and SIGTERM for long CLI commands: stop at the next batch, or at once on the second signal.

The work (a pipeline run) runs on a worker thread; the main thread only waits
and owns the signal handlers. The first SIGINT or SIGTERM asks every stage to
stop at its next batch boundary (:func:`fat_distill.cancel.request_cancel`), so
the run ends within seconds with its checkpoints in place and its state written;
a second signal exits at once (status 128 + signal number).
"""

from __future__ import annotations

import contextvars
import os
import signal
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from rich.console import Console

from fat_distill.cancel import describe_signal, request_cancel

T = TypeVar("T")

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number (130 Ctrl-C, 143 SIGTERM)."""
    return 128 + int(signum)


def run_interruptibly(work: Callable[[], T], *, console: Console,
                      before_exit: Callable[[], Any] | None = None) -> T:
    """Call ``work()`` on a worker thread and return its result (or raise its exception).

    While it runs, the first SIGINT/SIGTERM requests a cancel and says so on
    ``console``; ``work`` is expected to end soon after (the library raises
    :class:`fat_distill.cancel.RunCancelled` at the next batch). A second signal
    calls ``before_exit`` (e.g. stop a server) and exits the process immediately.

    Must be called from the main thread (signal handlers can only be set there).
    """
    outcome: dict[str, Any] = {}
    received: list[int] = []

    def target() -> None:
        try:
            outcome["value"] = work()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread as it is
            outcome["error"] = exc

    def on_signal(signum: int, frame: Any) -> None:
        received.append(signum)
        if len(received) == 1:
            request_cancel(signum)
            console.print(f"\n{describe_signal(signum)}: stopping the running stage at its next batch and "
                          "starting nothing new (press Ctrl-C again to exit at once)", highlight=False)
            return
        console.print(f"\n{describe_signal(signum)} again: exiting now", highlight=False)
        if before_exit is not None:
            try:
                before_exit()
            except Exception:  # noqa: BLE001 - exiting anyway
                pass
        os._exit(exit_code(received[0]))

    previous = {s: signal.signal(s, on_signal) for s in HANDLED_SIGNALS}
    worker = threading.Thread(target=contextvars.copy_context().run, args=(target,), name="fat-distill-run",
                              daemon=True)
    try:
        worker.start()
        while worker.is_alive():
            worker.join(0.2)  # short waits: the handlers run on this thread between them
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


__all__ = ["HANDLED_SIGNALS", "exit_code", "run_interruptibly"]
