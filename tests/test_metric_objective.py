"""CE + batch-hard triplet with the teacher's soft targets (the distilled student's ``metric_term: batch_hard``)."""

from __future__ import annotations

import pytest
import torch

from fat_distill.losses import BatchHardTripletLoss
from fat_distill.models import EmbeddingOutput
from fat_distill.train.objectives import MetricObjective, SampleTable


def _reference(features, logits, labels, dense_targets, margin, ce_weight):
    """Plain loops: per anchor the farthest positive and the closest negative (Euclidean), then soft CE."""
    n = len(labels)
    triplet = []
    for a in range(n):
        d = [torch.linalg.vector_norm(features[a] - features[j]) for j in range(n)]
        pos = [d[j] for j in range(n) if j != a and labels[j] == labels[a]]
        neg = [d[j] for j in range(n) if labels[j] != labels[a]]
        if not pos or not neg:  # such anchors are left out of the mean
            continue
        triplet.append(torch.clamp(max(pos) - min(neg) + margin, min=0))
    ce = [-(dense_targets[i] * torch.log_softmax(logits[i], 0)).sum() for i in range(n)]
    return torch.stack(triplet).mean() + ce_weight * torch.stack(ce).mean()


@pytest.mark.parametrize("ce_weight", [1.0, 0.5])
def test_soft_ce_plus_batch_hard_matches_loops_in_value_and_gradient(ce_weight):
    g = torch.Generator().manual_seed(0)
    n, classes, dim = 10, 4, 6
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 0])
    soft_ids = torch.randint(0, classes, (n, 2), generator=g)
    soft_ids[:, 1] = (soft_ids[:, 0] + 1) % classes  # two distinct classes per row
    soft_probs = torch.rand(n, 1, generator=g) * 0.5 + 0.5
    soft_probs = torch.cat([soft_probs, 1 - soft_probs], dim=1)
    samples = SampleTable(n, soft_ids, soft_probs)
    objective = MetricObjective(samples, BatchHardTripletLoss(0.3), ce_weight=ce_weight, soft=True).double()
    features = torch.randn(n, dim, generator=g, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(n, classes, generator=g, dtype=torch.float64, requires_grad=True)
    indices = torch.arange(n)
    got = objective.compute(EmbeddingOutput(features=features, bn_features=features, logits=logits), labels, indices).loss
    dense = torch.zeros(n, classes, dtype=torch.float64)
    dense.scatter_add_(1, soft_ids, soft_probs.double())
    f2 = features.detach().clone().requires_grad_(True)
    l2 = logits.detach().clone().requires_grad_(True)
    want = _reference(f2, l2, labels, dense, 0.3, ce_weight)
    torch.testing.assert_close(got, want)
    got.backward()
    want.backward()
    torch.testing.assert_close(features.grad, f2.grad)
    torch.testing.assert_close(logits.grad, l2.grad)


def test_soft_metric_objective_needs_soft_targets():
    with pytest.raises(ValueError, match="soft targets"):
        MetricObjective(SampleTable(4), BatchHardTripletLoss(0.3), soft=True)
