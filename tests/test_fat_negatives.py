"""FATLoss negative sets (all centres, centre short list, in-batch hardest) against brute-force loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fat_distill.losses import CentreBank, FATLoss, HybridFATLoss, LossOutput, nearest_centres
from fat_distill.losses.distances import gathered_squared_distances
from tests.loss_reference import dist

NEGATIVES = ["all_centres", "centre_shortlist", "batch_hardest"]
AGGREGATIONS = ["hardest", "mean", "topk"]


def fat_negatives_reference(
    features, labels, centres, valid, *, margin, normalize, aggregation, k, cohesion, weight, negatives
) -> tuple[torch.Tensor, float]:
    """FAT with each negative set written as loops over samples and centres; returns (loss, active fraction).

    - all_centres: every other valid centre;
    - centre_shortlist: the k valid centres nearest to the sample's *own centre*;
    - batch_hardest: the k samples of other identities nearest to the sample, detached.

    ``topk`` averages the k negatives nearest to the sample (all of them for the
    two k-sized sets); ``hardest`` takes the nearest; ``mean`` the mean over violating.
    """
    if normalize:  # F.normalize: f / max(|f|, 1e-12)
        features = torch.stack([f / torch.sqrt((f * f).sum()).clamp_min(1e-12) for f in features])
    p2s_terms, pos_dists = [], []
    looked_at = active = 0
    for i, f in enumerate(features):
        y = int(labels[i])
        if not valid[y]:
            continue
        d_pos = dist(f, centres[y])
        pos_dists.append(d_pos)
        others = [c for c in range(len(centres)) if c != y and valid[c]]
        if negatives == "all_centres":
            pool = [dist(f, centres[c]) for c in others]
        elif negatives == "centre_shortlist":
            near_own = sorted(others, key=lambda c: float(dist(centres[y], centres[c])))[:k]
            pool = [dist(f, centres[c]) for c in near_own]
        else:
            strangers = [j for j in range(len(features)) if int(labels[j]) != y]
            nearest = sorted(strangers, key=lambda j: float(dist(f, features[j]).detach()))[:k]
            pool = [dist(f, features[j].detach()) for j in nearest]
        pool.sort(key=lambda d: float(d.detach()))
        if not pool:
            continue
        hinges = [torch.relu(d_pos - d + margin) for d in pool]
        if aggregation == "hardest":
            chosen = hinges[:1]
            term = chosen[0]
        elif aggregation == "topk":
            chosen = hinges[:k]
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


def make_batch(seed: int, batch: int = 12, dim: int = 6, classes: int = 7, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    centres = torch.randn(classes, dim, generator=generator, dtype=dtype)
    features = centres[labels] + 0.9 * torch.randn(batch, dim, generator=generator, dtype=dtype)
    return features.requires_grad_(True), labels, centres


def assert_matches_reference(loss_fn: FATLoss, features, labels, centres, valid=None) -> LossOutput:
    out = loss_fn.compute(features, labels, centres, valid)
    (grad,) = torch.autograd.grad(out.loss, features)
    if isinstance(centres, CentreBank):
        centres, valid = centres.centres, centres.valid
    elif valid is None:
        valid = torch.ones(len(centres), dtype=torch.bool)
    reference, active = fat_negatives_reference(
        features, labels, centres, valid, margin=loss_fn.margin, normalize=loss_fn.normalize,
        aggregation=loss_fn.aggregation, k=loss_fn.k, cohesion=loss_fn.cohesion,
        weight=loss_fn.cohesion_weight, negatives=loss_fn.negatives,
    )
    (reference_grad,) = torch.autograd.grad(reference, features, allow_unused=True)
    reference_grad = torch.zeros_like(features) if reference_grad is None else reference_grad
    torch.testing.assert_close(out.loss, reference, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-6, atol=1e-7)
    assert float(out.active_fraction) == pytest.approx(active)
    assert float(sum(out.terms.values())) == pytest.approx(out.loss.item(), rel=1e-9, abs=1e-12)
    return out


@pytest.mark.parametrize("negatives", NEGATIVES)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("normalize", [False, True])
def test_every_negative_set_matches_loops_in_value_and_gradient(negatives, aggregation, normalize):
    for seed in range(2):
        features, labels, centres = make_batch(seed)
        if normalize:
            centres = F.normalize(centres, dim=1)
        valid = torch.tensor([True, True, False, True, True, True, True])  # class 2: no confident sample
        loss_fn = FATLoss(
            margin=0.3 if normalize else 1.0, normalize=normalize, aggregation=aggregation, k=3,
            cohesion="mean" if seed else "max_radius", cohesion_weight=0.5, negatives=negatives,
        )
        out = assert_matches_reference(loss_fn, features, labels, centres, valid)
        assert out.per_sample.shape == (12,) and not out.per_sample.requires_grad


@pytest.mark.parametrize("negatives", ["centre_shortlist", "batch_hardest"])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_k_beyond_the_available_negatives_uses_all_of_them(negatives, aggregation):
    features, labels, centres = make_batch(3, batch=8, classes=4)
    valid = torch.tensor([True, False, True, True])  # at most 2 negative centres
    assert_matches_reference(FATLoss(aggregation=aggregation, k=50, negatives=negatives), features, labels,
                             centres, valid)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_a_shortlist_of_every_centre_is_exact_fat(aggregation):
    features, labels, centres = make_batch(4)
    valid = torch.tensor([True, True, True, False, True, True, True])
    exact = FATLoss.normalised(aggregation=aggregation, k=6).compute(features, labels, centres, valid)
    shortlist = FATLoss.normalised(aggregation=aggregation, k=6, negatives="centre_shortlist")
    approx = shortlist.compute(features, labels, centres, valid)
    torch.testing.assert_close(approx.loss, exact.loss)
    torch.testing.assert_close(torch.autograd.grad(approx.loss, features)[0],
                               torch.autograd.grad(exact.loss, features)[0])


def test_one_identity_in_the_batch_has_no_in_batch_negatives_but_keeps_its_centre_negatives():
    features, _, centres = make_batch(5)
    labels = torch.full((12,), 3)
    batch = assert_matches_reference(FATLoss(negatives="batch_hardest", cohesion="mean"), features, labels, centres)
    assert float(batch.terms["p2s"]) == 0.0 and float(batch.active_fraction) == 0.0
    assert float(batch.terms["cohesion"]) > 0
    shortlist = assert_matches_reference(FATLoss(negatives="centre_shortlist"), features, labels, centres)
    assert float(shortlist.terms["p2s"]) > 0


def test_a_batch_of_one_sample_is_cohesion_only():
    features, labels, centres = make_batch(6, batch=1)
    out = assert_matches_reference(FATLoss(negatives="batch_hardest", cohesion="mean"), features, labels, centres)
    assert float(out.terms["p2s"]) == 0.0


@pytest.mark.parametrize("negatives", ["centre_shortlist", "batch_hardest"])
def test_invalid_centres_are_never_negatives_and_their_samples_are_skipped(negatives):
    features, labels, centres = make_batch(7)
    labels[:3] = 2
    valid = torch.tensor([True, True, False, True, True, True, True])
    loss_fn = FATLoss(aggregation="mean", cohesion="mean", negatives=negatives)
    before = loss_fn.compute(features, labels, centres, valid)
    moved = centres.clone()
    moved[2] = float("nan")  # used anywhere, it would turn the loss or the gradient NaN
    after = loss_fn.compute(features, labels, moved, valid)
    torch.testing.assert_close(after.loss, before.loss)
    assert torch.isfinite(torch.autograd.grad(after.loss, features)[0]).all()
    assert torch.all(after.per_sample[:3] == 0)
    moved[2] = centres[0]  # an invalid centre right next to class 0's must not enter its short list
    torch.testing.assert_close(loss_fn.compute(features, labels, moved, valid).loss, before.loss)


@pytest.mark.parametrize("negatives", ["centre_shortlist", "batch_hardest"])
def test_no_valid_centre_gives_zero_loss_with_a_graph(negatives):
    features, labels, centres = make_batch(8)
    out = FATLoss(negatives=negatives).compute(features, labels, centres, torch.zeros(7, dtype=torch.bool))
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.all(features.grad == 0)


@pytest.mark.parametrize("negatives", ["centre_shortlist", "batch_hardest"])
@pytest.mark.parametrize("fill", [0.0, 0.7])
def test_all_equal_or_zero_features_give_finite_loss_and_gradients(negatives, fill):
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    features = torch.full((8, 6), fill, requires_grad=True)
    loss_fn = FATLoss.normalised(aggregation="topk", negatives=negatives)
    bank = loss_fn.new_centre_bank(4, 6, mode="epoch")
    bank.refresh(features.detach(), labels)
    out = loss_fn.compute(features, labels, bank)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(features.grad).all()
    assert float(out.terms["p2s"]) == pytest.approx(loss_fn.margin, abs=1e-5)


@pytest.mark.parametrize("negatives", ["centre_shortlist", "batch_hardest"])
def test_half_precision_inputs_compute_in_float32(negatives):
    features, labels, centres = make_batch(9, dtype=torch.float32)
    half = features.detach().to(torch.bfloat16).requires_grad_(True)
    loss_fn = FATLoss.normalised(aggregation="topk", k=3, negatives=negatives)
    out = loss_fn.compute(half, labels, centres)
    out.loss.backward()
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, loss_fn.compute(half.detach().float(), labels, centres).loss)
    assert half.grad.dtype == torch.bfloat16 and torch.isfinite(half.grad.float()).all()


def test_the_bank_short_list_gives_the_loss_of_the_loops():
    features, labels, _ = make_batch(10, dtype=torch.float32)
    loss_fn = FATLoss.normalised(aggregation="topk", k=2, negatives="centre_shortlist", cohesion="mean")
    bank = loss_fn.new_centre_bank(7, 6, mode="epoch")
    bank.refresh(features.detach(), labels)
    bank = bank.to(torch.float64)
    assert_matches_reference(loss_fn, features.detach().double().requires_grad_(True), labels, bank)


def test_the_loss_refuses_a_bank_without_a_long_enough_short_list():
    features, labels, _ = make_batch(11, dtype=torch.float32)
    loss_fn = FATLoss.normalised(negatives="centre_shortlist", k=4)
    with pytest.raises(ValueError, match="keeps 0 neighbours"):
        loss_fn.compute(features, labels, CentreBank(7, 6, centre_mode=4))
    with pytest.raises(ValueError, match="keeps 2 neighbours"):
        loss_fn.compute(features, labels, CentreBank(7, 6, centre_mode=4, shortlist_k=2))
    longer = CentreBank(7, 6, centre_mode=4, shortlist_k=6)
    longer.refresh(features.detach(), labels)
    fitted = loss_fn.new_centre_bank(7, 6, mode="epoch")
    fitted.refresh(features.detach(), labels)
    torch.testing.assert_close(loss_fn.compute(features, labels, longer).loss,
                               loss_fn.compute(features, labels, fitted).loss)
    with pytest.raises(ValueError, match="negatives must be one of"):
        FATLoss(negatives="hard_centres")


def test_hybrid_passes_the_negative_set_through():
    features, labels, centres = make_batch(12)
    logits = torch.randn(12, 7, dtype=torch.float64)
    fat = FATLoss.normalised(negatives="batch_hardest", aggregation="topk", cohesion="mean")
    out = HybridFATLoss(fat, ce_weight=0.5).compute(features, logits, labels, F.normalize(centres, dim=1))
    expected = fat(features, labels, F.normalize(centres, dim=1)) + 0.5 * F.cross_entropy(logits, labels)
    torch.testing.assert_close(out.loss, expected)


# ---------------------------------------------------------------- the short list


def test_nearest_centres_are_the_nearest_other_valid_centres_in_order():
    generator = torch.Generator().manual_seed(13)
    centres = torch.randn(9, 4, generator=generator)
    valid = torch.tensor([True, True, False, True, True, True, False, True, True])
    got = nearest_centres(centres, valid, 3)
    for c in range(9):
        if not valid[c]:
            assert got[c].tolist() == [-1, -1, -1]
            continue
        others = sorted((c2 for c2 in range(9) if c2 != c and valid[c2]),
                        key=lambda c2: float(((centres[c] - centres[c2]) ** 2).sum()))
        assert got[c].tolist() == others[:3]
    padded = nearest_centres(centres, torch.tensor([True, False, True] + [False] * 6), 3)
    assert padded[0].tolist() == [2, -1, -1] and padded[1].tolist() == [-1, -1, -1]


def ema_batches(steps: int, seed: int = 14):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        labels = torch.randint(0, 8, (6,), generator=generator)
        yield torch.randn(6, 5, generator=generator) + labels.unsqueeze(1).float(), labels


def test_an_ema_bank_rebuilds_its_short_list_on_schedule_and_resumes_it():
    bank = CentreBank(8, 5, mode="ema", momentum=0.5, centre_mode=1, shortlist_k=2, shortlist_refresh=3)
    assert bank.shortlist.tolist() == [[-1, -1]] * 8 and int(bank.shortlist_age) == -1
    lists, resumed = [], None
    for step, (features, labels) in enumerate(ema_batches(8), start=1):
        bank.update(features, labels)
        lists.append(bank.shortlist.clone())
        if step in (1, 4, 7):  # the first update, then every third
            assert int(bank.shortlist_age) == 0
            assert torch.equal(bank.shortlist, nearest_centres(bank.centres, bank.valid, 2))
        else:
            assert torch.equal(lists[-1], lists[-2])  # stale between rebuilds, although the centres moved
        if step == 5:
            resumed = CentreBank(8, 5, mode="ema", momentum=0.5, centre_mode=1, shortlist_k=2, shortlist_refresh=3)
            resumed.load_state_dict(bank.state_dict())
    assert {"shortlist", "shortlist_age"} <= set(bank.state_dict())
    for step, (features, labels) in enumerate(ema_batches(8), start=1):
        if step > 5:
            resumed.update(features, labels)
            assert torch.equal(resumed.shortlist, lists[step - 1])


def test_an_epoch_bank_rebuilds_its_short_list_at_each_refresh():
    bank = FATLoss.normalised(negatives="centre_shortlist", k=2).new_centre_bank(8, 5, mode="epoch")
    for features, labels in ema_batches(2, seed=15):
        bank.refresh(features, labels)
        assert torch.equal(bank.shortlist, nearest_centres(bank.centres, bank.valid, 2))
    assert "shortlist" not in CentreBank(8, 5).state_dict()  # banks without a list keep their old state
    with pytest.raises(ValueError, match="shortlist_refresh >= 1"):
        CentreBank(8, 5, mode="ema", shortlist_k=2)
    with pytest.raises(RuntimeError, match="keeps no short list"):
        CentreBank(8, 5).rebuild_shortlist()


# ---------------------------------------------------------------- the gathered distances


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("scaled", [False, True])
def test_gathered_squared_distances_match_explicit_differences(normalize, scaled):
    generator = torch.Generator().manual_seed(16)
    x = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    x[3] = 0.0  # a zero row, measured from the origin when normalised
    x.requires_grad_(True)
    table = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    scale = torch.rand(6, generator=generator, dtype=torch.float64) + 0.5 if scaled else None
    index = torch.stack([torch.randperm(6, generator=generator)[:3] for _ in range(5)])
    present = torch.rand(5, 3, generator=generator) > 0.3
    index[~present] = -1
    got = gathered_squared_distances(x, table, index, present, normalize_x=normalize, table_scale=scale)
    anchors = F.normalize(x, dim=1) if normalize else x
    rows = table * scale.unsqueeze(1) if scaled else table
    expected = torch.where(present, ((anchors.unsqueeze(1) - rows[index.clamp_min(0)]) ** 2).sum(-1), 0.0)
    torch.testing.assert_close(got, expected)
    weights = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad((got * weights).sum(), x)[0],
                               torch.autograd.grad((expected * weights).sum(), x)[0])
    with pytest.raises(ValueError, match="same table row twice"):
        gathered_squared_distances(x, table, torch.zeros(5, 2, dtype=torch.long))


# ---------------------------------------------------------------- the training objective


def _train(tmp_path, frame, ckpt: str, negatives: str, **fit_kwargs):
    from fat_distill.models import build_model
    from fat_distill.train import TrainConfig, build_objective, build_train_data, device_settings, fit

    config = TrainConfig(image_size=(32, 16), epochs=3, batch_p=3, batch_k=2, lr=1e-3, warmup_epochs=0.5, pad=2,
                         seed=3)
    data = build_train_data(frame, tmp_path, config)
    torch.manual_seed(config.seed)
    model = build_model("small_cnn", data.num_classes, embedding_dim=16)
    objective = build_objective("fat_hybrid", model=model, num_classes=data.num_classes,
                                num_samples=len(data.dataset), image_size=config.image_size,
                                fat_negatives=negatives, fat_k=2, fat_shortlist_refresh=2, fat_aggregation="topk")
    result = fit(model, objective, data.dataset, data.batch_sampler, config=config,
                 settings=device_settings(torch.device("cpu")), checkpoint_dir=tmp_path / ckpt, stage="unit",
                 feature_dataset=data.feature_dataset, progress=False, **fit_kwargs)
    return model, objective, result


def test_build_objective_wires_the_negative_set_into_loss_and_banks():
    from fat_distill.distill.config import StudentConfig
    from fat_distill.models import build_model
    from fat_distill.train import build_objective

    model = build_model("small_cnn", 4, embedding_dim=8)
    objective = build_objective("fat_hybrid", model=model, num_classes=4, num_samples=10, image_size=(32, 16),
                                fat_negatives="centre_shortlist", fat_k=3, fat_shortlist_refresh=7)
    fat, bank = objective.hybrid.fat, objective.bank("")
    assert (fat.negatives, fat.k, bank.shortlist_k, bank.shortlist_refresh) == ("centre_shortlist", 3, 3, 7)
    default = build_objective("fat_hybrid", model=model, num_classes=4, num_samples=10, image_size=(32, 16))
    assert default.hybrid.fat.negatives == "all_centres" and default.bank("").shortlist_k == 0
    config = StudentConfig()
    # the pipeline's student defaults to the reference code's negatives (measured; the loss itself is exact)
    assert (config.fat_negatives, config.fat_k, config.fat_shortlist_refresh) == ("batch_hardest", 5, 100)
    with pytest.raises(ValueError, match="fat_negatives"):
        StudentConfig(fat_negatives="nearest")


def test_a_shortlist_run_resumes_to_identical_weights_and_lists(tmp_path):
    from tests.helpers import write_identity_images

    frame = write_identity_images(tmp_path, identities=6, per_identity=6)
    straight, straight_objective, _ = _train(tmp_path, frame, "straight", "centre_shortlist")

    class Interrupt(Exception):
        pass

    def stop_after_first(epoch, stats):
        if epoch == 0:
            raise Interrupt

    with pytest.raises(Interrupt):
        _train(tmp_path, frame, "resumed", "centre_shortlist", on_epoch_end=stop_after_first)
    resumed, resumed_objective, result = _train(tmp_path, frame, "resumed", "centre_shortlist")
    assert result.resumed_from_epoch == 1
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    bank, again = straight_objective.bank(""), resumed_objective.bank("")
    assert torch.equal(bank.shortlist, again.shortlist) and int(bank.shortlist_age) == int(again.shortlist_age)
    assert (bank.shortlist[bank.valid] >= 0).all()  # every identity's list was built

