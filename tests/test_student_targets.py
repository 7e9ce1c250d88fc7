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


def test_weight_one_is_the_hard_label():
    ids = torch.tensor([[1, 2]])
    probs = torch.tensor([[0.6, 0.4]])
    mixed = mix_given_label(ids, probs, np.array([2]), torch.tensor([True]), 1.0)
    torch.testing.assert_close(dense_soft_targets(mixed, 3, "test"), torch.tensor([[0.0, 0.0, 1.0]]))
