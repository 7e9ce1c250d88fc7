"""Confidence scoring on hand-built probabilities: the three rules, the guards, the round-to-round change."""

from __future__ import annotations

import numpy as np
import pytest

from fat_distill.distill import confident_set_change, gmm_clean_posterior, score_confidence


def rows(*pairs):
    """Probabilities over 3 classes: each pair is (class with prob p, p); the rest split evenly."""
    out = []
    for cls, p in pairs:
        row = np.full(3, (1 - p) / 2)
        row[cls] = p
        out.append(row)
    return np.array(out)


def test_threshold_rule_is_p_given_label_against_tau():
    probs = rows((0, 0.9), (1, 0.6), (2, 0.3), (0, 0.5))
    labels = np.array([0, 1, 0, 0])
    s = score_confidence(labels, probs, rule="threshold", threshold=0.5)
    expected_p = np.array([0.9, 0.6, 0.35, 0.5])
    np.testing.assert_allclose(s.confidence, expected_p)
    np.testing.assert_array_equal(s.confident, [True, True, False, True])  # 0.5 >= τ: kept
    np.testing.assert_array_equal(s.pred_label, [0, 1, 0, 0])  # ties: the first class
    np.testing.assert_allclose(s.max_prob, [0.9, 0.6, 0.35, 0.5])
    np.testing.assert_allclose(s.loss, -np.log(expected_p))
    np.testing.assert_allclose(s.entropy, -(probs * np.log(probs)).sum(axis=1))


def test_zero_probabilities_give_finite_loss_and_entropy():
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    s = score_confidence(np.array([0, 0]), probs, rule="threshold")
    assert np.isfinite(s.loss).all() and s.loss[0] == 0.0 and s.loss[1] > 20
    np.testing.assert_allclose(s.entropy, [0.0, 0.0])
    np.testing.assert_array_equal(s.confident, [True, False])


def test_quantile_rule_drops_the_lowest_fraction_of_each_identity():
    # class 0: 5 samples -> floor(0.2*5)=1 dropped; class 1: 4 -> 0 dropped; class 2: 10 -> 2 dropped
    rng = np.random.default_rng(0)
    labels = np.array([0] * 5 + [1] * 4 + [2] * 10)
    p_given = rng.uniform(0.2, 0.95, size=len(labels))
    probs = np.zeros((len(labels), 3))
    for i, (y, p) in enumerate(zip(labels, p_given)):
        probs[i] = (1 - p) / 2
        probs[i, y] = p
    s = score_confidence(labels, probs, rule="quantile", quantile=0.2)
    np.testing.assert_allclose(s.confidence, p_given)
    dropped = set(np.flatnonzero(~s.confident))
    c0 = np.flatnonzero(labels == 0)
    c2 = np.flatnonzero(labels == 2)
    expected = {c0[np.argmin(p_given[c0])], *c2[np.argsort(p_given[c2])[:2]]}
    assert dropped == expected
    # class 1 keeps everything even though its probabilities may be the lowest overall
    assert s.confident[labels == 1].all()


def test_quantile_is_per_identity_not_global():
    # identity 1 is hard (all low probabilities) but only its lowest sample goes
    labels = np.array([0] * 5 + [1] * 5)
    p = np.array([0.9, 0.91, 0.92, 0.93, 0.94, 0.3, 0.31, 0.32, 0.33, 0.34])
    probs = np.stack([np.where(np.arange(2) == y, pi, 1 - pi) for y, pi in zip(labels, p)])
    s = score_confidence(labels, probs, rule="quantile", quantile=0.2)
    np.testing.assert_array_equal(np.flatnonzero(~s.confident), [0, 5])
    g = score_confidence(labels, probs, rule="threshold", threshold=0.5)
    assert not g.confident[labels == 1].any()  # the global rule empties identity 1


def bimodal(n_clean=160, n_noisy=40, seed=0, classes=5):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n_clean + n_noisy)
    p = np.concatenate([rng.uniform(0.7, 0.98, n_clean), rng.uniform(0.01, 0.12, n_noisy)])
    probs = np.empty((len(labels), classes))
    for i, (y, pi) in enumerate(zip(labels, p)):
        probs[i] = (1 - pi) / (classes - 1)
        probs[i, y] = pi
    is_noisy = np.arange(len(labels)) >= n_clean
    return labels, probs, is_noisy


