"""Soft-label math against a direct softmax, the sparse → class-index round trip, and fold assignment."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from fat_distill.distill import (
    StudentConfig,
    TeacherConfig,
    assign_folds,
    ensemble_probabilities,
    fold_train_mask,
    soft_labels_from_logits,
    soft_labels_from_probs,
    soft_targets_for,
)
import yaml
from pydantic import ValidationError

# pids are not class indices: class c is pid PIDS[c]
PIDS = [3, 7, 11, 20, 42, 99]
LABEL_MAP = {pid: c for c, pid in enumerate(PIDS)}


def reference(logits: np.ndarray, temperature: float, k: int):
    z = logits / temperature
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    order = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return np.array(PIDS)[order], np.take_along_axis(p, order, axis=1)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("top_k", [1, 3, 6])
def test_soft_labels_match_a_direct_softmax(temperature, top_k):
    logits = np.random.default_rng(0).normal(0, 3, size=(9, len(PIDS)))
    ids, probs = soft_labels_from_logits(logits, LABEL_MAP, temperature=temperature, top_k=top_k)
    ref_ids, ref_probs = reference(logits, temperature, top_k)
    assert ids.dtype == np.int32 and probs.dtype == np.float32 and ids.shape == (9, top_k)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-6)
    assert (np.diff(probs, axis=1) <= 0).all()  # sorted descending
    assert (probs.sum(axis=1) <= 1 + 1e-6).all()
    if top_k == len(PIDS):
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    # the top-1 identity is the arg-max of the logits at any temperature
    np.testing.assert_array_equal(ids[:, 0], np.array(PIDS)[logits.argmax(axis=1)])


def test_temperature_spreads_the_mass():
    logits = np.random.default_rng(1).normal(0, 3, size=(20, len(PIDS)))
    _, sharp = soft_labels_from_logits(logits, LABEL_MAP, temperature=0.5, top_k=1)
    _, plain = soft_labels_from_logits(logits, LABEL_MAP, temperature=1.0, top_k=1)
    _, soft = soft_labels_from_logits(logits, LABEL_MAP, temperature=5.0, top_k=1)
    assert (sharp[:, 0] >= plain[:, 0]).all() and (plain[:, 0] >= soft[:, 0]).all()


def test_probs_input_gives_the_logits_result_and_k_is_clipped():
    logits = np.random.default_rng(2).normal(0, 2, size=(5, len(PIDS)))
    probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    a = soft_labels_from_logits(logits, LABEL_MAP, temperature=2.0, top_k=50)
    b = soft_labels_from_probs(probs, LABEL_MAP, temperature=2.0, top_k=50)
    assert a[0].shape == (5, len(PIDS))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], rtol=1e-5)
    # an exactly-zero probability stays zero and sorts last
    one_hot = np.eye(len(PIDS))[[2, 4]]
    ids, p = soft_labels_from_probs(one_hot, LABEL_MAP, temperature=3.0, top_k=2)
    np.testing.assert_array_equal(ids[:, 0], [PIDS[2], PIDS[4]])
    np.testing.assert_array_equal(p, [[1, 0], [1, 0]])


def test_ensemble_is_the_mean_of_the_members_tempered_softmax():
    rng = np.random.default_rng(3)
    members = [rng.normal(0, 3, size=(7, len(PIDS))) for _ in range(3)]
    for temperature in (0.5, 1.0, 3.0):
        expected = np.zeros((7, len(PIDS)))
        for logits in members:  # brute force, one row and one class at a time
            for i in range(7):
                z = np.exp(logits[i] / temperature)
                expected[i] += z / z.sum() / len(members)
        mean = ensemble_probabilities(members, temperature=temperature)
        np.testing.assert_allclose(mean, expected, rtol=1e-10)
        np.testing.assert_allclose(mean.sum(axis=1), 1.0)
    # one member: the ensemble is that member's soft labels
    single = soft_labels_from_probs(ensemble_probabilities(members[:1], temperature=2.0), LABEL_MAP, top_k=3)
    direct = soft_labels_from_logits(members[0], LABEL_MAP, temperature=2.0, top_k=3)
    np.testing.assert_array_equal(single[0], direct[0])
    np.testing.assert_allclose(single[1], direct[1], rtol=1e-5)
    # two confident members that disagree split the mass; a probability mean, not a logit mean
    a, b = np.array([[20.0, 0, 0, 0, 0, 0]]), np.array([[0, 20.0, 0, 0, 0, 0]])
    np.testing.assert_allclose(ensemble_probabilities([a, b])[0, :2], [0.5, 0.5], atol=1e-6)
    with pytest.raises(ValueError, match="shapes"):
        ensemble_probabilities([members[0], members[1][:3]])
    bad = members[1].copy()
    bad[4, 0] = np.inf
    with pytest.raises(ValueError, match="member 1.*row 4"):
        ensemble_probabilities([members[0], bad])
    with pytest.raises(ValueError, match="no member"):
        ensemble_probabilities([])


def test_soft_label_errors():
    logits = np.zeros((2, len(PIDS)))
    with pytest.raises(ValueError, match="label_map"):
        soft_labels_from_logits(logits, {3: 0, 7: 1})
    with pytest.raises(ValueError, match="temperature"):
        soft_labels_from_logits(logits, LABEL_MAP, temperature=0)
    bad = logits.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="row 1"):
        soft_labels_from_logits(bad, LABEL_MAP)


def test_soft_targets_map_pids_to_class_indices_with_padding():
    frame = pd.DataFrame({
        "sample_id": ["a", "b", "c"],
        "topk_ids": [np.array([7, 3], dtype=np.int32), np.array([500, 11], dtype=np.int32),
                     np.array([42], dtype=np.int32)],
        "topk_probs": [np.array([0.7, 0.2], dtype=np.float32), np.array([0.6, 0.3], dtype=np.float32),
                       np.array([0.9], dtype=np.float32)],
    })
    ids, probs = soft_targets_for(frame, ["c", "a", "b"], LABEL_MAP)  # dataset order differs from the frame's
    assert ids.dtype == torch.int64 and probs.dtype == torch.float32 and ids.shape == (3, 2)
    assert ids.tolist() == [[4, -1], [1, 0], [-1, 2]]  # pid 500 is unknown -> −1, short row padded
    np.testing.assert_allclose(probs.numpy(), [[0.9, 0.0], [0.7, 0.2], [0.0, 0.3]])
    with pytest.raises(ValueError, match="no soft label.*'zzz'"):
        soft_targets_for(frame, ["a", "zzz"], LABEL_MAP)
    only_unknown = frame.assign(topk_ids=[np.array([500, 501], dtype=np.int32)] * 3)
    with pytest.raises(ValueError, match="another label set"):
        soft_targets_for(only_unknown, ["a"], LABEL_MAP)


def test_folds_group_duplicated_images_and_cover_every_identity():
    rows = []
    for pid in range(1, 6):
        for j in range(7):
            rows.append({"sample_id": f"{pid}_{j}.png", "path": f"{pid}_{j}.png", "pid": pid})
    # multi-noise duplicates: same image, another label
    rows += [{"sample_id": "1_0.png#multi1", "path": "1_0.png", "pid": 3},
             {"sample_id": "2_5.png#multi1", "path": "2_5.png", "pid": 4}]
    frame = pd.DataFrame(rows)
    folds = assign_folds(frame, 3, seed=0)
    assert folds.shape == (len(frame),) and set(folds) == {0, 1, 2}
    by_path = pd.Series(folds).groupby(frame["path"]).nunique()
    assert (by_path == 1).all()  # a duplicated image never straddles folds
    for pid in range(1, 6):
        assert set(folds[(frame["pid"] == pid).to_numpy()]) == {0, 1, 2}
    sizes = np.bincount(folds)
    assert sizes.max() - sizes.min() <= 2
    np.testing.assert_array_equal(assign_folds(frame, 3, seed=0), folds)  # deterministic
    confident = np.ones(len(frame), dtype=bool)
    confident[0] = False
    mask = fold_train_mask(confident, folds, 1)
    assert not mask[folds == 1].any() and not mask[0]
    assert mask[(folds != 1) & confident].all()


def test_configs_load_from_yaml_and_refuse_unknown_keys():
    teacher = TeacherConfig.model_validate(yaml.safe_load(
        "rounds: 4\nrule: quantile\nscoring: oof\ntrain: {epochs: 2, model: small_cnn}\n"))
    assert (teacher.rounds, teacher.rule, teacher.train.epochs, teacher.scoring) == (4, "quantile", 2, "oof")
    assert TeacherConfig().train.resolved("teacher").epochs == 20  # E from scratch
    assert TeacherConfig(train={"weights": "w.pt"}).train.resolved("teacher").epochs == 5  # the paper's, pretrained
    # settings that do not change a round's result do not change its hash
    assert TeacherConfig(rounds=2).round_hash() == TeacherConfig(rounds=5, tolerance=0.2).round_hash()
    assert TeacherConfig().round_hash() != TeacherConfig(threshold=0.6).round_hash()
    with pytest.raises(ValidationError, match="round\n"):
        TeacherConfig.model_validate({"round": 3})
    with pytest.raises(ValidationError, match="folds"):
        TeacherConfig(folds=1)
    student = StudentConfig.model_validate({"method": "ce_triplet", "triplet_margin": "soft"})
    assert student.objective == "ce_triplet" and student.triplet_margin == "soft"
    assert StudentConfig(method="oracle").objective == "fat_hybrid"
    assert StudentConfig(method="oracle", oracle_objective="ce_triplet").objective == "ce_triplet"
    assert StudentConfig(method="distilled").objective == "fat_hybrid"
    with pytest.raises(ValidationError, match="triplet_margin"):
        StudentConfig(triplet_margin=-1.0)
    assert StudentConfig(method="ce_msml", triplet_margin="soft").objective == "ce_msml"
    assert StudentConfig(method="oracle", oracle_objective="ce_quadruplet").objective == "ce_quadruplet"
    with pytest.raises(ValidationError, match="quadruplet loss has no soft margin"):
        StudentConfig(method="ce_quadruplet", triplet_margin="soft")
