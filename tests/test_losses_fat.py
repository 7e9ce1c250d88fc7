"""FATLoss, CentreBank and HybridFATLoss against brute-force loop references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fat_distill.losses import (
    CENTRE_MODES,
    CentreBank,
    FATLoss,
    HybridFATLoss,
    LossOutput,
    compute_centres,
)
from tests.loss_reference import dist


def fat_reference(
    features, labels, centres, valid, margin, normalize, aggregation, k, cohesion, weight
) -> tuple[torch.Tensor, float]:
    """SPEC §1.1 written as loops over samples and centres; returns (loss, active fraction)."""
    if normalize:  # F.normalize: f / max(|f|, 1e-12), so a zero row stays zero
        features = torch.stack([f / torch.sqrt((f * f).sum()).clamp_min(1e-12) for f in features])
    p2s_terms, pos_dists = [], []
    looked_at = active = 0
    for i, f in enumerate(features):
        y = int(labels[i])
        if not valid[y]:
            continue
        d_pos = dist(f, centres[y])
        pos_dists.append(d_pos)
        negatives = sorted(
            ((dist(f, centres[c]), c) for c in range(len(centres)) if c != y and valid[c]),
            key=lambda pair: float(pair[0].detach()),
        )
        if not negatives:
            continue
        hinges = [torch.relu(d_pos - d_neg + margin) for d_neg, _ in negatives]
        if aggregation == "hardest":
            chosen = hinges[:1]
            term = chosen[0]
        elif aggregation == "topk":
            chosen = hinges[: min(k, len(hinges))]
            term = sum(chosen) / len(chosen)
        else:
            chosen = hinges
            violating = [h for h in hinges if float(h.detach()) > 0]
            term = sum(violating) / len(violating) if violating else d_pos * 0
        looked_at += len(chosen)
        active += sum(float(h.detach()) > 0 for h in chosen)
        p2s_terms.append(term)
    p2s = sum(p2s_terms) / len(p2s_terms) if p2s_terms else torch.zeros((), dtype=features.dtype)
    if not pos_dists:
        coh = torch.zeros((), dtype=features.dtype)
    elif cohesion == "max_radius":
        coh = torch.stack(pos_dists).max()
    else:
        coh = sum(pos_dists) / len(pos_dists)
    return p2s + weight * coh, (active / looked_at if looked_at else 0.0)


def make_batch(seed: int, batch: int = 10, dim: int = 5, classes: int = 5, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    centres = torch.randn(classes, dim, generator=generator, dtype=dtype)
    features = (centres[labels] + 0.9 * torch.randn(batch, dim, generator=generator, dtype=dtype))
    return features.requires_grad_(True), labels, centres


def assert_matches_reference(loss_fn: FATLoss, features, labels, centres, valid) -> LossOutput:
    out = loss_fn.compute(features, labels, centres, valid)
    (grad,) = torch.autograd.grad(out.loss, features)
    reference, active = fat_reference(
        features, labels, centres, valid, loss_fn.margin, loss_fn.normalize,
        loss_fn.aggregation, loss_fn.k, loss_fn.cohesion, loss_fn.cohesion_weight,
    )
    (reference_grad,) = torch.autograd.grad(reference, features, allow_unused=True)
    reference_grad = torch.zeros_like(features) if reference_grad is None else reference_grad
    torch.testing.assert_close(out.loss, reference, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-6, atol=1e-7)
    assert float(out.active_fraction) == pytest.approx(active)
    assert float(sum(out.terms.values())) == pytest.approx(out.loss.item(), rel=1e-9, abs=1e-12)
    return out


@pytest.mark.parametrize("aggregation", ["hardest", "mean", "topk"])
@pytest.mark.parametrize("cohesion", ["max_radius", "mean"])
@pytest.mark.parametrize("normalize", [False, True])
def test_fat_value_and_gradient_match_loops(aggregation, cohesion, normalize):
    for seed in range(3):
        features, labels, centres = make_batch(seed)
        if normalize:
            centres = F.normalize(centres, dim=1)
        valid = torch.tensor([True, True, False, True, True])  # one class without confident samples
        loss_fn = FATLoss(
            margin=0.3 if normalize else 1.0, normalize=normalize, aggregation=aggregation, k=2,
            cohesion=cohesion, cohesion_weight=0.25,
        )
        out = assert_matches_reference(loss_fn, features, labels, centres, valid)
        assert out.per_sample.shape == (10,) and not out.per_sample.requires_grad


def test_topk_with_k_beyond_the_valid_negatives_uses_all_of_them():
    features, labels, centres = make_batch(7)
    valid = torch.tensor([True, False, True, True, False])  # 2 negatives per sample at most
    many = FATLoss(aggregation="topk", k=50)
    assert_matches_reference(many, features, labels, centres, valid)
    mean_of_all = FATLoss(aggregation="topk", k=2).compute(features, labels, centres, valid)
    torch.testing.assert_close(many.compute(features, labels, centres, valid).loss, mean_of_all.loss)


def test_invalid_centres_are_excluded_from_negatives_and_their_samples_skipped():
    features, labels, centres = make_batch(3)
    labels[:3] = 2
    valid = torch.tensor([True, True, False, True, True])
    loss_fn = FATLoss(aggregation="mean", cohesion="mean")
    before = loss_fn.compute(features, labels, centres, valid)
    # Put the invalid centre exactly on a sample and at NaN: if it were used as a
    # negative (or positive) the loss would change or turn NaN.
    moved = centres.clone()
    moved[2] = float("nan")
    after = loss_fn.compute(features, labels, moved, valid)
    torch.testing.assert_close(after.loss, before.loss)
    (grad,) = torch.autograd.grad(after.loss, features)
    assert torch.isfinite(grad).all()
    assert torch.all(after.per_sample[:3] == 0)
    moved[2] = features[5].detach()
    torch.testing.assert_close(loss_fn.compute(features, labels, moved, valid).loss, before.loss)


def test_one_identity_in_the_batch_still_has_dataset_level_negatives():
    features, _, centres = make_batch(4)
    labels = torch.zeros(10, dtype=torch.long)
    assert_matches_reference(FATLoss(), features, labels, centres, torch.ones(5, dtype=torch.bool))


def test_a_single_valid_class_leaves_only_cohesion():
    features, labels, centres = make_batch(5, classes=3)
    labels[:] = 1
    valid = torch.tensor([False, True, False])
    out = assert_matches_reference(FATLoss(cohesion="mean"), features, labels, centres, valid)
    assert float(out.terms["p2s"]) == 0.0 and float(out.active_fraction) == 0.0
    assert float(out.terms["cohesion"]) > 0


def test_no_valid_centre_at_all_gives_zero_loss_with_a_graph():
    features, labels, centres = make_batch(6)
    out = FATLoss().compute(features, labels, centres, torch.zeros(5, dtype=torch.bool))
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert torch.all(features.grad == 0)


@pytest.mark.parametrize("fill", [0.0, 0.7])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("aggregation", ["hardest", "mean", "topk"])
def test_all_equal_or_zero_features_give_finite_loss_and_gradients(fill, normalize, aggregation):
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    features = torch.full((8, 6), fill, requires_grad=True)
    loss_fn = FATLoss(normalize=normalize, aggregation=aggregation, centre_mode=4 if normalize else 1)
    bank = loss_fn.new_centre_bank(4, 6, mode="epoch")
    bank.refresh(features.detach(), labels)  # every centre equals the (shared) feature
    out = loss_fn.compute(features, labels, bank)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(features.grad).all()
    assert float(out.terms["p2s"]) == pytest.approx(loss_fn.margin, abs=1e-5)


@pytest.mark.parametrize("aggregation", ["hardest", "mean"])
def test_a_zero_embedding_is_measured_from_the_origin_when_normalised(aggregation):
    features, labels, centres = make_batch(16)
    features = features.detach().clone()
    features[0] = 0.0
    features.requires_grad_(True)
    loss_fn = FATLoss.normalised(aggregation=aggregation, cohesion="mean")
    out = loss_fn.compute(features, labels, centres)
    reference, _ = fat_reference(
        features.detach(), labels, centres, torch.ones(5, dtype=torch.bool), 0.1, True, aggregation, 5, "mean", 0.1
    )
    torch.testing.assert_close(out.loss.detach(), reference)
    out.loss.backward()
    assert torch.isfinite(features.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_compute_in_float32(dtype):
    features, labels, centres = make_batch(8, dtype=torch.float32)
    half = features.detach().to(dtype).requires_grad_(True)
    loss_fn = FATLoss.normalised(aggregation="topk", k=3)
    out = loss_fn.compute(half, labels, centres)
    out.loss.backward()
    expected = loss_fn.compute(half.detach().float(), labels, centres).loss
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, expected)
    assert half.grad.dtype == dtype and torch.isfinite(half.grad.float()).all()


def test_centre_bank_and_tensor_centres_give_the_same_loss():
    features, labels, _ = make_batch(9, dtype=torch.float32)
    confident = torch.rand(10, generator=torch.Generator().manual_seed(1)) > 0.3
    loss_fn = FATLoss.normalised(cohesion="mean")
    bank = loss_fn.new_centre_bank(5, 5, mode="epoch")
    bank.refresh(features.detach(), labels, confident)
    from_bank = loss_fn.compute(features, labels, bank)
    from_tensor = loss_fn.compute(features, labels, bank.centres, bank.valid)
    torch.testing.assert_close(from_bank.loss, from_tensor.loss)
    assert torch.isfinite(from_bank.loss)


def test_gradient_reaches_the_embeddings_only():
    features, labels, centres = make_batch(10)
    centres.requires_grad_(True)
    FATLoss(aggregation="mean").compute(features, labels, centres).loss.backward()
    assert centres.grad is None and features.grad.abs().sum() > 0


def test_normalised_constructor_and_bank_mode_check():
    loss_fn = FATLoss.normalised()
    assert (loss_fn.normalize, loss_fn.centre_mode, loss_fn.margin) == (True, 4, 0.1)
    assert FATLoss().centre_mode == 1
    features, labels, _ = make_batch(11, dtype=torch.float32)
    with pytest.raises(ValueError, match="centre_mode=1"):
        loss_fn.compute(features, labels, CentreBank(5, 5, centre_mode=1))
    with pytest.raises(ValueError, match=r"class indices in \[0, 5\)"):
        loss_fn.compute(features, labels + 5, loss_fn.new_centre_bank(5, 5))
    with pytest.raises(ValueError, match="dim 5 but centres have dim 3"):
        loss_fn.compute(features, labels, torch.zeros(5, 3))
    with pytest.raises(ValueError, match="move the CentreBank"):
        loss_fn.compute(features, labels, torch.zeros(5, 5, device="meta"))


def test_forward_returns_the_scalar_of_compute():
    features, labels, centres = make_batch(12)
    loss_fn = FATLoss(aggregation="topk")
    torch.testing.assert_close(loss_fn(features, labels, centres), loss_fn.compute(features, labels, centres).loss)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    margin=st.floats(0.0, 2.0),
    aggregation=st.sampled_from(["hardest", "mean", "topk"]),
    k=st.integers(1, 6),
)
def test_fat_value_matches_loops_for_random_settings(seed, margin, aggregation, k):
    features, labels, centres = make_batch(seed, batch=8, dim=4, classes=4)
    valid = torch.rand(4, generator=torch.Generator().manual_seed(seed)) > 0.2
    loss_fn = FATLoss(margin=margin, aggregation=aggregation, k=k, cohesion_weight=0.1)
    out = loss_fn.compute(features, labels, centres, valid)
    reference, active = fat_reference(
        features, labels, centres, valid, margin, False, aggregation, k, "max_radius", 0.1
    )
    assert out.loss.item() == pytest.approx(reference.item(), rel=1e-6, abs=1e-9)
    assert math.isfinite(out.loss.item())


# ---------------------------------------------------------------- CentreBank


def centres_by_definition(features, labels, num_classes, mode):
    centres, valid = [], []
    for c in range(num_classes):
        members = [f for f, y in zip(features, labels) if int(y) == c]
        if not members:
            centres.append(torch.zeros(features.shape[1]))
            valid.append(False)
            continue
        if mode in (2, 4):
            members = [m / torch.sqrt((m * m).sum()) for m in members]
        mean = sum(members) / len(members)
        if mode in (3, 4):
            mean = mean / torch.sqrt((mean * mean).sum())
        centres.append(mean)
        valid.append(True)
    return torch.stack(centres), torch.tensor(valid)


@pytest.mark.parametrize("mode", sorted(CENTRE_MODES))
def test_centre_modes_match_their_definitions(mode):
    generator = torch.Generator().manual_seed(mode)
    features = torch.randn(20, 6, generator=generator) * 3 + 1
    labels = torch.randint(0, 4, (20,), generator=generator)
    labels[labels == 3] = 0  # class 3 has no sample
    bank = CentreBank(4, 6, centre_mode=mode)
    bank.refresh(features, labels)
    expected, expected_valid = centres_by_definition(features, labels, 4, mode)
    torch.testing.assert_close(bank.centres, expected)
    assert torch.equal(bank.valid, expected_valid)
    assert not bank.valid[3] and torch.all(bank.centres[3] == 0)
    norms = bank.centres[bank.valid].norm(dim=1)
    if mode in (3, 4):
        torch.testing.assert_close(norms, torch.ones_like(norms))


def test_only_confident_samples_form_centres_and_lacking_classes_are_invalid():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(12, 4, generator=generator)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    confident = torch.tensor([1, 0, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0], dtype=torch.bool)
    bank = CentreBank(4, 4, centre_mode=1)
    bank.refresh(features, labels, confident)
    expected, _ = centres_by_definition(features[confident], labels[confident], 4, 1)
    torch.testing.assert_close(bank.centres, expected)
    assert bank.valid.tolist() == [True, True, False, True]
    assert bank.counts.tolist() == [2, 3, 0, 1]
    assert torch.isfinite(bank.centres).all()
    centres, valid = compute_centres(features, labels, 4, centre_mode=1, confident_mask=confident)
    torch.testing.assert_close(centres, bank.centres)
    assert torch.equal(valid, bank.valid)


@pytest.mark.parametrize("mode", sorted(CENTRE_MODES))
def test_ema_updates_blend_batch_means_and_converge_to_refresh(mode):
    generator = torch.Generator().manual_seed(10 + mode)
    features = torch.randn(16, 5, generator=generator) + 2
    labels = torch.arange(16) % 4
    first, second = slice(0, 8), slice(8, 16)
    bank = CentreBank(4, 5, mode="ema", momentum=0.75, centre_mode=mode)
    bank.update(features[first], labels[first])
    refreshed = CentreBank(4, 5, centre_mode=mode)
    refreshed.refresh(features[first], labels[first])
    torch.testing.assert_close(bank.centres, refreshed.centres)  # first sight: the batch mean itself

    bank.update(features[second], labels[second])
    unit = (lambda x: x / x.norm(dim=1, keepdim=True)) if mode in (2, 4) else (lambda x: x)
    finish = (lambda x: x / x.norm(dim=1, keepdim=True)) if mode in (3, 4) else (lambda x: x)
    mean_first = torch.stack([unit(features[first][labels[first] == c]).mean(0) for c in range(4)])
    mean_second = torch.stack([unit(features[second][labels[second] == c]).mean(0) for c in range(4)])
    torch.testing.assert_close(bank.centres, finish(0.75 * mean_first + 0.25 * mean_second))
    assert bank.counts.tolist() == [4, 4, 4, 4]

    # Feeding the same data over and over converges to the full-pass centres.
    full = CentreBank(4, 5, centre_mode=mode)
    full.refresh(features, labels)
    for _ in range(80):
        bank.update(features, labels)
    torch.testing.assert_close(bank.centres, full.centres, atol=1e-5, rtol=1e-5)


def test_ema_leaves_absent_classes_alone_and_ignores_unconfident_samples():
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(6, 3, generator=generator)
    bank = CentreBank(3, 3, mode="ema", momentum=0.5, centre_mode=1)
    bank.update(features[:2], torch.tensor([0, 1]))
    before = bank.centres.clone()
    bank.update(features[2:4], torch.tensor([1, 2]), confident_mask=torch.tensor([False, False]))
    assert torch.equal(bank.centres, before) and bank.valid.tolist() == [True, True, False]
    bank.update(features[4:5], torch.tensor([1]))
    torch.testing.assert_close(bank.centres[1], 0.5 * features[1] + 0.5 * features[4])
    torch.testing.assert_close(bank.centres[0], before[0])


def test_epoch_bank_refuses_batch_updates():
    with pytest.raises(RuntimeError, match="mode='ema'"):
        CentreBank(3, 2, mode="epoch").update(torch.zeros(2, 2), torch.tensor([0, 1]))


def test_centre_bank_state_dict_round_trip():
    bank = CentreBank(3, 4, mode="ema")
    bank.update(torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert {"centres", "running_mean", "valid", "counts"} <= set(bank.state_dict())
    restored = CentreBank(3, 4, mode="ema")
    restored.load_state_dict(bank.state_dict())
    assert torch.equal(restored.centres, bank.centres) and torch.equal(restored.valid, bank.valid)
    moved = restored.to(torch.float64)
    assert moved.centres.dtype == torch.float64 and moved.valid.dtype == torch.bool


# ---------------------------------------------------------------- Hybrid


def test_hybrid_hard_and_smooth_targets_add_cross_entropy():
    features, labels, centres = make_batch(13)
    logits = torch.randn(10, 5, dtype=torch.float64, requires_grad=True)
    fat = FATLoss.normalised(cohesion="mean")
    fat_value = fat(features, labels, F.normalize(centres, dim=1))
    for target, smoothing in [("hard", 0.0), ("smooth", 0.2)]:
        hybrid = HybridFATLoss(fat, ce_weight=0.5, target=target, smoothing=0.2)
        out = hybrid.compute(features, logits, labels, F.normalize(centres, dim=1))
        expected = fat_value + 0.5 * F.cross_entropy(logits, labels, label_smoothing=smoothing)
        torch.testing.assert_close(out.loss, expected)
        assert set(out.terms) == {"p2s", "cohesion", "ce"}
        torch.testing.assert_close(sum(out.terms.values()), out.loss.detach())
        assert "accuracy" in out.stats


def test_hybrid_soft_targets_dense_and_sparse_agree_with_loops():
    features, labels, centres = make_batch(14)
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(10, 5, generator=generator, dtype=torch.float64).requires_grad_(True)
    ids = torch.stack([torch.randperm(5, generator=generator)[:3] for _ in range(10)])
    probs = torch.softmax(torch.randn(10, 3, generator=generator, dtype=torch.float64), dim=1) * 0.9
    fat = FATLoss(cohesion="mean")
    hybrid = HybridFATLoss(fat, target="soft")
    sparse = hybrid.compute(features, logits, labels, centres, soft_targets=(ids, probs))
    dense_targets = torch.zeros(10, 5, dtype=torch.float64).scatter_(1, ids, probs)
    dense = hybrid.compute(features, logits, labels, centres, soft_targets=dense_targets)
    torch.testing.assert_close(sparse.loss, dense.loss)

    ce = 0
    for i in range(10):
        log_z = torch.log(sum(torch.exp(logits[i, c]) for c in range(5)))
        mass = probs[i].sum()
        ce = ce + sum(-(probs[i, j] / mass) * (logits[i, ids[i, j]] - log_z) for j in range(3))
    expected = fat(features, labels, centres) + ce / 10
    torch.testing.assert_close(sparse.loss, expected)
    (grad,) = torch.autograd.grad(sparse.loss, logits)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(grad, expected_grad)


def test_hybrid_refuses_missing_or_ignored_soft_targets():
    features, labels, centres = make_batch(15)
    logits = torch.randn(10, 5)
    with pytest.raises(ValueError, match="pass the teacher's soft_targets"):
        HybridFATLoss(FATLoss(), target="soft")(features, logits, labels, centres)
    with pytest.raises(ValueError, match="would ignore the soft_targets"):
        HybridFATLoss(FATLoss(), target="hard")(
            features, logits, labels, centres, soft_targets=torch.full((10, 5), 0.2)
        )


def test_centre_bank_rejects_out_of_range_labels_and_wrong_dims():
    bank = CentreBank(3, 2, mode="ema")
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        bank.update(torch.zeros(2, 2), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        bank.refresh(torch.zeros(2, 2), torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match=r"features must be \(N, 2\)"):
        bank.update(torch.zeros(2, 5), torch.tensor([0, 1]))
    assert not bank.valid.any()
