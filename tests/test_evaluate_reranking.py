"""k-reciprocal re-ranking against the reference implementation it ports."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fat_distill.evaluate import (
    compute_distance_matrix,
    evaluate_distance_matrix,
    evaluate_retrieval,
    k_reciprocal_rerank,
    rerank_features,
)


def reference_re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3):
    """torchreid ``utils/rerank.py::re_ranking`` (Zhong et al., modified by Houjing Huang), loops kept as-is."""
    original_dist = np.concatenate(
        [np.concatenate([q_q_dist, q_g_dist], axis=1), np.concatenate([q_g_dist.T, g_g_dist], axis=1)], axis=0
    )
    original_dist = np.power(original_dist, 2).astype(np.float32)
    original_dist = np.transpose(1.0 * original_dist / np.max(original_dist, axis=0))
    V = np.zeros_like(original_dist).astype(np.float32)
    initial_rank = np.argsort(original_dist).astype(np.int32)

    query_num = q_g_dist.shape[0]
    gallery_num = q_g_dist.shape[0] + q_g_dist.shape[1]
    all_num = gallery_num

    for i in range(all_num):
        # k-reciprocal neighbors
        forward_k_neigh_index = initial_rank[i, : k1 + 1]
        backward_k_neigh_index = initial_rank[forward_k_neigh_index, : k1 + 1]
        fi = np.where(backward_k_neigh_index == i)[0]
        k_reciprocal_index = forward_k_neigh_index[fi]
        k_reciprocal_expansion_index = k_reciprocal_index
        for j in range(len(k_reciprocal_index)):
            candidate = k_reciprocal_index[j]
            candidate_forward_k_neigh_index = initial_rank[candidate, : int(np.around(k1 / 2.0)) + 1]
            candidate_backward_k_neigh_index = initial_rank[
                candidate_forward_k_neigh_index, : int(np.around(k1 / 2.0)) + 1
            ]
            fi_candidate = np.where(candidate_backward_k_neigh_index == candidate)[0]
            candidate_k_reciprocal_index = candidate_forward_k_neigh_index[fi_candidate]
            if len(np.intersect1d(candidate_k_reciprocal_index, k_reciprocal_index)) > 2.0 / 3 * len(
                candidate_k_reciprocal_index
            ):
                k_reciprocal_expansion_index = np.append(k_reciprocal_expansion_index, candidate_k_reciprocal_index)

        k_reciprocal_expansion_index = np.unique(k_reciprocal_expansion_index)
        weight = np.exp(-original_dist[i, k_reciprocal_expansion_index])
        V[i, k_reciprocal_expansion_index] = 1.0 * weight / np.sum(weight)
    original_dist = original_dist[:query_num,]
    if k2 != 1:
        V_qe = np.zeros_like(V, dtype=np.float32)
        for i in range(all_num):
            V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe
        del V_qe
    del initial_rank
    invIndex = []
    for i in range(gallery_num):
        invIndex.append(np.where(V[:, i] != 0)[0])

    jaccard_dist = np.zeros_like(original_dist, dtype=np.float32)

    for i in range(query_num):
        temp_min = np.zeros(shape=[1, gallery_num], dtype=np.float32)
        indNonZero = np.where(V[i, :] != 0)[0]
        indImages = [invIndex[ind] for ind in indNonZero]
        for j in range(len(indNonZero)):
            temp_min[0, indImages[j]] = temp_min[0, indImages[j]] + np.minimum(
                V[i, indNonZero[j]], V[indImages[j], indNonZero[j]]
            )
        jaccard_dist[i] = 1 - temp_min / (2.0 - temp_min)

    final_dist = jaccard_dist * (1 - lambda_value) + original_dist * lambda_value
    final_dist = final_dist[:query_num, query_num:]
    return final_dist


def _clustered(seed: int, num_query: int, num_gallery: int, identities: int = 10, dim: int = 16, spread: float = 0.9):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(identities + 1, dim))
    query_pids = rng.integers(1, identities + 1, num_query)
    gallery_pids = rng.integers(1, identities + 1, num_gallery)
    query = torch.from_numpy(centres[query_pids] + spread * rng.normal(size=(num_query, dim)))
    gallery = torch.from_numpy(centres[gallery_pids] + spread * rng.normal(size=(num_gallery, dim)))
    return query, gallery, query_pids, gallery_pids


@pytest.mark.parametrize(("k1", "k2", "lambda_value"), [(20, 6, 0.3), (7, 3, 0.5), (5, 1, 0.0)])
def test_equals_reference_implementation(k1, k2, lambda_value):
    query, gallery, _, _ = _clustered(0, 25, 90)
    q_g = compute_distance_matrix(query, gallery, "euclidean").numpy()
    q_q = compute_distance_matrix(query, query, "euclidean").numpy()
    g_g = compute_distance_matrix(gallery, gallery, "euclidean").numpy()
    expected = reference_re_ranking(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=lambda_value)
    actual = k_reciprocal_rerank(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=lambda_value)
    assert actual.shape == (25, 90) and actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, atol=2e-6)


def test_rerank_features_uses_the_metric_and_feeds_evaluation():
    query, gallery, query_pids, gallery_pids = _clustered(1, 30, 120, spread=1.3)
    q_camids, g_camids = np.ones(30, dtype=int), np.full(120, 2)
    expected = reference_re_ranking(
        compute_distance_matrix(query, gallery).numpy(),
        compute_distance_matrix(query, query).numpy(),
        compute_distance_matrix(gallery, gallery).numpy(),
    )
    np.testing.assert_allclose(rerank_features(query, gallery, metric="cosine"), expected, atol=2e-6)

    reranked = evaluate_retrieval(query, gallery, query_pids, gallery_pids, q_camids, g_camids, rerank=True)
    from_reference = evaluate_distance_matrix(expected, query_pids, gallery_pids, q_camids, g_camids)
    assert reranked.mAP == pytest.approx(from_reference.mAP, abs=1e-6)
    np.testing.assert_allclose(reranked.cmc, from_reference.cmc, atol=1e-6)
    # On well-clustered identities the k-reciprocal neighbourhoods are the clusters, so re-ranking helps.
    plain = evaluate_retrieval(query, gallery, query_pids, gallery_pids, q_camids, g_camids)
    assert reranked.mAP > plain.mAP


def test_junk_is_dropped_before_reranking():
    query, gallery, query_pids, gallery_pids = _clustered(3, 20, 80)
    q_camids, g_camids = np.ones(20, dtype=int), np.full(80, 2)
    junk = torch.from_numpy(np.random.default_rng(0).normal(size=(15, 16)))
    with_junk = evaluate_retrieval(
        query,
        torch.cat([gallery, junk]),
        query_pids,
        np.concatenate([gallery_pids, np.full(15, -1)]),
        q_camids,
        np.concatenate([g_camids, np.full(15, 2)]),
        rerank=True,
    )
    without_junk = evaluate_retrieval(query, gallery, query_pids, gallery_pids, q_camids, g_camids, rerank=True)
    np.testing.assert_array_equal(with_junk.average_precision, without_junk.average_precision)


def test_refuses_above_the_size_limit_before_allocating():
    query, gallery, _, _ = _clustered(2, 10, 50)
    with pytest.raises(ValueError, match="60 images would take about .* above the limit of 40 images"):
        rerank_features(query, gallery, max_images=40)
    big = torch.zeros(7_000, 4)
    with pytest.raises(ValueError, match="evaluate without rerank"):
        evaluate_retrieval(big, big, np.ones(7_000, int), np.ones(7_000, int), np.ones(7_000, int),
                           np.full(7_000, 2), rerank=True)


def test_parameter_and_shape_errors():
    q_g, q_q, g_g = np.ones((3, 5)), np.ones((3, 3)), np.ones((5, 5))
    with pytest.raises(ValueError, match="k2 <= k1\\+1"):
        k_reciprocal_rerank(q_g, q_q, g_g, k1=2, k2=4)
    with pytest.raises(ValueError, match="lambda_value"):
        k_reciprocal_rerank(q_g, q_q, g_g, k1=2, k2=1, lambda_value=1.5)
    with pytest.raises(ValueError, match="gallery_gallery"):
        k_reciprocal_rerank(q_g, q_q, np.ones((4, 4)))
