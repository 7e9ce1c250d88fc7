"""The pipeline commands as a user meets them: `config show`, `--set`, `demo`, `run` and `resume` on bad
input (exit 2 and what to do), `--deployment` without a server, FAT_DISTILL_DEBUG, Ctrl-C, resuming a
failed run and an interrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fat_distill.cli import app
from fat_distill.pipeline import load_run_json
from tests.helpers import REPO
from tests.pipeline_configs import TRAIN, own_data_config, tiny_config

runner = CliRunner()


def invoke(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def one_line(text: str) -> str:
    """Rich wraps long messages: compare them as one line."""
    return " ".join(text.split())


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def cli_env() -> dict[str, str]:
    """This session's environment (its Prefect home) for a `fat-distill` child process running this checkout."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


# --- config show, --set ----------------------------------------------------------------------------------------

def test_config_show_applies_set_to_the_demo_and_to_a_file(tmp_path):
    shown = invoke("config", "show", "--demo", "--set", "teacher.rounds=1", "--set", "data.synth.size=[32,16]",
                   "-s", "baselines=[ce]")
    assert shown.exit_code == 0, shown.output
    demo = yaml.safe_load(shown.stdout)
    assert demo["teacher"]["rounds"] == 1 and demo["data"]["synth"]["size"] == [32, 16]
    assert demo["baselines"] == ["ce"]
    # everything not set is the demo's, not the class defaults
    assert demo["run"]["name"] == "demo" and demo["noise"]["rate"] == 0.4 and demo["noise"]["kind"] == "mix"
    # the demo leaves the budget to the scratch regime; config show names the value used
    assert demo["student"]["train"]["epochs"] is None
    assert "epochs: null  # 35: scratch regime (weights: null) default" in shown.stdout

    path = write_config(tmp_path / "c.yaml", {"run": {"name": "mine"}, "noise": {"rate": 0.1}})
    shown = invoke("config", "show", path, "--set", "noise.kind=pair")
    assert shown.exit_code == 0, shown.output
    mine = yaml.safe_load(shown.stdout)
    assert mine["run"]["name"] == "mine" and mine["noise"]["rate"] == 0.1 and mine["noise"]["kind"] == "pair"


@pytest.mark.parametrize("args, message", [
    (["--set", "teacher.round=3"], "teacher.round: unknown key"),
    (["--set", "noise.rate=1.5"], "noise.rate"),
    (["--set", "noise.rate"], "noise.rate"),
])
def test_config_show_names_a_bad_set_and_exits_2(args, message):
    shown = invoke("config", "show", *args)
    assert shown.exit_code == 2
    assert message in one_line(shown.output) and "Traceback" not in shown.output


# --- run / resume on bad input -----------------------------------------------------------------------------------

def test_run_and_resume_refuse_bad_input_with_exit_2(tmp_path):
    missing = invoke("run", tmp_path / "nope.yaml")
    assert missing.exit_code == 2 and "nope.yaml" in one_line(missing.output)

    unknown = write_config(tmp_path / "unknown.yaml", {"teacher": {"rounds": 1, "tolerence": 0.1}})
    refused = invoke("run", unknown, "--direct")
    assert refused.exit_code == 2 and "teacher.tolerence: unknown key" in one_line(refused.output)
    assert not (tmp_path / "runs").exists()  # refused before a run folder was made

    runs = tmp_path / "runs"
    gone = invoke("resume", "no-such-run", "--runs-root", runs)
    assert gone.exit_code == 2 and "no run 'no-such-run'" in one_line(gone.output)

    # a run folder whose saved config was edited into an invalid one
    broken = runs / "t-20250101-000000-abcd"
    broken.mkdir(parents=True)
    (broken / "run.json").write_text(json.dumps({"run_id": broken.name, "status": "failed", "stages": {}}))
    write_config(broken / "config.yaml", {"noise": {"rate": 2}})
    bad = invoke("resume", "t-2025", "--runs-root", runs)  # a unique prefix is enough
    assert bad.exit_code == 2 and "noise.rate" in one_line(bad.output) and "config.yaml" in one_line(bad.output)


def test_deployment_without_a_prefect_server_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    result = invoke("run", write_config(tmp_path / "c.yaml", tiny_config(tmp_path)), "--deployment", "pipeline")
    assert result.exit_code == 2
    assert "--deployment needs a Prefect server: set PREFECT_API_URL" in one_line(result.output)
    assert not (tmp_path / "runs").exists()  # nothing ran here instead


def test_fat_distill_debug_shows_the_traceback(tmp_path):
    config = write_config(tmp_path / "c.yaml", {"teacher": {"round": 3}})
    plain = invoke("run", config)
    assert plain.exit_code == 2 and "teacher.round: unknown key" in one_line(plain.output)
    assert "Traceback" not in plain.output
    # A real process, so the traceback is the interpreter's own, printed where a user sees it.
    debug = subprocess.run([sys.executable, "-m", "fat_distill.cli", "run", str(config)],
                           env={**cli_env(), "FAT_DISTILL_DEBUG": "1"}, capture_output=True, text=True, timeout=300,
                           cwd=tmp_path)
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr and "ConfigError" in debug.stderr
    assert "teacher.round: unknown key" in debug.stderr


