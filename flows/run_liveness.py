"""Whether a run recorded as running may be resumed, and its flow run marked Crashed when its process is gone.

A run killed with its machine (or with its worker's process group) leaves ``run.json``
at ``"status": "running"`` and its flow run ``Running`` on the Prefect server: nothing
is left to report the end. Two things settle it:

- the server, when the flow runs send heartbeats (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``,
  set by ``prefect.yaml``) and the automation of ``prefect-automations.yaml`` is created:
  a flow run silent for its ``within`` seconds is set ``Crashed``, whichever machine died;
- ``fat-distill resume`` (:func:`check_resumable`): on the machine the run ran on, the
  recorded process (PID and start time) tells whether it is gone; if so and the server
  still says ``Running``, the flow run is set ``Crashed`` (forced) before resuming. For a
  run of another machine the PID says nothing here: the server's state decides.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from fat_distill.pipeline.runs import run_process_alive

#: Settles a flow run whose heartbeats stopped (README "Run on a cluster").
AUTOMATIONS_FILE = "prefect-automations.yaml"


def this_host() -> str:
    return socket.gethostname()


def _server_state(flow_run_id: str | None) -> Any | None:
    """The flow run's state on the server named by PREFECT_API_URL (None: no server, no id, or unreadable)."""
    if not flow_run_id or not os.environ.get("PREFECT_API_URL"):
        return None
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            return client.read_flow_run(flow_run_id).state
    except Exception:  # noqa: BLE001 - an unreachable server or an unknown id: judged without it
        return None


def mark_crashed(flow_run_id: str, message: str) -> None:
    """Set a flow run ``Crashed`` on the server (forced: the orchestration rules refuse it from Running)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)


def check_resumable(data: dict[str, Any], run_name: str) -> list[str]:
    """Raise ``ValueError`` when the run of ``run.json`` ``data`` may still be running; returns notes to print.

    A run that is not ``running`` is resumable. One that ran here is resumable when its
    process is gone; its flow run is then set Crashed when the server still says Running
    (one note says so). One that ran on another machine is resumable once the server says
    its flow run ended (Crashed, Failed, Cancelled).
    """
    if data.get("status") != "running":
        return []
    host, pid, flow_run_id = data.get("host"), data.get("pid"), data.get("flow_run_id")
    state = _server_state(flow_run_id)
    if host in (None, this_host()):
        if run_process_alive(data):
            raise ValueError(f"run {run_name} is still running (PID {pid}); stop it first "
                             f"(Ctrl-C in its terminal, or kill {pid}) or wait for it to end")
        if state is None or state.is_final():
            return []
        message = f"its process (PID {pid} on {host or this_host()}) is gone"
        seen = f"flow run {flow_run_id} of run {run_name} was still {state.name} on the server, but {message}"
        try:
            mark_crashed(flow_run_id, f"fat-distill resume: {message}")
        except Exception as exc:  # noqa: BLE001 - the run resumes anyway; the server keeps a stale state
            return [f"{seen}; could not mark it Crashed ({type(exc).__name__}: {exc})"]
        return [f"{seen}: marked it Crashed"]
    where = f"on {host} (PID {pid})"
    if state is None:
        raise ValueError(f"run {run_name} is recorded as running {where}, which cannot be checked from here: resume "
                         f"it on {host}, or set PREFECT_API_URL to the Prefect server it reported to, so that the "
                         "state of its flow run decides")
    if not state.is_final():
        raise ValueError(f"run {run_name} is still running {where}: its flow run {flow_run_id} is {state.name} on "
                         f"the server. If {host} is down, the server marks the flow run Crashed once its heartbeats "
                         f"stop (the automation of {AUTOMATIONS_FILE}, README 'Run on a cluster'); resume it then")
    return []


__all__ = ["AUTOMATIONS_FILE", "check_resumable", "mark_crashed", "this_host"]
