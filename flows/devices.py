"""GPU scheduling: one Prefect global concurrency limit per device, each stage holds a slot while it runs.

Limits are named after the machine and the device, ``fat-distill-<host>-<device>``
(``fat-distill-gpu-box-1-cuda-0``, ``fat-distill-laptop-cpu-0``: :func:`device_limit_names`),
with ``max_tasks_per_device`` slots, created or updated at flow start and acquired with
``strict=True``, so a stage never runs on a device that already holds the maximum
number of stages, across every flow that talks to the same Prefect server: flow runs
on one machine share its devices' limits, workers on other machines have their own.
The host is ``FAT_DISTILL_HOST`` when set (containers on one machine set the same
name so they share its GPUs), else the machine's host name.
Without CUDA, ``auto`` is the CPU; ``devices: [cpu, cpu]`` gives two virtual devices
(useful to test scheduling, and to run two CPU stages at once).
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency

from fat_distill.cancel import check_cancelled
from flows.slot_registry import SlotRegistry

log = logging.getLogger("fat_distill.devices")

T = TypeVar("T")

LIMIT_PREFIX = "fat-distill"
#: Names the machine in device limit names (default: its host name).
HOST_ENV = "FAT_DISTILL_HOST"
POLL_SECONDS = 0.5
#: How often a stage waiting for a device looks for slots that killed runs left held.
DEAD_SLOT_CHECK_SECONDS = 5.0
LEASE_SECONDS = 60
# A released Prefect slot is kept this long for the next stage of this process on the same device.
# Taking a slot costs a server write; on the embedded SQLite server that write often collides with the
# task-run recorder's and is answered 503 after ~2 s, then retried 2 s later. The next stage of a chain
# (teacher round r+1 after r, the queued students) asks within a fraction of a second.
HANDOVER_SECONDS = 5.0
# How long one try to take a slot waits on the server; tries repeat every POLL_SECONDS. Short, because it
# holds the folder's slot lock, which the holder needs to give its slot back.
TAKE_TIMEOUT_SECONDS = 1
# A try that timed out while the limit shows a free slot met a slow server (a loaded machine's SQLite write
# is answered 503 after seconds), not a busy device: it is tried again, this long, so a slow server never
# makes a free device look taken (a stage then went to the other device, or waited for it).
SLOW_SERVER_TAKE_SECONDS = 30


def expand_devices(devices: list[str]) -> list[str]:
    """``auto`` → every CUDA device (or ``cpu`` when there is none); other names are kept."""
    out: list[str] = []
    for name in devices or ["auto"]:
        if name == "auto":
            if torch.cuda.is_available():
                out.extend(f"cuda:{i}" for i in range(torch.cuda.device_count()))
            else:
                out.append("cpu")
        else:
            out.append(name)
    return out


def host_name() -> str:
    """The machine as device limits name it: ``$FAT_DISTILL_HOST``, else its host name."""
    name = os.environ.get(HOST_ENV) or socket.gethostname() or "localhost"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "localhost"


def device_limit_names(devices: list[str], host: str, prefix: str = LIMIT_PREFIX) -> list[str]:
    """One Prefect limit name per entry of ``devices`` (expanded), unique within the list.

    ``cuda:1`` → ``<prefix>-<host>-cuda-1``; a name without an index is numbered by its
    repeats (``[cpu, cpu]`` → ``…-cpu-0``, ``…-cpu-1``: two virtual devices); an exact
    repeat of an indexed device gets ``-v1``, ``-v2`` ….

    >>> device_limit_names(["cuda:0", "cuda:1"], "gpu-box-1")
    ['fat-distill-gpu-box-1-cuda-0', 'fat-distill-gpu-box-1-cuda-1']
    >>> device_limit_names(["cpu", "cpu"], "laptop")
    ['fat-distill-laptop-cpu-0', 'fat-distill-laptop-cpu-1']
    """
    names: list[str] = []
    bare: Counter[str] = Counter()
    for device in devices:
        kind, _, index = device.partition(":")
        if not index:
            index = str(bare[kind])
            bare[kind] += 1
        name = base = f"{prefix}-{host}-{kind}-{index}"
        repeat = 0
        while name in names:
            repeat += 1
            name = f"{base}-v{repeat}"
        names.append(name)
    return names


class DevicePool:
    """The devices a flow schedules stages on, backed by Prefect global concurrency limits."""

    def __init__(self, devices: list[str], max_tasks_per_device: int = 1, prefix: str = LIMIT_PREFIX):
        self.devices = expand_devices(devices)
        self.max_tasks = max_tasks_per_device
        self.prefix = prefix
        self.host = host_name()
        self._limit_names = device_limit_names(self.devices, self.host, prefix)
        # Embedded server: this process's record of its slots (set by create_limits); None on a shared server.
        self._registry: SlotRegistry | None = None
        self._dead_checked = float("-inf")  # when a waiting stage last looked for slots of killed runs
        self._next = 0
        self._lock = threading.Lock()
        # In-process view of free slots: stages of this flow wait on a condition instead of polling the
        # server (which would take CPU from the training it waits for); the Prefect limit still guards
        # against other flows and processes using the same devices.
        self._local_free = [max_tasks_per_device] * len(self.devices)
        self._changed = threading.Condition(self._lock)
        # Prefect slots released by a stage and not yet given back to the server: (context, expiry timer).
        self._parked: list[list[tuple[Any, threading.Timer]]] = [[] for _ in self.devices]
        # Slots are taken and given back on this thread, outside any task run: Prefect releases the
        # leases a task run took when that run ends, which would defeat parking a slot for the next one.
        self._server_calls = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fat-distill-device-slots")
        # Stages on a device run on that device's own threads. torch keeps an OpenMP thread team per
        # calling thread; a second live team on the same cores made each later student ~25 % slower
        # (measured: 4.5 s -> 5.6 s per 8 epochs when the previous trainer's thread stayed alive).
        self._device_threads = [ThreadPoolExecutor(max_workers=max_tasks_per_device,
                                                   thread_name_prefix=f"fat-distill-device-{i}")
                                for i in range(len(self.devices))]

    def limit_name(self, index: int) -> str:
        """The Prefect limit of device ``index`` (its position in ``devices``): see :func:`device_limit_names`."""
        return self._limit_names[index]

    @property
    def slots(self) -> int:
        return len(self.devices) * self.max_tasks

    def create_limits(self, *, reset_stale: bool | None = None) -> None:
        """Create or update the per-device limits.

        Args:
            reset_stale: free the slots held by processes that are gone. Default: only for the
                embedded server (no PREFECT_API_URL), whose leases die with the server of the
                killed run; the processes of one folder record their slots
                (:class:`flows.slot_registry.SlotRegistry`), and a limit is lowered to what live
                processes hold: a live run's slots are never freed. On a shared server, slots of
                killed runs are freed when their lease (``LEASE_SECONDS``, renewed while held) expires.
        """
        from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

        if reset_stale is None:
            reset_stale = "PREFECT_API_URL" not in os.environ
        if reset_stale and self._registry is None:
            self._registry = SlotRegistry.for_prefect_home()
        with self._exclusive(), get_client(sync_client=True) as client:
            for i in range(len(self.devices)):
                client.upsert_global_concurrency_limit_by_name(self.limit_name(i), self.max_tasks)
            if reset_stale:
                self._free_dead_slots(client)
        log.info("device pool: %s, %d stage(s) per device", ", ".join(self.devices), self.max_tasks)

    def _free_dead_slots(self, client: Any) -> None:
        """Lower each limit's active slots to what live processes hold (call under :meth:`_exclusive`)."""
        from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

        live = self._registry.live_holdings()
        for i in range(len(self.devices)):
            name = self.limit_name(i)
            active = client.read_global_concurrency_limit_by_name(name).active_slots
            if active > live[name]:
                log.warning("device pool: %s had %d slot(s) held by runs that were killed; freeing them "
                            "(%d held by live runs stay)", name, active - live[name], live[name])
                client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=live[name]))

    def _free_dead_slots_while_waiting(self) -> None:
        """A stage waiting for a device frees the slots of runs killed meanwhile (their leases died with their
        embedded server, so nothing else would), at most every ``DEAD_SLOT_CHECK_SECONDS``."""
        if self._registry is None or time.monotonic() - self._dead_checked < DEAD_SLOT_CHECK_SECONDS:
            return
        self._dead_checked = time.monotonic()
        try:
            with self._exclusive(), get_client(sync_client=True) as client:
                self._free_dead_slots(client)
        except Exception as exc:  # noqa: BLE001 - the next check tries again
            log.debug("device pool: checking for slots of killed runs failed: %s", exc)

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """The cross-process slot lock of the embedded server's folder (nothing on a shared server)."""
        if self._registry is None:
            yield
        else:
            with self._registry.exclusive():
                yield

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
                ctx = self._take_slot(index)
            except TimeoutError:  # another process holds this device: give the local slot back, retry
                self._release_local(index)
                check_cancelled(f"stage {stage} (waiting for {self.devices[index]})")
                self._free_dead_slots_while_waiting()
                time.sleep(POLL_SECONDS)
                continue
            except BaseException:
                self._release_local(index)
                raise
            try:
                log.info("%s: running on %s (slot of %s)", stage, self.devices[index], self.limit_name(index))
                yield index, self.devices[index]
            finally:
                self._park_slot(index, ctx)
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
            held: list[tuple[int, Any]] = []
            try:
                for i in indices:  # ascending order: processes competing for the same devices do not interlock
                    held.append((i, self._take_slot(i)))
            except TimeoutError:  # another process holds one of them: give everything back, retry
                for i, ctx in reversed(held):
                    self._park_slot(i, ctx)
                for i in indices:
                    self._release_local(i)
                check_cancelled(f"stage {stage} (waiting for {', '.join(self.devices[i] for i in indices)})")
                self._free_dead_slots_while_waiting()
                time.sleep(POLL_SECONDS)
                continue
            except BaseException:
                for i, ctx in reversed(held):
                    self._park_slot(i, ctx)
                for i in indices:
                    self._release_local(i)
                raise
            names = [self.devices[i] for i in indices]
            try:
                log.info("%s: running data-parallel on %s", stage, ", ".join(names))
                yield indices, names
            finally:
                for i, ctx in reversed(held):
                    self._park_slot(i, ctx)
                for i in indices:
                    self._release_local(i)
            return

    def run_on(self, index: int, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Call ``fn`` on device ``index``'s own thread (with the caller's context: Prefect run, logging)."""
        context = contextvars.copy_context()
        return self._device_threads[index].submit(context.run, fn, *args, **kwargs).result()

    def _take_slot(self, index: int) -> Any:
        """A Prefect slot of device ``index``: a parked one (no server call) or a newly acquired one.

        Raises:
            TimeoutError: every slot of the device's limit is held by other processes.
        """
        with self._lock:
            if self._parked[index]:
                ctx, timer = self._parked[index].pop()
                timer.cancel()
                return ctx
        name = self.limit_name(index)

        def enter() -> Any:
            with self._exclusive():
                if self._registry is not None:  # recorded first: a kill then leaves a record, never a lost slot
                    self._registry.add(name)
                try:
                    try:
                        ctx = self._enter_limit(name, TAKE_TIMEOUT_SECONDS)
                    except TimeoutError:
                        if not self._has_free_slot(name):
                            raise
                        ctx = self._enter_limit(name, SLOW_SERVER_TAKE_SECONDS)
                except BaseException:
                    if self._registry is not None:
                        self._registry.remove(name)
                    raise
            return ctx

        return self._server_calls.submit(enter).result()

    @staticmethod
    def _enter_limit(name: str, timeout_seconds: float) -> Any:
        """One slot of the Prefect limit ``name``, entered (the caller exits it to give the slot back)."""
        ctx = concurrency(name, occupy=1, timeout_seconds=timeout_seconds, strict=True,
                          lease_duration=LEASE_SECONDS)
        ctx.__enter__()
        return ctx

    @staticmethod
    def _has_free_slot(name: str) -> bool:
        """Whether the server's limit ``name`` has a slot no one holds (False when it cannot be read)."""
        try:
            with get_client(sync_client=True) as client:
                limit = client.read_global_concurrency_limit_by_name(name)
        except Exception as exc:  # noqa: BLE001 - treated as busy: the caller's retry loop asks again
            log.debug("device pool: reading %s failed: %s", name, exc)
            return False
        return limit.active_slots < limit.limit

    def _park_slot(self, index: int, ctx: Any) -> None:
        """Keep a stage's Prefect slot for ``HANDOVER_SECONDS`` before giving it back to the server."""
        timer = threading.Timer(HANDOVER_SECONDS, self._expire, args=(index, ctx))
        timer.daemon = True
        with self._lock:
            self._parked[index].append((ctx, timer))
        timer.start()

    def _expire(self, index: int, ctx: Any) -> None:
        with self._lock:
            entry = next((e for e in self._parked[index] if e[0] is ctx), None)
            if entry is None:  # taken by the next stage meanwhile
                return
            self._parked[index].remove(entry)
        self._give_back(index, ctx)

    def _give_back(self, index: int, ctx: Any) -> None:
        name = self.limit_name(index)

        def leave() -> None:
            with self._exclusive():
                ctx.__exit__(None, None, None)
                if self._registry is not None:
                    self._registry.remove(name)

        try:
            self._server_calls.submit(leave).result()
        except Exception as exc:  # noqa: BLE001 - the lease then expires on its own after LEASE_SECONDS
            log.warning("device pool: could not release a slot of %s (%s); its lease expires in %d s",
                        name, exc, LEASE_SECONDS)

    def close(self) -> None:
        """Give every parked slot back to the server now (at the end of a flow)."""
        with self._lock:
            parked = [(i, entry) for i, entries in enumerate(self._parked) for entry in entries]
            for entries in self._parked:
                entries.clear()
        for index, (ctx, timer) in parked:
            timer.cancel()
            self._give_back(index, ctx)

    def _release_local(self, index: int) -> None:
        with self._changed:
            self._local_free[index] += 1
            self._changed.notify_all()
