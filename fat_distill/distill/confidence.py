"""Confidence of each sample in its given label, from a classifier's predicted probabilities.

Three rules decide which samples are *confident* (kept for the next teacher
round and allowed to build FAT centres):

``threshold``
    confident iff ``p(given label) >= threshold``. Simple, but the right τ
    depends on the number of classes and on how long the teacher trained.
``quantile``
    per identity, the lowest ``quantile`` fraction of samples by
    ``p(given label)`` is dropped. Per identity, so identities that are small or
    hard (low probabilities everywhere) are thinned, not wiped out; assumes the
    noise is spread over identities.
``gmm``
    a two-component 1-D Gaussian mixture on the per-sample cross-entropy of the
    given label (DivideMix, Li et al. 2020): clean samples form the low-loss
    component. ``confidence`` is the posterior of that component and a sample is
    confident iff it is at least 0.5. Needs no threshold and adapts to how far
    the teacher has fitted the noise.

Everything here is a function over numpy arrays (cleanlab style); the teacher
stage calls it on the probabilities of its model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np

log = logging.getLogger("fat_distill.distill")

CONFIDENCE_RULES = ("gmm", "threshold", "quantile")
ConfidenceRule = Literal["gmm", "threshold", "quantile"]

# Probabilities are clipped here before the log, so a sample the model calls
# impossible gets a large finite loss (−log 1e-12 ≈ 27.6) rather than inf.
_MIN_PROB = 1e-12
# Rows of `probs` must sum to 1 within this tolerance (float32 softmax outputs).
_SUM_TOLERANCE = 1e-3


@dataclass
class ConfidenceScores:
    """Per-sample confidence of a classifier in the given labels (all arrays ``(N,)``).

    Attributes:
        confidence: float64 in [0, 1]: ``p(given label)`` for ``threshold`` and
            ``quantile``, the posterior of the low-loss (clean) component for ``gmm``.
        confident: bool; the rule's decision.
        pred_label: int64 class index of the largest probability.
        max_prob: float64, the largest probability.
        entropy: float64, entropy of the predicted distribution in nats.
        loss: float64, cross-entropy of the given label, ``−log p(given)``.
    """

    confidence: np.ndarray
    confident: np.ndarray
    pred_label: np.ndarray
    max_prob: np.ndarray
    entropy: np.ndarray
    loss: np.ndarray

    def __len__(self) -> int:
        return len(self.confidence)


def _check_inputs(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2:
        raise ValueError(f"score_confidence: probs must be (N, C), got shape {probs.shape}")
    n, c = probs.shape
    if n == 0:
        raise ValueError("score_confidence: probs has no rows; there is nothing to score")
    if c < 2:
        raise ValueError(
            f"score_confidence: probs has {c} class column(s); confidence in a label needs at least 2 "
            "classes (with one identity every sample trivially carries it)"
        )
    if labels.shape != (n,):
        raise ValueError(f"score_confidence: labels must be ({n},) to match probs, got shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"score_confidence: labels must be integer class indices, got dtype {labels.dtype}")
    if n and (labels.min() < 0 or labels.max() >= c):
        row = int(np.flatnonzero((labels < 0) | (labels >= c))[0])
        raise ValueError(
            f"score_confidence: label {labels[row]} at row {row} is outside [0, {c}); "
            "map pids to the classifier's class indices first"
        )
    bad = ~np.isfinite(probs).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"score_confidence: probs has NaN or infinite values in {int(bad.sum())} row(s), first row {row}; "
            "the model diverged (check the teacher's training loss) or the inputs are not probabilities"
        )
    if (probs < 0).any():
        row = int(np.flatnonzero((probs < 0).any(axis=1))[0])
        raise ValueError(f"score_confidence: negative probability in row {row}; pass softmax(logits), not logits")
    sums = probs.sum(axis=1)
    off = np.abs(sums - 1.0) > _SUM_TOLERANCE
    if off.any():
        row = int(np.flatnonzero(off)[0])
        raise ValueError(
            f"score_confidence: row {row} of probs sums to {sums[row]:.6g}, not 1; "
            "pass softmax(logits) over all classes"
        )
    return labels.astype(np.int64), probs


def score_confidence(
    labels: np.ndarray,
    probs: np.ndarray,
    *,
    rule: ConfidenceRule = "gmm",
    threshold: float = 0.5,
    quantile: float = 0.2,
    min_per_class: int = 0,
    gmm_seed: int = 0,
) -> ConfidenceScores:
    """Score each sample's confidence in its given label and decide which are confident.

    Args:
        labels: ``(N,)`` int, the given (possibly noisy) label of each sample as a class index.
        probs: ``(N, C)`` predicted class probabilities (rows sum to 1), e.g.
            ``softmax(logits)`` of the teacher. Out-of-fold probabilities give
            scores that are not inflated by the model having memorised the sample.
        rule: ``"gmm"`` (default; no threshold to tune), ``"threshold"`` or
            ``"quantile"``; see the module docstring.
        threshold: τ of the ``threshold`` rule, in (0, 1]. Raise it to keep fewer,
            cleaner samples; lower it when the teacher is under-trained or C is large
            (probabilities are spread thinner).
        quantile: q of the ``quantile`` rule, in [0, 1): the fraction dropped per
            identity. Set it near the expected noise rate.
        min_per_class: after the rule, each class keeps at least this many of its
            most confident samples as confident (all of them if it has fewer), so no
            identity loses every sample and disappears from the next round. 0 = off.
        gmm_seed: random state of the mixture fit (``gmm`` only).

    Returns:
        :class:`ConfidenceScores`.

    Raises:
        ValueError: shapes disagree, fewer than 2 classes, labels out of range,
            NaN/inf or non-normalised probabilities, an unknown rule or an
            out-of-range parameter, or (``gmm``) all losses equal so there is
            nothing to separate.
    """
    if rule not in CONFIDENCE_RULES:
        raise ValueError(f"score_confidence: rule must be one of {CONFIDENCE_RULES}, got {rule!r}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"score_confidence: threshold must be in (0, 1], got {threshold}")
    if not 0.0 <= quantile < 1.0:
        raise ValueError(f"score_confidence: quantile must be in [0, 1), got {quantile}")
    if min_per_class < 0:
        raise ValueError(f"score_confidence: min_per_class must be >= 0, got {min_per_class}")
    labels, probs = _check_inputs(labels, probs)

    n = len(labels)
    p_given = probs[np.arange(n), labels]
    loss = -np.log(np.clip(p_given, _MIN_PROB, 1.0))
    pred_label = probs.argmax(axis=1).astype(np.int64)
    max_prob = probs.max(axis=1)
    # 0·log 0 = 0: clipping only changes the factor that multiplies a zero.
    entropy = -(probs * np.log(np.clip(probs, _MIN_PROB, 1.0))).sum(axis=1)
    entropy = np.maximum(entropy, 0.0)

    if rule == "threshold":
        confidence = np.clip(p_given, 0.0, 1.0)
        confident = confidence >= threshold
    elif rule == "quantile":
        confidence = np.clip(p_given, 0.0, 1.0)
        confident = _per_class_quantile_keep(labels, confidence, quantile)
    else:
        confidence = gmm_clean_posterior(loss, seed=gmm_seed)
        confident = confidence >= 0.5
    if min_per_class:
        confident = _ensure_min_per_class(labels, confidence, confident, min_per_class)
    return ConfidenceScores(confidence=confidence, confident=confident, pred_label=pred_label,
                            max_prob=max_prob, entropy=entropy, loss=loss)


def _per_class_quantile_keep(labels: np.ndarray, score: np.ndarray, quantile: float) -> np.ndarray:
    """Drop ``floor(quantile · n_k)`` lowest-scoring samples of every class k (ties: lower row first)."""
    keep = np.ones(len(labels), dtype=bool)
    order = np.lexsort((np.arange(len(labels)), score, labels))  # by class, then score, then row
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    ends = np.r_[starts[1:], len(order)]
    for start, end in zip(starts, ends):
        drop = int(np.floor(quantile * (end - start) + 1e-9))
        keep[order[start:start + drop]] = False
    return keep


def _ensure_min_per_class(labels: np.ndarray, confidence: np.ndarray, confident: np.ndarray,
                          minimum: int) -> np.ndarray:
    confident = confident.copy()
    rescued = 0
    for cls in np.unique(labels):
        rows = np.flatnonzero(labels == cls)
        have = int(confident[rows].sum())
        want = min(minimum, len(rows))
        if have >= want:
            continue
        candidates = rows[~confident[rows]]
        best = candidates[np.argsort(-confidence[candidates], kind="stable")[: want - have]]
        confident[best] = True
        rescued += len(best)
    if rescued:
        log.info("min_per_class=%d: %d sample(s) kept confident so that no identity is emptied", minimum, rescued)
    return confident


def gmm_clean_posterior(loss: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Posterior of the low-loss component of a 2-component 1-D Gaussian mixture on ``loss``.

    As in DivideMix, losses are min-max normalised to [0, 1] first and the mixture
    gets a small covariance regulariser (5e-4) so a tight clean cluster cannot
    collapse to zero variance. A two-Gaussian posterior need not be monotone in the
    loss: far below a narrow clean component a *wider* noisy component wins again
    (and beyond a narrow noisy one, a wide clean one). So losses at or above the
    noisy mean get at most the posterior there, and then each sample gets the
    highest posterior found at any loss >= its own: a smaller loss never means
    less confidence.

    Args:
        loss: ``(N,)`` per-sample loss (cross-entropy of the given label), N >= 2.
        seed: random state of the mixture fit.

    Returns:
        ``(N,)`` float64 posterior probabilities in [0, 1].

    Raises:
        ValueError: fewer than 2 samples, non-finite losses, or all losses equal
            (a mixture cannot separate identical values; use ``rule="threshold"``
            or ``"quantile"``, or train the teacher longer).
    """
    from sklearn.mixture import GaussianMixture

    loss = np.asarray(loss, dtype=np.float64)
    if loss.ndim != 1 or len(loss) < 2:
        raise ValueError(f"gmm_clean_posterior: loss must be (N,) with N >= 2, got shape {loss.shape}")
    if not np.isfinite(loss).all():
        raise ValueError("gmm_clean_posterior: loss has NaN or infinite values")
    lo, hi = float(loss.min()), float(loss.max())
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        raise ValueError(
            f"gmm_clean_posterior: all {len(loss)} losses are equal ({lo:.6g}), so a two-component mixture "
            "has nothing to separate; use rule='threshold' or 'quantile', or train the teacher longer"
        )
    x = ((loss - lo) / (hi - lo)).reshape(-1, 1)
    gmm = GaussianMixture(n_components=2, max_iter=100, tol=1e-3, reg_covar=5e-4, random_state=seed)
    gmm.fit(x)
    means = gmm.means_.ravel()
    clean = int(np.argmin(means))
    posterior = gmm.predict_proba(x)[:, clean]
    # Past the noisy mean the noisy component must keep winning, whatever the widths.
    beyond_noisy = x.ravel() >= means[1 - clean]
    at_noisy_mean = gmm.predict_proba(means[1 - clean].reshape(1, 1))[0, clean]
    posterior = np.where(beyond_noisy, np.minimum(posterior, at_noisy_mean), posterior)
    # Upper envelope, scanning from the largest loss down: each sample gets the
    # highest posterior at any loss >= its own, so confidence never rises with loss.
    order = np.argsort(x.ravel(), kind="stable")
    posterior[order] = np.maximum.accumulate(posterior[order][::-1])[::-1]
    return np.clip(posterior, 0.0, 1.0)


def confident_set_change(previous: np.ndarray, current: np.ndarray) -> float:
    """Fraction of samples whose confident flag differs between two rounds.

    Args:
        previous: ``(N,)`` bool, the confident flags of the earlier round.
        current: ``(N,)`` bool, the same samples in the same order, later round.

    Returns:
        ``mean(previous != current)`` in [0, 1]; 0.0 for N = 0.
    """
    previous = np.asarray(previous, dtype=bool)
    current = np.asarray(current, dtype=bool)
    if previous.shape != current.shape or previous.ndim != 1:
        raise ValueError(
            f"confident_set_change: flags must be two (N,) arrays over the same samples, got shapes "
            f"{previous.shape} and {current.shape}"
        )
    if not len(previous):
        return 0.0
    return float(np.mean(previous != current))
