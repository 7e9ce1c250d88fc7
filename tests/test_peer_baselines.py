"""The filter-and-retrain peers (`filtered`, `cleanlab`) and the near-chance teacher warning, in real runs.

One tiny direct run and one tiny Prefect run include both baselines, with a teacher that cannot learn
(lr 1e-6, 1 epoch): it must warn, name the fields to change, and the run summary must carry the warning.
"""

from __future__ import annotations

import numpy as np
import pytest

from fat_distill.distill import load_dataset
from fat_distill.distill._common import train_rows
from fat_distill.distill.cleanlab_baseline import label_issues_frame
from fat_distill.distill.student import filter_training_rows
from fat_distill.distill.teacher import near_chance_warning
from fat_distill.distill.config import TeacherConfig
from fat_distill.manifests import read_manifest, read_manifest_meta
from fat_distill.pipeline import PipelineConfig, load_run_json, validate_config
from fat_distill.pipeline.inspect import inspect_run
from tests.pipeline_configs import tiny_config

UNTRAINABLE = {"lr": 1e-6, "epochs": 1}


def peers_config(root):
    config = tiny_config(root, baselines=["filtered", "cleanlab"], cleanlab={"folds": 2, "epochs": 1})
    config["teacher"]["train"].update(UNTRAINABLE)
    # Its own data, so a Prefect cache shared by the session holds nothing of it.
    config["data"]["synth"] = {**config["data"]["synth"], "seed": 23}
    return config


def check_run(runs_root, run_id):
    run_dir = runs_root / run_id
    run = load_run_json(run_dir)
    manifests = run_dir.parent.parent / "manifests" / run_id
    dataset = load_dataset(manifests / "dataset_noisy.parquet")
    train = train_rows(dataset.frame, "test")

    # filtered: exactly the confident rows of the final teacher round, with their given labels.
    rounds = sorted(manifests.glob("teacher_round_*.parquet"))
    final = read_manifest(rounds[-1], "teacher_round")
    filtered_dir = run_dir / "stages" / "student" / "filtered"
    marker = (filtered_dir / "stage.json").read_text()
    assert read_manifest_meta(rounds[-1]).content_hash in marker
    kept = filter_training_rows(train, rounds[-1], "filtered")
    assert set(kept["sample_id"]) == set(final.loc[final["confident"], "sample_id"])
    assert (kept.set_index("sample_id")["pid"] == final.set_index("sample_id").loc[kept["sample_id"],
                                                                                  "given_label"]).all()

    # cleanlab: the rows find_label_issues did not flag, from a label_issues manifest of every train row.
    issues_path = manifests / "label_issues.parquet"
    issues = read_manifest(issues_path, "label_issues")
    assert set(issues["sample_id"]) == set(train["sample_id"]) and set(issues["fold"]) == {0, 1}
    assert read_manifest_meta(issues_path).content_hash in (run_dir / "stages" / "student" / "cleanlab" /
                                                             "stage.json").read_text()
    cleaned = filter_training_rows(train, issues_path, "cleanlab")
    assert set(cleaned["sample_id"]) == set(issues.loc[~issues["flagged"], "sample_id"])

    # Both are evaluated like every model; the near-chance teacher warned in the manifest, run.json and inspect.
    assert {"distilled", "filtered", "cleanlab"} <= set(run["metrics"]["retrieval"])
    warnings = run["metrics"]["warnings"]
    assert warnings and all("teacher.train.lr" in w and "teacher.train.epochs" in w and "teacher.train.model" in w
                            for w in warnings)
    meta = read_manifest_meta(rounds[0])
    assert meta.extra["warning"] == warnings[0] and meta.extra["train_accuracy"] < 0.2
    report = inspect_run(run_dir)
    assert report["teacher_rounds"][0]["warning"] == warnings[0]
    assert run["stages"]["cleanlab"]["outputs"]["kept"] == int((~issues["flagged"]).sum())
    return run


def test_filtered_and_cleanlab_baselines_in_a_direct_run(tmp_path, caplog):
    from fat_distill.pipeline import run_direct

    with caplog.at_level("WARNING", logger="fat_distill.distill"):
        run_id, _ = run_direct(validate_config(PipelineConfig, peers_config(tmp_path)))
    check_run(tmp_path / "runs", run_id)
    assert any("train accuracy" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


@pytest.mark.slow
def test_filtered_and_cleanlab_baselines_in_a_prefect_run(tmp_path):
    from flows.pipeline import run_pipeline

    run_id, _ = run_pipeline(validate_config(PipelineConfig, peers_config(tmp_path)))
    run = check_run(tmp_path / "runs", run_id)
    assert {f"cleanlab.fold{k}" for k in range(2)} <= set(run["stages"])
    again, _ = run_pipeline(validate_config(PipelineConfig, peers_config(tmp_path)))  # all from cache
    states = {name: entry["state"] for name, entry in load_run_json(tmp_path / "runs" / again)["stages"].items()}
    assert states["cleanlab"] == states["student.cleanlab"] == states["student.filtered"] == "cached"


def test_label_issues_frame_is_cleanlabs_verdict_row_by_row():
    from cleanlab.filter import find_label_issues

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 10)
    probs = rng.dirichlet(np.ones(4) * 0.3, size=40)
    probs[np.arange(40), labels] += 2.0
    probs[:5] = np.eye(4)[(labels[:5] + 1) % 4] * 0.9 + 0.025  # five confidently other-class rows
    probs /= probs.sum(1, keepdims=True)
    train = __import__("pandas").DataFrame({"sample_id": [f"s{i}" for i in range(40)], "pid": labels + 10,
                                            "fold": np.arange(40) % 2})
    frame = label_issues_frame(train, {p + 10: p for p in range(4)}, labels, probs)
    np.testing.assert_array_equal(frame["flagged"], find_label_issues(labels, probs, n_jobs=1))
    assert frame["flagged"][:5].all()
    assert (frame["pred_label"] == probs.argmax(1) + 10).all()
    np.testing.assert_allclose(frame["label_quality"], probs[np.arange(40), labels], rtol=1e-6)


@pytest.mark.parametrize("accuracy, classes, warned", [(0.19, 100, True), (0.25, 100, False), (0.3, 8, False),
                                                      (0.24, 8, True), (0.5, 8, False), (None, 8, False)])
def test_near_chance_means_below_twice_chance_or_twenty_percent(accuracy, classes, warned):
    message = near_chance_warning(accuracy, classes, 1, TeacherConfig())
    assert (message is not None) == warned
    if warned:
        assert "teacher round 1" in message and "teacher.train.lr (now 0.003, scratch regime)" in message


def test_row_filter_methods_need_their_manifest_and_others_refuse_it(tmp_path):
    from fat_distill.distill import StudentConfig, train_student

    with pytest.raises(ValueError, match="rows_manifest"):
        train_student(tmp_path / "none.parquet", StudentConfig(method="cleanlab"), tmp_path / "out", "cpu")
    with pytest.raises(ValueError, match="ignore rows_manifest"):
        train_student(tmp_path / "none.parquet", StudentConfig(method="ce"), tmp_path / "out", "cpu",
                      rows_manifest=tmp_path / "x.parquet")
