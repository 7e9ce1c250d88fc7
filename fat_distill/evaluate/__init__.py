"""Evaluation: feature extraction, retrieval metrics (CMC, mAP, mINP), re-ranking, noise-detection metrics, plots."""

from fat_distill.evaluate.features import extract_features, extract_manifest_features
from fat_distill.evaluate.noise_metrics import is_noisy_from_labels, noise_detection_report
from fat_distill.evaluate.pictures import (
    EmbeddingMap,
    RankedLists,
    RankedPictures,
    choose_queries,
    plot_embedding_map,
    plot_ranked_results,
    rank_gallery,
)
from fat_distill.evaluate.plots import (
    plot_cmc,
    plot_confidence_flags,
    plot_confidence_histogram,
    plot_noise_pr_curve,
)
from fat_distill.evaluate.reranking import MAX_RERANK_IMAGES, k_reciprocal_rerank, rerank_features
from fat_distill.evaluate.retrieval import (
    RetrievalResult,
    compute_distance_matrix,
    evaluate_distance_matrix,
    evaluate_retrieval,
)

__all__ = [
    "MAX_RERANK_IMAGES",
    "EmbeddingMap",
    "RankedLists",
    "RankedPictures",
    "RetrievalResult",
    "choose_queries",
    "compute_distance_matrix",
    "evaluate_distance_matrix",
    "evaluate_retrieval",
    "extract_features",
    "extract_manifest_features",
    "is_noisy_from_labels",
    "k_reciprocal_rerank",
    "noise_detection_report",
    "plot_cmc",
    "plot_confidence_flags",
    "plot_confidence_histogram",
    "plot_embedding_map",
    "plot_noise_pr_curve",
    "plot_ranked_results",
    "rank_gallery",
    "rerank_features",
]
