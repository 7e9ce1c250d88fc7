"""P×K identity sampler: batch structure, replacement, determinism, train mask, exact length, resume."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fat_distill.data.sampler import IdentityBatchSampler, IdentitySampler


def _labels(counts: dict[int, int], seed: int = 0) -> np.ndarray:
    """Labels with ``counts[pid]`` samples each, in shuffled order (indices ≠ identity order)."""
    labels = np.concatenate([np.full(count, pid) for pid, count in counts.items()])
    return np.random.default_rng(seed).permutation(labels)


# 12 identities: some large, some smaller than K, one with a single image.
COUNTS = {pid: count for pid, count in zip(range(100, 112), [9, 4, 4, 7, 2, 1, 12, 5, 4, 3, 8, 6])}


def test_every_batch_has_p_identities_with_k_images_each() -> None:
    labels = _labels(COUNTS)
    sampler = IdentitySampler(labels, p=3, k=4, seed=1)
    batches = sampler.epoch_batches()
    assert len(batches) > 0
    for batch in batches:
        assert len(batch) == 12
        per_identity = Counter(labels[batch].tolist())
        assert len(per_identity) == 3
        assert set(per_identity.values()) == {4}
        # Consecutive K-runs belong to one identity, as batch-hard mining expects.
        runs = labels[batch].reshape(3, 4)
        assert (runs == runs[:, :1]).all()


def test_small_identities_are_sampled_with_replacement_and_large_ones_without() -> None:
    labels = _labels(COUNTS)
    sampler = IdentitySampler(labels, p=2, k=4, seed=3, drop_last=False)
    yielded = np.array(list(sampler))
    by_identity = {pid: yielded[labels[yielded] == pid] for pid in COUNTS}
    # The single-image identity appears as its one index repeated K times.
    single = by_identity[105]
    assert len(single) == 4 and len(set(single.tolist())) == 1
    # An identity of 2 images fills K=4 by repeating them.
    assert len(by_identity[104]) == 4 and set(by_identity[104].tolist()) == set(np.flatnonzero(labels == 104))
    # Identities with >= K images never repeat an index within the epoch.
    for pid, count in COUNTS.items():
        if count >= 4:
            assert len(by_identity[pid]) == len(set(by_identity[pid].tolist())), pid
            assert len(by_identity[pid]) == (count // 4) * 4, pid


def test_an_epoch_covers_every_identity() -> None:
    labels = _labels({pid: 4 + pid % 5 for pid in range(40)})
    sampler = IdentitySampler(labels, p=8, k=4, seed=0)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        seen = set(labels[np.array(list(sampler))].tolist())
        # With chunk-weighted identity choice nothing is left over here; torchreid's
        # uniform choice would drop the last identities' chunks.
        assert seen == set(range(40))


def test_order_is_deterministic_per_seed_and_epoch_and_changes_across_epochs() -> None:
    labels = _labels(COUNTS)
    first = IdentitySampler(labels, p=3, k=2, seed=7)
    second = IdentitySampler(labels, p=3, k=2, seed=7)
    assert list(first) == list(second)
    first.set_epoch(1)
    epoch_one = list(first)
    assert epoch_one != list(second)
    second.set_epoch(1)
    assert list(second) == epoch_one
    first.set_epoch(0)
    assert list(first) == list(IdentitySampler(labels, p=3, k=2, seed=7))
    assert list(IdentitySampler(labels, p=3, k=2, seed=8)) != list(IdentitySampler(labels, p=3, k=2, seed=7))


def test_train_mask_excludes_samples_and_skips_identities_without_trainable_samples() -> None:
    labels = _labels(COUNTS)
    rng = np.random.default_rng(0)
    train_mask = rng.random(len(labels)) < 0.6
    train_mask[labels == 106] = False  # a whole identity is not trusted
    sampler = IdentitySampler(labels, p=2, k=3, seed=0, train_mask=train_mask, drop_last=False)
    for epoch in range(4):
        sampler.set_epoch(epoch)
        yielded = np.array(list(sampler))
        assert train_mask[yielded].all()
        assert 106 not in set(labels[yielded].tolist())
    assert sampler.num_identities == len(set(labels[train_mask].tolist()))


def test_len_is_exact_for_every_epoch_and_both_drop_last_settings() -> None:
    labels = _labels(COUNTS)
    for drop_last in (True, False):
        sampler = IdentitySampler(labels, p=4, k=3, seed=2, drop_last=drop_last)
        for epoch in range(5):
            sampler.set_epoch(epoch)
            expected = len(sampler)
            assert len(list(sampler)) == expected
            assert expected % 3 == 0
            if drop_last:
                assert expected == sampler.num_batches() * 12


def test_drop_last_false_keeps_the_leftover_chunks_as_a_smaller_batch() -> None:
    # Two identities with 3 chunks, one with 1: P=2 leaves one chunk over.
    labels = _labels({1: 6, 2: 6, 3: 2})
    kept = IdentitySampler(labels, p=2, k=2, seed=0, drop_last=False).epoch_batches()
    dropped = IdentitySampler(labels, p=2, k=2, seed=0, drop_last=True).epoch_batches()
    assert sum(len(batch) for batch in kept) == 14  # every chunk of every identity
    assert [len(batch) for batch in kept[:-1]] == [4] * (len(kept) - 1)
    assert len(kept[-1]) == 2
    assert all(len(batch) == 4 for batch in dropped)
    assert sum(len(batch) for batch in dropped) == 12


def test_state_dict_round_trip_resumes_the_same_order() -> None:
    labels = _labels(COUNTS)
    sampler = IdentitySampler(labels, p=3, k=2, seed=11)
    sampler.set_epoch(4)
    state = sampler.state_dict()
    assert state == {"seed": 11, "epoch": 4}
    resumed = IdentitySampler(labels, p=3, k=2, seed=0)
    resumed.load_state_dict(state)
    assert list(resumed) == list(sampler)
    with pytest.raises(KeyError, match="missing"):
        resumed.load_state_dict({"seed": 1})


def test_batch_sampler_drives_a_dataloader_with_p_times_k_batches() -> None:
    labels = _labels(COUNTS)
    dataset = TensorDataset(torch.arange(len(labels)), torch.as_tensor(labels))
    batch_sampler = IdentityBatchSampler(labels, p=3, k=2, seed=5)
    batch_sampler.set_epoch(2)
    loader = DataLoader(dataset, batch_sampler=batch_sampler)
    batches = list(loader)
    assert len(batches) == len(batch_sampler)
    flat = IdentitySampler(labels, p=3, k=2, seed=5)
    flat.set_epoch(2)
    assert torch.cat([indices for indices, _ in batches]).tolist() == list(flat)
    for indices, batch_labels in batches:
        assert torch.equal(batch_labels, torch.as_tensor(labels)[indices])
        assert sorted(Counter(batch_labels.tolist()).values()) == [2, 2, 2]
    assert batch_sampler.state_dict() == {"seed": 5, "epoch": 2}


def test_flat_sampler_with_dataloader_batch_size_gives_aligned_batches() -> None:
    labels = _labels(COUNTS)
    sampler = IdentitySampler(labels, p=2, k=4, seed=0)
    loader = DataLoader(TensorDataset(torch.as_tensor(labels)), batch_size=sampler.batch_size, sampler=sampler)
    for (batch_labels,) in loader:
        assert sorted(Counter(batch_labels.tolist()).values()) == [4, 4]


def test_invalid_arguments_are_explained() -> None:
    labels = _labels(COUNTS)
    with pytest.raises(ValueError, match="p >= 1.*got p=0, k=4"):
        IdentitySampler(labels, p=0, k=4)
    with pytest.raises(ValueError, match="got p=2, k=0"):
        IdentitySampler(labels, p=2, k=0)
    with pytest.raises(ValueError, match="at least p=13 identities.*only 12 exist"):
        IdentitySampler(labels, p=13, k=2)
    mask = labels < 103  # identities 100, 101, 102 only
    with pytest.raises(ValueError, match=r"at least p=4 identities.*only 3 exist \(12 identities in labels, 9 without"):
        IdentitySampler(labels, p=4, k=2, train_mask=mask)
    with pytest.raises(ValueError, match="train_mask has shape"):
        IdentitySampler(labels, p=2, k=2, train_mask=mask[:-1])
    with pytest.raises(ValueError, match="boolean"):
        IdentitySampler(labels, p=2, k=2, train_mask=mask.astype(int))
