"""Noise-detection report: hand-computed cases and scikit-learn as the reference."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

from fat_distill.evaluate import is_noisy_from_labels, noise_detection_report


def test_hand_computed_small_case():
    noise_kind = ["clean", "clean", "clean", "clean", "flip", "flip", "outlier", "pair"]
    confidence = [0.9, 0.8, 0.3, 0.7, 0.2, 0.6, 0.1, 0.4]
    confident = np.array([True, True, False, True, False, True, False, False])
    report = noise_detection_report(confidence, confident, noise_kind=noise_kind)
    assert report.index.tolist() == ["all", "flip", "pair", "outlier"]
    assert report.columns.tolist() == ["precision", "recall", "f1", "auroc", "support"]
    # Flagged: rows 2 (clean), 4 (flip), 6 (outlier), 7 (pair) → TP 3, FP 1, FN 1 (row 5).
    overall = report.loc["all"]
    assert overall["precision"] == pytest.approx(3 / 4)
    assert overall["recall"] == pytest.approx(3 / 4)
    assert overall["f1"] == pytest.approx(3 / 4)
    # Noise scores 1-c: noisy {.8,.4,.9,.6}, clean {.1,.2,.7,.3}; pairs noisy > clean: 4+3+4+3 = 14 of 16.
    assert overall["auroc"] == pytest.approx(14 / 16)
    assert overall["support"] == 4
    assert report.loc["flip", "recall"] == pytest.approx(1 / 2)
    assert report.loc["flip", "auroc"] == pytest.approx((4 + 3) / 8)
    assert report.loc["outlier", "recall"] == 1.0 and report.loc["outlier", "auroc"] == 1.0
    assert report.loc["pair", "auroc"] == pytest.approx(3 / 4)
    assert report.loc["pair", "support"] == 1
    assert np.isnan(report.loc["flip", "precision"]) and np.isnan(report.loc["flip", "f1"])


def test_agrees_with_sklearn_on_random_data():
    rng = np.random.default_rng(0)
    kinds = rng.choice(["clean", "flip", "pair", "outlier", "multi"], size=500, p=[0.6, 0.1, 0.1, 0.1, 0.1])
    is_noisy = kinds != "clean"
    confidence = np.clip(rng.normal(np.where(is_noisy, 0.4, 0.7), 0.2), 0, 1)
    confident = confidence > 0.5
    report = noise_detection_report(confidence, confident, noise_kind=pd.Series(kinds))
    precision, recall, f1, _ = precision_recall_fscore_support(is_noisy, ~confident, average="binary")
    assert report.loc["all", "precision"] == pytest.approx(precision)
    assert report.loc["all", "recall"] == pytest.approx(recall)
    assert report.loc["all", "f1"] == pytest.approx(f1)
    assert report.loc["all", "auroc"] == pytest.approx(roc_auc_score(is_noisy, 1 - confidence))
    assert report.index.tolist() == ["all", "flip", "pair", "outlier", "multi"]
    for kind in ["flip", "pair", "outlier", "multi"]:
        of_kind, versus = kinds == kind, (kinds == kind) | ~is_noisy
        assert report.loc[kind, "recall"] == pytest.approx((~confident[of_kind]).mean())
        assert report.loc[kind, "auroc"] == pytest.approx(roc_auc_score(of_kind[versus], 1 - confidence[versus]))
        assert report.loc[kind, "support"] == of_kind.sum()


def test_ground_truth_from_labels():
    pid, true_pid = np.array([1, 2, 3, 3, 5]), np.array([1, 2, 4, 3, 6])
    assert is_noisy_from_labels(pid, true_pid).tolist() == [False, False, True, False, True]
    report = noise_detection_report(
        [0.9, 0.2, 0.1, 0.8, 0.3], np.array([True, False, False, True, True]), pid=pid, true_pid=true_pid
    )
    assert report.index.tolist() == ["all"]
    assert report.loc["all", "precision"] == pytest.approx(1 / 2)
    assert report.loc["all", "recall"] == pytest.approx(1 / 2)
    assert report.loc["all", "auroc"] == pytest.approx(5 / 6)


def test_undefined_values_are_nan_not_zero():
    # Nothing flagged: precision 0/0; no clean samples: AUROC undefined.
    report = noise_detection_report([0.5, 0.6], np.array([True, True]), noise_kind=["flip", "pair"])
    assert np.isnan(report.loc["all", "precision"])
    assert report.loc["all", "recall"] == 0.0 and report.loc["all", "f1"] == 0.0
    assert np.isnan(report.loc["all", "auroc"])
    clean_only = noise_detection_report([0.5, 0.6], np.array([True, False]), noise_kind=["clean", "clean"])
    assert clean_only.index.tolist() == ["all"]
    assert np.isnan(clean_only.loc["all", "recall"]) and clean_only.loc["all", "precision"] == 0.0


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="equal length"):
        noise_detection_report([0.1, 0.2], np.array([True]), noise_kind=["clean", "flip"])
    with pytest.raises(ValueError, match="boolean"):
        noise_detection_report([0.1, 0.2], np.array([1, 0]), noise_kind=["clean", "flip"])
    with pytest.raises(ValueError, match="not finite at row 1"):
        noise_detection_report([0.1, np.nan], np.array([True, False]), noise_kind=["clean", "flip"])
    with pytest.raises(ValueError, match="give the ground truth"):
        noise_detection_report([0.1, 0.2], np.array([True, False]))
