"""Sweeps say what they ran: every model labelled by its method, each point's run records its grid point,
and ``runs/<sweep_id>/sweep.parquet`` compares the points; ``latest`` names the newest run."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from fat_distill.cli import app
from fat_distill.manifests import read_manifest
from fat_distill.pipeline import PipelineConfig, RunPaths, RunState, find_run, load_run_json, validate_config
from fat_distill.pipeline.sweeps import find_sweep, grid_points, point_label, point_overrides, sweep_table
from tests.pipeline_configs import tiny_config

runner = CliRunner()


def test_the_student_is_named_by_its_method_and_a_baseline_of_that_method_is_not_trained_twice(tmp_path):
    config = validate_config(PipelineConfig, tiny_config(tmp_path, student={"method": "ce_triplet"},
                                                         baselines=["ce_triplet", "ce"]))
    models = config.student_configs()
    assert list(models) == ["ce_triplet", "ce"]
    assert models["ce_triplet"] is config.student
    assert models["ce"].method == "ce" and models["ce"].train == config.student.train
    distilled = validate_config(PipelineConfig, tiny_config(tmp_path))
    assert list(distilled.student_configs()) == ["distilled", "ce"]


def test_grid_points_keep_their_values_and_labels():
    points = grid_points({"noise.rate": [0.2, 0.4], "student.method": ["distilled", "ce_triplet"]})
    assert [point_label(p) for p in points] == [
        "noise.rate=0.2,student.method=distilled", "noise.rate=0.2,student.method=ce_triplet",
        "noise.rate=0.4,student.method=distilled", "noise.rate=0.4,student.method=ce_triplet"]
    assert point_overrides({"run.devices": ["cpu", "cpu"], "x.flag": True}) == ["run.devices=[cpu, cpu]",
                                                                               "x.flag=true"]
    with pytest.raises(ValueError, match="have no values"):
        grid_points({"noise.rate": []})


def _new_run(root: Path, name: str) -> str:
    config = validate_config(PipelineConfig, tiny_config(root, run={"name": name}))
    run_id = f"{name}-{time.time_ns()}"
    RunState.create(RunPaths.for_run(config, run_id), config)
    return run_id


def test_latest_is_the_newest_run_by_creation_time_not_by_folder_time(tmp_path):
    runs = tmp_path / "runs"
    with pytest.raises(FileNotFoundError, match="no runs"):
        find_run(runs, "latest")
    first = _new_run(tmp_path, "a")
    second = _new_run(tmp_path, "b")  # created within the same second as the first: the exact time decides
    assert os.readlink(runs / "latest") == second
    assert find_run(runs, "latest") == runs / second
    # Resuming the older run touches its folder, but it is still not the newest run.
    config = validate_config(PipelineConfig, yaml.safe_load((runs / first / "config.yaml").read_text()))
    RunState.create(RunPaths.for_run(config, first), config, resumed=True)
    assert find_run(runs, "latest") == runs / second
    assert os.readlink(runs / "latest") == second
    result = runner.invoke(app, ["runs", "--runs-root", str(runs), "--json"])
    assert result.exit_code == 0, result.output
    assert [r["run_id"] for r in json.loads(result.stdout)] == [second, first]  # the file `latest` is no run


def test_a_sweep_id_is_told_apart_from_its_points(tmp_path):
    runs = tmp_path / "runs"
    for name in ("s-sweep-1-0", "s-sweep-1-1"):
        (runs / name).mkdir(parents=True)
        (runs / name / "run.json").write_text(json.dumps({"run_id": name, "created": "x", "stages": {}}))
    (runs / "s-sweep-1").mkdir()
    (runs / "s-sweep-1" / "sweep.json").write_text(json.dumps({"sweep_id": "s-sweep-1", "points": []}))
    assert find_sweep(runs, "s-sweep-1") == runs / "s-sweep-1"
    assert find_sweep(runs, "s-sweep") == runs / "s-sweep-1"  # a prefix only the sweep and its points share
    assert find_sweep(runs, "s-sweep-1-0") is None
    assert find_run(runs, "s-sweep-1-0") == runs / "s-sweep-1-0"
    with pytest.raises(ValueError, match="is a sweep"):
        find_run(runs, "s-sweep-1")


def test_sweep_table_keeps_grid_values_typed_and_mixed_ones_as_text(tmp_path):
    runs = tmp_path / "runs"
    for i, method in enumerate(["distilled", "ce_triplet"]):
        (runs / f"s-{i}").mkdir(parents=True)
        retrieval = {method: {"rank1": 0.5, "rank5": 0.7, "mAP": 0.4, "mINP": 0.1}}
        (runs / f"s-{i}" / "run.json").write_text(json.dumps({"metrics": {
            "retrieval": retrieval, "noise_detection": {"all.f1": 0.8 if i else None}}}))
    record = {"sweep_id": "s", "grid": {"noise.rate": [0.2, 1], "mix": [1, "a"]},
              "points": [{"label": f"p{i}", "run_id": f"s-{i}", "values": {"noise.rate": [0.2, 1][i],
                                                                            "mix": [1, "a"][i]}}
                         for i in range(2)]}
    table = sweep_table(runs, record)
    assert list(table.columns) == ["sweep_id", "point", "run_id", "noise.rate", "mix", "method", "rank1", "rank5",
                                   "mAP", "mINP", "noise_detection_f1"]
    assert table["noise.rate"].tolist() == [0.2, 1.0] and table["noise.rate"].dtype == "float64"
    assert table["mix"].tolist() == ["1", "a"]
    assert table["method"].tolist() == ["distilled", "ce_triplet"]
    assert pd.isna(table["noise_detection_f1"][0]) and table["noise_detection_f1"][1] == 0.8


@pytest.mark.slow
def test_a_method_sweep_labels_every_model_by_its_method_and_writes_its_table(tmp_path):
    config = tiny_config(tmp_path, run={**tiny_config(tmp_path)["run"], "name": "sw"}, teacher={"rounds": 1},
                         baselines=["ce_triplet"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    runs = tmp_path / "runs"

    result = runner.invoke(app, ["sweep", str(path), "--grid", "student.method=distilled,ce_triplet"])
    assert result.exit_code == 0, result.output
    (sweep_json,) = runs.glob("*/sweep.json")
    sweep_id = sweep_json.parent.name
    assert sweep_id.startswith("sw-sweep-")
    record = json.loads(sweep_json.read_text())
    assert record["status"] == "completed"
    assert [(p["label"], p["run_id"], p["status"]) for p in record["points"]] == [
        ("student.method=distilled", f"{sweep_id}-0", "completed"),
        ("student.method=ce_triplet", f"{sweep_id}-1", "completed")]

    expected_models = {0: ["distilled", "ce_triplet"], 1: ["ce_triplet"]}
    for index, method in enumerate(["distilled", "ce_triplet"]):
        run_id = f"{sweep_id}-{index}"
        run_json = load_run_json(runs / run_id)
        assert run_json["sweep"] == {"sweep_id": sweep_id, "index": index, "label": f"student.method={method}",
                                     "point": {"student.method": method}}
        assert yaml.safe_load((runs / run_id / "config.yaml").read_text())["student"]["method"] == method
        models = expected_models[index]
        assert list(run_json["metrics"]["retrieval"]) == models
        assert sorted(n for n in run_json["stages"] if n.startswith(("student.", "evaluate."))) == sorted(
            [f"student.{m}" for m in models] + [f"evaluate.{m}" for m in models])
        manifests = tmp_path / "manifests" / run_id
        assert sorted(p.name for p in manifests.glob("metrics_*.parquet")) == sorted(
            [f"metrics_{m}.parquet" for m in models] + ["metrics_label_audit.parquet", "metrics_noise_detection.parquet"])
        metrics = read_manifest(manifests / "metrics.parquet", "metrics")
        student_stages = sorted(s for s in metrics["stage"].unique() if s.startswith("student."))
        assert student_stages == sorted(f"student.{m}" for m in models)
        assert (metrics.groupby(["stage", "metric"]).size() == 1).all(), "a model is listed twice"
        trained_here = runs / run_id / "stages" / "student"  # a stage taken from cache has no folder here
        assert {p.name for p in trained_here.iterdir()} <= set(models) if trained_here.exists() else True
    # The ce_triplet student of point 1 is the ce_triplet baseline of point 0: same key, taken from cache.
    point1 = load_run_json(runs / f"{sweep_id}-1")["stages"]
    assert point1["student.ce_triplet"]["state"] == "cached"
    assert point1["student.ce_triplet"]["key"] == load_run_json(runs / f"{sweep_id}-0")["stages"][
        "student.ce_triplet"]["key"]

    table = pd.read_parquet(runs / sweep_id / "sweep.parquet")
    assert list(table.columns) == ["sweep_id", "point", "run_id", "student.method", "method", "rank1", "rank5",
                                   "mAP", "mINP", "noise_detection_f1"]
    assert list(zip(table["run_id"], table["student.method"], table["method"])) == [
        (f"{sweep_id}-0", "distilled", "distilled"), (f"{sweep_id}-0", "distilled", "ce_triplet"),
        (f"{sweep_id}-1", "ce_triplet", "ce_triplet")]
    assert (table["sweep_id"] == sweep_id).all()
    assert table[["rank1", "rank5", "mAP", "mINP"]].apply(lambda c: c.between(0, 1)).all().all()
    assert table["noise_detection_f1"].notna().all()
    for row in table.itertuples():
        retrieval = load_run_json(runs / row.run_id)["metrics"]["retrieval"][row.method]
        assert row.mAP == pytest.approx(retrieval["mAP"])

    shown = runner.invoke(app, ["inspect", sweep_id, "--runs-root", str(runs), "--json"])
    assert shown.exit_code == 0, shown.output
    report = json.loads(shown.stdout)
    assert report["sweep_id"] == sweep_id
    assert [(r["run_id"], r["method"]) for r in report["rows"]] == list(zip(table["run_id"], table["method"]))
    shown = runner.invoke(app, ["inspect", sweep_id, "--runs-root", str(runs)])
    assert shown.exit_code == 0, shown.output
    assert "student.method=ce_triplet" in shown.output and "ambiguous" not in shown.output

    listed = runner.invoke(app, ["runs", "--runs-root", str(runs)])
    assert listed.exit_code == 0, listed.output
    assert "2/2" in listed.output  # the sweep's own line: both points completed
    as_json = json.loads(runner.invoke(app, ["runs", "--runs-root", str(runs), "--json"]).stdout)
    assert {r["run_id"]: r["sweep"] for r in as_json} == {f"{sweep_id}-0": sweep_id, f"{sweep_id}-1": sweep_id}

    latest = runner.invoke(app, ["inspect", "latest", "--runs-root", str(runs), "--json"])
    assert latest.exit_code == 0, latest.output
    assert json.loads(latest.stdout)["run_id"] == f"{sweep_id}-1"


def test_a_point_finished_later_brings_the_sweep_table_and_status_up_to_date(tmp_path):
    from fat_distill.pipeline.sweeps import load_sweep_json, read_sweep_table, refresh_sweep, start_sweep

    runs = tmp_path / "runs"
    points = grid_points({"student.method": ["distilled", "ce"]})
    start_sweep(runs, "s", {"student.method": ["distilled", "ce"]}, points, {"run": {"name": "s"}})
    assert load_sweep_json(runs / "s")["status"] == "running" and read_sweep_table(runs / "s").empty

    def finish(index: int, status: str, method: str) -> None:
        (runs / f"s-{index}").mkdir(exist_ok=True)
        metrics = {"retrieval": {method: {"rank1": 0.5, "rank5": 0.6, "mAP": 0.3, "mINP": 0.1}},
                   "noise_detection": {"all.f1": 0.7}} if status == "completed" else None
        (runs / f"s-{index}" / "run.json").write_text(json.dumps({"run_id": f"s-{index}", "status": status,
                                                                  "metrics": metrics, "stages": {}}))

    finish(0, "completed", "distilled")
    finish(1, "failed", "ce")
    table = refresh_sweep(runs, "s", finished=True)
    record = load_sweep_json(runs / "s")
    assert record["status"] == "failed" and [p["status"] for p in record["points"]] == ["completed", "failed"]
    assert table["method"].tolist() == ["distilled"]
    finish(1, "completed", "ce")  # `fat-distill resume s-1` finished it
    refresh_sweep(runs, "s")
    assert load_sweep_json(runs / "s")["status"] == "completed"
    assert read_sweep_table(runs / "s")["method"].tolist() == ["distilled", "ce"]
