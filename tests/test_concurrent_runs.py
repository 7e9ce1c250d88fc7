"""Two runs in one folder share its devices: a live run's slot is never taken away, and a live run is not
resumed a second time.

Before, a second ``fat-distill run`` in the same folder freed the first run's device slot on start
("slots held by an earlier, killed run; freeing them"), and both then trained on one device despite
``max_tasks_per_device: 1``; ``resume`` of a run whose process was alive started a second copy.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.pipeline_configs import TRAIN, tiny_config

pytestmark = pytest.mark.slow

FAT_DISTILL = shutil.which("fat-distill", path=str(Path(sys.executable).parent))


def write_config(root: Path, name: str, teacher_epochs: int) -> Path:
    config = tiny_config(root, run={"name": name}, teacher={"rounds": 1, "train": {**TRAIN, "epochs": teacher_epochs}},
                         baselines=[])
    config["run"].update({"devices": ["cpu"], "max_tasks_per_device": 1, "torch_threads": 1})
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_of(root: Path, name: str) -> tuple[str | None, dict]:
    for path in (root / "runs").glob(f"{name}-*/run.json"):
        try:
            return path.parent.name, json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
    return None, {}


def wait_for(condition: Callable[[], bool], what: str, procs: list[subprocess.Popen], timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        for proc in procs:
            if proc.poll() is not None:
                pytest.fail(f"a run ended (rc {proc.returncode}) while waiting until {what}: {proc.stderr.read()}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting until {what}")


def device_intervals(data: dict) -> list[tuple[float, float]]:
    return [(e["slot_acquired"], e.get("slot_released", float("inf"))) for e in data["stages"].values()
            if "slot_acquired" in e]


def test_a_second_run_waits_for_the_device_of_a_live_run_and_a_live_run_is_not_resumed(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / ".prefect")}
    start = dict(cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                 start_new_session=True)
    first = subprocess.Popen([FAT_DISTILL, "run", str(write_config(tmp_path, "first", 2000))], **start)
    second = None
    try:
        wait_for(lambda: "slot_acquired" in run_of(tmp_path, "first")[1].get("stages", {}).get("teacher.round0", {}),
                 "the first run trains its teacher", [first])
        first_id, _ = run_of(tmp_path, "first")

        again = subprocess.run([FAT_DISTILL, "resume", first_id], cwd=tmp_path, env=env, capture_output=True,
                               text=True)
        assert again.returncode == 2 and "is still running" in again.stderr, again.stdout + again.stderr

        second = subprocess.Popen([FAT_DISTILL, "run", str(write_config(tmp_path, "second", 1))], **start)
        wait_for(lambda: run_of(tmp_path, "second")[1].get("stages", {}).get("teacher.round0", {}).get("state")
                 == "running", "the second run's teacher waits for a device", [first, second])
        time.sleep(5)  # time enough to take a freed slot: it must keep waiting while the first run trains
        assert "slot_acquired" not in run_of(tmp_path, "second")[1]["stages"]["teacher.round0"]
        assert run_of(tmp_path, "first")[1]["stages"]["teacher.round0"]["state"] == "running"

        os.killpg(first.pid, signal.SIGINT)  # the first run stops; its slot goes to the second
        _, err = first.communicate(timeout=60)
        assert first.returncode == 130, err
        _, err = second.communicate(timeout=300)
        assert second.returncode == 0, err
        assert "killed" not in err  # the second run freed no slot: none was held by a dead process
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    (_, a), (_, b) = run_of(tmp_path, "first"), run_of(tmp_path, "second")
    assert a["status"] == "cancelled" and b["status"] == "completed"
    for start_a, end_a in device_intervals(a):
        for start_b, end_b in device_intervals(b):
            assert end_a <= start_b or end_b <= start_a, "both runs held the one CPU slot at the same time"
