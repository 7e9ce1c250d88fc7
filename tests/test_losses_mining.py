"""MSML and quadruplet losses against brute-force loops over every pair / quadruplet."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fat_distill.data import normalize_batch
from fat_distill.losses import (
    LOSSES,
    BatchHardTripletLoss,
    MarginSampleMiningLoss,
    QuadrupletLoss,
    closest_pair,
    distance_matrix,
    hardest_foreign_pairs,
)
from fat_distill.models import build_model
from fat_distill.train import (
    OBJECTIVES,
    TrainConfig,
    build_objective,
    build_train_data,
    device_settings,
    fit,
)
from tests.helpers import write_identity_images
from tests.loss_reference import dist


def pairs(labels, same):
    """Unordered pairs (i < j) of the batch with equal (same=True) or different labels."""
    return [(i, j) for i, j in itertools.combinations(range(len(labels)), 2) if (labels[i] == labels[j]) == same]


def msml_reference(f, labels, margin):
    positive, negative = pairs(labels, True), pairs(labels, False)
    if not positive or not negative:
        return None
    gap = torch.stack([dist(f[i], f[j]) for i, j in positive]).max() - torch.stack(
        [dist(f[m], f[n]) for m, n in negative]
    ).min()
    return F.softplus(gap) if margin == "soft" else torch.relu(gap + margin)


def msml_per_anchor_reference(f, labels, margin):
    """``[max_p d(a,p) - min_{m,n} d(m,n) + margin]_+`` per anchor, 0 without a positive."""
    negative = pairs(labels, False)
    out = []
    for a in range(len(f)):
        pos = [p for p in range(len(f)) if p != a and labels[p] == labels[a]]
        if not pos or not negative:
            out.append(0.0)
            continue
        gap = max(float(dist(f[a], f[p])) for p in pos) - min(float(dist(f[m], f[n])) for m, n in negative)
        out.append(math.log1p(math.exp(gap)) if margin == "soft" else max(gap + margin, 0.0))
    return torch.tensor(out, dtype=torch.float64)


def quadruplet_anchor_terms(f, labels, a, margin, quadruplet_margin, weight):
    """Anchor ``a``'s (triplet, weighted quadruplet) terms from loops, or None without a triplet."""
    others = [j for j in range(len(f)) if j != a]
    pos = [p for p in others if labels[p] == labels[a]]
    neg = [n for n in others if labels[n] != labels[a]]
    if not pos or not neg:
        return None
    d_ap = torch.stack([dist(f[a], f[p]) for p in pos]).max()
    d_an = torch.stack([dist(f[a], f[n]) for n in neg]).min()
    triplet = torch.relu(d_ap - d_an + margin)
    foreign = [(m, n) for m, n in pairs(labels, False) if labels[a] not in (labels[m], labels[n])]
    if not foreign:
        return triplet, torch.zeros_like(triplet)
    d_mn = torch.stack([dist(f[m], f[n]) for m, n in foreign]).min()
    return triplet, weight * torch.relu(d_ap - d_mn + quadruplet_margin)


def quadruplet_reference(f, labels, margin, quadruplet_margin, weight):
    terms = [quadruplet_anchor_terms(f, labels, a, margin, quadruplet_margin, weight) for a in range(len(f))]
    terms = [t for t in terms if t is not None]
    return sum(t + q for t, q in terms) / len(terms)


