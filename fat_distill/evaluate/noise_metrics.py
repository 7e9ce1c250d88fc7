"""How well confidence scores find the noisy labels, overall and per kind of noise.

Positive = noisy. A sample is *flagged* (predicted noisy) when it is not
``confident``; precision, recall and F1 score the flags, and AUROC scores the
ranking by ``1 − confidence`` (threshold-free). Undefined values (0/0, or an
AUROC with a single class present) are NaN, never a silent 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from fat_distill.data.noise import NOISE_KINDS  # report order of the kinds; others follow alphabetically

CLEAN = "clean"
REPORT_COLUMNS = ("precision", "recall", "f1", "auroc", "support")


def is_noisy_from_labels(pid: Sequence[int] | np.ndarray, true_pid: Sequence[int] | np.ndarray) -> np.ndarray:
    """Ground-truth noise flags where only labels are known: the given pid differs from the true one.

    Args:
        pid: shape (N,), the given labels.
        true_pid: shape (N,), the ground truth.

    Returns:
        shape (N,), bool.
    """
    pid, true_pid = np.asarray(pid), np.asarray(true_pid)
    if pid.shape != true_pid.shape or pid.ndim != 1:
        raise ValueError(f"pid and true_pid must be 1-D of equal length, got {pid.shape} and {true_pid.shape}")
    return pid != true_pid


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else float("nan")


def _auroc(is_positive: np.ndarray, scores: np.ndarray) -> float:
    if is_positive.all() or not is_positive.any():
        return float("nan")
    return float(roc_auc_score(is_positive, scores))


def noise_detection_report(
    confidence: Sequence[float] | np.ndarray,
    confident: Sequence[bool] | np.ndarray,
    *,
    noise_kind: Sequence[str] | np.ndarray | pd.Series | None = None,
    pid: Sequence[int] | np.ndarray | None = None,
    true_pid: Sequence[int] | np.ndarray | None = None,
) -> pd.DataFrame:
    """Precision, recall, F1 and AUROC of detecting noisy labels, overall and per noise kind.

    The ground truth is ``noise_kind != "clean"`` when ``noise_kind`` is given
    (it also separates the kinds), else ``pid != true_pid``.

    Row ``"all"``: precision = flagged noisy / flagged, recall = flagged noisy /
    noisy, F1 their harmonic mean, AUROC of ``1 − confidence`` for noisy vs
    clean, support = number of noisy samples. Row per kind (``"flip"``,
    ``"pair"``, ``"outlier"``, ``"multi"`` …): recall = the fraction of that
    kind flagged, AUROC of that kind vs the clean samples, support = samples of
    that kind; precision and F1 are NaN (a flag does not say which kind it found).

    Args:
        confidence: shape (N,), higher = more likely clean (e.g. the teacher's
            probability of the given label).
        confident: shape (N,), bool; ``False`` = flagged as noisy.
        noise_kind: shape (N,), str, ``"clean"`` or the kind of noise.
        pid: shape (N,), the given labels (used with ``true_pid`` when
            ``noise_kind`` is absent).
        true_pid: shape (N,), the ground-truth labels.

    Returns:
        DataFrame indexed by ``"all"`` then each noise kind present, with columns
        ``precision, recall, f1, auroc`` (float) and ``support`` (int).

    Raises:
        ValueError: lengths differ, confidence is not finite, or neither
            ``noise_kind`` nor both ``pid`` and ``true_pid`` are given.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    confident = np.asarray(confident)
    if confidence.ndim != 1 or confident.shape != confidence.shape:
        raise ValueError(
            f"confidence and confident must be 1-D of equal length, got {confidence.shape} and {confident.shape}"
        )
    if confident.dtype != np.bool_:
        raise ValueError(f"confident must be boolean, got dtype {confident.dtype}")
    if not np.isfinite(confidence).all():
        row = int(np.flatnonzero(~np.isfinite(confidence))[0])
        raise ValueError(f"confidence is not finite at row {row} ({confidence[row]}); score every sample first")
    if noise_kind is not None:
        kinds = np.asarray(noise_kind, dtype=object)
        if kinds.shape != confidence.shape:
            raise ValueError(f"noise_kind has shape {kinds.shape}, expected {confidence.shape}")
        is_noisy = kinds != CLEAN
    elif pid is not None and true_pid is not None:
        is_noisy = is_noisy_from_labels(pid, true_pid)
        if is_noisy.shape != confidence.shape:
            raise ValueError(f"pid/true_pid have shape {is_noisy.shape}, expected {confidence.shape}")
        kinds = None
    else:
        raise ValueError("give the ground truth: noise_kind, or both pid and true_pid")

    flagged = ~confident
    noise_score = 1.0 - confidence
    true_positives = int((flagged & is_noisy).sum())
    precision = _ratio(true_positives, int(flagged.sum()))
    recall = _ratio(true_positives, int(is_noisy.sum()))
    false_positives = int((flagged & ~is_noisy).sum())
    false_negatives = int((~flagged & is_noisy).sum())
    f1 = _ratio(2 * true_positives, 2 * true_positives + false_positives + false_negatives)
    rows = {"all": (precision, recall, f1, _auroc(is_noisy, noise_score), int(is_noisy.sum()))}

    if kinds is not None:
        present = {str(kind) for kind in kinds[is_noisy]}
        ordered = [kind for kind in NOISE_KINDS if kind in present] + sorted(present - set(NOISE_KINDS))
        is_clean = ~is_noisy
        for kind in ordered:
            of_kind = kinds == kind
            versus_clean = of_kind | is_clean
            rows[kind] = (
                float("nan"),
                _ratio(int((flagged & of_kind).sum()), int(of_kind.sum())),
                float("nan"),
                _auroc(of_kind[versus_clean], noise_score[versus_clean]),
                int(of_kind.sum()),
            )
    report = pd.DataFrame.from_dict(rows, orient="index", columns=list(REPORT_COLUMNS))
    report["support"] = report["support"].astype(np.int64)
    return report
