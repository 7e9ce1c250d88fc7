"""Smoke test of benchmarks/bench_objectives.py: a tiny clean-label study, its summary and its resume."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_objectives.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_objectives", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_objectives"] = module
    spec.loader.exec_module(module)
    return module


def test_variants_are_valid_student_configs(bench):
    from fat_distill.train import TrainConfig
    for name in bench.VARIANTS:
        config = bench.student_config(name, TrainConfig(epochs=1))
        assert config.method in ("ce_triplet", "fat_hybrid_noisy")
    assert bench.student_config("fat_reference", TrainConfig()).fat_negatives == "batch_hardest"
    with pytest.raises(argparse.ArgumentTypeError):
        bench.parse_variant("fat_nonsense")


def test_summary_gives_each_variant_its_difference_to_the_peer_per_seed(bench):
    runs = pd.DataFrame([
        {"dataset": "synth", "epochs": 5, "seed": s, "variant": v, "mAP": m, "rank1": m, "train_acc": 0.9,
         "train_seconds": 3.0}
        for s, v, m in [(0, "ce_triplet", 0.40), (1, "ce_triplet", 0.50), (0, "fat", 0.42), (1, "fat", 0.46)]])
    text = bench.summarise(runs)
    fat_line = next(line for line in text.splitlines() if "| fat |" in line)
    assert "44.0 [42.0, 46.0]" in fat_line and "-1.0 [-4.0, 2.0]" in fat_line
    # Best mean mAP first.
    assert text.index("| ce_triplet |") < text.index("| fat |")


def test_tiny_study_writes_rows_and_resumes(bench, tmp_path):
    argv = ["--datasets", "synth", "--seeds", "0", "--epochs", "1", "--variants", "ce_triplet", "fat",
            "--model", "tiny_cnn", "--synth-identities", "12", "--synth-images", "4", "--synth-size", "32", "16",
            "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    runs = bench.main(argv)
    assert list(runs["variant"]) == ["ce_triplet", "fat"]
    assert runs[["mAP", "rank1", "train_acc"]].apply(lambda c: c.between(0, 1)).all().all()
    assert "| synth | 1 | fat | 1 |" in (tmp_path / "out" / "summary.md").read_text()
    bench.main(argv)  # every row is there: nothing is trained again
    assert len(pd.read_csv(tmp_path / "out" / "runs.csv")) == 2
