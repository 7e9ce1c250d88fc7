"""A full disk or a read-only folder is named with its path and cause, and the run resumes once it is fixed.

Before: ``error:  . unexpected pos 608512 vs 608408`` (torch's text, no path) for a full disk, a raw
``OSError: [Errno 30]`` traceback for a read-only folder, and in ``data index`` the cleanup's own error
masked the first. The disks here are small tmpfs mounts (skipped where mounting is not permitted).
"""

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
import torch
import yaml
from typer.testing import CliRunner

from fat_distill.atomic import atomic_write_text
from fat_distill.cli import app
from fat_distill.data import generate_synthetic_reid
from fat_distill.disk import OutputError
from fat_distill.pipeline import PipelineConfig, load_config
from fat_distill.pipeline.preflight import PreflightError, preflight
from fat_distill.train import save_checkpoint
from tests.pipeline_configs import TRAIN, tiny_config

runner = CliRunner()
FAT_DISTILL = shutil.which("fat-distill", path=str(Path(sys.executable).parent))


def mount_tmpfs(folder: Path, size: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a small tmpfs is not permitted here ({done.stderr.strip()})")


@pytest.fixture
def disk(tmp_path):
    """A folder on its own 8 MB file system."""
    folder = tmp_path / "disk"
    mount_tmpfs(folder, "8m")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def read_only(folder: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)


def test_full_disk_names_the_checkpoint_and_leaves_nothing_behind(disk):
    target = disk / "ckpt" / "epoch-0000.pt"
    with pytest.raises(OutputError) as err:
        save_checkpoint(target, {"weights": torch.zeros(4 * 1024 * 1024)})  # 16 MB on an 8 MB disk
    message = str(err.value)
    assert message.startswith("no space left on device") and str(target) in message and "MB free" in message
    assert list((disk / "ckpt").iterdir()) == []  # neither the checkpoint nor its temporary file


def test_read_only_folder_is_named_and_not_masked_by_the_cleanup(disk, tmp_path):
    read_only(disk)
    with pytest.raises(OutputError, match="folder is read-only"):
        atomic_write_text(disk / "run.json", "{}")
    images = tmp_path / "ds"
    generate_synthetic_reid(images, identities=4, cameras=2, images_per_identity=2, size=(32, 16), seed=0,
                            distractors=0, junk=0)
    result = runner.invoke(app, ["data", "index", str(images), "--layout", "market1501",
                                 "--out", str(disk / "dataset.parquet")])
    assert result.exit_code == 2, result.output
    assert "folder is read-only" in result.output and str(disk / "dataset.parquet") in result.output
    config = load_config(PipelineConfig, None, [f"run.runs_root={disk / 'runs'}",
                                                f"run.manifests_root={tmp_path / 'manifests'}"])
    with pytest.raises(PreflightError, match="folder is read-only"):
        preflight(config, check_images=False)


def test_preflight_says_how_much_space_the_run_needs(disk, tmp_path):
    config = load_config(PipelineConfig, None, [f"run.runs_root={disk / 'runs'}", "teacher.train.model=resnet18",
                                                f"run.manifests_root={tmp_path / 'manifests'}"])
    with pytest.raises(PreflightError) as err:
        preflight(config, check_images=False)
    assert "no space left for the run's checkpoints" in str(err.value) and "the run needs about" in str(err.value)


def fill(folder: Path) -> Path:
    """Write a file until the disk is full; returns it."""
    filler = folder / "filler"
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * (1 << 20))
                handle.flush()
        except OSError:
            pass
    return filler


@pytest.mark.slow
def test_run_stopped_by_a_full_disk_resumes_once_space_is_freed(tmp_path):
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "192m")
    try:
        train = {**TRAIN, "epochs": 60}
        config = tiny_config(disk, teacher={"rounds": 1, "train": train}, baselines=[])
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
        proc = subprocess.Popen([FAT_DISTILL, "run", str(path), "--direct"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            deadline = time.time() + 240
            while time.time() < deadline and not list((disk / "runs").glob("*/stages/teacher/round-0/epoch-*.pt")):
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.02)
            filler = fill(disk)
            output, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        assert proc.returncode == 2, output
        flat = " ".join(output.split())  # the console wraps long lines
        assert "no space left on device" in flat and "MB free" in flat and "Traceback" not in output
        (run_dir,) = [p for p in (disk / "runs").iterdir() if not p.is_symlink()]
        assert f"continue with: fat-distill resume {run_dir.name}" in flat
        assert not list(disk.rglob(".*.tmp-*"))  # nothing half-written

        filler.unlink()
        done = subprocess.run([FAT_DISTILL, "resume", run_dir.name, "--runs-root", str(disk / "runs")], env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
