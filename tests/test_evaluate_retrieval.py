"""Retrieval metrics: blocked CMC/mAP/mINP against a plain per-query reference (torchreid's algorithm)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fat_distill.evaluate import RetrievalResult, compute_distance_matrix, evaluate_distance_matrix, evaluate_retrieval


def reference_market1501(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    """torchreid's ``eval_market1501`` as plain loops, plus this project's conventions.

    Additions to torchreid: gallery pid -1 is junk (removed), camid -1 never
    matches a camera, ties put non-matches first, and mINP (AGW's formula).
    Returns (cmc over 1..max_rank, mAP, mINP, per-query AP with NaN for skipped).
    """
    num_q, num_g = distmat.shape
    all_cmc, all_ap, all_inp = [], [], []
    per_query_ap = np.full(num_q, np.nan)
    for q in range(num_q):
        q_pid, q_camid = q_pids[q], q_camids[q]
        # Sort by distance, non-matches before matches at equal distance.
        order = np.lexsort((g_pids == q_pid, distmat[q]))
        ranked_matches = []
        for g in order:
            if g_pids[g] == -1:
                continue  # junk
            if g_pids[g] == q_pid and q_camid != -1 and g_camids[g] == q_camid:
                continue  # same identity, same camera
            ranked_matches.append(1 if g_pids[g] == q_pid else 0)
        raw_cmc = np.array(ranked_matches)
        if raw_cmc.sum() == 0:
            continue
        cumulative = raw_cmc.cumsum()
        cmc = np.minimum(cumulative, 1)
        padded = np.ones(max_rank)
        padded[: min(max_rank, len(cmc))] = cmc[:max_rank]
        all_cmc.append(padded)
        precisions = [cumulative[i] / (i + 1.0) for i in range(len(raw_cmc)) if raw_cmc[i]]
        ap = sum(precisions) / raw_cmc.sum()
        all_ap.append(ap)
        per_query_ap[q] = ap
        last_match = np.flatnonzero(raw_cmc)[-1]
        all_inp.append(cumulative[last_match] / (last_match + 1.0))
    return np.mean(all_cmc, axis=0), float(np.mean(all_ap)), float(np.mean(all_inp)), per_query_ap


def _noisy_retrieval_problem(seed: int, num_query: int = 40, num_gallery: int = 150, dim: int = 8):
    """Clustered float64 features with few identities and cameras: many pid/camera ties.

    Includes distractors (pid 0), junk (pid -1), queries whose identity is not in
    the gallery, and unknown cameras (-1).
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, dim))
    gallery_pids = rng.integers(1, 9, num_gallery)
    gallery_pids[rng.random(num_gallery) < 0.15] = 0
    gallery_pids[rng.random(num_gallery) < 0.1] = -1
    query_pids = rng.integers(1, 11, num_query)  # 9 and 10 never appear in the gallery
    gallery_camids = rng.integers(1, 4, num_gallery)
    query_camids = rng.integers(1, 4, num_query)
    gallery_camids[rng.random(num_gallery) < 0.1] = -1
    query_camids[rng.random(num_query) < 0.1] = -1
    gallery = centres[np.abs(gallery_pids)] + 1.2 * rng.normal(size=(num_gallery, dim))
    query = centres[query_pids] + 1.2 * rng.normal(size=(num_query, dim))
    return (torch.from_numpy(query), torch.from_numpy(gallery), query_pids, gallery_pids, query_camids, gallery_camids)


