"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal Encoding", CVPR 2017).

A vectorised port of the reference implementation (Zhong's code as modified by
Houjing Huang, shipped as torchreid's ``utils/rerank.py::re_ranking``): the
same k-reciprocal neighbour sets, expansion rule, Gaussian weights, local
query expansion and Jaccard distance, without its per-image Python loops.

Unlike :func:`fat_distill.evaluate.retrieval.evaluate_retrieval`, re-ranking
cannot be done in query blocks: every image's neighbour set depends on the
distances among *all* query and gallery images, so it holds several dense
(Q+G)² float32 matrices. Above :data:`MAX_RERANK_IMAGES` images it refuses
with an error rather than exhausting memory.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fat_distill.evaluate.retrieval import compute_distance_matrix

# 12k images: four live 12k² float32 matrices ≈ 2.3 GB. Market-1501 (3,368 query
# + 15,913 gallery) does not fit; subsample the gallery or pass max_images.
MAX_RERANK_IMAGES = 12_000
_QUERY_CHUNK = 64  # queries whose Jaccard distances are accumulated together
_ROW_CHUNK = 1024  # rows per step of the vectorised neighbour-set computations


def _check_size(num_images: int, max_images: int) -> None:
    if num_images > max_images:
        gigabytes = 4 * num_images**2 * 4 / 1e9
        raise ValueError(
            f"k-reciprocal re-ranking needs dense (query+gallery)² matrices: {num_images} images would take "
            f"about {gigabytes:.1f} GB, above the limit of {max_images} images; evaluate without rerank, "
            f"subsample the gallery, or pass a larger max_images if the machine has the memory"
        )


def _reciprocal_neighbours(initial_rank: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k-reciprocal neighbours R(i, k): the j among i's k+1 nearest that have i among theirs.

    Args:
        initial_rank: shape (N, >= k+1), each row's nearest neighbours, nearest first.
        k: neighbourhood size.

    Returns:
        ``(neighbours, is_reciprocal)``, both shape (N, k+1): ``neighbours`` is
        ``initial_rank[:, :k+1]`` and ``is_reciprocal`` marks the members of R(i, k).
    """
    neighbours = initial_rank[:, : k + 1]
    is_reciprocal = np.empty(neighbours.shape, dtype=bool)
    for start in range(0, len(neighbours), _ROW_CHUNK):
        rows = np.arange(start, min(start + _ROW_CHUNK, len(neighbours)))
        backward = initial_rank[neighbours[rows], : k + 1]  # (rows, k+1, k+1)
        is_reciprocal[rows] = (backward == rows[:, None, None]).any(axis=2)
    return neighbours, is_reciprocal


def _nearest_neighbours(distances: np.ndarray, count: int) -> np.ndarray:
    """Indices of each row's ``count`` smallest entries, nearest first (ties by index).

    Args:
        distances: shape (N, N).
        count: neighbours wanted, < N.

    Returns:
        shape (N, count), int64.
    """
    candidates = np.argpartition(distances, count - 1, axis=1)[:, :count]
    candidate_distances = np.take_along_axis(distances, candidates, axis=1)
    order = np.lexsort((candidates, candidate_distances), axis=1)
    return np.take_along_axis(candidates, order, axis=1)


def k_reciprocal_rerank(
    query_gallery: np.ndarray,
    query_query: np.ndarray,
    gallery_gallery: np.ndarray,
    *,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    max_images: int = MAX_RERANK_IMAGES,
) -> np.ndarray:
    """Re-ranked query × gallery distances: λ·original + (1 − λ)·Jaccard of k-reciprocal sets.

    Inputs are distances (not squared: they are squared here, as in the
    reference); the original term is each squared distance divided by its
    column's maximum.

    Args:
        query_gallery: shape (Q, G).
        query_query: shape (Q, Q).
        gallery_gallery: shape (G, G).
        k1: size of the k-reciprocal neighbourhoods (paper: 20).
        k2: neighbours averaged by the local query expansion (paper: 6; 1 disables it).
        lambda_value: weight of the original distance (paper: 0.3).
        max_images: refuse Q + G above this; memory is about 16·(Q+G)² bytes.

    Returns:
        shape (Q, G), float32.

    Raises:
        ValueError: shapes disagree, a parameter is out of range, or Q + G > max_images.
    """
    num_query, num_gallery = query_gallery.shape
    if query_query.shape != (num_query, num_query) or gallery_gallery.shape != (num_gallery, num_gallery):
        raise ValueError(
            f"expected query_query ({num_query}, {num_query}) and gallery_gallery ({num_gallery}, {num_gallery}) "
            f"to match query_gallery {query_gallery.shape}, got {query_query.shape} and {gallery_gallery.shape}"
        )
    num_images = num_query + num_gallery
    _check_size(num_images, max_images)
    if not 1 <= k1 < num_images or not 1 <= k2 <= k1 + 1:
        raise ValueError(
            f"need 1 <= k1 < query+gallery ({num_images}) and 1 <= k2 <= k1+1, got k1={k1}, k2={k2}"
        )
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value}")

    original = np.block([[query_query, query_gallery], [query_gallery.T, gallery_gallery]]).astype(np.float32)
    np.square(original, out=original)
    original /= original.max(axis=0)
    original = np.ascontiguousarray(original.T)
    initial_rank = _nearest_neighbours(original, k1 + 1)

    # Expanded k-reciprocal set of i: R(i, k1) plus every R(c, k1/2) of a member c
    # that shares more than 2/3 of its own members with R(i, k1).
    neighbours, is_reciprocal = _reciprocal_neighbours(initial_rank, k1)
    half_neighbours, half_is_reciprocal = _reciprocal_neighbours(initial_rank, int(np.around(k1 / 2.0)))
    reciprocal = np.where(is_reciprocal, neighbours, -1)  # (N, k1+1), -1 = not a member
    half_reciprocal = np.where(half_is_reciprocal, half_neighbours, -1)  # (N, h+1)
    half_sizes = half_is_reciprocal.sum(axis=1)
    weights = np.zeros_like(original)
    for start in range(0, num_images, _ROW_CHUNK):
        rows = np.arange(start, min(start + _ROW_CHUNK, num_images))
        candidates = reciprocal[rows]  # (r, k1+1)
        candidate_sets = half_reciprocal[np.maximum(candidates, 0)]  # (r, k1+1, h+1)
        # shared[r, c]: how many of candidate c's members are in R(row r, k1).
        is_shared = (candidate_sets[..., None] == reciprocal[rows, None, None, :]).any(axis=3)
        shared = (is_shared & (candidate_sets >= 0)).sum(axis=2)
        expands = (candidates >= 0) & (shared > 2.0 / 3.0 * half_sizes[np.maximum(candidates, 0)])
        members = np.concatenate(
            [candidates, np.where(expands[..., None], candidate_sets, -1).reshape(len(rows), -1)], axis=1
        )
        member_rows, member_slots = np.nonzero(members >= 0)
        member_rows = rows[member_rows]
        member_columns = members[member_rows - start, member_slots]
        # A member listed twice is written twice with the same weight: the set union.
        weights[member_rows, member_columns] = np.exp(-original[member_rows, member_columns])
    weights /= weights.sum(axis=1, keepdims=True)

    if k2 != 1:
        expanded = np.empty_like(weights)
        for start in range(0, num_images, _ROW_CHUNK):
            stop = min(start + _ROW_CHUNK, num_images)
            expanded[start:stop] = weights[initial_rank[start:stop, :k2]].mean(axis=1)
        weights = expanded
        del expanded

    jaccard = _jaccard_distance(weights, num_query)
    del weights
    final = jaccard * (1.0 - lambda_value) + original[:num_query] * lambda_value
    return np.ascontiguousarray(final[:, num_query:], dtype=np.float32)


def _jaccard_distance(weights: np.ndarray, num_query: int) -> np.ndarray:
    """1 − Σ_k min(V_ik, V_jk) / Σ_k max(V_ik, V_jk) for the query rows i and all j.

    Visits only the non-zero entries: for each k in row i's support, the rows j
    with V_jk ≠ 0 (a column-major sparse copy of V is the reference's inverted index).

    Args:
        weights: V, shape (N, N), rows summing to 1.
        num_query: the first ``num_query`` rows are the queries.

    Returns:
        shape (num_query, N), float32.
    """
    import scipy.sparse

    num_images = weights.shape[0]
    by_column = scipy.sparse.csc_matrix(weights)
    by_row = scipy.sparse.csr_matrix(weights[:num_query])
    jaccard = np.empty((num_query, num_images), dtype=np.float32)
    for start in range(0, num_query, _QUERY_CHUNK):
        stop = min(start + _QUERY_CHUNK, num_query)
        block = by_row[start:stop].tocoo()
        query_rows, supports, query_values = block.row, block.col, block.data
        column_starts = by_column.indptr[supports]
        column_lengths = by_column.indptr[supports + 1] - column_starts
        entry_owner = np.repeat(np.arange(len(supports)), column_lengths)
        offsets = np.arange(len(entry_owner)) - np.repeat(np.cumsum(column_lengths) - column_lengths, column_lengths)
        entries = column_starts[entry_owner] + offsets
        overlap = np.minimum(query_values[entry_owner], by_column.data[entries])
        bins = query_rows[entry_owner].astype(np.int64) * num_images + by_column.indices[entries]
        minimum_sum = np.bincount(bins, weights=overlap, minlength=(stop - start) * num_images).reshape(
            stop - start, num_images
        )
        # With rows summing to 1, Σ max = 2 − Σ min.
        jaccard[start:stop] = 1.0 - minimum_sum / (2.0 - minimum_sum)
    return jaccard


def rerank_features(
    query_features: Tensor,
    gallery_features: Tensor,
    *,
    metric: str = "cosine",
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    max_images: int = MAX_RERANK_IMAGES,
) -> np.ndarray:
    """Re-ranked distances straight from features; see :func:`k_reciprocal_rerank`.

    Args:
        query_features: shape (Q, D).
        gallery_features: shape (G, D).
        metric: ``"cosine"`` or ``"euclidean"``, as in
            :func:`fat_distill.evaluate.retrieval.compute_distance_matrix`.
        k1, k2, lambda_value, max_images: as in :func:`k_reciprocal_rerank`.

    Returns:
        shape (Q, G), float32.
    """
    # Refuse before allocating the (Q+G)² inputs.
    _check_size(len(query_features) + len(gallery_features), max_images)
    with torch.inference_mode():
        query_gallery = compute_distance_matrix(query_features, gallery_features, metric).cpu().numpy()
        query_query = compute_distance_matrix(query_features, query_features, metric).cpu().numpy()
        gallery_gallery = compute_distance_matrix(gallery_features, gallery_features, metric).cpu().numpy()
    return k_reciprocal_rerank(
        query_gallery, query_query, gallery_gallery, k1=k1, k2=k2, lambda_value=lambda_value, max_images=max_images
    )
