"""Following a deployment's run from the client: what changed is reported once, in order; names resolve."""

from __future__ import annotations

from typer.testing import CliRunner

from fat_distill.cli import app
from flows.watch import Observed, changes, deployment_name


def test_each_change_of_state_is_reported_once_with_the_failure_message():
    seen: dict[str, str] = {}
    first = [Observed("f", "flow run r1", "Running"), Observed("t1", "stage data", "Running")]
    assert changes(seen, first) == ["flow run r1: Running", "stage data: Running"]
    assert changes(seen, first) == []  # nothing new
    later = [Observed("f", "flow run r1", "Running"), Observed("t1", "stage data", "Failed", "FileNotFoundError: x"),
             Observed("t2", "p=1: stage noise", "Pending", "ignored while pending")]
    assert changes(seen, later) == ["stage data: Failed — FileNotFoundError: x", "p=1: stage noise: Pending"]
    assert seen == {"f": "Running", "t1": "Failed", "t2": "Pending"}


def test_a_deployment_name_without_a_flow_is_looked_up_under_the_flow_it_runs():
    assert deployment_name("pipeline") == "fat-distill-pipeline/pipeline"
    assert deployment_name("sweep", "fat-distill-sweep") == "fat-distill-sweep/sweep"
    assert deployment_name("other-flow/gpu") == "other-flow/gpu"


def test_watch_needs_a_deployment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", "--watch"])
    assert result.exit_code == 2
    assert "--watch follows a run started with --deployment" in result.output


def test_a_deployment_needs_a_prefect_server(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    result = CliRunner().invoke(app, ["sweep", "--grid", "student.train.lr=0.1,0.2", "--deployment", "sweep"])
    assert result.exit_code == 2
    assert "--deployment needs a Prefect server: set PREFECT_API_URL" in result.output
