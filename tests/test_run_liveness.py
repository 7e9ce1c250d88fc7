"""`fat-distill resume` of a run recorded as running: its flow run on the server is marked Crashed when its
process is gone; a live process, or a run of another machine whose flow run the server still shows running,
is refused with what to do. Against the session's Prefect server, reached by its URL as on a cluster."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Running

from fat_distill.processes import process_identity
from flows.run_liveness import AUTOMATIONS_FILE, check_resumable, mark_crashed, this_host

ROOT = Path(__file__).resolve().parents[1]


@flow(name="fat-distill-liveness-test")
def _noop() -> None:
    """Only a flow to create flow runs of."""


@pytest.fixture
def server_url(monkeypatch):
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the session's temporary server (the one the flow tests use)
    server.start()
    monkeypatch.setenv("PREFECT_API_URL", server.api_url)
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        yield server.api_url


def _running_flow_run() -> str:
    with get_client(sync_client=True) as client:
        return str(client.create_flow_run(_noop, state=Running()).id)


def _state(flow_run_id: str):
    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state


def _dead_process() -> dict:
    child = subprocess.Popen(["true"])
    identity = process_identity(child.pid).as_dict()
    child.wait()
    return identity


def test_a_dead_local_run_gets_its_flow_run_marked_crashed(server_url):
    flow_run_id = _running_flow_run()
    data = {"status": "running", **_dead_process(), "host": this_host(), "flow_run_id": flow_run_id}
    notes = check_resumable(data, "r1")
    assert len(notes) == 1 and "marked it Crashed" in notes[0] and f"PID {data['pid']}" in notes[0]
    state = _state(flow_run_id)
    assert state.is_crashed() and "is gone" in state.message
    assert check_resumable(data, "r1") == []  # already final: nothing more to do


def test_a_live_local_run_is_refused(server_url):
    data = {"status": "running", **process_identity().as_dict(), "host": this_host(),
            "flow_run_id": _running_flow_run()}
    with pytest.raises(ValueError, match=f"still running \\(PID {os.getpid()}\\); stop it first"):
        check_resumable(data, "r2")
    assert _state(data["flow_run_id"]).is_running()


def test_a_run_of_another_machine_waits_for_the_server_to_end_its_flow_run(server_url):
    flow_run_id = _running_flow_run()
    # Its PID may be any process here (even this one): only the server's state counts.
    data = {"status": "running", **process_identity().as_dict(), "host": "gpu-box-7", "flow_run_id": flow_run_id}
    with pytest.raises(ValueError, match="still running on gpu-box-7") as refused:
        check_resumable(data, "r3")
    assert AUTOMATIONS_FILE in str(refused.value)
    mark_crashed(flow_run_id, "no heartbeat")  # what the automation does once gpu-box-7 is silent
    assert check_resumable(data, "r3") == []


def test_a_run_of_another_machine_without_a_server_is_refused_with_what_to_do(monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    data = {"status": "running", "pid": 1, "host": "gpu-box-7", "flow_run_id": "00000000-0000-0000-0000-000000000000"}
    with pytest.raises(ValueError, match="resume it on gpu-box-7, or set PREFECT_API_URL"):
        check_resumable(data, "r4")
    assert check_resumable({**data, "status": "failed"}, "r4") == []


def test_deployments_send_heartbeats_and_the_automation_waits_for_three_missed_ones():
    import yaml
    from prefect.events.schemas.automations import AutomationCore

    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    beats = {int(d["work_pool"]["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]) for d in deployments}
    (automation,) = [AutomationCore.model_validate(a) for a in yaml.safe_load((ROOT / AUTOMATIONS_FILE).read_text())]
    assert beats == {30}  # Prefect's minimum
    assert automation.trigger.within.total_seconds() >= 3 * max(beats)
    assert automation.trigger.posture == "Proactive" and automation.actions[0].state == "CRASHED"
