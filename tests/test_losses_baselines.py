"""Baseline losses against brute-force loops over every triplet / pair / sample."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fat_distill.losses import (
    LOSSES,
    BatchAllTripletLoss,
    BatchHardTripletLoss,
    CentreLoss,
    ContrastiveLoss,
    IdentityLoss,
    ImprovedTripletLoss,
    LabelSmoothingCrossEntropy,
    LiftedStructuredLoss,
    SoftTargetCrossEntropy,
)
from tests.loss_reference import dist


def positives_and_negatives(labels, a):
    others = [j for j in range(len(labels)) if j != a]
    return (
        [p for p in others if labels[p] == labels[a]],
        [n for n in others if labels[n] != labels[a]],
    )


def batch_hard_reference(f, labels, margin):
    terms = []
    for a in range(len(f)):
        pos, neg = positives_and_negatives(labels, a)
        if not pos or not neg:
            continue
        gap = torch.stack([dist(f[a], f[p]) for p in pos]).max() - torch.stack(
            [dist(f[a], f[n]) for n in neg]
        ).min()
        terms.append(F.softplus(gap) if margin == "soft" else torch.relu(gap + margin))
    return sum(terms) / len(terms) if terms else None


def batch_all_reference(f, labels, margin, ignore_zero):
    terms = []
    for a in range(len(f)):
        pos, neg = positives_and_negatives(labels, a)
        terms += [torch.relu(dist(f[a], f[p]) - dist(f[a], f[n]) + margin) for p in pos for n in neg]
    count = sum(float(t.detach()) > 0 for t in terms) if ignore_zero else len(terms)
    return sum(terms) / max(count, 1)


def improved_reference(f, labels, margin, pos_margin, pos_weight):
    terms = []
    for a in range(len(f)):
        pos, neg = positives_and_negatives(labels, a)
        if not pos or not neg:
            continue
        d_ap = torch.stack([dist(f[a], f[p]) for p in pos]).max()
        d_an = torch.stack([dist(f[a], f[n]) for n in neg]).min()
        terms.append(torch.relu(d_ap - d_an + margin) + pos_weight * torch.relu(d_ap - pos_margin))
    return sum(terms) / len(terms)


def contrastive_reference(f, labels, pos_margin, neg_margin):
    pos_terms, neg_terms = [], []
    for i in range(len(f)):
        for j in range(i + 1, len(f)):
            d = dist(f[i], f[j])
            if labels[i] == labels[j]:
                pos_terms.append(torch.relu(d - pos_margin))
            else:
                neg_terms.append(torch.relu(neg_margin - d))

    def mean_nonzero(terms):
        count = sum(float(t.detach()) > 0 for t in terms)
        return sum(terms) / max(count, 1) if terms else 0

    return mean_nonzero(pos_terms) + mean_nonzero(neg_terms)


def lifted_reference(f, labels, margin):
    total, pairs = 0, 0
    for i in range(len(f)):
        for j in range(i + 1, len(f)):
            if labels[i] != labels[j]:
                continue
            exps = [torch.exp(margin - dist(f[i], f[k])) for k in range(len(f)) if labels[k] != labels[i]]
            exps += [torch.exp(margin - dist(f[j], f[k])) for k in range(len(f)) if labels[k] != labels[j]]
            if not exps:
                continue
            lifted = torch.log(sum(exps)) + dist(f[i], f[j])
            total = total + torch.relu(lifted) ** 2
            pairs += 1
    return total / (2 * max(pairs, 1))


def make_batch(seed, batch=10, dim=5, classes=4, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    labels[:2] = torch.tensor([0, 0])  # at least one positive pair
    labels[2] = classes  # and a singleton identity
    means = torch.randn(classes + 1, dim, generator=generator, dtype=dtype)
    features = 0.6 * means[labels] + 0.5 * torch.randn(batch, dim, generator=generator, dtype=dtype)
    return features.requires_grad_(True), labels


def assert_value_and_gradient(loss_fn: IdentityLoss, reference_fn, features, labels):
    out = loss_fn.compute(features, labels)
    (grad,) = torch.autograd.grad(out.loss, features)
    reference = reference_fn(features, labels.tolist())
    (reference_grad,) = torch.autograd.grad(reference, features)
    torch.testing.assert_close(out.loss, reference, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(sum(out.terms.values()), out.loss.detach())
    assert out.per_sample.shape == (len(labels),) and not out.per_sample.requires_grad
    assert 0.0 <= float(out.active_fraction) <= 1.0
    return out


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("margin", [0.3, 1.5, "soft"])
def test_batch_hard_matches_loops(seed, margin):
    features, labels = make_batch(seed)
    out = assert_value_and_gradient(
        BatchHardTripletLoss(margin), lambda f, y: batch_hard_reference(f, y, margin), features, labels
    )
    assert float(out.per_sample[2]) == 0.0  # the singleton has no positive


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("ignore_zero", [True, False])
def test_batch_all_matches_loops(seed, ignore_zero):
    features, labels = make_batch(seed, batch=9)
    out = assert_value_and_gradient(
        BatchAllTripletLoss(0.4, ignore_zero=ignore_zero),
        lambda f, y: batch_all_reference(f, y, 0.4, ignore_zero),
        features,
        labels,
    )
    y, f = labels.tolist(), features.detach()
    all_terms = [
        float(dist(f[a], f[p]) - dist(f[a], f[n])) + 0.4
        for a in range(9)
        for p in positives_and_negatives(y, a)[0]
        for n in positives_and_negatives(y, a)[1]
    ]
    assert float(out.active_fraction) == pytest.approx(sum(t > 0 for t in all_terms) / len(all_terms))


@pytest.mark.parametrize("seed", range(3))
def test_improved_triplet_matches_loops(seed):
    features, labels = make_batch(seed)
    out = assert_value_and_gradient(
        ImprovedTripletLoss(margin=0.3, pos_margin=0.4, pos_weight=0.7),
        lambda f, y: improved_reference(f, y, 0.3, 0.4, 0.7),
        features,
        labels,
    )
    assert set(out.terms) == {"triplet", "positive"}


@pytest.mark.parametrize("seed", range(3))
def test_contrastive_matches_loops(seed):
    features, labels = make_batch(seed)
    assert_value_and_gradient(
        ContrastiveLoss(pos_margin=0.3, neg_margin=1.2),
        lambda f, y: contrastive_reference(f, y, 0.3, 1.2),
        features,
        labels,
    )


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("margin", [0.5, 1.0])
def test_lifted_structured_matches_loops(seed, margin):
    features, labels = make_batch(seed)
    assert_value_and_gradient(
        LiftedStructuredLoss(margin), lambda f, y: lifted_reference(f, y, margin), features, labels
    )


def test_centre_loss_matches_loops_and_trains_its_centres():
    features, labels = make_batch(0)
    loss_fn = CentreLoss(num_classes=5, dim=5).double()
    out = loss_fn.compute(features, labels)
    out.loss.backward()
    centres = loss_fn.centres.detach().clone().requires_grad_(True)
    feats = features.detach().clone().requires_grad_(True)
    reference = sum(((feats[i] - centres[int(y)]) ** 2).sum() for i, y in enumerate(labels)) / len(labels)
    reference.backward()
    torch.testing.assert_close(out.loss, reference)
    torch.testing.assert_close(features.grad, feats.grad)
    torch.testing.assert_close(loss_fn.centres.grad, centres.grad)
    assert list(loss_fn.parameters())[0] is loss_fn.centres


def test_label_smoothing_cross_entropy_matches_torch_and_loops():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (8,), generator=generator)
    for smoothing in (0.0, 0.1, 0.3):
        out = LabelSmoothingCrossEntropy(smoothing).compute(logits, labels)
        torch.testing.assert_close(out.loss, F.cross_entropy(logits, labels, label_smoothing=smoothing))
        loops = 0
        for i in range(8):
            log_z = torch.log(sum(torch.exp(logits[i, c]) for c in range(5)))
            for c in range(5):
                q = (1 - smoothing) * (c == int(labels[i])) + smoothing / 5
                loops = loops - q * (logits[i, c] - log_z)
        torch.testing.assert_close(out.loss, loops / 8)
        (grad,) = torch.autograd.grad(out.loss, logits)
        (loops_grad,) = torch.autograd.grad(loops / 8, logits)
        torch.testing.assert_close(grad, loops_grad)
        accuracy = (logits.argmax(1) == labels).double().mean()
        torch.testing.assert_close(out.stats["accuracy"], accuracy.float())


def test_soft_target_cross_entropy_dense_sparse_and_padding():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    dense = torch.softmax(torch.randn(6, 4, generator=generator, dtype=torch.float64), dim=1)
    loss_fn = SoftTargetCrossEntropy()
    out = loss_fn.compute(logits, dense)
    loops = sum(
        -dense[i, c] * torch.log(torch.exp(logits[i, c]) / sum(torch.exp(logits[i])))
        for i in range(6)
        for c in range(4)
    ) / 6
    torch.testing.assert_close(out.loss, loops)
    (grad,) = torch.autograd.grad(out.loss, logits)
    (loops_grad,) = torch.autograd.grad(loops, logits)
    torch.testing.assert_close(grad, loops_grad)

    ids = torch.tensor([[2, 0, -1]] * 6)  # -1 is padding for a row with fewer than k classes
    probs = torch.tensor([[0.6, 0.2, 0.0]] * 6, dtype=torch.float64)
    sparse = loss_fn.compute(logits, (ids, probs))
    as_dense = torch.zeros(6, 4, dtype=torch.float64)
    as_dense[:, 2], as_dense[:, 0] = 0.75, 0.25  # renormalised top-k mass
    torch.testing.assert_close(sparse.loss, loss_fn.compute(logits, as_dense).loss)

    with pytest.raises(ValueError, match="zero probability mass"):
        loss_fn.compute(logits, torch.zeros(6, 4))
    with pytest.raises(ValueError, match="must be < 4"):
        loss_fn.compute(logits, (ids + 3, probs))
    with pytest.raises(ValueError, match=">= 0"):
        loss_fn.compute(logits, -dense)


@pytest.mark.parametrize("epsilon", [0.1, 0.3])
def test_smoothed_soft_targets_match_loops_and_one_hot_equals_label_smoothing(epsilon):
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    q = torch.softmax(torch.randn(5, 4, generator=generator, dtype=torch.float64), dim=1)
    out = SoftTargetCrossEntropy(smoothing=epsilon).compute(logits, q)
    loops = sum(-((1 - epsilon) * q[i, c] + epsilon / 4) * torch.log_softmax(logits[i], 0)[c]
                for i in range(5) for c in range(4)) / 5
    torch.testing.assert_close(out.loss, loops)
    (grad,) = torch.autograd.grad(out.loss, logits)
    (loops_grad,) = torch.autograd.grad(loops, logits)
    torch.testing.assert_close(grad, loops_grad)
    # a one-hot soft target smoothed by epsilon is label smoothing of that label
    labels = torch.tensor([0, 3, 1, 1, 2])
    one_hot = torch.nn.functional.one_hot(labels, 4).double()
    torch.testing.assert_close(SoftTargetCrossEntropy(smoothing=epsilon).compute(logits, one_hot).loss,
                               LabelSmoothingCrossEntropy(epsilon).compute(logits, labels).loss)
    # accuracy still compares with the unsmoothed target's arg-max
    assert out.stats["accuracy"] == (logits.argmax(1) == q.argmax(1)).float().mean()
    with pytest.raises(ValueError, match="smoothing"):
        SoftTargetCrossEntropy(smoothing=1.0)


# ---------------------------------------------------------------- edge cases for every embedding loss

EMBEDDING_LOSSES = {
    "batch_hard": lambda: BatchHardTripletLoss(0.3),
    "batch_hard_soft": lambda: BatchHardTripletLoss("soft"),
    "batch_all": lambda: BatchAllTripletLoss(0.3),
    "improved": lambda: ImprovedTripletLoss(),
    "contrastive": lambda: ContrastiveLoss(0.1, 1.0),
    "lifted": lambda: LiftedStructuredLoss(1.0),
    "centre": lambda: CentreLoss(8, 6),
}


def loss_and_grad(loss_fn, features, labels):
    features = features.detach().clone().requires_grad_(True)
    out = loss_fn.compute(features, labels)
    out.loss.backward()
    return out, features.grad


@pytest.mark.parametrize("name", sorted(EMBEDDING_LOSSES))
@pytest.mark.parametrize(
    "features",
    [torch.zeros(8, 6), torch.full((8, 6), 0.37), torch.randn(8, 6, generator=torch.Generator().manual_seed(0))],
    ids=["all_zero", "all_equal", "random"],
)
@pytest.mark.parametrize(
    "labels",
    [torch.zeros(8, dtype=torch.long), torch.arange(8), torch.tensor([0, 0, 1, 1, 2, 2, 3, 4])],
    ids=["one_identity", "all_singletons", "mixed"],
)
def test_degenerate_batches_give_finite_losses_and_gradients(name, features, labels):
    out, grad = loss_and_grad(EMBEDDING_LOSSES[name](), features, labels)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all(), name
    assert torch.isfinite(out.per_sample).all() and torch.isfinite(out.active_fraction)
    if name != "centre" and name != "contrastive" and (labels.unique().numel() in (1, 8)):
        # no (anchor, positive, negative) combination exists
        assert out.loss.item() == 0.0 and torch.all(grad == 0)


@pytest.mark.parametrize("name", sorted(EMBEDDING_LOSSES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_return_float32(name, dtype):
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(8, 6, generator=generator).to(dtype)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    loss_fn = EMBEDDING_LOSSES[name]()
    out, grad = loss_and_grad(loss_fn, features, labels)
    reference, _ = loss_and_grad(loss_fn, features.float(), labels)
    assert out.loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(out.loss, reference.loss)
    assert torch.isfinite(grad.float()).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cross_entropies_take_half_precision_logits(dtype):
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 5, generator=generator).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 5, (6,), generator=generator)
    soft = torch.softmax(torch.randn(6, 5, generator=generator), dim=1).to(dtype)
    for loss_fn, target in [(LabelSmoothingCrossEntropy(0.1), labels), (SoftTargetCrossEntropy(), soft)]:
        out = loss_fn.compute(logits, target)
        (grad,) = torch.autograd.grad(out.loss, logits)
        expected = loss_fn.compute(logits.detach().float(), target.float() if target.is_floating_point() else target)
        assert out.loss.dtype == torch.float32 and grad.dtype == dtype
        torch.testing.assert_close(out.loss, expected.loss)


def test_registry_names_every_public_loss():
    assert all(issubclass(cls, IdentityLoss) for cls in LOSSES.values())
    assert {"fat", "hybrid_fat", "batch_hard_triplet", "soft_target_ce"} <= set(LOSSES)


# ---------------------------------------------------------------- properties


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), margin=st.floats(0.0, 2.0), batch=st.integers(4, 10))
def test_batch_hard_is_the_largest_batch_all_term_of_each_anchor(seed, margin, batch):
    features, labels = make_batch(seed, batch=batch, classes=3)
    out = BatchHardTripletLoss(margin).compute(features, labels)
    y, f = labels.tolist(), features.detach()
    for a in range(batch):
        pos, neg = positives_and_negatives(y, a)
        if not pos or not neg:
            assert float(out.per_sample[a]) == 0.0
            continue
        largest = max(
            max(float(dist(f[a], f[p]) - dist(f[a], f[n])) + margin, 0.0)
            for p in pos
            for n in neg
        )
        assert float(out.per_sample[a]) == pytest.approx(largest, rel=1e-9, abs=1e-12)


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    shift=st.floats(-50, 50),
    name=st.sampled_from(["batch_hard", "batch_hard_soft", "batch_all", "improved", "contrastive", "lifted"]),
)
def test_pairwise_losses_are_translation_invariant(seed, shift, name):
    features, labels = make_batch(seed)
    loss_fn = EMBEDDING_LOSSES[name]()
    moved = loss_fn.compute(features + shift, labels).loss.item()
    assert math.isclose(loss_fn.compute(features, labels).loss.item(), moved, rel_tol=1e-7, abs_tol=1e-9)
