"""Smoke test of benchmarks/bench_noise.py: its detection scoring, summary tables and a --quick run."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fat_distill.distill import TeacherConfig

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_noise.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_noise", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_noise"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_detection_row_counts_flags_against_the_truth(bench):
    is_noisy = np.array([True, True, False, False, False, True])
    flagged = np.array([True, False, True, False, False, True])
    row = bench.detection_row(is_noisy, flagged, confidence=np.array([0.1, 0.6, 0.2, 0.9, 0.8, 0.3]))
    assert row["precision"] == pytest.approx(2 / 3) and row["recall"] == pytest.approx(2 / 3)
    assert row["f1"] == pytest.approx(2 / 3)
    assert row["flagged_fraction"] == pytest.approx(0.5) and row["noise_rate"] == pytest.approx(0.5)
    # Clean rows: 0.2, 0.9, 0.8; noisy: 0.1, 0.6, 0.3 → 7 of 9 (clean, noisy) pairs ordered right.
    assert row["auroc"] == pytest.approx(7 / 9)
    clean = bench.detection_row(np.zeros(4, bool), np.array([True, False, False, False]))
    assert math.isnan(clean["f1"]) and math.isnan(clean["recall"]) and clean["flagged_fraction"] == 0.25


def test_detectors_find_obviously_mislabelled_rows(bench):
    rng = np.random.default_rng(0)
    classes, n = 5, 200
    true = np.arange(n) % classes
    probs = np.full((n, classes), 0.02)
    probs[np.arange(n), true] = 0.92
    labels = true.copy()
    noisy = rng.choice(n, 30, replace=False)
    labels[noisy] = (true[noisy] + 1) % classes
    is_noisy = labels != true
    rows = {r["detector"]: r for r in bench.compare_detectors(labels, probs, is_noisy, TeacherConfig())}
    assert {"cleanlab:prune_by_noise_rate", "ours:gmm", "ours:threshold", "ours:quantile"} <= set(rows)
    for name in ("cleanlab:prune_by_noise_rate", "ours:gmm", "ours:threshold"):
        assert rows[name]["f1"] == pytest.approx(1.0), name
    assert all(r["source"] == "oof round 0" for r in rows.values())


def test_gap_table_measures_the_share_of_the_gap_closed(bench):
    ret = pd.DataFrame({"dataset": "synth", "rate": 0.4, "seed": 0,
                        "method": ["distilled", "ce", "ce_triplet", "fat_hybrid_noisy", "oracle"],
                        "mAP": [0.32, 0.20, 0.24, 0.22, 0.40]})
    table = bench.gap_table(ret)
    # best noisy baseline ce_triplet 24 → oracle 40; the student at 32 closes 8 of 16 points.
    assert "| distilled | ce_triplet | 24.0 | 32.0 | 40.0 | 50 % |" in table


def test_quick_run_writes_tables_and_resumes(bench, tmp_path):
    argv = ["--quick", "--datasets", "synth", "--rates", "0.4", "--seeds", "0", "--methods", "distilled", "ce",
            "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    retrieval = bench.main(argv)
    assert list(retrieval["method"]) == ["distilled", "ce"]
    assert retrieval[["mAP", "rank1", "train_acc"]].apply(lambda c: c.between(0, 1)).all().all()
    detection = pd.read_csv(tmp_path / "out" / "detection.csv")
    assert {"cleanlab:prune_by_noise_rate", "ours:gmm", "teacher:oof:gmm:fresh"} <= set(detection["detector"])
    assert detection["noise_rate"].between(0.3, 0.5).all()  # 40 % mix noise, rounded per identity
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| synth | 40% | distilled | 1 |" in summary and "cleanlab:prune_by_noise_rate" in summary
    # Everything is done: a second run adds no row.
    bench.main(argv)
    assert len(pd.read_csv(tmp_path / "out" / "retrieval.csv")) == 2
    assert len(pd.read_csv(tmp_path / "out" / "detection.csv")) == len(detection)


def test_teacher_variant_takes_its_own_epochs_per_round(bench):
    variant = bench.TeacherVariant.parse("oof:gmm:fresh:30")
    assert variant.epochs == 30 and variant.name == "oof:gmm:fresh:30"
    assert bench.TeacherVariant.parse("oof:gmm:continue").epochs is None
    from fat_distill.train import TrainConfig
    config = bench.teacher_config(TrainConfig(epochs=10), variant, rounds=3)
    assert config.train.epochs == 30 and config.retrain == "fresh"
    import argparse
    with pytest.raises(argparse.ArgumentTypeError):
        bench.TeacherVariant.parse("oof:gmm:fresh:0")


def test_equal_budget_cleanlab_trains_as_many_epochs_and_iterates(bench, tmp_path):
    """--equal-budget: cleanlab on fold models of rounds × E epochs, and cleanlab iterated for the teacher's rounds."""
    import json

    work = tmp_path / "work"
    argv = ["--quick", "--datasets", "synth", "--rates", "0.4", "--seeds", "0", "--methods", "--equal-budget",
            "--teachers", "oof:gmm:continue", "oof:gmm:fresh:2", "--work-dir", str(work), "--out", str(tmp_path / "out")]
    bench.main(argv)  # --quick: E = 1, 2 rounds
    detection = pd.read_csv(tmp_path / "out" / "detection.csv")
    by = {(d, s): r for d, s, r in zip(detection["detector"], detection["source"], detection.to_dict("records"))}
    assert ("cleanlab:prune_by_noise_rate", "oof round 0") in by
    assert ("cleanlab:prune_by_noise_rate", "oof 1 round × 2 ep") in by
    assert ("ours:gmm", "oof 1 round × 2 ep") in by
    iterated = by[("cleanlab-iterated:prune_by_noise_rate", "final round 1 (2 × 1 ep)")]
    assert iterated["rounds_run"] == 2 and 0 <= iterated["f1"] <= 1
    assert {"teacher:oof:gmm:continue", "teacher:oof:gmm:fresh:2"} <= set(detection["detector"])
    condition = work / "synth" / "rate0.4-seed0"
    # The long fold models trained 2 epochs on their folds (one round), the fresh:2 teacher 2 epochs per round.
    long_fold = json.loads((condition / "oof-round0-2ep" / "round-0" / "fold-0" / "stage.json").read_text())
    assert long_fold["stage"] == "teacher.round0"
    assert (condition / "teacher-oof-gmm-fresh-2ep" / "teacher_round_1.parquet").is_file()
    # Round 1 of the iterated cleanlab trained each fold model on exactly the rows cleanlab kept outside the fold.
    iterated_dir = condition / "cleanlab-iterated-oof-gmm-continue-1ep"
    kept = bench.read_manifest(iterated_dir / "cleanlab_round_0.parquet", "teacher_round")
    for fold in (0, 1):
        marker = json.loads((iterated_dir / "round-1" / f"fold-{fold}" / "stage.json").read_text())
        assert marker["train_rows"] == int((kept["confident"] & (kept["fold"] != fold)).sum())
    assert (~kept["confident"]).any()  # cleanlab removed rows, so round 1 trained on fewer
    # Everything is done: a second run adds no row.
    bench.main(argv)
    assert len(pd.read_csv(tmp_path / "out" / "detection.csv")) == len(detection)