def _assert_matches_reference(result: RetrievalResult, distmat, q_pids, g_pids, q_camids, g_camids):
    cmc, mAP, mINP, per_query_ap = reference_market1501(distmat, q_pids, g_pids, q_camids, g_camids, len(result.cmc))
    np.testing.assert_allclose(result.cmc, cmc, atol=1e-6)
    assert result.mAP == pytest.approx(mAP, abs=1e-6)
    assert result.mINP == pytest.approx(mINP, abs=1e-6)
    np.testing.assert_allclose(result.average_precision, per_query_ap, atol=1e-6)
    assert result.num_valid_queries == int(np.isfinite(per_query_ap).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_matches_reference_with_ties_distractors_junk_and_missing_queries(seed, metric):
    query, gallery, q_pids, g_pids, q_camids, g_camids = _noisy_retrieval_problem(seed)
    result = evaluate_retrieval(query, gallery, q_pids, g_pids, q_camids, g_camids, metric=metric, block_size=16)
    distmat = compute_distance_matrix(query, gallery, metric).numpy()
    _assert_matches_reference(result, distmat, q_pids, g_pids, q_camids, g_camids)
    assert 0 < result.num_valid_queries < result.num_queries  # some queries really were skipped
    assert result.num_skipped_queries == result.num_queries - result.num_valid_queries


def test_block_sizes_give_identical_results():
    query, gallery, q_pids, g_pids, q_camids, g_camids = _noisy_retrieval_problem(3)
    results = [
        evaluate_retrieval(query, gallery, q_pids, g_pids, q_camids, g_camids, block_size=size)
        for size in (1, 7, len(query), 10 * len(query))
    ]
    for other in results[1:]:
        np.testing.assert_array_equal(other.cmc, results[0].cmc)
        np.testing.assert_array_equal(other.average_precision, results[0].average_precision)
        assert other.mAP == results[0].mAP
        assert other.mINP == results[0].mINP
        assert other.num_valid_queries == results[0].num_valid_queries


def test_float32_features_match_reference_on_their_own_distances():
    query, gallery, q_pids, g_pids, q_camids, g_camids = _noisy_retrieval_problem(4, num_query=60, num_gallery=300)
    query, gallery = query.float(), gallery.float()
    distmat = compute_distance_matrix(query, gallery).numpy()
    result = evaluate_distance_matrix(distmat, q_pids, g_pids, q_camids, g_camids, block_size=7)
    _assert_matches_reference(result, distmat, q_pids, g_pids, q_camids, g_camids)


def test_exact_distance_ties_rank_non_matches_first():
    query, gallery, q_pids, g_pids, q_camids, g_camids = _noisy_retrieval_problem(5)
    # Quantised distances: most matches share their distance with some non-match.
    distmat = np.round(compute_distance_matrix(query, gallery).numpy() * 8) / 8
    result = evaluate_distance_matrix(distmat, q_pids, g_pids, q_camids, g_camids, block_size=5)
    _assert_matches_reference(result, distmat, q_pids, g_pids, q_camids, g_camids)
    # Features collapsed onto one point rank every non-match first.
    collapsed = evaluate_distance_matrix(np.zeros_like(distmat), q_pids, g_pids, q_camids, g_camids)
    assert collapsed.rank1 == 0.0


def test_hand_computed_ranking():
    # Gallery in distance order: negative, match, distractor, match, junk, same-camera match.
    distances = np.array([[0.1, 0.2, 0.3, 0.4, 0.05, 0.01]])
    gallery_pids = np.array([2, 1, 0, 1, -1, 1])
    gallery_camids = np.array([1, 2, 3, 3, 2, 1])
    result = evaluate_distance_matrix(distances, [1], gallery_pids, [1], gallery_camids)
    # Kept ranking: [neg, match, distractor, match] → matches at ranks 2 and 4.
    assert result.cmc[:4].tolist() == [0.0, 1.0, 1.0, 1.0]
    assert result.mAP == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert result.mINP == pytest.approx(2 / 4)
    assert result.rank1 == 0.0 and result.rank5 == 1.0 and result.rank10 == 1.0
    # With an unknown query camera the same-camera match (distance 0.01) counts, at rank 1.
    unknown = evaluate_distance_matrix(distances, [1], gallery_pids, [-1], gallery_camids)
    assert unknown.mAP == pytest.approx((1 / 1 + 2 / 3 + 3 / 5) / 3)
    assert unknown.rank1 == 1.0


def test_unknown_cameras_never_remove_matches():
    query, gallery, q_pids, g_pids, _, _ = _noisy_retrieval_problem(6)
    unknown_q, unknown_g = np.full(len(q_pids), -1), np.full(len(g_pids), -1)
    result = evaluate_retrieval(query, gallery, q_pids, g_pids, unknown_q, unknown_g)
    distmat = compute_distance_matrix(query, gallery).numpy()
    _assert_matches_reference(result, distmat, q_pids, g_pids, unknown_q, unknown_g)
    # Every query whose identity is in the gallery is valid: nothing was removed as same-camera.
    assert result.num_valid_queries == int(np.isin(q_pids, g_pids[g_pids > 0]).sum())
    # With known cameras identical to the query's for every image, all matches are removed.
    same_camera_q, same_camera_g = np.ones(len(q_pids), dtype=int), np.ones(len(g_pids), dtype=int)
    with pytest.raises(ValueError, match="none of the 40 queries"):
        evaluate_retrieval(query, gallery, q_pids, g_pids, same_camera_q, same_camera_g)


def test_junk_is_removed_and_distractors_are_negatives():
    query, gallery, q_pids, g_pids, q_camids, g_camids = _noisy_retrieval_problem(7)
    base = evaluate_retrieval(query, gallery, q_pids, g_pids, q_camids, g_camids)
    # Junk copies of every query placed in the gallery change nothing.
    with_junk = evaluate_retrieval(
        query,
        torch.cat([gallery, query]),
        q_pids,
        np.concatenate([g_pids, np.full(len(q_pids), -1)]),
        q_camids,
        np.concatenate([g_camids, np.full(len(q_pids), 9)]),
    )
    np.testing.assert_array_equal(with_junk.average_precision, base.average_precision)
    # The same copies as distractors (pid 0) sit at distance 0: rank-1 drops to zero.
    with_distractors = evaluate_retrieval(
        query,
        torch.cat([gallery, query]),
        q_pids,
        np.concatenate([g_pids, np.zeros(len(q_pids), dtype=int)]),
        q_camids,
        np.concatenate([g_camids, np.full(len(q_pids), 9)]),
    )
    assert with_distractors.rank1 == 0.0
    assert with_distractors.mAP < base.mAP


def test_distance_matrix_entry_point_equals_feature_entry_point():
    query, gallery, q_pids, g_pids, q_camids, g_camids = _noisy_retrieval_problem(8)
    from_features = evaluate_retrieval(query, gallery, q_pids, g_pids, q_camids, g_camids, metric="euclidean")
    distmat = compute_distance_matrix(query, gallery, "euclidean")
    from_matrix = evaluate_distance_matrix(distmat, q_pids, g_pids, q_camids, g_camids)
    np.testing.assert_array_equal(from_matrix.average_precision, from_features.average_precision)
    np.testing.assert_array_equal(from_matrix.cmc, from_features.cmc)


def test_negative_distances_and_torch_labels_are_accepted():
    query, gallery, q_pids, g_pids, q_camids, g_camids = _noisy_retrieval_problem(9)
    distmat = compute_distance_matrix(query, gallery).numpy() - 0.5  # shifts ranks by nothing
    result = evaluate_distance_matrix(
        distmat, torch.from_numpy(q_pids), torch.from_numpy(g_pids), q_camids.tolist(), g_camids
    )
    _assert_matches_reference(result, distmat, q_pids, g_pids, q_camids, g_camids)


def test_result_reports_requested_ranks_and_cmc_length():
    query, gallery, q_pids, g_pids, q_camids, g_camids = _noisy_retrieval_problem(10)
    result = evaluate_retrieval(query, gallery, q_pids, g_pids, q_camids, g_camids, ranks=(1, 3, 20), max_rank=5)
    assert len(result.cmc) == 20  # covers the largest requested rank
    assert set(result.as_dict()) == {"rank1", "rank3", "rank20", "mAP", "mINP", "num_valid_queries", "num_queries"}
    assert np.all(np.diff(result.cmc) >= 0) and result.cmc[-1] <= 1.0
    with pytest.raises(ValueError, match="outside the computed CMC ranks"):
        result.rank(21)


def test_bad_inputs_are_named():
    query, gallery, q_pids, g_pids, q_camids, g_camids = _noisy_retrieval_problem(11)
    with pytest.raises(ValueError, match="query_pids must have shape"):
        evaluate_retrieval(query, gallery, q_pids[:-1], g_pids, q_camids, g_camids)
    with pytest.raises(ValueError, match="width"):
        evaluate_retrieval(query, gallery[:, :4], q_pids, g_pids, q_camids, g_camids)
    broken = query.clone()
    broken[3, 2] = float("nan")
    with pytest.raises(ValueError, match="query_features contains NaN"):
        evaluate_retrieval(broken, gallery, q_pids, g_pids, q_camids, g_camids)
    with pytest.raises(ValueError, match="metric must be one of"):
        evaluate_retrieval(query, gallery, q_pids, g_pids, q_camids, g_camids, metric="manhattan")
    with pytest.raises(ValueError, match="block_size"):
        evaluate_retrieval(query, gallery, q_pids, g_pids, q_camids, g_camids, block_size=0)
    with pytest.raises(ValueError, match="must hold integers"):
        evaluate_retrieval(query, gallery, q_pids.astype(float), g_pids, q_camids, g_camids)
