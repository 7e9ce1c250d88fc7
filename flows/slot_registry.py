"""Which process holds which device slots of the embedded Prefect server, so a new run frees only the dead's.

On the embedded server (no PREFECT_API_URL) a slot's lease lives in the memory
of the server process that granted it, and that server dies with its CLI: the
count of held slots stays in the shared database. Before this record, a new run
freed every held slot on start, including those of a second run still training
in the same folder, and both then trained on one device.

Each process that takes slots writes ``$PREFECT_HOME/fat-distill-slots/<pid>-<start>.json``
(its identity and ``{limit name: slots held}``). Taking or giving back a slot,
and the reset at flow start, happen under one file lock (``flock``) shared by
every process of the folder, with the record updated in the same critical
section, so the records always match the server's counts: the reset lowers a
limit to what live processes hold, and frees nothing else.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fat_distill.atomic import atomic_write_text
from fat_distill.processes import ProcessIdentity, is_alive, process_identity

log = logging.getLogger("fat_distill.devices")

FOLDER = "fat-distill-slots"
LOCK_FILE = ".lock"

try:
    import fcntl
except ImportError:  # not POSIX: records are kept, the cross-process lock is not
    fcntl = None  # type: ignore[assignment]


class SlotRegistry:
    """This process's record of held device slots, and the lock every process takes to change slots."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.me = process_identity()
        self._held: Counter[str] = Counter()
        self._thread_lock = threading.RLock()

    @classmethod
    def for_prefect_home(cls) -> SlotRegistry:
        """This process's registry of the current PREFECT_HOME (one per folder: every pool of the process
        writes the same record, so they must share its counts)."""
        home = os.environ.get("PREFECT_HOME") or str(Path("~/.prefect").expanduser())
        folder = (Path(home).expanduser() / FOLDER).absolute()
        with _REGISTRIES_LOCK:
            if folder not in _REGISTRIES:
                _REGISTRIES[folder] = cls(folder)
            return _REGISTRIES[folder]

    @property
    def record(self) -> Path:
        return self.folder / f"{self.me.pid}-{self.me.started or 'unknown'}.json"

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the folder's slot lock (all processes): take, give back and reset slots inside it."""
        with self._thread_lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(self.folder / LOCK_FILE, "a+") as handle:
                if fcntl is not None:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    if fcntl is not None:
                        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def add(self, limit: str, slots: int = 1) -> None:
        """Record ``slots`` more held of ``limit`` (before asking the server: a kill then over-counts, never under)."""
        with self._thread_lock:
            self._held[limit] += slots
            self._save()

    def remove(self, limit: str, slots: int = 1) -> None:
        with self._thread_lock:
            self._held[limit] = max(0, self._held[limit] - slots)
            self._save()

    def _save(self) -> None:
        held = {name: count for name, count in self._held.items() if count > 0}
        if not held:
            self.record.unlink(missing_ok=True)
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.record, json.dumps({"owner": self.me.as_dict(), "held": held}))

    def live_holdings(self) -> Counter[str]:
        """Slots held per limit by live processes (this one included); records of dead processes are deleted.

        Call it inside :meth:`exclusive`, so that no record changes meanwhile.
        """
        total: Counter[str] = Counter()
        if not self.folder.is_dir():
            return total
        for path in self.folder.glob("*.json"):
            try:
                data = json.loads(path.read_text())
                owner = ProcessIdentity.from_dict(data["owner"])
                held = {str(k): int(v) for k, v in data["held"].items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                path.unlink(missing_ok=True)  # damaged (records are written atomically): unusable
                continue
            if owner is None or not is_alive(owner.pid, owner.started):
                log.info("device pool: %s (PID %s) is gone; its slots %s are free", path.name,
                         owner.pid if owner else "?", held)
                path.unlink(missing_ok=True)
                continue
            total.update(held)
        return total


_REGISTRIES: dict[Path, SlotRegistry] = {}
_REGISTRIES_LOCK = threading.Lock()

__all__ = ["SlotRegistry"]
