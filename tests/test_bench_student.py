"""Smoke test of benchmarks/bench_student.py: student variants trained on a finished run's teacher outputs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pandas as pd
import pytest

from fat_distill.pipeline import PipelineConfig, run_direct, validate_config
from tests.pipeline_configs import tiny_config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_student.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_student", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_student"] = module
    spec.loader.exec_module(module)
    return module


def test_summary_reports_margin_over_the_best_baseline_and_gap_closed(bench):
    runs = pd.DataFrame([{"run": r, "variant": v, "mAP": m, "rank1": m}
                         for r, v, m in [("a", "ce_triplet", 0.30), ("a", "filtered", 0.32), ("a", "oracle", 0.52),
                                         ("a", "distilled", 0.37)]])
    line = next(x for x in bench.summarise(runs).splitlines() if x.startswith("| distilled |"))
    assert "| 5.0 |" in line and "25.0 %" in line  # 37 − 32; (37 − 32) / (52 − 32)


def test_a_variants_train_fields_merge_into_the_runs(bench):
    student = {"method": "distilled", "train": {"image_size": [32, 16], "epochs": 7}}
    config = bench.variant_config(student, "distilled:mixup0.4", {"train_epochs": 2})
    assert config.train.mixup_alpha == 0.4 and tuple(config.train.image_size) == (32, 16)
    assert config.train.epochs == 2
    assert bench.variant_config(student, "distilled").train.mixup_alpha == 0.0


def test_variants_train_on_a_finished_run(bench, tmp_path):
    config = validate_config(PipelineConfig, tiny_config(tmp_path, baselines=[]))
    run_id, _ = run_direct(config)
    out = tmp_path / "out"
    argv = ["--runs", str(tmp_path / "runs" / run_id), "--variants", "ce_triplet", "filtered", "cleanlab",
            "distilled:relabel:given1:bh", "distilled:rounds", "distilled:mixup0.4", "--epochs", "1",
            "--cleanlab-folds", "2",
            "--work-dir", str(tmp_path / "work"), "--out", str(out)]
    runs = bench.main(argv)
    assert list(runs["variant"]) == ["ce_triplet", "filtered", "cleanlab", "distilled:relabel:given1:bh",
                                     "distilled:rounds", "distilled:mixup0.4"]
    assert runs["mAP"].between(0, 1).all()
    assert runs["labels_clean"].between(0, 100).all() and runs["rows_trained"].gt(0).all()
    # filter-and-retrain trains on fewer, cleaner rows than every row with its given label
    by = runs.set_index("variant")
    assert by.loc["filtered", "rows_trained"] < by.loc["ce_triplet", "rows_trained"]
    summary = (out / "summary.md").read_text()
    assert "| distilled:relabel:given1:bh | 1 |" in summary
    detection = pd.read_csv(out / "detection.csv")
    assert list(detection["detector"]) == ["teacher (final round)", "cleanlab"]
    assert detection["noisy"].gt(0).all() and detection["recall"].between(0, 100).all()
    kinds = [c for c in detection.columns if c.startswith("recall_")]  # the tiny config's noise kind(s)
    assert kinds and detection[kinds].stack().between(0, 100).all() and "recall of " in summary
    assert "| cleanlab | 1 |" in summary.split("Noise detection")[1]
    bench.main(argv)  # every row is there: nothing is trained again
    assert len(pd.read_csv(out / "runs.csv")) == 6

    # distilled:rounds trained on soft labels made again, from every teacher round of the run
    from fat_distill.manifests import read_manifest_meta

    (made,) = (tmp_path / "work" / run_id).glob("soft-labels-*/soft_labels.parquet")
    rounds = len(list((tmp_path / "runs" / run_id / "stages" / "teacher").glob("teacher_round_*.parquet")))
    assert rounds == 2 and len(read_manifest_meta(made).extra["ensemble"]) == rounds
