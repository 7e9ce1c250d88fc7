"""A run killed with SIGKILL in the middle of a teacher round, and again in the student stage, resumes
to the same manifests (content hashes) and metrics as an uninterrupted run with the same seed, and
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
    for run_dir in runs_root.glob("*/run.json"):
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


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    assert FAT_DISTILL, "fat-distill console script not installed"
    reference_root, killed_root = tmp_path / "ref", tmp_path / "killed"
    reference_root.mkdir()
    killed_root.mkdir()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}

    # Reference: the same config, uninterrupted, straight through the library (no Prefect, no cache).
    done = subprocess.run([FAT_DISTILL, "run", str(write_config(reference_root)), "--direct"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    ref_id, _ = run_json(reference_root / "runs")

    cmd = [FAT_DISTILL, "run", str(write_config(killed_root))]
    runs_root = killed_root / "runs"
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

    ref_manifests = reference_root / "manifests" / ref_id
    new_manifests = killed_root / "manifests" / run_id
    for name in ("dataset_noisy.parquet", "teacher_round_0.parquet", "soft_labels.parquet",
                 "metrics_distilled.parquet", "metrics_noise_detection.parquet"):
        assert (read_manifest_meta(new_manifests / name).content_hash
                == read_manifest_meta(ref_manifests / name).content_hash), name
    ref_metrics = read_manifest(ref_manifests / "metrics.parquet")
    new_metrics = read_manifest(new_manifests / "metrics.parquet")
    assert ref_metrics.equals(new_metrics)
