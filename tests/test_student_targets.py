"""Mixing the given label into the distilled student's soft CE targets."""

from __future__ import annotations

import numpy as np
import torch

from fat_distill.distill.student import mix_given_label
from fat_distill.losses.classification import dense_soft_targets


def test_confident_rows_get_weighted_given_label_others_keep_soft():
    ids = torch.tensor([[2, 0, -1], [1, 2, 0]])
    probs = torch.tensor([[0.7, 0.3, 0.0], [0.5, 0.3, 0.2]])
    given = np.array([0, 0])
    confident = torch.tensor([True, False])
    mixed_ids, mixed_probs = mix_given_label(ids, probs, given, confident, 0.5)
    dense = dense_soft_targets((mixed_ids, mixed_probs), 3, "test")
    expected = torch.tensor([[0.5 + 0.5 * 0.3, 0.0, 0.5 * 0.7],   # w·onehot(0) + (1−w)·soft
                             [0.2, 0.5, 0.3]])                      # not confident: soft only
    torch.testing.assert_close(dense, expected)
    torch.testing.assert_close(dense.sum(1), torch.ones(2))


def test_weight_one_is_the_given_label():
    ids = torch.tensor([[1, 2]])
    probs = torch.tensor([[0.6, 0.4]])
    mixed = mix_given_label(ids, probs, np.array([2]), torch.tensor([True]), 1.0)
    torch.testing.assert_close(dense_soft_targets(mixed, 3, "test"), torch.tensor([[0.0, 0.0, 1.0]]))


def _soft_labels(tmp_path):
    import pandas as pd

    from fat_distill.manifests import write_manifest
    soft = pd.DataFrame({
        "sample_id": ["a", "b", "c", "d"],
        "given_label": [1, 1, 2, 3],
        "topk_ids": [[1, 2], [2, 1], [3, 1], [3, 2]],
        "topk_probs": [[0.9, 0.1], [0.8, 0.2], [0.3, 0.2], [0.9, 0.1]],
        "confident": [True, False, False, False],
    })
    path = tmp_path / "soft.parquet"
    write_manifest(soft, path, "soft_labels", stage="test")
    train = pd.DataFrame({"sample_id": ["a", "b", "c", "d"], "pid": [1, 1, 2, 3]})
    return path, train, {1: 0, 2: 1, 3: 2}


def test_flagged_rows_are_relabelled_when_the_teacher_is_sure_else_dropped(tmp_path):
    from fat_distill.distill import StudentConfig
    from fat_distill.distill.student import distilled_targets
    path, train, label_map = _soft_labels(tmp_path)
    # b: flagged, teacher 0.8 on pid 2 → relabel; c: 0.3 → drop; d: teacher agrees with the given label → drop.
    rows, ids, probs, confident, column = distilled_targets(
        path, train, label_map, StudentConfig(flagged_rows="relabel", relabel_min_prob=0.5, given_label_weight=0.0))
    assert list(rows["sample_id"]) == ["a", "b"] and list(rows[column]) == [1, 2]
    assert confident.tolist() == [True, False]  # a relabelled row builds no centre
    assert ids.shape[0] == probs.shape[0] == 2 and ids[1, 0] == label_map[2]

    rows, *_, confident, column = distilled_targets(path, train, label_map, StudentConfig(flagged_rows="drop"))
    assert list(rows["sample_id"]) == ["a"] and confident.tolist() == [True]

    rows, *_, confident, column = distilled_targets(path, train, label_map, StudentConfig(flagged_rows="soft"))
    assert column == "pid" and len(rows) == 4 and confident.tolist() == [True, False, False, False]


def test_flag_disagreeing_flags_kept_rows_whose_teacher_top1_is_another_identity(tmp_path):
    import pandas as pd

    from fat_distill.distill import StudentConfig
    from fat_distill.distill.student import distilled_targets
    from fat_distill.manifests import write_manifest
    soft = pd.DataFrame({
        "sample_id": ["a", "e", "f", "g"],
        "given_label": [1, 1, 1, 2],
        "topk_ids": [[1, 2], [2, 1], [3, 1], [9, 2]],  # g: top-1 outside the label map counts as agreeing
        "topk_probs": [[0.9, 0.1], [0.7, 0.3], [0.4, 0.35], [0.6, 0.4]],
        "confident": [True, True, True, True],
    })
    path = tmp_path / "soft.parquet"
    write_manifest(soft, path, "soft_labels", stage="test")
    train = pd.DataFrame({"sample_id": ["a", "e", "f", "g"], "pid": [1, 1, 1, 2]})
    label_map = {1: 0, 2: 1, 3: 2}

    rows, *_, confident, column = distilled_targets(path, train, label_map, StudentConfig(given_label_weight=1.0))
    assert list(rows["sample_id"]) == ["a", "e", "f", "g"] and confident.all()  # off: the teacher's flags rule

    # e: teacher 0.7 on pid 2 → relabelled, no centre; f: 0.4 on pid 3 → dropped; a and g stay.
    rows, ids, probs, confident, column = distilled_targets(
        path, train, label_map, StudentConfig(flag_disagreeing=True, relabel_min_prob=0.5, given_label_weight=1.0))
    assert list(rows["sample_id"]) == ["a", "e", "g"] and list(rows[column]) == [1, 2, 2]
    assert confident.tolist() == [True, False, True]
    dense = torch.zeros(3, 3).scatter_add_(1, ids.clamp(min=0).long(), probs * (ids >= 0))
    assert dense[0, 0] == 1.0 and dense[1].argmax() == label_map[2]  # the relabelled row learns the soft label

    rows, *_, confident, _ = distilled_targets(path, train, label_map,
                                               StudentConfig(flag_disagreeing=True, flagged_rows="drop"))
    assert list(rows["sample_id"]) == ["a", "g"]


def test_flag_disagreeing_that_leaves_no_confident_row_says_which_setting_to_change(tmp_path):
    import pandas as pd
    import pytest

    from fat_distill.distill import StudentConfig
    from fat_distill.distill.student import distilled_targets
    from fat_distill.manifests import write_manifest
    soft = pd.DataFrame({"sample_id": ["a", "b"], "given_label": [1, 2], "topk_ids": [[2, 1], [1, 2]],
                         "topk_probs": [[0.6, 0.4], [0.7, 0.3]], "confident": [True, True]})
    path = tmp_path / "soft.parquet"
    write_manifest(soft, path, "soft_labels", stage="test")
    train = pd.DataFrame({"sample_id": ["a", "b"], "pid": [1, 2]})
    with pytest.raises(ValueError, match=r"no sample is confident.*student\.flag_disagreeing: false"):
        distilled_targets(path, train, {1: 0, 2: 1}, StudentConfig(flag_disagreeing=True))
