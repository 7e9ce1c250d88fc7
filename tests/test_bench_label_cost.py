"""benchmarks/bench_label_cost.py: the labels each variant trains on, and a run on a finished tiny pipeline run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pandas as pd
import pytest

from fat_distill.pipeline import PipelineConfig, run_direct, validate_config
from tests.pipeline_configs import tiny_config

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    for name in ("bench_student", "bench_label_cost"):  # bench_label_cost imports bench_student
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_label_cost"]


def _frame():
    return pd.DataFrame({
        "sample_id": ["t0", "t1", "t2", "t3", "t4", "q0"],
        "split": ["train"] * 5 + ["query"],
        "pid": [1, 2, 2, 3, 1, 1],
        "true_pid": [1, 1, 2, 9, 1, 1],
        "noise_kind": ["clean", "pair", "clean", "outlier", "clean", "clean"],
    })


def test_each_variant_trains_on_the_students_rows_with_its_labels(bench):
    frame = _frame()
    # the student keeps t0..t3 (t4 dropped) and relabelled t2 wrongly to 3
    student = pd.DataFrame({"sample_id": ["t0", "t1", "t2", "t3"], "student_pid": [1, 2, 3, 3]})

    def labels(variant):
        out = bench.relabelled_dataset(frame, student, "student_pid", variant)
        return dict(zip(out["sample_id"], out["true_pid"]))

    assert labels("student labels") == {"t0": 1, "t1": 2, "t2": 3, "t3": 3, "q0": 1}
    assert labels("true labels") == {"t0": 1, "t1": 1, "t2": 2, "t3": 9, "q0": 1}
    assert labels("true except pair") == {"t0": 1, "t1": 2, "t2": 2, "t3": 9, "q0": 1}
    assert labels("true except outlier") == {"t0": 1, "t1": 1, "t2": 2, "t3": 3, "q0": 1}
    assert labels("oracle") == {"t0": 1, "t1": 1, "t2": 2, "t3": 9, "t4": 1, "q0": 1}
    with pytest.raises(ValueError, match="unknown variant"):
        labels("cleanest")


def test_a_finished_run_gives_a_row_per_variant_and_a_table(bench, tmp_path):
    config = validate_config(PipelineConfig, tiny_config(tmp_path, baselines=[]))
    run_id, _ = run_direct(config)
    out = tmp_path / "out"
    argv = ["--runs", str(tmp_path / "runs" / run_id), "--variants", "student labels", "true labels",
            "true except flip", "--epochs", "1", "--work-dir", str(tmp_path / "work"), "--out", str(out)]
    results = bench.main(argv).set_index("variant")
    assert results["mAP"].between(0, 1).all()
    assert results.loc["true labels", "wrong_labels"] == 0
    # the tiny run's noise is all flips: the student's wrong labels are on flipped rows, or on clean rows it relabelled
    assert results.loc["true except flip", "wrong_labels"] <= results.loc["student labels", "wrong_labels"]
    table = (out / "label_cost.md").read_text()
    assert "| true except flip | 1 |" in table
    bench.main(argv)  # every row is there: nothing is trained again
    assert len(pd.read_csv(out / "label_cost.csv")) == 3
