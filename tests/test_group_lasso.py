"""JLML structured sparsity: the group-lasso (L2,1) norm, its proximal step, and training with it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fat_distill.models import (
    build_model,
    group_l21_norm,
    group_norms,
    prox_group_l21_,
    zero_group_fraction,
)
from fat_distill.train import TrainConfig, build_train_data, device_settings, fit
from fat_distill.train.objectives import build_objective
from tests.helpers import write_identity_images


def _reference_l21(weight: torch.Tensor, groups: list[int]) -> float:
    total = 0.0
    for g in sorted(set(groups)):
        columns = [j for j, gid in enumerate(groups) if gid == g]
        total += math.sqrt(len(columns)) * math.sqrt(sum(float(weight[i, j]) ** 2
                                                         for i in range(weight.shape[0]) for j in columns))
    return total


def test_l21_norm_matches_a_loop_for_columns_and_groups():
    torch.manual_seed(0)
    weight = torch.randn(5, 7, dtype=torch.float64)
    columns = list(range(7))
    assert float(group_l21_norm(weight)) == pytest.approx(_reference_l21(weight, columns), rel=1e-6)
    groups = [0, 0, 1, 2, 2, 2, 1]
    assert float(group_l21_norm(weight, torch.tensor(groups))) == pytest.approx(_reference_l21(weight, groups),
                                                                                rel=1e-6)


def test_gradient_is_finite_at_zero_groups_and_matches_the_closed_form():
    weight = torch.randn(4, 3, requires_grad=True)
    with torch.no_grad():
        weight[:, 1] = 0
    group_l21_norm(weight).backward()
    assert torch.isfinite(weight.grad).all()
    assert torch.equal(weight.grad[:, 1], torch.zeros(4))
    expected = weight.detach()[:, 0] / weight.detach()[:, 0].norm()
    torch.testing.assert_close(weight.grad[:, 0], expected)


def test_prox_zeroes_small_groups_exactly_and_shrinks_the_others():
    weight = torch.tensor([[3.0, 0.1, 0.0, 1.0], [4.0, 0.1, 0.0, -1.0]])  # column norms 5, 0.141, 0, 1.414
    zero = prox_group_l21_(weight, threshold=0.5)
    assert zero == 2
    assert torch.equal(weight[:, 1:3], torch.zeros(2, 2))
    torch.testing.assert_close(weight[:, 0], torch.tensor([3.0, 4.0]) * (1 - 0.5 / 5))
    torch.testing.assert_close(weight[:, 3], torch.tensor([1.0, -1.0]) * (1 - 0.5 / math.sqrt(2)))
    assert zero_group_fraction(weight) == 0.5
    grouped = torch.tensor([[1.0, 1.0, 0.3]])
    prox_group_l21_(grouped, threshold=1.0, groups=torch.tensor([0, 0, 1]))  # sqrt(2) * 1 >= norm sqrt(2)
    assert torch.equal(grouped, torch.zeros(1, 3))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="one group id per input column"):
        group_norms(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\(out, in\) weight matrix"):
        group_l21_norm(torch.zeros(3))
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        prox_group_l21_(torch.zeros(2, 2), -1.0)


def test_proximal_gradient_selects_the_informative_feature_groups_on_a_toy_problem():
    """Regression on 12 inputs in 4 groups of 3; only groups 0 and 2 carry signal."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(512, 12, generator=generator)
    groups = torch.arange(12) // 3
    true = torch.zeros(2, 12)
    true[:, 0:3] = torch.randn(2, 3, generator=generator)
    true[:, 6:9] = torch.randn(2, 3, generator=generator)
    targets = inputs @ true.T + 0.1 * torch.randn(512, 2, generator=generator)

    def train(penalty: float) -> torch.Tensor:
        weight = torch.zeros(2, 12, requires_grad=True)
        lr = 0.05
        for _ in range(400):
            loss = ((inputs @ weight.T - targets) ** 2).mean()
            (grad,) = torch.autograd.grad(loss, weight)
            with torch.no_grad():
                weight -= lr * grad
                if penalty:
                    prox_group_l21_(weight, lr * penalty, groups)
        return weight.detach()

    sparse = train(penalty=0.05)
    norms = group_norms(sparse, groups)
    assert norms[1] == 0 and norms[3] == 0  # whole uninformative groups are exactly zero
    assert norms[0] > 0.5 and norms[2] > 0.5
    assert zero_group_fraction(sparse, groups) == 0.5
    dense = train(penalty=0.0)
    assert (group_norms(dense, groups) > 0).all()  # without the penalty nothing is switched off


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gl")
    frame = write_identity_images(root, identities=4, per_identity=4, size=(64, 32))
    return frame, root


EPOCHS = 6


def _fit_jlml(tiny_data, tmp_path, weight: float):
    frame, root = tiny_data
    config = TrainConfig(model="jlml", image_size=(64, 32), batch_p=4, batch_k=2, pad=0,
                         random_erasing_p=0.0, lr=0.01, group_lasso_weight=weight, warmup_epochs=0, epochs=EPOCHS)
    data = build_train_data(frame, root, config)
    settings = device_settings(torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model("jlml", data.num_classes, width=4)
    objective = build_objective("ce", model=model, num_classes=data.num_classes, num_samples=len(frame),
                                image_size=(64, 32))
    result = fit(model, objective, data.dataset, data.batch_sampler, config=config, settings=settings,
                 checkpoint_dir=tmp_path / f"ckpt{weight}", stage="test", progress=False)
    return model, result


def test_training_with_group_lasso_switches_off_whole_input_features(tiny_data, tmp_path):
    # Measured on this toy: 20 switches off ~25-35 % of each branch's inputs; 80 switches off everything.
    model, result = _fit_jlml(tiny_data, tmp_path, weight=20.0)
    fractions = {name: zero_group_fraction(w) for name, w in model.feature_selection_weights().items()}
    assert all(0 < f < 1 for f in fractions.values()), fractions
    assert result.history[-1]["loss"] < result.history[0]["loss"] / 2  # it still learns with fewer features
    last = result.history[-1]
    assert last["zero_feature_fraction"] == pytest.approx(np.mean(list(fractions.values())))
    assert last["group_lasso"] > 0
    for weight in model.feature_selection_weights().values():
        zero_columns = (weight == 0).all(dim=0)
        # Switched off column by column: a column is either all zero or has no zero at all.
        assert ((weight[:, ~zero_columns] != 0).all()), "zeros inside surviving columns"
        assert zero_columns.any()


def test_off_by_default_and_refused_for_models_without_selection_layers(tiny_data, tmp_path):
    assert TrainConfig().group_lasso_weight == 0
    model, result = _fit_jlml(tiny_data, tmp_path, weight=0.0)
    assert "zero_feature_fraction" not in result.history[-1]
    assert all(zero_group_fraction(w) == 0 for w in model.feature_selection_weights().values())

    frame, root = tiny_data
    config = TrainConfig(model="small_cnn", image_size=(64, 32), batch_p=4, batch_k=2, epochs=1,
                         group_lasso_weight=0.1)
    data = build_train_data(frame, root, config)
    small = build_model("small_cnn", data.num_classes)
    objective = build_objective("ce", model=small, num_classes=data.num_classes, num_samples=len(frame),
                                image_size=(64, 32))
    with pytest.raises(ValueError, match="group_lasso_weight=0.1 needs a model with feature-selection layers"):
        fit(small, objective, data.dataset, data.batch_sampler, config=config,
            settings=device_settings(torch.device("cpu")), checkpoint_dir=tmp_path / "small", stage="test",
            progress=False)
