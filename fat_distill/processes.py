"""Which process is still alive: a PID together with the process's start time.

A PID alone is not an identity: after a crash the number can be given to an
unrelated process, which would then look like the run (or the slot holder, or
the embedded server) it replaced. Every record of "this process holds X" keeps
:func:`process_identity` (PID and start time), and :func:`is_alive` asks for both.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ProcessIdentity", "is_alive", "process_identity", "process_start_time"]


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3… of ``/proc/<pid>/stat`` (state, ppid, …), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: fields after the last ')' are fixed.
    return text[text.rindex(")") + 2:].split()


def process_start_time(pid: int) -> str | None:
    """An opaque, stable token of when process ``pid`` started (None: no such process, or unknown here).

    Linux: the start time in clock ticks since boot (``/proc/<pid>/stat``, field 22);
    elsewhere ``ps -o lstart=``.
    """
    if Path("/proc/self/stat").exists():
        fields = _proc_stat(pid)
        return fields[19] if fields and len(fields) > 19 else None
    try:
        out = subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


@dataclass(frozen=True)
class ProcessIdentity:
    """A process as other processes can recognise it later: PID plus start time."""

    pid: int
    started: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "pid_started": self.started}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProcessIdentity | None:
        pid = data.get("pid")
        return cls(int(pid), data.get("pid_started")) if pid else None


def process_identity(pid: int | None = None) -> ProcessIdentity:
    """The identity of process ``pid`` (default: this process)."""
    pid = os.getpid() if pid is None else pid
    return ProcessIdentity(pid, process_start_time(pid))


def is_alive(pid: int | None, started: str | None = None) -> bool:
    """Whether process ``pid`` exists and, when ``started`` is given, is the one that started then.

    A record without a start time (written by an older version) is judged by the PID alone.
    """
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    fields = _proc_stat(pid)
    if fields and fields[0] in ("Z", "X"):  # exited, not yet reaped by its parent
        return False
    if started is None:
        return True
    now = process_start_time(pid)
    return now is None or now == started
