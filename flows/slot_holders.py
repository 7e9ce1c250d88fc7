"""Which live processes hold device slots of one Prefect home, so a flow start frees only dead ones.

With the embedded server (no PREFECT_API_URL), every ``fat-distill run`` in a project starts
its own server process on the same database under PREFECT_HOME, so device limits are shared
by those runs. A run killed while it held a device slot leaves the slot counted as held, and
its lease is not reliably expired (each embedded server keeps leases in its own memory). So
slots of dead holders are freed (at flow start, and by a stage that waits for the device),
and a slot that another live run on the same home holds must never be.

Each process records each slot it holds in a file under
``PREFECT_HOME/fat-distill-device-holders/<limit>/`` that it keeps locked (``flock``) until it
has given the slot back. The operating system drops the lock when the process ends, however
it ends (SIGKILL included), so a record that can be locked belongs to a dead process. Asking
the server for a slot and writing its record happen under the limit's own lock file, and so
does counting: while the count runs, every slot held by a live process has a record, so
``active slots - live records`` slots are held by dead processes, and only those are freed.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock, so no records and nothing is freed
    fcntl = None  # type: ignore[assignment]

FOLDER = "fat-distill-device-holders"


@dataclass
class SlotRecord:
    """A live process's record of one slot of ``limit`` that it holds."""

    limit: str
    path: Path
    handle: IO[str]


class SlotHolders:
    """The slot records of one Prefect home (see the module docstring)."""

    def __init__(self, home: str | os.PathLike):
        self.root = Path(home) / FOLDER

    @staticmethod
    def supported() -> bool:
        return fcntl is not None

    @contextmanager
    def _locked(self, limit: str) -> Iterator[Path]:
        """The limit's lock (one process and thread at a time); yields the limit's record folder."""
        folder = self.root / limit
        folder.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{limit}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield folder
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextmanager
    def taking(self, limit: str) -> Iterator[SlotRecord]:
        """Ask the server for a slot of ``limit`` inside this block: its record is kept if the block
        succeeds and removed if it raises (e.g. the ask timed out)."""
        with self._locked(limit) as folder:
            path = folder / f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
            handle = open(path, "w")  # noqa: SIM115 - stays open (and locked) while the slot is held
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            handle.write(f"pid {os.getpid()}\n")
            handle.flush()
            record = SlotRecord(limit, path, handle)
            try:
                yield record
            except BaseException:
                path.unlink(missing_ok=True)
                handle.close()
                raise

    def release(self, record: SlotRecord) -> None:
        """Remove a record once its slot is back on the server."""
        with self._locked(record.limit):
            record.path.unlink(missing_ok=True)
            record.handle.close()

    def free_dead_slots(self, client: Any, limit: str) -> int:
        """Give back the slots of ``limit`` that no live process holds; returns how many.

        Args:
            client: a synchronous Prefect client.
            limit: the global concurrency limit's name.
        """
        with self._locked(limit) as folder:
            live = 0
            for path in sorted(folder.iterdir()):
                with open(path) as probe:
                    try:
                        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        live += 1
                        continue
                path.unlink(missing_ok=True)  # its process is gone
            dead = client.read_global_concurrency_limit_by_name(limit).active_slots - live
            if dead > 0:
                # A decrement, not an absolute value: a slot given back meanwhile is not counted twice.
                # (The server wants a positive occupancy; the dead holders' real one is unknown.)
                client.release_concurrency_slots([limit], dead, 1.0)
            return max(dead, 0)


__all__ = ["SlotHolders", "SlotRecord"]
