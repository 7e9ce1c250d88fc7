"""After a failure the CLI says what to do, and `resume --set` applies a change to the run.

Before, ``--set teacher.train.lr=1e6`` exited 0 with the teacher's loss at 8e12;
after a NaN the printed ``fat-distill resume RUN`` repeated the same config and
failed the same way, and editing the saved config then raised CheckpointError.
"""

from __future__ import annotations

import errno
import io
import json
import logging
from pathlib import Path

import yaml
from typer.testing import CliRunner

from fat_distill.cli import app
from fat_distill.data.image_dataset import ImageDecodeError
from fat_distill.disk import OutputError
from fat_distill.pipeline import PipelineConfig, load_config
from fat_distill.pipeline.advice import failure_advice
from fat_distill.train import NonFiniteLossError
from tests.pipeline_configs import TRAIN, tiny_config

runner = CliRunner()


def write_config(root: Path, **sections) -> Path:
    # Its own data: the session's Prefect cache must not hand these stages to other tests' tiny runs.
    config = tiny_config(root, teacher={"rounds": 1, "train": dict(TRAIN)}, baselines=[], **sections)
    config["data"]["synth"] = {**config["data"]["synth"], "seed": 4242}  # test_pictures uses 11
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def only_run(root: Path) -> tuple[str, dict]:
    (path,) = (p for p in (root / "runs").glob("*/run.json") if not p.parent.is_symlink())
    return path.parent.name, json.loads(path.read_text())


def test_diverging_student_names_the_setting_and_resume_with_a_change_reruns_it(tmp_path):
    config = write_config(tmp_path)
    result = runner.invoke(app, ["run", str(config), "--direct", "--set", "student.train.lr=1e6",
                                 "--set", "student.train.epochs=2"])
    assert result.exit_code == 2, result.output
    run_id, data = only_run(tmp_path)
    assert data["status"] == "failed" and data["stages"]["student.distilled"]["state"] == "failed"
    assert "diverging loss" in result.output and "student.train.lr is 1e+06" in result.output
    assert f"fat-distill resume {run_id} --set student.train.lr=100000" in result.output
    assert f"continue with: fat-distill resume {run_id}\n" not in result.output  # the same config fails again
    teacher = tmp_path / "runs" / run_id / "stages" / "teacher"
    assert list(teacher.rglob("final.pt"))
    assert "Traceback" not in result.output and "Traceback" in (tmp_path / "runs" / run_id / "run.log").read_text()

    # The same config fails the same way (as the hint said); the console gets one message per failure, the
    # traceback goes to run.log, and no stage is left "running" in run.json.
    result = runner.invoke(app, ["resume", run_id, "--runs-root", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "diverging loss" in result.output, result.output
    assert "Traceback" not in result.output
    assert "Traceback" in (tmp_path / "runs" / run_id / "run.log").read_text()
    _, data = only_run(tmp_path)
    assert data["status"] == "failed"
    assert not [name for name, e in data["stages"].items() if e.get("state") in ("running", "submitted")]

    # A changed teacher: its finished checkpoints belong to the old settings and are discarded (they used to
    # raise CheckpointError), and the student after it trains again.
    result = runner.invoke(app, ["resume", run_id, "--runs-root", str(tmp_path / "runs"),
                                 "--set", "student.train.lr=0.003", "--set", "teacher.train.lr=0.002"])
    assert result.exit_code == 0, result.output
    assert "changed: teacher, student" in result.output
    _, data = only_run(tmp_path)
    assert data["status"] == "completed" and data["attempts"] == 3
    assert data["stages"]["teacher.round0"]["state"] == "ran" and data["stages"]["student.distilled"]["state"] == "ran"
    saved = yaml.safe_load((tmp_path / "runs" / run_id / "config.yaml").read_text())
    assert saved["teacher"]["train"]["lr"] == 0.002 and saved["student"]["train"]["lr"] == 0.003


def test_resume_refuses_to_move_a_run(tmp_path):
    config = write_config(tmp_path)
    (tmp_path / "runs" / "r1").mkdir(parents=True)
    (tmp_path / "runs" / "r1" / "config.yaml").write_text(config.read_text())
    (tmp_path / "runs" / "r1" / "run.json").write_text(json.dumps({"run_id": "r1", "status": "failed", "stages": {}}))
    result = runner.invoke(app, ["resume", "r1", "--runs-root", str(tmp_path / "runs"),
                                 "--set", f"run.runs_root={tmp_path / 'elsewhere'}"])
    assert result.exit_code == 2 and "run.runs_root cannot change" in result.output


def test_the_resume_hint_appears_only_where_resuming_can_help(tmp_path):
    config = load_config(PipelineConfig, None, [])
    plain = "continue with: fat-distill resume R"
    full_disk = OutputError("no space left on device: could not write x", tmp_path, errno.ENOSPC)
    assert plain in failure_advice(full_disk, "R", config)
    assert plain in failure_advice(ImageDecodeError("image x could not be decoded"), "R", config)
    too_high = failure_advice(ValueError("noise rate 0.9 leaves no clean sample"), "R", config)
    assert plain not in too_high and "fat-distill resume R --set" in too_high
    nan = NonFiniteLossError("student.distilled", 0, 3, {"ce": float("nan")}, None)
    advice = failure_advice(nan, "R", config)
    assert f"student.train.lr is {config.student.train.resolved().lr:g}" in advice and "--set student.train.lr=" in advice


def test_prefect_console_shows_failures_without_tracebacks_other_handlers_keep_them(monkeypatch):
    from prefect.logging.handlers import PrefectConsoleHandler

    from flows.environment import brief_console_logging

    monkeypatch.delenv("FAT_DISTILL_DEBUG", raising=False)
    console, kept = io.StringIO(), []
    logger = logging.getLogger("prefect.task_runs.test_console")
    keeper = logging.Handler()
    keeper.emit = kept.append
    logger.addHandler(PrefectConsoleHandler(stream=console))
    logger.addHandler(keeper)
    try:
        assert brief_console_logging() >= 1
        try:
            raise RuntimeError("stage x failed")
        except RuntimeError:
            logger.error("Task run failed with exception: RuntimeError('stage x failed')", exc_info=True)
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
    assert "Task run failed" in console.getvalue() and "Traceback" not in console.getvalue()
    assert kept[0].exc_info is not None  # the API (Prefect UI) and run.log still get the traceback
