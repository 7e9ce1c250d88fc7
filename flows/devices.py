"""GPU scheduling: one Prefect global concurrency limit per device, each stage holds a slot while it runs.

Limits are named ``fat-distill-device-<i>`` (i = position in ``run.devices``) with
``max_tasks_per_device`` slots, created or updated at flow start and acquired with
``strict=True``, so a stage never runs on a device that already holds the maximum
number of stages, across every flow that talks to the same Prefect server.
Without CUDA, ``auto`` is the CPU; ``devices: [cpu, cpu]`` gives two virtual devices
(useful to test scheduling, and to run two CPU stages at once).

With the embedded server, runs of one project share the limits through the database under
PREFECT_HOME; each process records the slots it holds there (:mod:`flows.slot_holders`), so
that a flow start frees the slots of killed runs and never those of a live one.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency

from flows.slot_holders import SlotHolders, SlotRecord

log = logging.getLogger("fat_distill.devices")

T = TypeVar("T")

LIMIT_PREFIX = "fat-distill-device"
POLL_SECONDS = 0.5
LEASE_SECONDS = 60
# A released Prefect slot is kept this long for the next stage of this process on the same device.
# Taking a slot costs a server write; on the embedded SQLite server that write often collides with the
# task-run recorder's and is answered 503 after ~2 s, then retried 2 s later. The next stage of a chain
# (teacher round r+1 after r, the queued students) asks within a fraction of a second.
HANDOVER_SECONDS = 5.0


def expand_devices(devices: list[str]) -> list[str]:
    """``auto`` → every CUDA device (or ``cpu`` when there is none); other names are kept."""
    out: list[str] = []
    for name in devices or ["auto"]:
        if name == "auto":
            import torch  # only here: a pool of named devices needs no torch (nor do the tests' helper processes)

            if torch.cuda.is_available():
                out.extend(f"cuda:{i}" for i in range(torch.cuda.device_count()))
            else:
                out.append("cpu")
        else:
            out.append(name)
    return out


@dataclass
class _Slot:
    """A Prefect slot this process holds: the concurrency context to exit, and its holder record (embedded)."""

    context: Any
    record: SlotRecord | None


def _embedded() -> bool:
    return "PREFECT_API_URL" not in os.environ


class DevicePool:
    """The devices a flow schedules stages on, backed by Prefect global concurrency limits."""

    def __init__(self, devices: list[str], max_tasks_per_device: int = 1, prefix: str = LIMIT_PREFIX):
        self.devices = expand_devices(devices)
        self.max_tasks = max_tasks_per_device
        self.prefix = prefix
        self._next = 0
        self._lock = threading.Lock()
        # In-process view of free slots: stages of this flow wait on a condition instead of polling the
        # server (which would take CPU from the training it waits for); the Prefect limit still guards
        # against other flows and processes using the same devices.
        self._local_free = [max_tasks_per_device] * len(self.devices)
        self._changed = threading.Condition(self._lock)
        # Prefect slots released by a stage and not yet given back to the server: (slot, expiry timer).
        self._parked: list[list[tuple[_Slot, threading.Timer]]] = [[] for _ in self.devices]
        # Slots are taken and given back on this thread, outside any task run: Prefect releases the
        # leases a task run took when that run ends, which would defeat parking a slot for the next one.
        self._server_calls = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fat-distill-device-slots")
        self._holders = _holder_records() if _embedded() else None
        # Stages on a device run on that device's own threads. torch keeps an OpenMP thread team per
        # calling thread; a second live team on the same cores made each later student ~25 % slower
        # (measured: 4.5 s -> 5.6 s per 8 epochs when the previous trainer's thread stayed alive).
        self._device_threads = [ThreadPoolExecutor(max_workers=max_tasks_per_device,
                                                   thread_name_prefix=f"fat-distill-device-{i}")
                                for i in range(len(self.devices))]

    def limit_name(self, index: int) -> str:
        return f"{self.prefix}-{index}"

    @property
    def slots(self) -> int:
        return len(self.devices) * self.max_tasks

    def create_limits(self, *, free_dead: bool | None = None) -> None:
        """Create or update the per-device limits.

        Args:
            free_dead: give back the slots that killed processes left held. Default: only for
                the embedded server (no PREFECT_API_URL), where runs of one project share the
                database and record their slots (:class:`flows.slot_holders.SlotHolders`), so only
                slots without a live holder are freed (a stage waiting for a device frees them
                too). On a shared server, slots of killed runs are freed when their lease
                (``LEASE_SECONDS``, renewed while held) expires.
        """
        if free_dead is None:
            free_dead = self._holders is not None
        with get_client(sync_client=True) as client:
            for i in range(len(self.devices)):
                client.upsert_global_concurrency_limit_by_name(self.limit_name(i), self.max_tasks)
        if free_dead and self._holders is not None:
            for i in range(len(self.devices)):
                self._free_dead_slots(i)
        log.info("device pool: %s, %d stage(s) per device", ", ".join(self.devices), self.max_tasks)

    @contextmanager
    def acquire(self, stage: str) -> Iterator[tuple[int, str]]:
        """Hold one slot of a device with a free slot (round-robin start); yields (index, device)."""
        n = len(self.devices)
        while True:
            with self._changed:
                while not any(self._local_free):
                    self._changed.wait()
                start = self._next
                self._next = (self._next + 1) % n
                order = [(start + k) % n for k in range(n)]
                free = [i for i in order if self._local_free[i] > 0]
                index = next((i for i in free if self._parked[i]), free[0])  # a parked slot needs no server call
                self._local_free[index] -= 1
            try:
                slot = self._take_slot(index)
            except TimeoutError:  # another process holds this device: give the local slot back, retry
                self._release_local(index)
                time.sleep(POLL_SECONDS)
                continue
            except BaseException:
                self._release_local(index)
                raise
            try:
                log.info("%s: running on %s (slot of %s)", stage, self.devices[index], self.limit_name(index))
                yield index, self.devices[index]
            finally:
                self._park_slot(index, slot)
                self._release_local(index)
            return

    def indices_for(self, stage: str, devices: list[str]) -> list[int]:
        """Pool positions of the devices a data-parallel stage trains on (``train.devices``), one each."""
        taken: list[int] = []
        for name in devices:
            index = next((i for i, d in enumerate(self.devices) if d == name and i not in taken), None)
            if index is None:
                raise ValueError(
                    f"{stage} trains on train.devices {devices}, but the run schedules stages on run.devices "
                    f"{self.devices}: list every one of them in run.devices (e.g. run.devices: {devices}) so "
                    "the scheduler can reserve them while it trains")
            taken.append(index)
        return sorted(taken)

    @contextmanager
    def acquire_devices(self, stage: str, devices: list[str]) -> Iterator[tuple[list[int], list[str]]]:
        """Hold one slot of each named device at once (a data-parallel stage); yields (indices, devices).

        All slots are taken together, or none: a stage never holds some devices while
        waiting for the others, so two such stages cannot deadlock.
        """
        indices = self.indices_for(stage, devices)
        while True:
            with self._changed:
                while not all(self._local_free[i] > 0 for i in indices):
                    self._changed.wait()
                for i in indices:
                    self._local_free[i] -= 1
            held: list[tuple[int, _Slot]] = []
            try:
                for i in indices:  # ascending order: processes competing for the same devices do not interlock
                    held.append((i, self._take_slot(i)))
            except TimeoutError:  # another process holds one of them: give everything back, retry
                for i, slot in reversed(held):
                    self._park_slot(i, slot)
                for i in indices:
                    self._release_local(i)
                time.sleep(POLL_SECONDS)
                continue
            except BaseException:
                for i, slot in reversed(held):
                    self._park_slot(i, slot)
                for i in indices:
                    self._release_local(i)
                raise
            names = [self.devices[i] for i in indices]
            try:
                log.info("%s: running data-parallel on %s", stage, ", ".join(names))
                yield indices, names
            finally:
                for i, slot in reversed(held):
                    self._park_slot(i, slot)
                for i in indices:
                    self._release_local(i)
            return

    def run_on(self, index: int, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Call ``fn`` on device ``index``'s own thread (with the caller's context: Prefect run, logging)."""
        context = contextvars.copy_context()
        return self._device_threads[index].submit(context.run, fn, *args, **kwargs).result()

    def _take_slot(self, index: int) -> _Slot:
        """A Prefect slot of device ``index``: a parked one (no server call) or a newly acquired one.

        Raises:
            TimeoutError: every slot of the device's limit is held by other processes.
        """
        with self._lock:
            if self._parked[index]:
                slot, timer = self._parked[index].pop()
                timer.cancel()
                return slot
        name = self.limit_name(index)

        def enter() -> Any:
            ctx = concurrency(name, occupy=1, timeout_seconds=5, strict=True, lease_duration=LEASE_SECONDS)
            ctx.__enter__()
            return ctx

        def enter_recorded() -> _Slot:
            try:
                with self._holders.taking(name) as record:
                    return _Slot(enter(), record)
            except TimeoutError:
                # Held elsewhere: by a live run, or by a killed one whose slot nobody has freed yet.
                try:
                    self._free_dead_slots(index)
                except Exception as exc:  # noqa: BLE001 - the wait goes on; the next timeout tries again
                    log.warning("device pool: could not check %s for slots of killed runs (%s)", name, exc)
                raise

        if self._holders is None:
            return _Slot(self._server_calls.submit(enter).result(), None)
        return self._server_calls.submit(enter_recorded).result()

    def _free_dead_slots(self, index: int) -> None:
        name = self.limit_name(index)
        with get_client(sync_client=True) as client:
            freed = self._holders.free_dead_slots(client, name)
        if freed:
            log.warning("device pool: %s had %d slot(s) held by killed runs; freed them", name, freed)

    def _park_slot(self, index: int, slot: _Slot) -> None:
        """Keep a stage's Prefect slot for ``HANDOVER_SECONDS`` before giving it back to the server."""
        timer = threading.Timer(HANDOVER_SECONDS, self._expire, args=(index, slot))
        timer.daemon = True
        with self._lock:
            self._parked[index].append((slot, timer))
        timer.start()

    def _expire(self, index: int, slot: _Slot) -> None:
        with self._lock:
            entry = next((e for e in self._parked[index] if e[0] is slot), None)
            if entry is None:  # taken by the next stage meanwhile
                return
            self._parked[index].remove(entry)
        self._give_back(index, slot)

    def _give_back(self, index: int, slot: _Slot) -> None:
        try:
            self._server_calls.submit(slot.context.__exit__, None, None, None).result()
        except Exception as exc:  # noqa: BLE001 - the lease then expires on its own after LEASE_SECONDS
            log.warning("device pool: could not release a slot of %s (%s); its lease expires in %d s",
                        self.limit_name(index), exc, LEASE_SECONDS)
        finally:
            if slot.record is not None:  # this process no longer holds it: the next flow start may free it
                self._holders.release(slot.record)

    def close(self) -> None:
        """Give every parked slot back to the server now (at the end of a flow)."""
        with self._lock:
            parked = [(i, entry) for i, entries in enumerate(self._parked) for entry in entries]
            for entries in self._parked:
                entries.clear()
        for index, (slot, timer) in parked:
            timer.cancel()
            self._give_back(index, slot)

    def _release_local(self, index: int) -> None:
        with self._changed:
            self._local_free[index] += 1
            self._changed.notify_all()


def _holder_records() -> SlotHolders | None:
    """The slot records of the embedded server's home (None where ``flock`` is missing: nothing is freed)."""
    from prefect.settings import get_current_settings

    return SlotHolders(get_current_settings().home) if SlotHolders.supported() else None