# --- a failed run, fixed and resumed ------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_missing_dataset_is_refused_before_any_run_starts_then_runs_once_there(tmp_path, prefect_run):
    """The dataset folder is missing: the check before the first stage refuses it with exit 2, naming the folder,
    and starts no run (a resume could not help). Then the folder appears and the same command finishes."""
    from fat_distill.data import generate_synthetic_reid

    root = tmp_path / "market"
    synth = own_data_config(tmp_path)["data"]["synth"]
    config = write_config(tmp_path / "c.yaml",
                          tiny_config(tmp_path, data={"source": "folder", "root": str(root), "layout": "market1501"}))
    failed = invoke("run", config)
    assert failed.exit_code == 2
    output = one_line(failed.output)
    assert str(root) in output and "resume" not in output
    assert not [p for p in (tmp_path / "runs").glob("*") if p.is_dir()] if (tmp_path / "runs").exists() else True

    generate_synthetic_reid(root, identities=synth["identities"], cameras=synth["cameras"],
                            images_per_identity=synth["images_per_identity"], size=tuple(synth["size"]),
                            seed=synth["seed"], distractors=synth["distractors"], junk=synth["junk"])
    done = invoke("run", config)
    assert done.exit_code == 0, done.output
    run_dir = tmp_path / "runs" / os.readlink(tmp_path / "runs" / "latest")
    data = load_run_json(run_dir)
    assert data["status"] == "completed" and data["error"] is None
    assert data["stages"]["data"]["state"] == "ran"
    assert (tmp_path / "manifests" / run_dir.name / "metrics.parquet").is_file()


# --- demo -------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_demo_runs_with_overrides(tmp_path):
    train = [f"{section}.train.{key}={json.dumps(value)}" for section in ("teacher", "student")
             for key, value in {**TRAIN, "epochs": 1}.items()]
    overrides = [f"run.runs_root={tmp_path / 'runs'}", f"run.manifests_root={tmp_path / 'manifests'}",
                 "run.progress=false", "data.synth.identities=12", "data.synth.images_per_identity=4",
                 "data.synth.size=[32,16]", "data.synth.distractors=2", "data.synth.junk=1", "data.synth.seed=5",
                 "teacher.rounds=1", "baselines=[]", *train]
    result = invoke("demo", *[arg for override in overrides for arg in ("--set", override)])
    assert result.exit_code == 0, result.output
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if not p.is_symlink() and not p.name.startswith(".")]
    assert run_dir.name.startswith("demo-") and "done in" in result.output and run_dir.name in result.output
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["synth"]["identities"] == 12 and saved["teacher"]["train"]["epochs"] == 1
    assert saved["noise"]["kind"] == "mix" and saved["student"]["train"]["model"] == "tiny_cnn"  # the demo's
    data = load_run_json(run_dir)
    assert data["status"] == "completed" and set(data["metrics"]["retrieval"]) == {"distilled"}
    assert data["stages"]["noise"]["state"] == "ran" and data["flow_run_id"]  # through Prefect
    assert "retrieval (query vs gallery)" in result.output


# --- Ctrl-C -------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("target", ["run_process", "process_group"])
def test_ctrl_c_stops_a_run_with_130_and_the_resume_command_then_resume_continues_it(tmp_path, target):
    train = {**TRAIN, "epochs": 20}
    config = own_data_config(tmp_path, seed=12)
    config = write_config(tmp_path / "c.yaml", {**config, "teacher": {**config["teacher"], "rounds": 1,
                                                                       "train": train},
                                                "student": {"train": train}, "baselines": []})
    runs = tmp_path / "runs"
    process = subprocess.Popen([sys.executable, "-m", "fat_distill.cli", "run", str(config)], env=cli_env(),
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # its own process group, as a terminal gives a command
    run_id = None
    try:
        deadline = time.monotonic() + 300
        while run_id is None:
            assert process.poll() is None, f"the run ended (rc {process.returncode}) before it could be interrupted"
            assert time.monotonic() < deadline, "teacher.round0 never wrote an epoch checkpoint"
            for run_json in (p for p in runs.glob("*/run.json") if not p.parent.is_symlink()):
                try:
                    stage = json.loads(run_json.read_text())["stages"].get("teacher.round0", {})
                except (json.JSONDecodeError, KeyError):
                    continue
                folder = run_json.parent / "stages" / "teacher" / "round-0"
                if stage.get("state") == "running" and list(folder.glob("epoch-*.pt")):
                    run_id = run_json.parent.name
            time.sleep(0.05)
        if target == "process_group":  # Ctrl-C in a terminal
            os.killpg(process.pid, signal.SIGINT)
        else:  # kill -INT PID
            os.kill(process.pid, signal.SIGINT)
        try:
            stdout, stderr = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            pytest.fail("the run did not stop within 300 s of SIGINT")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 130, stdout + stderr
    assert f"Continue with: fat-distill resume {run_id}" in one_line(stderr)
    assert "Traceback" not in stderr
    assert load_run_json(runs / run_id)["status"] == "cancelled"

    resumed = invoke("resume", run_id, "--runs-root", runs)
    assert resumed.exit_code == 0, resumed.output
    data = load_run_json(runs / run_id)
    assert data["status"] == "completed" and data["attempts"] == 2
    assert data["stages"]["soft_labels"]["state"] == "ran" and data["stages"]["evaluate.distilled"]["state"] == "ran"
    # The interrupted teacher round is not trained from scratch again: the stage thread finished it after the
    # signal (its result is then cached), or resume continued it from its last epoch checkpoint.
    teacher = data["stages"]["teacher.round0"]
    assert teacher["state"] == "cached" or teacher["resumed_from_epoch"] >= 1, teacher
