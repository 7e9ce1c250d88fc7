"""Mixup: seeded draws, the blended loss against its brute-force definition, and training with it."""

from __future__ import annotations

import math

import pytest
import torch

from fat_distill.config_hash import config_hash, hashed_fields
from fat_distill.losses import BatchHardTripletLoss
from fat_distill.losses.output import LossOutput
from fat_distill.models import EmbeddingOutput
from fat_distill.train.mixup import MixupParams, mix_images, mixup_loss, mixup_params
from fat_distill.train.objectives import ClassificationObjective, MetricObjective, SampleTable
from tests.test_train import image_frame, run, small_config  # noqa: F401  (the fixture is used by name)


def test_draws_are_seeded_folded_and_permutations():
    a = mixup_params(8, 0.4, seed=1, epoch=2, batch=3)
    b = mixup_params(8, 0.4, seed=1, epoch=2, batch=3)
    assert a.lam == b.lam and torch.equal(a.perm, b.perm)
    assert sorted(a.perm.tolist()) == list(range(8))
    draws = [mixup_params(8, 0.4, seed=1, epoch=2, batch=k) for k in range(50)]
    assert all(0.5 <= d.lam <= 1.0 for d in draws) and len({d.lam for d in draws}) == 50
    with pytest.raises(ValueError, match="alpha must be > 0"):
        mixup_params(8, 0.0, seed=0, epoch=0, batch=0)


def test_images_blend_with_their_partner():
    images = torch.arange(12, dtype=torch.float32).view(3, 1, 2, 2)
    params = MixupParams(lam=0.75, perm=torch.tensor([2, 0, 1]))
    mixed = mix_images(images, params)
    for i, j in enumerate([2, 0, 1]):
        torch.testing.assert_close(mixed[i], 0.75 * images[i] + 0.25 * images[j])
    with pytest.raises(TypeError, match="float images"):
        mix_images(images.to(torch.uint8), params)


def _output(batch=6, classes=3, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, dim, generator=g, requires_grad=True)
    logits = torch.randn(batch, classes, generator=g, requires_grad=True)
    return EmbeddingOutput(features=feats, bn_features=feats, logits=logits)


@pytest.mark.parametrize("soft", [False, True])
def test_loss_is_the_lambda_weighted_sum_of_own_and_partner_labels(soft):
    n, c = 6, 3
    ids = torch.tensor([[k % c, (k + 1) % c] for k in range(n)])
    probs = torch.tensor([[0.8, 0.2]] * n)
    samples = SampleTable(n, soft_ids=ids, soft_probs=probs) if soft else SampleTable(n)
    objective = MetricObjective(samples, BatchHardTripletLoss(0.3), soft=soft)
    out = _output(n, c)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    indices = torch.arange(n)
    params = MixupParams(lam=0.7, perm=torch.tensor([3, 4, 5, 0, 1, 2]))
    got = mixup_loss(objective, out, labels, indices, params)
    # brute force: the per-sample CE against each target, the triplet loss under each labelling
    own = objective.compute(out, labels, indices)
    partner = objective.compute(out, labels[params.perm], indices[params.perm])
    torch.testing.assert_close(got.loss, 0.7 * own.loss + 0.3 * partner.loss)
    if soft:  # the partner's soft target is looked up by the partner's index
        target = torch.zeros(n, c).scatter_(1, ids[params.perm], probs)
        ce = -(target * out.logits.log_softmax(1)).sum(1).mean()
        torch.testing.assert_close(partner.terms["ce"], ce.detach())
    assert set(got.terms) == set(own.terms)
    got.loss.backward()
    assert out.features.grad is not None and out.logits.grad is not None


def test_lambda_one_is_the_plain_loss():
    objective = ClassificationObjective(SampleTable(4))
    out = _output(4, 3)
    labels = torch.tensor([0, 1, 2, 0])
    got = mixup_loss(objective, out, labels, torch.arange(4), MixupParams(lam=1.0, perm=torch.tensor([1, 0, 3, 2])))
    torch.testing.assert_close(got.loss, objective.compute(out, labels, torch.arange(4)).loss)
    assert isinstance(got, LossOutput)


def test_mixup_off_keeps_the_config_hash_and_on_changes_it():
    base = small_config()
    assert "mixup_alpha" not in hashed_fields(base)
    assert config_hash(small_config(mixup_alpha=0.0)) == config_hash(base)
    assert config_hash(small_config(mixup_alpha=0.4)) != config_hash(base)


@pytest.mark.parametrize("objective", ["ce", "fat_hybrid"])
def test_training_with_mixup_learns_and_is_reproducible(image_frame, objective):  # noqa: F811
    root, frame = image_frame
    config = small_config(epochs=3, lr=3e-3, mixup_alpha=0.4)
    first, result = run(root, frame, config, objective, ckpt=f"mixup_a_{objective}")
    assert all(math.isfinite(h["loss"]) for h in result.history)
    second, _ = run(root, frame, config, objective, ckpt=f"mixup_b_{objective}")
    plain, _ = run(root, frame, small_config(epochs=3, lr=3e-3), objective, ckpt=f"mixup_off_{objective}")
    same = [torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values())]
    assert all(same)
    assert not all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), plain.state_dict().values()))