def test_gmm_separates_a_bimodal_loss():
    labels, probs, is_noisy = bimodal()
    s = score_confidence(labels, probs, rule="gmm")
    np.testing.assert_array_equal(s.confident, ~is_noisy)
    assert (s.confidence >= 0).all() and (s.confidence <= 1).all()
    assert s.confidence[~is_noisy].min() > 0.9 and s.confidence[is_noisy].max() < 0.1
    # a smaller loss never means less confidence
    order = np.argsort(s.loss)
    assert (np.diff(s.confidence[order]) <= 1e-9).all()


def test_gmm_posterior_is_monotone_when_the_noisy_component_is_wide():
    # narrow clean cluster near 0.1, wide noisy spread: far below the clean mean a
    # raw two-Gaussian posterior would favour the wide component again
    rng = np.random.default_rng(1)
    loss = np.concatenate([rng.normal(1.0, 0.02, 300), rng.uniform(1.5, 9.0, 100), [0.0]])
    post = gmm_clean_posterior(loss)
    assert post[-1] >= post[:300].min()  # the smallest loss is at least as confident as the clean cluster
    order = np.argsort(loss)
    assert (np.diff(post[order]) <= 1e-9).all()


def test_min_per_class_keeps_some_samples_of_every_identity():
    labels = np.array([0, 0, 0, 1, 1, 1])
    probs = rows((0, 0.9), (0, 0.8), (0, 0.85), (1, 0.2), (1, 0.1), (1, 0.3))
    s = score_confidence(labels, probs, rule="threshold", threshold=0.5, min_per_class=2)
    np.testing.assert_array_equal(s.confident, [True, True, True, True, False, True])


@pytest.mark.parametrize("rule", ["gmm", "threshold", "quantile"])
def test_errors_say_what_is_wrong(rule):
    probs = rows((0, 0.9), (1, 0.6), (2, 0.3))
    with pytest.raises(ValueError, match="NaN or infinite.*row 1"):
        bad = probs.copy()
        bad[1, 0] = np.nan
        score_confidence(np.array([0, 1, 2]), bad, rule=rule)
    with pytest.raises(ValueError, match="at least 2 classes"):
        score_confidence(np.array([0, 0]), np.ones((2, 1)), rule=rule)
    with pytest.raises(ValueError, match="sums to"):
        score_confidence(np.array([0, 1, 2]), probs * 3, rule=rule)
    with pytest.raises(ValueError, match="label 5 at row 0"):
        score_confidence(np.array([5, 1, 2]), probs, rule=rule)
    with pytest.raises(ValueError, match=r"labels must be \(3,\)"):
        score_confidence(np.array([0, 1]), probs, rule=rule)


def test_gmm_refuses_all_equal_losses():
    probs = np.full((4, 4), 0.25)
    with pytest.raises(ValueError, match="all 4 losses are equal"):
        score_confidence(np.array([0, 1, 2, 3]), probs, rule="gmm")
    # the other rules are well defined on it
    assert score_confidence(np.array([0, 1, 2, 3]), probs, rule="threshold", threshold=0.25).confident.all()


def test_bad_rule_and_parameters():
    probs = rows((0, 0.9), (1, 0.6))
    with pytest.raises(ValueError, match="rule must be one of"):
        score_confidence(np.array([0, 1]), probs, rule="median")
    with pytest.raises(ValueError, match="threshold"):
        score_confidence(np.array([0, 1]), probs, rule="threshold", threshold=0.0)
    with pytest.raises(ValueError, match="quantile"):
        score_confidence(np.array([0, 1]), probs, rule="quantile", quantile=1.0)


def test_confident_set_change():
    assert confident_set_change(np.array([True, True, False, False]), np.array([True, False, False, True])) == 0.5
    assert confident_set_change(np.array([True]), np.array([True])) == 0.0
    assert confident_set_change(np.array([], dtype=bool), np.array([], dtype=bool)) == 0.0
    with pytest.raises(ValueError, match="same samples"):
        confident_set_change(np.array([True, False]), np.array([True]))
