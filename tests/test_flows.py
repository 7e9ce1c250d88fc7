"""Real Prefect flows (embedded server, isolated PREFECT_HOME): caching, partial re-runs, device slots."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from fat_distill.manifests import read_manifest, read_manifest_meta
from fat_distill.pipeline import PipelineConfig, load_run_json, validate_config
from tests.pipeline_configs import tiny_config

pytestmark = pytest.mark.slow


def run(config_dict):
    from flows.pipeline import run_pipeline

    cfg = validate_config(PipelineConfig, config_dict)
    run_id, summary = run_pipeline(cfg)
    return run_id, summary, load_run_json(f"{cfg.run.runs_root}/{run_id}")


def states(run_json):
    return {name: entry["state"] for name, entry in run_json["stages"].items()}


def test_pipeline_caches_every_stage_and_reruns_only_what_changed(tmp_path):
    config = tiny_config(tmp_path)
    run_id, summary, first = run(config)
    assert first["status"] == "completed"
    assert set(states(first).values()) == {"ran"}
    assert set(summary["retrieval"]) == {"distilled", "ce"}
    manifests = tmp_path / "manifests" / run_id
    for name in ("dataset.parquet", "dataset_noisy.parquet", "teacher_round_0.parquet", "teacher_round_1.parquet",
                 "soft_labels.parquet", "metrics.parquet", "metrics_distilled.parquet", "metrics_ce.parquet",
                 "metrics_noise_detection.parquet"):
        read_manifest(manifests / name)  # exists and validates
    assert read_manifest(manifests / "soft_labels.parquet")["confident"].any()

    run_id2, summary2, second = run(config)
    assert set(states(second).values()) == {"cached"}, states(second)
    assert summary2 == summary
    for name in ("teacher_round_1.parquet", "soft_labels.parquet"):
        assert (read_manifest_meta(tmp_path / "manifests" / run_id2 / name).content_hash
                == read_manifest_meta(manifests / name).content_hash)

    changed = tiny_config(tmp_path, student={"train": {**config["student"]["train"], "lr": 1e-3}})
    _, _, third = run(changed)
    s = states(third)
    assert {n for n, st in s.items() if st == "ran"} == {"student.distilled", "student.ce", "evaluate.distilled",
                                                       "evaluate.ce"}
    assert s["teacher.round1"] == "cached" and s["noise_report"] == "cached"
    assert "config section changed" in third["stages"]["student.distilled"]["why"]

    # one more round: rounds 0 and 1 come from the first run's cache (their weights stay in its folder), and
    # round 2, trained in this run's folder, continues from round 1's weights there
    more = tiny_config(tmp_path, teacher={**config["teacher"], "rounds": 3})
    more_id, _, fourth = run(more)
    s = states(fourth)
    assert s["teacher.round0"] == s["teacher.round1"] == "cached" and s["teacher.round2"] == "ran", s
    assert not (tmp_path / "runs" / more_id / "stages" / "teacher" / "round-1").exists()
    assert (tmp_path / "runs" / more_id / "stages" / "teacher" / "round-2" / "final.pt").is_file()


def test_one_runs_stages_spread_over_both_devices_one_at_a_time(tmp_path):
    """The in-process scheduler (run.json's slot times, written by the stage task itself); the Prefect limit
    between processes is tested by test_a_device_slot_is_never_held_by_two_processes_at_once."""
    config = tiny_config(tmp_path, run={"devices": ["cpu", "cpu"], "max_tasks_per_device": 1},
                         teacher={"rounds": 1, "scoring": "oof", "folds": 2, "soft_label_models": "all_rounds"},
                         baselines=["ce", "ce_triplet"])
    run_id, _, run_json = run(config)
    # the soft labels came from the rounds' ensemble: one member per round, each the round's fold models
    soft = read_manifest_meta(tmp_path / "manifests" / run_id / "soft_labels.parquet")
    assert [[Path(c).parent.name for c in member] for member in soft.extra["ensemble"] or [soft.extra["checkpoints"]]
            ] == [["fold-0", "fold-1"]]
    intervals = defaultdict(list)
    for name, entry in run_json["stages"].items():
        if "slot_acquired" in entry:
            intervals[entry["device_index"]].append((entry["slot_acquired"], entry["slot_released"], name))
    assert set(intervals) == {0, 1}, "both virtual devices should have been used"
    for device, spans in intervals.items():
        spans.sort()
        for (start_a, end_a, a), (start_b, end_b, b) in zip(spans, spans[1:]):
            assert start_b >= end_a, f"device {device} ran {a} and {b} at the same time"
    folds = [n for n in run_json["stages"] if ".fold" in n]
    assert len(folds) == 2


def test_a_device_slot_is_never_held_by_two_processes_at_once(tmp_path):
    """Two OS processes on one Prefect home (two `fat-distill run` in one project) want the only slot of the same
    device. The second starts (``create_limits``, which frees slots of killed runs) while the first holds it; the
    first is then killed holding it, and the waiting second must free that dead slot and take it."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    import uuid
    from pathlib import Path

    prefix = f"test-processes-{uuid.uuid4().hex[:8]}"
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    first_out, second_out, second_ready = tmp_path / "first.json", tmp_path / "second.json", tmp_path / "second.ready"

    def holder(*args):
        return subprocess.Popen([sys.executable, "-m", "tests.device_slot_holder", prefix, *map(str, args)],
                                env=env, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # a process group: SIGKILL takes its embedded server too

    def wait_for(path, process):
        deadline = time.monotonic() + 240
        while not path.exists():
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, f"{path.name} never appeared"
            time.sleep(0.05)

    first = holder(first_out, "--hold-until", tmp_path / "never")
    processes = [first]
    try:
        wait_for(first_out.with_suffix(".holding"), first)
        held_from = time.time()
        second = holder(second_out, "--ready", second_ready)
        processes.append(second)
        wait_for(second_ready, second)  # the second process's flow start is done: it asks for the slot now
        time.sleep(3.0)
        assert not second_out.with_suffix(".holding").exists(), "both processes held the device at once"
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        killed_at = time.time()
        output = second.communicate(timeout=240)[0]
        assert second.returncode == 0, output
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    second_held = json.loads(second_out.read_text())
    # The device was the first process's from held_from until it died; the second got it only afterwards.
    assert held_from < killed_at <= second_held["got"] <= second_held["released"]


def test_metrics_and_stage_summary_are_artifacts_of_the_flow_run(prefect_run):
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    runs_root, run_id = prefect_run
    run_json = load_run_json(runs_root / run_id)
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run_json["flow_run_id"]])))
    by_key = defaultdict(list)
    for artifact in artifacts:
        by_key[artifact.key].append(artifact)

    (table,) = by_key["retrieval-metrics"]
    assert table.type == "table"
    rows = {row.pop("method"): row for row in json.loads(table.data)}
    retrieval = run_json["metrics"]["retrieval"]
    assert set(rows) == {"distilled", "ce"}
    for method, metrics in retrieval.items():
        assert rows[method] == {name: round(value, 4) for name, value in metrics.items()}

    (summary,) = by_key["run-summary"]
    assert summary.type == "markdown" and f"# fat-distill run `{run_id}`" in summary.data
    for name, entry in run_json["stages"].items():
        assert f"| {name} | {entry['state']} |" in summary.data
    auroc = run_json["metrics"]["noise_detection"]["all.auroc"]
    assert f"auroc {auroc:.3f}" in summary.data

    images = {artifact.data for artifact in artifacts if artifact.type == "image"}
    plots = [p for p in (runs_root / run_id / "plots").glob("*.png")
             if p.name.startswith(("cmc_", "confidence_", "noise_"))]  # the run's own, not later pictures
    assert {f"cmc_{m}.png" for m in ("distilled", "ce")} <= {p.name for p in plots}
    assert {p.resolve().as_uri() for p in plots} <= images


