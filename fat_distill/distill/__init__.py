"""Label-noise distillation (SPEC §1.2): teacher rounds, confidence scoring, soft labels, student and baselines.

Functions over arrays (:func:`score_confidence`, :func:`soft_labels_from_logits`)
and over manifests (:func:`run_teacher`, :func:`make_soft_labels`,
:func:`train_student`, :func:`evaluate_student`, :func:`evaluate_noise_detection`);
the Prefect flows only call these.
"""

from fat_distill.distill._common import DatasetInput, load_dataset
from fat_distill.distill.confidence import (
    CONFIDENCE_RULES,
    ConfidenceScores,
    confident_set_change,
    gmm_clean_posterior,
    score_confidence,
)
from fat_distill.distill.config import STUDENT_METHODS, StudentConfig, TeacherConfig
from fat_distill.distill.label_audit import (
    RELABEL_MIN_PROB,
    apply_actions,
    audit_identities,
    audit_labels,
    cleaned_labels,
    propose_actions,
)
from fat_distill.distill.noise_report import evaluate_noise_detection, has_ground_truth
from fat_distill.distill.soft_labels import (
    ensemble_probabilities,
    make_soft_labels,
    soft_labels_from_logits,
    soft_labels_from_probs,
    soft_targets_for,
)
from fat_distill.distill.student import (
    StudentResult,
    evaluate_student,
    student_features,
    student_label_map,
    student_training_rows,
    train_student,
)
from fat_distill.distill.teacher import (
    TeacherResult,
    assign_folds,
    fold_dir,
    fold_train_mask,
    keep_identities_in_every_fold,
    round_dir,
    round_manifest_path,
    run_teacher,
    run_teacher_fold,
    run_teacher_round,
    teacher_checkpoints,
)

__all__ = [
    "RELABEL_MIN_PROB", "apply_actions", "audit_identities", "audit_labels", "cleaned_labels", "has_ground_truth",
    "propose_actions",
    "CONFIDENCE_RULES", "ConfidenceScores", "DatasetInput", "STUDENT_METHODS", "StudentConfig", "StudentResult",
    "TeacherConfig", "TeacherResult", "assign_folds", "confident_set_change", "evaluate_noise_detection",
    "evaluate_student", "fold_dir", "fold_train_mask", "gmm_clean_posterior", "keep_identities_in_every_fold",
    "ensemble_probabilities", "load_dataset", "make_soft_labels", "round_dir", "round_manifest_path", "run_teacher",
    "run_teacher_fold", "run_teacher_round", "score_confidence", "soft_labels_from_logits", "soft_labels_from_probs",
    "soft_targets_for", "student_features", "student_label_map", "student_training_rows", "teacher_checkpoints",
    "train_student",
]
