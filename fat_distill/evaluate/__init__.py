"""Evaluation: feature extraction, retrieval metrics (CMC, mAP, mINP), re-ranking, noise-detection metrics, plots."""

from fat_distill.evaluate.features import extract_features, extract_manifest_features
from fat_distill.evaluate.noise_metrics import is_noisy_from_labels, noise_detection_report
from fat_distill.evaluate.plots import plot_cmc, plot_confidence_histogram, plot_noise_pr_curve
from fat_distill.evaluate.reranking import MAX_RERANK_IMAGES, k_reciprocal_rerank, rerank_features
from fat_distill.evaluate.retrieval import (
    RetrievalResult,
    compute_distance_matrix,
    evaluate_distance_matrix,
    evaluate_retrieval,
)

__all__ = [
    "MAX_RERANK_IMAGES",
    "RetrievalResult",
    "compute_distance_matrix",
    "evaluate_distance_matrix",
    "evaluate_retrieval",
    "extract_features",
    "extract_manifest_features",
    "is_noisy_from_labels",
    "k_reciprocal_rerank",
    "noise_detection_report",
    "plot_cmc",
    "plot_confidence_histogram",
    "plot_noise_pr_curve",
    "rerank_features",
]