def test_why_a_stage_ran_names_the_changed_input_and_the_changed_library_code(prefect_run, tmp_path, monkeypatch):
    """Against the session's prefect_run (same runs root): the soft-label temperature changes, and so does the
    evaluation code. The stage keys hash the library's source files: they are read from an edited copy of the
    package here, the code that runs is unchanged."""
    import shutil

    from fat_distill.pipeline import keys
    from tests.pipeline_configs import own_data_config

    runs_root, _ = prefect_run
    edited = tmp_path / "fat_distill"
    shutil.copytree(keys.PACKAGE_ROOT, edited, ignore=shutil.ignore_patterns("__pycache__"))
    with open(edited / "evaluate" / "retrieval.py", "a") as source:
        source.write("\n# an edit of the evaluation code\n")
    monkeypatch.setattr(keys, "PACKAGE_ROOT", edited)
    keys.source_hash.cache_clear()
    config = own_data_config(runs_root.parent)
    config["teacher"]["temperature"] = 2.0
    try:
        run_id, _, run_json = run(config)
    finally:
        keys.source_hash.cache_clear()
    stages = run_json["stages"]
    assert {n for n, e in stages.items() if e["state"] == "ran"} == {
        "soft_labels", "student.distilled", "evaluate.distilled", "evaluate.ce", "noise_report", "label_audit"}
    assert stages["soft_labels"]["why"] == "its config section changed"
    assert stages["student.distilled"]["why"] == "input soft_labels changed"
    assert stages["evaluate.distilled"]["why"] == "input checkpoint changed, library code changed"
    assert stages["evaluate.ce"]["why"] == stages["noise_report"]["why"] == "library code changed"
    log = (runs_root / run_id / "run.log").read_text()
    assert "stage evaluate.ce: ran (library code changed)" in log


