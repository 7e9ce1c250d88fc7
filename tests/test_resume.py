"""A run stopped in the middle of a teacher round, and again in the student stage, resumes to the same
manifests (content hashes) and metrics as an uninterrupted run with the same seed: killed with SIGKILL,
or cancelled with SIGINT (Ctrl-C, to the process group) or SIGTERM (to the CLI's PID); and
each interrupted stage continued from its last epoch checkpoint (run.json and run.log say from which)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fat_distill.manifests import read_manifest, read_manifest_meta
from tests.pipeline_configs import TRAIN, tiny_config

pytestmark = pytest.mark.slow

FAT_DISTILL = shutil.which("fat-distill", path=str(Path(sys.executable).parent))


EPOCHS = 4


def write_config(root: Path) -> Path:
    train = {**TRAIN, "image_size": [64, 32], "epochs": EPOCHS}
    config = tiny_config(root, data={"synth": {"identities": 24, "cameras": 3, "images_per_identity": 8,
                                                "size": [64, 32], "distractors": 2, "junk": 1, "seed": 0}},
                         teacher={"rounds": 1, "train": train}, student={"train": train}, baselines=[])
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_json(runs_root: Path) -> tuple[str, dict] | tuple[None, None]:
    for run_dir in (p for p in runs_root.glob("*/run.json") if not p.parent.is_symlink()):
        try:
            return run_dir.parent.name, json.loads(run_dir.read_text())
        except json.JSONDecodeError:
            continue
    return None, None


def kill_during(cmd: list[str], env: dict, runs_root: Path, stage: str, checkpoint_dir: str,
                timeout: float = 240) -> str:
    """Start ``cmd``; SIGKILL it once ``stage`` is running and has written an epoch checkpoint."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            run_id, data = run_json(runs_root)
            if data and data["stages"].get(stage, {}).get("state") == "running":
                folder = runs_root / run_id / "stages" / checkpoint_dir
                if list(folder.glob("epoch-*.pt")) and not (folder / "final.pt").exists():
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return run_id
            if proc.poll() is not None:
                pytest.fail(f"the run ended (rc {proc.returncode}) before {stage} could be interrupted")
            time.sleep(0.02)
        pytest.fail(f"{stage} never started")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The manifests of an uninterrupted run of the same config, straight through the library (no Prefect)."""
    root = tmp_path_factory.mktemp("reference")
    done = subprocess.run([FAT_DISTILL, "run", str(write_config(root)), "--direct"], capture_output=True, text=True,
                          env={**os.environ, "PREFECT_HOME": str(root / "prefect-home")})
    assert done.returncode == 0, done.stdout + done.stderr
    ref_id, _ = run_json(root / "runs")
    return root / "manifests" / ref_id


def assert_same_manifests(reference: Path, manifests: Path) -> None:
    for name in ("dataset_noisy.parquet", "teacher_round_0.parquet", "soft_labels.parquet",
                 "metrics_distilled.parquet", "metrics_noise_detection.parquet"):
        assert (read_manifest_meta(manifests / name).content_hash
                == read_manifest_meta(reference / name).content_hash), name
    assert read_manifest(reference / "metrics.parquet").equals(read_manifest(manifests / "metrics.parquet"))


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, reference):
    assert FAT_DISTILL, "fat-distill console script not installed"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    cmd = [FAT_DISTILL, "run", str(write_config(tmp_path))]
    runs_root = tmp_path / "runs"
    run_id = kill_during(cmd, env, runs_root, "teacher.round0", "teacher/round-0")
    status = subprocess.run([FAT_DISTILL, "runs", "--runs-root", str(runs_root), "--json"], env=env,
                            capture_output=True, text=True, check=True)
    assert json.loads(status.stdout)[0]["status"] == "interrupted"

    resume = [FAT_DISTILL, "resume", run_id, "--runs-root", str(runs_root)]
    assert kill_during(resume, env, runs_root, "student.distilled", "student/distilled") == run_id
    # The same seed would give the same hashes if the teacher had started over: the run says where it continued.
    _, data = run_json(runs_root)
    teacher = data["stages"]["teacher.round0"]
    assert teacher["state"] == "ran"
    assert 1 <= teacher["resumed_from_epoch"] < EPOCHS
    assert teacher["ran_epochs"] == EPOCHS - teacher["resumed_from_epoch"]  # fewer than a fresh start
    done = subprocess.run(resume, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    _, data = run_json(runs_root)
    assert data["status"] == "completed" and data["attempts"] == 3
    assert data["stages"]["data"]["state"] == "cached"
    student = data["stages"]["student.distilled"]
    assert student["state"] == "ran"
    assert 1 <= student["resumed_from_epoch"] < EPOCHS
    assert student["ran_epochs"] == EPOCHS - student["resumed_from_epoch"]
    # taken from cache this time: the second attempt's resume is not reported as this attempt's
    assert data["stages"]["teacher.round0"]["state"] == "cached"
    assert data["stages"]["teacher.round0"].get("resumed_from_epoch") is None
    log = (runs_root / run_id / "run.log").read_text()
    assert f"stage teacher.round0 resumed from epoch {teacher['resumed_from_epoch']}" in log
    assert f"stage student.distilled resumed from epoch {student['resumed_from_epoch']}" in log
    assert_same_manifests(reference, tmp_path / "manifests" / run_id)
    assert_no_server_left(tmp_path / "prefect-home")


def embedded_servers(prefect_home: Path) -> list[int]:
    """PIDs of the embedded Prefect servers recorded under ``prefect_home`` (flows/server.py)."""
    return [json.loads(p.read_text())["server"]["pid"] for p in (prefect_home / "fat-distill-servers").glob("*.json")]


def assert_no_server_left(prefect_home: Path, seen: list[int] = ()) -> None:
    from fat_distill.processes import is_alive

    assert embedded_servers(prefect_home) == []
    deadline = time.time() + 10  # a SIGKILLed CLI's server gets SIGTERM from the kernel and shuts down
    while any(is_alive(pid) for pid in seen) and time.time() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in seen if is_alive(pid)], "an embedded Prefect server outlived its run"


def signal_during(cmd: list[str], env: dict, runs_root: Path, stage: str, checkpoint_dir: str, signum: int,
                  prefect_home: Path, timeout: float = 240) -> tuple[str, int, str, list[int]]:
    """Start ``cmd`` in its own session; once ``stage`` has written an epoch checkpoint, send ``signum`` the
    way a user does: SIGINT to the process group (a terminal's Ctrl-C), SIGTERM to the CLI's PID (``kill``).

    Returns (run id, exit status, stderr, PIDs of the embedded servers seen while it ran).
    """
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + timeout
    servers: set[int] = set()
    try:
        while time.time() < deadline:
            servers.update(embedded_servers(prefect_home))
            run_id, data = run_json(runs_root)
            if data and data["stages"].get(stage, {}).get("state") == "running":
                folder = runs_root / run_id / "stages" / checkpoint_dir
                if list(folder.glob("epoch-*.pt")) and not (folder / "final.pt").exists():
                    if signum == signal.SIGINT:
                        os.killpg(proc.pid, signum)
                    else:
                        os.kill(proc.pid, signum)
                    # Stopping at the next batch takes well under a second; 60 s only guards the test.
                    _, err = proc.communicate(timeout=60)
                    return run_id, proc.returncode, err, sorted(servers)
            if proc.poll() is not None:
                pytest.fail(f"the run ended (rc {proc.returncode}) before {stage} could be interrupted: "
                            f"{proc.stderr.read()}")
            time.sleep(0.02)
        pytest.fail(f"{stage} never started")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("at_teacher,at_student", [(signal.SIGINT, signal.SIGTERM), (signal.SIGTERM, signal.SIGINT)],
                         ids=["sigint-then-sigterm", "sigterm-then-sigint"])
def test_signal_cancels_then_resume_matches_uninterrupted_run(tmp_path, reference, at_teacher, at_student):
    """SIGINT / SIGTERM stop the running stage at a batch boundary, start nothing new, stop the embedded
    server, record the run as cancelled and exit 130 / 143 with the resume hint; resuming then ends with
    the manifests of an uninterrupted run."""
    home = tmp_path / "prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home)}
    runs_root = tmp_path / "runs"
    cmd = [FAT_DISTILL, "run", str(write_config(tmp_path))]
    run_id, rc, err, servers = signal_during(cmd, env, runs_root, "teacher.round0", "teacher/round-0", at_teacher,
                                             home)
    assert rc == 128 + at_teacher, err
    assert f"fat-distill resume {run_id}" in err and "Traceback" not in err, err
    _, data = run_json(runs_root)
    assert data["status"] == "cancelled"
    assert data["stages"]["teacher.round0"]["state"] == "cancelled"
    assert not any(name.startswith(("soft_labels", "student")) for name in data["stages"])  # nothing new started
    assert not (runs_root / run_id / "stages" / "teacher" / "round-0" / "final.pt").exists()
    assert servers, "no embedded server was recorded"
    assert_no_server_left(home, servers)

    resume = [FAT_DISTILL, "resume", run_id, "--runs-root", str(runs_root)]
    _, rc, err, servers = signal_during(resume, env, runs_root, "student.distilled", "student/distilled", at_student,
                                        home)
    assert rc == 128 + at_student, err
    _, data = run_json(runs_root)
    assert data["status"] == "cancelled" and data["stages"]["student.distilled"]["state"] == "cancelled"
    assert data["stages"]["teacher.round0"]["state"] == "ran"  # continued from its epoch checkpoint
    assert_no_server_left(home, servers)

    done = subprocess.run(resume, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    _, data = run_json(runs_root)
    assert data["status"] == "completed" and data["attempts"] == 3
    assert data["stages"]["student.distilled"]["state"] == "ran"
    assert_same_manifests(reference, tmp_path / "manifests" / run_id)
    assert_no_server_left(home)


def test_second_ctrl_c_exits_at_once(tmp_path):
    """A second Ctrl-C does not wait for the next batch: the process exits at once with 130 (resumable as
    after a kill). The first one lands while the data stage synthesises images (no batch boundary there; 4,000
    identities outlast the two signals on a loaded machine)."""
    runs_root = tmp_path / "runs"
    cmd = [FAT_DISTILL, "run", str(write_config(tmp_path)), "--direct", "--set", "data.synth.identities=4000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "PREFECT_HOME": str(tmp_path / "home")})
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            _, data = run_json(runs_root)
            if data and data["stages"].get("data", {}).get("state") == "running":
                break
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.3)  # two signals sent at once would merge into one
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert "exiting now" in err, err
    _, data = run_json(runs_root)
    assert data["stages"]["data"]["state"] == "running"  # it never got to finish the stage


def test_a_killed_runs_embedded_server_is_reaped_at_the_next_start(tmp_path, monkeypatch):
    """A server whose CLI is gone is stopped by the next start; one whose CLI lives (another run) is not."""
    from fat_distill.processes import is_alive, process_identity
    from flows.server import reap_orphaned_servers, records_dir

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    owner = subprocess.Popen([sys.executable, "-c", "pass"])
    gone = process_identity(owner.pid)
    owner.wait()
    orphan = subprocess.Popen(["sleep", "600"], start_new_session=True)
    sibling = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        records_dir().mkdir(parents=True)
        for server, owned_by in ((orphan, gone), (sibling, process_identity())):
            (records_dir() / f"{server.pid}.json").write_text(json.dumps(
                {"server": process_identity(server.pid).as_dict(), "owner": owned_by.as_dict()}))
        assert reap_orphaned_servers() == [orphan.pid]
        assert orphan.wait(timeout=10) == -signal.SIGTERM
        assert is_alive(sibling.pid) and [p.name for p in records_dir().iterdir()] == [f"{sibling.pid}.json"]
    finally:
        for proc in (orphan, sibling):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
