"""benchmarks/probe_teacher_training.py on a finished tiny pipeline run: one row per training mode and detector."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from fat_distill.pipeline import PipelineConfig, run_direct, validate_config
from tests.pipeline_configs import tiny_config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "probe_teacher_training.py"


def test_every_mode_trains_and_scores_the_noise(tmp_path):
    spec = importlib.util.spec_from_file_location("probe_teacher_training", SCRIPT)
    probe = importlib.util.module_from_spec(spec)
    sys.modules["probe_teacher_training"] = probe
    spec.loader.exec_module(probe)
    config = validate_config(PipelineConfig, tiny_config(tmp_path, baselines=[]))
    run_id, _ = run_direct(config)
    argv = ["--runs", str(tmp_path / "runs" / run_id), "--epochs", "2", "--out", str(tmp_path / "out")]
    table = probe.main(argv)
    assert list(table["mode"]) == ["ce", "ce", "coteach", "mixup"]
    assert list(table["detector"]) == ["gmm on final probabilities", "gmm on AUM"] + ["gmm on final probabilities"] * 2
    for column in ("precision", "recall", "clean_kept", "labels_clean", "train_acc"):
        assert table[column].between(0, 100).all(), column
    assert table["recall_flip"].between(0, 100).all()  # the tiny run's noise is flips
    assert (table["rows_trained"] > 0).all()
    probe.main(argv)  # every row is there: nothing is trained again
    assert len(table) == len(probe.main(argv))