def test_unknown_config_key_is_named(tmp_path):
    from fat_distill.pipeline.overrides import ConfigError

    bad = tiny_config(tmp_path, teacher={"round": 3})
    with pytest.raises(ConfigError, match="teacher.round: unknown key"):
        validate_config(PipelineConfig, bad)


def test_device_limits_are_named_by_machine_and_device(monkeypatch):
    import socket

    from flows.devices import DevicePool, device_limit_names

    # Workers on two machines with the same run.devices get different limits; one machine's flow runs share them.
    assert device_limit_names(["cuda:0", "cuda:1"], "box-a") != device_limit_names(["cuda:0", "cuda:1"], "box-b")
    assert device_limit_names(["cuda:1", "cuda:0"], "box-a") == ["fat-distill-box-a-cuda-1", "fat-distill-box-a-cuda-0"]
    assert device_limit_names(["cpu", "cpu", "cuda:0", "cuda:0"], "h") == [
        "fat-distill-h-cpu-0", "fat-distill-h-cpu-1", "fat-distill-h-cuda-0", "fat-distill-h-cuda-0-v1"]
    monkeypatch.delenv("FAT_DISTILL_HOST", raising=False)
    assert DevicePool(["cpu"]).limit_name(0) == f"fat-distill-{socket.gethostname()}-cpu-0"
    monkeypatch.setenv("FAT_DISTILL_HOST", "gpu box/1")  # containers of one machine name it alike
    assert DevicePool(["cpu", "cpu"]).limit_name(1) == "fat-distill-gpu-box-1-cpu-1"


def test_data_parallel_stage_holds_all_its_devices_at_once():
    import threading
    import time
    import uuid

    from flows.devices import DevicePool

    pool = DevicePool(["cpu", "cpu"], 1, prefix=f"test-pool-{uuid.uuid4().hex[:8]}")
    pool.create_limits()
    events: dict[str, float] = {}
    started = threading.Event()

    def data_parallel():
        with pool.acquire_devices("student.distilled", ["cpu", "cpu"]) as (indices, names):
            assert indices == [0, 1] and names == ["cpu", "cpu"]
            events["ddp_start"] = time.time()
            started.set()
            time.sleep(1.0)
            events["ddp_end"] = time.time()

    def single():
        started.wait(timeout=60)
        with pool.acquire("evaluate.ce") as (index, _):
            events["single_start"] = time.time()

    threads = [threading.Thread(target=data_parallel), threading.Thread(target=single)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert events["single_start"] >= events["ddp_end"], "a stage ran on a device the data-parallel stage held"

    with pytest.raises(ValueError, match=r"train.devices \['cuda:0', 'cuda:1'\].*list every one of them"):
        pool.indices_for("student.distilled", ["cuda:0", "cuda:1"])
    with pytest.raises(ValueError, match="run.devices"):
        pool.indices_for("student.distilled", ["cpu", "cpu", "cpu"])


def test_a_data_parallel_student_outside_run_devices_fails_before_training(tmp_path):
    config = tiny_config(tmp_path, run={"devices": ["cpu"]},
                         student={"train": {**tiny_config(tmp_path)["student"]["train"], "devices": ["cpu", "cpu"]}})
    with pytest.raises(ValueError, match="student.distilled trains on train.devices"):
        run(config)
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir() and not p.is_symlink()]  # not runs/latest
    run_json = load_run_json(run_dir)
    assert run_json["status"] == "failed" and not any(e.get("state") == "ran" for e in run_json["stages"].values())


def test_data_parallel_students_hold_both_devices_in_a_real_flow(tmp_path):
    student_train = {**tiny_config(tmp_path)["student"]["train"], "devices": ["cpu", "cpu"]}
    config = tiny_config(tmp_path, run={"devices": ["cpu", "cpu"]}, teacher={"rounds": 1},
                         student={"train": student_train}, baselines=["ce"], data={"synth": {
                             **tiny_config(tmp_path)["data"]["synth"], "seed": 3}})  # not cached by other tests
    _, summary, run_json = run(config)
    assert set(summary["retrieval"]) == {"distilled", "ce"}
    stages = run_json["stages"]
    for name in ("student.distilled", "student.ce"):
        assert stages[name]["device_indices"] == [0, 1] and stages[name]["device"] == "cpu,cpu"
    spans = sorted((e["slot_acquired"], e["slot_released"], n, tuple(e["device_indices"]))
                   for n, e in stages.items() if "slot_acquired" in e)
    for i, (start_a, end_a, a, devices_a) in enumerate(spans):
        for start_b, end_b, b, devices_b in spans[i + 1:]:
            if set(devices_a) & set(devices_b):
                assert start_b >= end_a, f"{a} and {b} shared a device at the same time"