def make_batch(seed, batch=10, dim=5, classes=4, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    labels[:2] = torch.tensor([0, 0])  # at least one positive pair
    labels[2] = classes  # and a singleton identity
    means = torch.randn(classes + 1, dim, generator=generator, dtype=dtype)
    features = 0.6 * means[labels] + 0.5 * torch.randn(batch, dim, generator=generator, dtype=dtype)
    return features.requires_grad_(True), labels


def make_pk_batch(seed, p=4, k=3, dim=6):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(p).repeat_interleave(k)[torch.randperm(p * k, generator=generator)]
    means = torch.randn(p, dim, generator=generator, dtype=torch.float64)
    features = 0.5 * means[labels] + 0.5 * torch.randn(p * k, dim, generator=generator, dtype=torch.float64)
    return features.requires_grad_(True), labels


BATCHES = {
    **{f"irregular{seed}": (lambda seed=seed: make_batch(seed)) for seed in range(3)},
    **{f"pk{seed}": (lambda seed=seed: make_pk_batch(seed)) for seed in range(2)},
}


def assert_value_and_gradient(out, features, reference):
    (grad,) = torch.autograd.grad(out.loss, features)
    (reference_grad,) = torch.autograd.grad(reference, features)
    torch.testing.assert_close(out.loss, reference, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(sum(out.terms.values()), out.loss.detach())
    assert out.per_sample.shape == features.shape[:1] and not out.per_sample.requires_grad
    assert 0.0 <= float(out.active_fraction) <= 1.0


# ---------------------------------------------------------------- MSML


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("margin", [0.0, 0.6, 2.0, "soft"])
def test_msml_matches_loops(batch, margin):
    features, labels = BATCHES[batch]()
    y = labels.tolist()
    out = MarginSampleMiningLoss(margin).compute(features, labels)
    assert_value_and_gradient(out, features, msml_reference(features, y, margin))
    assert set(out.terms) == {"msml"}

    per_anchor = msml_per_anchor_reference(features.detach(), y, margin)
    torch.testing.assert_close(out.per_sample, per_anchor, rtol=1e-9, atol=1e-12)
    # the batch reduction is a max (of the same values computed along another path: equal to rounding)
    assert out.loss.item() == pytest.approx(out.per_sample.max().item(), rel=1e-12, abs=0)
    has_positive = [any(y[p] == y[a] for p in range(len(y)) if p != a) for a in range(len(y))]
    active = [float(per_anchor[a]) > (math.log(2) if margin == "soft" else 0) for a in range(len(y))]
    expected_active = sum(a and h for a, h in zip(active, has_positive)) / sum(has_positive)
    assert float(out.active_fraction) == pytest.approx(expected_active)

    f = features.detach()
    hardest_positive = max(float(dist(f[i], f[j])) for i, j in pairs(y, True))
    hardest_negative = min(float(dist(f[m], f[n])) for m, n in pairs(y, False))
    assert float(out.stats["pos_dist"]) == pytest.approx(hardest_positive, rel=1e-9)
    assert float(out.stats["neg_dist"]) == pytest.approx(hardest_negative, rel=1e-9)


def test_msml_gradient_reaches_only_the_two_mined_pairs():
    features, labels = make_pk_batch(7, p=4, k=4)
    out = MarginSampleMiningLoss(5.0).compute(features, labels)  # large margin: the hinge is active
    (grad,) = torch.autograd.grad(out.loss, features)
    y, f = labels.tolist(), features.detach()
    hardest_positive = max(pairs(y, True), key=lambda ij: float(dist(f[ij[0]], f[ij[1]])))
    hardest_negative = min(pairs(y, False), key=lambda mn: float(dist(f[mn[0]], f[mn[1]])))
    touched = {i for i in range(len(y)) if grad[i].abs().sum() > 0}
    assert touched == set(hardest_positive) | set(hardest_negative)


def test_msml_negative_pair_need_not_contain_the_anchor():
    # Identities 0 and 1 are spread out, 2 and 3 sit close together: the hardest
    # positive pair is (0, 1) at 4, the hardest negative pair (4, 6) at 0.3.
    features = torch.tensor(
        [[0.0, 0.0], [4.0, 0.0], [0.0, 10.0], [3.0, 10.0], [20.0, 0.0], [20.0, 0.5], [20.3, 0.0], [20.3, 0.6]],
        dtype=torch.float64,
    ).requires_grad_(True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    out = MarginSampleMiningLoss(0.5).compute(features, labels)
    torch.testing.assert_close(out.loss, torch.tensor(4.0 - 0.3 + 0.5, dtype=torch.float64))
    # each anchor's own hardest positive against the batch's hardest negative pair
    expected = torch.tensor([4.2, 4.2, 3.2, 3.2, 0.7, 0.7, 0.8, 0.8], dtype=torch.float64)
    torch.testing.assert_close(out.per_sample, expected)
    (grad,) = torch.autograd.grad(out.loss, features)
    assert grad[[0, 1, 4, 6]].norm(dim=1).min() > 0 and grad[[2, 3, 5, 7]].abs().sum() == 0
    # a descent step pulls 0 toward 1 and pushes 4 away from 6, along x, at unit rate
    torch.testing.assert_close(grad[0], torch.tensor([-1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(grad[4], torch.tensor([1.0, 0.0], dtype=torch.float64))


def test_closest_pair_searches_the_upper_triangle_only():
    features = torch.tensor([[0.0], [1.0], [5.0], [5.5]])
    distances = distance_matrix(features, features)
    labels = torch.tensor([0, 1, 1, 2])
    negative = labels.unsqueeze(0) != labels.unsqueeze(1)
    pair, found = closest_pair(distances, negative)
    assert pair.tolist() == [2, 3] and bool(found)
    _, found = closest_pair(distances, torch.zeros(4, 4, dtype=torch.bool))
    assert not bool(found)


# ---------------------------------------------------------------- quadruplet


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("margins", [(0.3, None, 1.0), (1.0, 0.5, 0.7), (0.0, 0.0, 1.0), (2.0, 1.5, 2.0)])
def test_quadruplet_matches_loops(batch, margins):
    margin, quadruplet_margin, weight = margins
    features, labels = BATCHES[batch]()
    y = labels.tolist()
    loss_fn = QuadrupletLoss(margin, quadruplet_margin, weight)
    quadruplet_margin = margin / 2 if quadruplet_margin is None else quadruplet_margin
    assert loss_fn.quadruplet_margin == quadruplet_margin
    out = loss_fn.compute(features, labels)
    assert_value_and_gradient(out, features, quadruplet_reference(features, y, margin, quadruplet_margin, weight))
    assert set(out.terms) == {"triplet", "quadruplet"}

    f = features.detach()
    anchors = [quadruplet_anchor_terms(f, y, a, margin, quadruplet_margin, weight) for a in range(len(y))]
    expected = [0.0 if t is None else float(t[0] + t[1]) for t in anchors]
    torch.testing.assert_close(out.per_sample, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    with_triplet = [t for t in anchors if t is not None]
    triplet_mean = sum(float(t) for t, _ in with_triplet) / len(with_triplet)
    assert float(out.terms["triplet"]) == pytest.approx(triplet_mean, rel=1e-9, abs=1e-12)
    # >= 3 identities: every anchor with a triplet also has a foreign pair, 2 hinges each
    hinges = [float(t) > 0 for t, _ in with_triplet] + [float(q) > 0 for _, q in with_triplet]
    assert float(out.active_fraction) == pytest.approx(sum(hinges) / len(hinges))


def test_quadruplet_with_two_identities_is_the_batch_hard_triplet():
    features, labels = make_pk_batch(3, p=2, k=4)
    out = QuadrupletLoss(0.5, 0.4).compute(features, labels)
    reference = quadruplet_reference(features, labels.tolist(), 0.5, 0.4, 1.0)
    assert_value_and_gradient(out, features, reference)
    assert float(out.terms["quadruplet"]) == 0.0 and float(out.stats["pair_dist"]) == 0.0
    torch.testing.assert_close(out.loss, BatchHardTripletLoss(0.5).compute(features, labels).loss)


def test_quadruplet_pair_excludes_the_anchor_identity():
    # The closest negative pair of the batch is (0, 2), identities 0 and 1; anchors
    # of identity 0 and 1 must fall back to the closest pair without their own samples.
    features = torch.tensor([[0.0], [3.0], [0.1], [3.2], [10.0], [10.6], [20.0], [21.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    first, second, has_pair = hardest_foreign_pairs(distance_matrix(features, features), labels)
    found = {a: tuple(sorted((int(first[a]), int(second[a])))) for a in range(8)}
    assert found[4] == found[6] == (0, 2)  # identities 2 and 3 use the global pair
    assert found[0] == found[1] == (3, 4)  # identity 0: closest pair of identities 1, 2, 3 is 3.2 vs 10.0
    assert found[2] == found[3] == (1, 4)  # identity 1: 3.0 vs 10.0
    assert has_pair.all()


def test_quadruplet_pair_needs_a_third_identity_not_a_third_positive_pair():
    # A singleton third identity is enough: anchors of identity 0 use a pair of
    # identities 1 and 2; the singleton itself has no triplet and holds 0.
    features, _ = make_batch(5, batch=7, classes=2)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    out = QuadrupletLoss(0.4, 0.2).compute(features, labels)
    assert_value_and_gradient(out, features, quadruplet_reference(features, labels.tolist(), 0.4, 0.2, 1.0))
    assert float(out.per_sample[6]) == 0.0 and float(out.stats["pair_dist"]) > 0
    _, _, has_pair = hardest_foreign_pairs(distance_matrix(features.detach(), features.detach()), labels)
    assert has_pair.all()
    # without the singleton only two identities remain: no anchor has a pair
    two = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    out = QuadrupletLoss(0.4, 0.2).compute(features, two)
    assert float(out.terms["quadruplet"]) == 0.0
    assert_value_and_gradient(out, features, quadruplet_reference(features, two.tolist(), 0.4, 0.2, 1.0))


def test_constructor_errors_name_the_loss_and_the_argument():
    with pytest.raises(ValueError, match="MarginSampleMiningLoss: margin"):
        MarginSampleMiningLoss("hard")
    with pytest.raises(ValueError, match="QuadrupletLoss: margin must be a number.*soft"):
        QuadrupletLoss("soft")
    with pytest.raises(ValueError, match="labels must be"):
        QuadrupletLoss().compute(torch.randn(4, 3), torch.zeros(3, dtype=torch.long))


# ---------------------------------------------------------------- edge cases, dtypes, registry

MINING_LOSSES = {
    "msml": lambda: MarginSampleMiningLoss(0.6),
    "msml_soft": lambda: MarginSampleMiningLoss("soft"),
    "quadruplet": lambda: QuadrupletLoss(),
}


@pytest.mark.parametrize("name", sorted(MINING_LOSSES))
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
    features = features.clone().requires_grad_(True)
    out = MINING_LOSSES[name]().compute(features, labels)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(features.grad).all()
    assert torch.isfinite(out.per_sample).all() and all(torch.isfinite(v) for v in out.stats.values())
    if labels.unique().numel() in (1, 8):  # no positive pair or no negative pair
        assert out.loss.item() == 0.0 and torch.all(features.grad == 0)
        assert torch.all(out.per_sample == 0) and out.active_fraction.item() == 0.0
    if features.detach().std() == 0 and labels.unique().numel() == 5:
        # coincident points: every hinge sits at its margin, with a zero (not NaN) gradient
        expected = math.log(2) if name == "msml_soft" else {"msml": 0.6, "quadruplet": 0.3 + 0.15}[name]
        assert out.loss.item() == pytest.approx(expected, rel=1e-5)
        assert torch.all(features.grad == 0)


@pytest.mark.parametrize("name", sorted(MINING_LOSSES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_return_float32(name, dtype):
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(12, 6, generator=generator).to(dtype).requires_grad_(True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    loss_fn = MINING_LOSSES[name]()
    out = loss_fn.compute(features, labels)
    (grad,) = torch.autograd.grad(out.loss, features)
    reference = loss_fn.compute(features.detach().float(), labels)
    assert out.loss.dtype == torch.float32 and grad.dtype == dtype and torch.isfinite(grad.float()).all()
    torch.testing.assert_close(out.loss, reference.loss)


def test_registry_and_objective_names():
    assert LOSSES["margin_sample_mining"] is MarginSampleMiningLoss
    assert LOSSES["quadruplet"] is QuadrupletLoss
    assert {"ce_msml", "ce_quadruplet"} <= set(OBJECTIVES)


# ---------------------------------------------------------------- properties


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    batch=st.integers(4, 12),
    classes=st.integers(1, 5),
    name=st.sampled_from(sorted(MINING_LOSSES)),
    shift=st.floats(-20, 20),
)
def test_losses_are_nonnegative_and_invariant_to_permutation_and_translation(seed, batch, classes, name, shift):
    features, labels = make_batch(seed, batch=batch, classes=classes)
    features = features.detach()
    loss_fn = MINING_LOSSES[name]()
    out = loss_fn.compute(features, labels)
    order = torch.randperm(batch, generator=torch.Generator().manual_seed(seed))
    permuted = loss_fn.compute(features[order], labels[order])
    moved = loss_fn.compute(features + shift, labels)
    assert out.loss.item() >= 0 and bool((out.per_sample >= 0).all())
    assert math.isclose(out.loss.item(), permuted.loss.item(), rel_tol=1e-9, abs_tol=1e-12)
    torch.testing.assert_close(out.per_sample[order], permuted.per_sample, rtol=1e-9, atol=1e-12)
    assert math.isclose(out.loss.item(), moved.loss.item(), rel_tol=1e-7, abs_tol=1e-9)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), margin=st.floats(0.0, 2.0), batch=st.integers(4, 10))
def test_msml_bounds_every_batch_hard_term(seed, margin, batch):
    # The global hardest pairs dominate every anchor's own: MSML >= each anchor's batch-hard term.
    features, labels = make_batch(seed, batch=batch, classes=3)
    msml = MarginSampleMiningLoss(margin).compute(features, labels)
    batch_hard = BatchHardTripletLoss(margin).compute(features, labels)
    assert bool((batch_hard.per_sample <= msml.loss + 1e-12).all())
    assert bool((batch_hard.per_sample <= msml.per_sample + 1e-12).all())


# ---------------------------------------------------------------- training with the new objectives


@pytest.fixture(scope="module")
def image_frame(tmp_path_factory):
    root = tmp_path_factory.mktemp("mining_imgs")
    return root, write_identity_images(root, identities=4, per_identity=4)


@pytest.mark.parametrize("objective", ["ce_msml", "ce_quadruplet"])
def test_objective_trains_a_small_model(image_frame, objective):
    root, frame = image_frame
    config = TrainConfig(image_size=(32, 16), epochs=2, batch_p=3, batch_k=2, lr=3e-3, warmup_epochs=0.5,
                         pad=2, seed=3)
    data = build_train_data(frame, root, config)
    torch.manual_seed(config.seed)
    model = build_model("small_cnn", data.num_classes, embedding_dim=16)
    built = build_objective(objective, model=model, num_classes=data.num_classes, num_samples=len(data.dataset),
                            image_size=config.image_size, triplet_margin=0.3)
    assert type(built.metric_loss) is {"ce_msml": MarginSampleMiningLoss, "ce_quadruplet": QuadrupletLoss}[objective]

    # Gradients flow from the metric term alone into the backbone, and a few steps on
    # one fixed batch lower the objective.
    images, labels, indices = next(iter(torch.utils.data.DataLoader(data.dataset, batch_sampler=data.batch_sampler)))
    images = normalize_batch(images)  # the dataset yields uint8; fit normalises (and augments) batches
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    metric = built.compute(model(images), labels, indices).terms["metric"]
    losses = []
    for _ in range(8):  # the first Adam steps can overshoot on one batch; 8 settle for both losses
        optimiser.zero_grad()
        out = built.compute(model(images), labels, indices)
        out.loss.backward()
        losses.append(out.loss.item())
        optimiser.step()
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert float(metric) >= 0.0

    result = fit(model, built, data.dataset, data.batch_sampler, config=config,
                 settings=device_settings(torch.device("cpu")), checkpoint_dir=root / f"ckpt_{objective}",
                 stage="unit", feature_dataset=data.feature_dataset, progress=False)
    assert len(result.history) == 2
    assert all(math.isfinite(h["loss"]) and 0.0 <= h["active_fraction"] <= 1.0 for h in result.history)


def test_metric_loss_gradient_reaches_the_backbone():
    torch.manual_seed(0)
    model = build_model("small_cnn", 4, embedding_dim=16)
    images = torch.randn(8, 3, 32, 16)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    for loss_fn in (MarginSampleMiningLoss(5.0), QuadrupletLoss(5.0)):  # large margins: hinges active
        model.zero_grad()
        loss_fn(model(images).features, labels).backward()
        grads = [p.grad for name, p in model.named_parameters() if "classifier" not in name]
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
        assert all(g is None or torch.isfinite(g).all() for g in grads)
