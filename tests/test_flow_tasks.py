"""How the pipeline reads in Prefect (embedded server): one task per stage with its own key, name, tags and
retries; results kept beside the run folders; cached runs re-attach their pictures; sweep points as subflows."""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

import pytest

from fat_distill.pipeline import PipelineConfig, load_run_json, validate_config
from tests.pipeline_configs import TRAIN, tiny_config

pytestmark = pytest.mark.slow


def _config(root: Path) -> dict:
    # Seed 5: no other test's cache; no baselines: the fewest stages that still have every kind.
    return tiny_config(root, data={"synth": {**tiny_config(root)["data"]["synth"], "seed": 5}},
                       teacher={"rounds": 1}, student={"train": {**TRAIN, "lr": 1e-3}}, baselines=[])


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    from flows.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("flow-tasks")
    cfg = validate_config(PipelineConfig, _config(root))
    run_id, _ = run_pipeline(cfg)
    return root, cfg, run_id, load_run_json(root / "runs" / run_id)


def _task_runs(flow_run_id: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)])))


def _artifacts(flow_run_id: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(flow_run_id)])))


def test_each_stage_is_its_own_task_with_tags_retries_and_results_beside_the_runs(first_run):
    root, cfg, run_id, run_json = first_run
    task_runs = {t.name: t for t in _task_runs(run_json["flow_run_id"])}
    assert set(task_runs) == set(run_json["stages"])
    retries = cfg.run.retries
    for name, task_run in task_runs.items():
        kind = run_json["stages"][name]["components"]["stage"]
        assert task_run.task_key == f"fat-distill.{name}"
        assert {"fat-distill", f"stage:{kind}", f"run:{run_id}"} <= set(task_run.tags)
        assert task_run.empirical_policy.retries == retries.for_stage(kind)
    assert retries.for_stage("data") == 2 and retries.for_stage("student") == 0
    assert "method:distilled" in task_runs["student.distilled"].tags
    assert "method:distilled" in task_runs["evaluate.distilled"].tags
    assert "device:0" in task_runs["teacher.round0"].tags  # one device: known when submitted
    assert not any(t.startswith("device:") for t in task_runs["data"].tags)  # no device at all
    results = list((root / "runs" / ".stage-results").iterdir())
    assert len(results) >= len(task_runs), "each stage's result is stored beside the run folders"


def test_a_cached_run_reattaches_the_pictures_of_the_run_it_reuses(first_run):
    from flows.pipeline import run_pipeline

    root, cfg, first_id, first_json = first_run
    run_id, _ = run_pipeline(cfg)
    run_json = load_run_json(root / "runs" / run_id)
    assert {e["state"] for e in run_json["stages"].values()} == {"cached"}
    images = [a for a in _artifacts(run_json["flow_run_id"]) if a.type == "image"]
    drawn = [a for a in _artifacts(first_json["flow_run_id"]) if a.type == "image"]
    assert drawn and sorted(a.data for a in images) == sorted(a.data for a in drawn)
    for artifact in images:
        assert f"/runs/{first_id}/plots/" in artifact.data  # the earlier run's files: nothing drawn again
        assert Path(artifact.data.removeprefix("file://")).is_file()


def test_sweep_points_are_subflows_named_after_their_grid_point_with_their_own_artifacts(first_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, FlowRunFilterParentFlowRunId

    from flows.pipeline import artifact_key, run_sweep

    root, cfg, _, _ = first_run
    results = run_sweep(cfg, {"student.train.lr": [0.001, 0.002]}, sweep_id="tasks-sweep")
    labels = {"student.train.lr=0.001", "student.train.lr=0.002"}
    assert set(results) == labels
    with get_client(sync_client=True) as client:
        (sweep_run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(
            any_=["tasks-sweep"])))
        points = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[sweep_run.id])))
    assert {p.name for p in points} == labels
    assert all(p.state.is_completed() for p in points)
    for point in points:
        keys = {a.key for a in _artifacts(str(point.id))}
        assert {artifact_key("run-summary", point.name), artifact_key("retrieval-metrics", point.name)} <= keys
        stages = {t.name for t in _task_runs(str(point.id))}
        assert {"data", "teacher.round0", "student.distilled", "evaluate.distilled"} <= stages
    assert artifact_key("run-summary", "student.train.lr=0.001") == "run-summary-student-train-lr-0-001"
    point_runs = {label: load_run_json(root / "runs" / r["run_id"]) for label, r in results.items()}
    assert point_runs["student.train.lr=0.001"]["stages"]["student.distilled"]["state"] == "cached"
    assert point_runs["student.train.lr=0.002"]["stages"]["student.distilled"]["state"] == "ran"


def test_only_transient_errors_are_retried_by_prefect():
    from prefect import flow, task

    from flows.pipeline import _retry_if_transient, is_transient

    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError()) and is_transient(OSError(5, "EIO"))
    for permanent in (FileNotFoundError("x"), PermissionError(), ValueError("bad manifest"), KeyError("col")):
        assert not is_transient(permanent)

    calls: dict[str, int] = {"io": 0, "bad": 0}

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=_retry_if_transient)
    def flaky(kind: str) -> str:
        calls[kind] += 1
        if kind == "io" and calls[kind] == 1:
            raise ConnectionResetError("the shared filesystem went away for a moment")
        if kind == "bad":
            raise ValueError("row 3 of dataset.parquet has no pid")
        return "ok"

    @flow
    def both() -> tuple[str, str]:
        io = flaky("io")
        bad = flaky.submit("bad")
        bad.wait()
        return io, bad.state.name

    assert both() == ("ok", "Failed")
    assert calls == {"io": 2, "bad": 1}  # retried once after the transient error; bad input failed at once


def test_every_stage_kind_has_a_retry_count():
    from fat_distill.pipeline.config import RetriesSection
    from fat_distill.pipeline.keys import STAGE_CODE

    retries = RetriesSection()
    for kind in STAGE_CODE:
        assert retries.for_stage(kind) >= 0
    assert {k for k in STAGE_CODE if retries.for_stage(k) == 0} == {
        "teacher_fold", "teacher_round", "soft_labels", "cleanlab", "student", "evaluate"}