def test_a_released_device_slot_is_handed_to_the_next_stage_then_given_back(monkeypatch):
    """No wall-clock bounds: a loaded machine's embedded server answers in seconds. A handover is seen as one
    server take for a chain of stages; expiry is waited for with a generous deadline."""
    import time
    import uuid

    from prefect import flow, task
    from prefect.client.orchestration import get_client

    import flows.devices as devices
    from flows.devices import DevicePool

    takes = []
    real_concurrency = devices.concurrency

    class Counted:
        """Prefect's own context manager, counted when a slot is taken: a try that timed out on a slow server
        (the pool then tries again, see SLOW_SERVER_TAKE_SECONDS) took nothing."""

        def __init__(self, name, ctx):
            self.name, self.ctx = name, ctx

        def __enter__(self):
            entered = self.ctx.__enter__()
            takes.append(self.name)
            return entered

        def __exit__(self, *exc):
            return self.ctx.__exit__(*exc)

    def counted_concurrency(*args, **kwargs):
        return Counted(args[0], real_concurrency(*args, **kwargs))

    monkeypatch.setattr(devices, "concurrency", counted_concurrency)
    monkeypatch.setattr(devices, "HANDOVER_SECONDS", 600.0)  # nothing expires while the chain runs
    pool = DevicePool(["cpu"], 1, prefix=f"test-handover-{uuid.uuid4().hex[:8]}")
    name = pool.limit_name(0)

    def held() -> int:
        with get_client(sync_client=True) as client:
            return client.read_global_concurrency_limit_by_name(name).active_slots

    @task
    def stage(label: str) -> int:
        with pool.acquire(label):
            return held()

    @flow
    def chain() -> list[int]:
        pool.create_limits()
        return [stage(f"s{i}") for i in range(3)]

    assert chain() == [1, 1, 1]  # the device is busy on the server while a stage runs
    assert held() == 1, "the last stage's slot is parked, still held for other processes"
    assert len(takes) == 1, f"three stages in a row took {len(takes)} slots from the server, not one"
    pool.close()
    assert held() == 0, "close gives parked slots back"

    monkeypatch.setattr(devices, "HANDOVER_SECONDS", 0.5)
    assert chain() == [1, 1, 1]
    deadline = time.monotonic() + 60
    while held() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert held() == 0, "an unclaimed slot goes back to the server after HANDOVER_SECONDS"
    pool.close()


def test_a_slow_server_does_not_make_a_free_device_look_taken(monkeypatch):
    """A take that times out (here: at once) is retried when the limit has a free slot; a device another pool
    holds still times out, so the stage waits for it."""
    import uuid

    import pytest
    from prefect import flow

    import flows.devices as devices
    from flows.devices import DevicePool

    monkeypatch.setattr(devices, "TAKE_TIMEOUT_SECONDS", 1e-6)
    monkeypatch.setattr(devices, "SLOW_SERVER_TAKE_SECONDS", 60)
    prefix = f"test-slow-{uuid.uuid4().hex[:8]}"
    first, second = DevicePool(["cpu"], 1, prefix=prefix), DevicePool(["cpu"], 1, prefix=prefix)

    @flow
    def contend() -> str:
        first.create_limits(reset_stale=False)
        with first.acquire("holder") as (index, _):
            assert index == 0
            monkeypatch.setattr(devices, "SLOW_SERVER_TAKE_SECONDS", 1e-6)
            with pytest.raises(TimeoutError):
                second._take_slot(0)
        first.close()
        return "ok"

    assert contend() == "ok"


def test_stages_of_a_device_run_on_its_own_thread_with_the_callers_context():
    import contextvars
    import threading

    from flows.devices import DevicePool

    pool = DevicePool(["cpu", "cpu"], 1, prefix="test-threads")
    marker = contextvars.ContextVar("marker", default=None)
    marker.set("task-run-context")

    def where() -> tuple[str, str | None]:
        return threading.current_thread().name, marker.get()

    first, again, other = pool.run_on(0, where), pool.run_on(0, where), pool.run_on(1, where)
    assert first == again and first[0].startswith("fat-distill-device-0")  # one thread (one OpenMP team) per device
    assert other[0].startswith("fat-distill-device-1")
    assert first[1] == other[1] == "task-run-context"  # Prefect's run context (and its logging) comes along
    with pytest.raises(ZeroDivisionError):
        pool.run_on(0, lambda: 1 / 0)
