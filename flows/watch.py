"""Trigger a deployment and follow its flow run from the client (``fat-distill run --deployment … --watch``).

The flow run executes on a worker, perhaps on another machine: everything here is
read from the Prefect server (``PREFECT_API_URL``), so it works whether or not the
run folder is reachable from the client. It polls the flow run, its subflows (the
points of a sweep) and their stage task runs (tagged ``fat-distill``), and reports
each change of state once, until the flow run reaches a final state.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

#: Flows whose deployments ``--deployment NAME`` finds when NAME has no ``flow/`` prefix.
PIPELINE_FLOW = "fat-distill-pipeline"
SWEEP_FLOW = "fat-distill-sweep"
POLL_SECONDS = 2.0
#: Stage task runs have the task key ``fat-distill.<stage>`` (flows/pipeline.py).
STAGE_KEY_PREFIX = "fat-distill."
_PAGE = 200  # the server's default (and maximum) page size
SETTLE_SECONDS = 10.0
PATIENCE_SECONDS = 120.0  # a busy server (HTTP 5xx) or a lost connection, before --watch gives up
FINAL_STATES = {"Completed", "Cached", "Failed", "Crashed", "Cancelled"}


@dataclass(frozen=True)
class Observed:
    """One thing being watched, as last read from the server."""

    key: str        # stable id: the flow run's or task run's id
    label: str      # what a person reads: "flow run <name>", "<point>: stage teacher.round0"
    state: str      # Prefect state name: Scheduled, Pending, Running, Completed, Cached, Failed, Crashed …
    message: str = ""


def deployment_name(name: str, flow_name: str = PIPELINE_FLOW) -> str:
    """``pipeline`` → ``fat-distill-pipeline/pipeline``; a name with a ``/`` is taken as ``flow/deployment``."""
    return name if "/" in name else f"{flow_name}/{name}"


def changes(seen: dict[str, str], observed: Iterable[Observed]) -> list[str]:
    """Lines for what changed since ``seen`` (key → state name), which is updated in place.

    Each new thing and each change of state gives one line; a failed or crashed state
    carries its message.
    """
    lines = []
    for item in observed:
        if seen.get(item.key) == item.state:
            continue
        seen[item.key] = item.state
        detail = f" — {item.message}" if item.message and item.state in ("Failed", "Crashed", "Cancelled") else ""
        lines.append(f"{item.label}: {item.state}{detail}")
    return lines


def trigger(name: str, parameters: dict[str, Any], flow_run_name: str | None = None):
    """Create a flow run of deployment ``name`` (``flow/deployment``) and return it at once (state Scheduled)."""
    from prefect.deployments import run_deployment

    return run_deployment(name=name, parameters=parameters, timeout=0, flow_run_name=flow_run_name)


def observe(client, flow_run_id: UUID) -> tuple[Any, list[Observed]]:
    """The flow run, and what to report of it: itself, its subflows, and every stage task run under them."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
        TaskRunFilter,
        TaskRunFilterTags,
    )
    from prefect.client.schemas.sorting import TaskRunSort

    flow_run = client.read_flow_run(flow_run_id)
    subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(
        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
    prefix = {flow_run_id: ""} | {sub.id: f"{sub.name}: " for sub in subflows}
    observed = [_flow_observed(flow_run, "flow run")]
    observed += [_flow_observed(sub, "subflow") for sub in sorted(subflows, key=lambda r: r.name)]
    task_runs, offset = [], 0
    while True:
        page = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(prefix))),
            task_run_filter=TaskRunFilter(tags=TaskRunFilterTags(all_=["fat-distill"])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=_PAGE, offset=offset)
        task_runs += page
        if len(page) < _PAGE:
            break
        offset += _PAGE
    for run in task_runs:
        state = run.state
        # The task key names the stage from the start; the run's name is a placeholder until it starts.
        stage = run.task_key.removeprefix(STAGE_KEY_PREFIX) if run.task_key.startswith(STAGE_KEY_PREFIX) else run.name
        observed.append(Observed(str(run.id), f"{prefix.get(run.flow_run_id, '')}stage {stage}",
                                 state.name if state else "Pending", (state.message or "") if state else ""))
    return flow_run, observed


def _flow_observed(run, what: str) -> Observed:
    state = run.state
    return Observed(str(run.id), f"{what} {run.name}", state.name if state else "Scheduled",
                    (state.message or "") if state else "")


def _observe_patiently(client, flow_run_id: UUID, poll_seconds: float):
    """:func:`observe`, reading again while the server is busy or briefly unreachable (up to ``PATIENCE_SECONDS``)."""
    import httpx

    deadline = time.monotonic() + PATIENCE_SECONDS
    while True:
        try:
            return observe(client, flow_run_id)
        except (httpx.TransportError, httpx.HTTPStatusError) as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if (status is not None and status < 500) or time.monotonic() > deadline:
                raise
            time.sleep(poll_seconds)


def follow(flow_run_id: UUID | str, say: Callable[[str], None], *, poll_seconds: float = POLL_SECONDS,
           timeout: float | None = None):
    """Report state changes of a flow run and its stages until it is final; returns the final flow run.

    Args:
        flow_run_id: the flow run (e.g. from :func:`trigger`).
        say: called with one line per change.
        poll_seconds: time between reads of the server.
        timeout: give up after this many seconds (``TimeoutError``); None waits as long as it takes.
    """
    from prefect.client.orchestration import get_client

    flow_run_id = UUID(str(flow_run_id))
    root = str(flow_run_id)
    seen: dict[str, str] = {}
    deadline = None if timeout is None else time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            flow_run, observed = _observe_patiently(client, flow_run_id, poll_seconds)
            if flow_run.state is not None and flow_run.state.is_final():
                break
            for line in changes(seen, observed):
                say(line)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"flow run {flow_run.name} ({flow_run_id}) is still "
                                   f"{flow_run.state.name if flow_run.state else 'Scheduled'} after {timeout:.0f}s")
            time.sleep(poll_seconds)
        # Task runs report their last state just after the flow run's: give them a moment, then end
        # with the flow run's own final state.
        settle = time.monotonic() + SETTLE_SECONDS
        while True:
            stages = [o for o in observed if o.key != root]
            for line in changes(seen, stages):
                say(line)
            if all(o.state in FINAL_STATES for o in stages) or time.monotonic() > settle:
                break
            time.sleep(min(poll_seconds, 1.0))
            flow_run, observed = _observe_patiently(client, flow_run_id, poll_seconds)
        for line in changes(seen, [o for o in observed if o.key == root]):
            say(line)
        return flow_run

__all__ = ["Observed", "PIPELINE_FLOW", "STAGE_KEY_PREFIX", "SWEEP_FLOW", "changes", "deployment_name", "follow",
           "observe", "trigger"]
