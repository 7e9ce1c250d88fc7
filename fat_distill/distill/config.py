"""Typed settings of the teacher and student stages (one pydantic object per stage).

Both are plain pydantic models with ``extra="forbid"`` so a misspelt YAML key
(``teacher.round: 3``) is an error before any work starts. Their JSON is part of
each stage's cache key (:func:`fat_distill.config_hash.config_hash`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fat_distill.config_hash import config_hash, hashed_fields
from fat_distill.config_sections import Section
from fat_distill.train import TrainConfig

STUDENT_METHODS = ("distilled", "ce", "ce_triplet", "ce_msml", "ce_quadruplet", "fat_hybrid_noisy", "filtered",
                   "cleanlab", "oracle")
#: Methods that train on a subset of the train rows chosen by another stage (a row-filter manifest).
ROW_FILTER_METHODS = ("filtered", "cleanlab")

# Teacher fields that do not change what a given round computes: changing them
# keeps the rounds already done (e.g. raising `rounds` from 2 to 3 reuses 0 and 1).
_NOT_PER_ROUND = {"rounds", "tolerance", "temperature", "top_k", "soft_label_models"}
# Student fields used only by evaluate_student: changing them does not retrain.
_EVALUATION_ONLY = {"flip_test", "distance"}


def _teacher_train_default() -> TrainConfig:
    # epochs unset: a round's budget depends on the regime (the paper's 5 with pretrained weights, 20 from
    # scratch; fat_distill.train.regimes).
    return TrainConfig()


class TeacherConfig(Section):
    """The teacher's rounds: E epochs of CE (``train.epochs``), confidence, retrain on the confident set.

    Round 0 trains on every train row with its given label; round r >= 1 on the
    rows confident after round r−1. The rounds stop after ``rounds`` or as soon as
    the confident set changes by at most ``tolerance`` (fraction of samples).
    """

    train: TrainConfig = Field(default_factory=_teacher_train_default,
                               description="training of one round; epochs = E (paper: 5)")
    rounds: int = Field(3, ge=1, description="at most this many rounds (round 0 included)")
    rule: Literal["gmm", "threshold", "quantile"] = Field(
        "gmm", description="confidence rule: 2-component GMM on the loss, absolute p(given) >= threshold, "
                           "or per-identity quantile")
    threshold: float = Field(0.5, gt=0, le=1, description="rule 'threshold': confident iff p(given) >= this")
    quantile: float = Field(0.2, ge=0, lt=1, description="rule 'quantile': fraction dropped per identity")
    min_confident_per_identity: int = Field(
        2, ge=0, description="every identity keeps at least this many confident samples (0 = off)")
    # "continue": at the same compute as "fresh" (E epochs a round) its last model has trained longest, which
    # is where its lead comes from (benchmarks/README.md, "Equal training budget").
    retrain: Literal["fresh", "continue"] = Field(
        "continue", description="each round starts from the previous round's weights, or from a new model")
    scoring: Literal["in_sample", "oof"] = Field(
        "in_sample", description="score with the round's model (in_sample) or with K fold models, each "
                                 "scoring the samples it did not train on (oof)")
    folds: int = Field(2, ge=2, description="K of out-of-fold scoring")
    tolerance: float = Field(0.01, ge=0, le=1,
                             description="stop when at most this fraction of confident flags changes")
    temperature: float = Field(1.0, gt=0, description="T of the soft labels: softmax(logits / T)")
    top_k: int = Field(5, ge=1, description="soft labels keep the k most probable identities")
    soft_label_models: Literal["final_round", "all_rounds"] = Field(
        "final_round", description="soft labels from the final round's model(s), or the mean of every round's "
                                   "softmax(logits / T) (a temporal ensemble: benchmarks/README.md, "
                                   "'Teacher ensembles and temperature')")

    def round_hash(self) -> str:
        """Hash of the fields that determine what every round computes (its manifests' config hash).

        The training settings enter resolved (the regime's lr, epochs, warm-up written out), so the
        hash names what actually trains.
        """
        return config_hash(self._resolved_dump(exclude=_NOT_PER_ROUND))

    def soft_labels_hash(self) -> str:
        """Hash of what the soft labels depend on: the rounds' settings plus T and k."""
        return config_hash(self._resolved_dump(exclude={"tolerance"}))

    def _resolved_dump(self, exclude: set[str]) -> dict:
        return {**hashed_fields(self, exclude=exclude), "train": hashed_fields(self.train.resolved("teacher"))}


class StudentConfig(Section):
    """The student (``distilled``) and the baselines, all trained and evaluated by the same code.

    Methods:
        distilled: hybrid normalised FAT + soft cross-entropy on the teacher's soft
            labels; only confident samples build centres (needs a soft_labels manifest).
            ``metric_term: batch_hard`` swaps FAT for the batch-hard triplet.
        ce: cross-entropy on the given labels (label-smoothed when ``smoothing > 0``).
        ce_triplet: label-smoothed CE + batch-hard triplet on the given labels
            (the Bag-of-Tricks ReID baseline).
        ce_msml / ce_quadruplet: the same with the margin-sample-mining or the
            quadruplet loss instead of the triplet (``triplet_margin`` is their margin).
        fat_hybrid_noisy: hybrid normalised FAT + CE on the given (noisy) labels,
            every sample a centre contributor: FAT without distillation.
        filtered: the ce_triplet objective on the final teacher round's confident rows only,
            with their given labels (filter and retrain, no soft labels).
        cleanlab: the ce_triplet objective on the rows that confident learning
            (``cleanlab.filter.find_label_issues`` on K-fold out-of-fold probabilities,
            the pipeline's ``cleanlab`` section) does not flag, with their given labels.
        oracle: ``oracle_objective`` on ``true_pid`` (needs the ground truth);
            ``multi`` duplicate rows are dropped (under true labels they repeat a clean row).
    """

    train: TrainConfig = Field(default_factory=TrainConfig)
    method: Literal["distilled", "ce", "ce_triplet", "ce_msml", "ce_quadruplet", "fat_hybrid_noisy", "filtered",
                    "cleanlab", "oracle"] = "distilled"
    oracle_objective: Literal["fat_hybrid", "ce_triplet", "ce_msml", "ce_quadruplet"] = Field(
        "fat_hybrid", description="objective of the oracle; fat_hybrid isolates the effect of the labels "
                                  "from that of the loss when compared with 'distilled'")
    metric_term: Literal["fat", "batch_hard"] = Field(
        "fat", description="distilled: the metric term beside the soft cross-entropy: normalised FAT against "
                           "centres of confident samples (the paper), or the batch-hard triplet on the hard labels "
                           "(ce_triplet's term), to measure the student against the strongest clean objective; "
                           "benchmarks/README.md, 'Clean-label objectives'")
    given_label_weight: float = Field(
        1.0, ge=0, le=1,
        description="distilled: weight w of the given label in a confident sample's CE target, "
                    "w·one-hot(given) + (1−w)·teacher soft label; 0 = the teacher's soft label alone (the paper); "
                    "1 (measured: benchmarks/README.md, 'Student ablation') = the label the teacher confirmed. "
                    "Samples the teacher did not trust always get the soft label alone.")
    label_source: Literal["given", "teacher"] = Field(
        "given", description="distilled: the hard label FAT and the P×K sampler use: the given label, or "
                             "the teacher's most probable identity (top-1 soft label)")
    flagged_rows: Literal["soft", "relabel", "drop"] = Field(
        "relabel", description="distilled: what the student does with the rows the teacher flagged: relabel them to "
                               "the teacher's top-1 identity when its probability is >= relabel_min_prob, trained on "
                               "with their soft label, and drop the rest (the rule of `fat-distill labels export`; "
                               "measured: benchmarks/README.md, 'Student ablation'); train on all of them with the "
                               "soft label, their hard label staying the given one (soft, the paper); or drop them")
    flag_disagreeing: bool = Field(
        False, description="distilled: also flag a row the teacher kept when the teacher's most probable identity is "
                           "not its given label (confident learning's predicted ≠ given rule); the row then follows "
                           "flagged_rows. It catches more of the look-alike rows the confidence rule keeps, and "
                           "flags clean rows with them: below the defaults on synth, level on ORL "
                           "(benchmarks/README.md, 'Where the student's errors come from')")
    relabel_min_prob: float = Field(
        0.5, ge=0, le=1, description="distilled with flagged_rows: relabel: the teacher's top-1 probability a flagged "
                                     "row needs to be relabelled instead of dropped")
    ce_weight: float = Field(1.0, ge=0, description="λ_ce of the hybrid and ce_triplet losses")
    smoothing: float = Field(0.1, ge=0, lt=1, description="label smoothing of hard-label cross-entropy")
    soft_smoothing: float = Field(
        0.0, ge=0, lt=1, description="distilled: label smoothing of the soft CE target, (1−ε)·q + ε/C; 0 = the "
                                     "teacher's soft label (mixed with the given label) as it is")
    fat_margin: float = Field(0.1, gt=0, description="margin of normalised FAT")
    fat_aggregation: Literal["hardest", "mean", "topk"] = "hardest"
    fat_cohesion: Literal["max_radius", "mean"] = "mean"
    fat_cohesion_weight: float = Field(
        1.0, ge=0, description="λ_coh of normalised FAT: the reference code's 1.0 for normalised features (0.1 is "
                               "its raw-feature value); measured on clean labels in benchmarks/README.md, "
                               "'Clean-label objectives'")
    fat_negatives: Literal["all_centres", "centre_shortlist", "batch_hardest"] = Field(
        "batch_hardest", description="FAT's negatives: the fat_k nearest in-batch samples of other identities (the "
                                     "reference code's default; with cohesion 1.0 the strongest on clean labels in "
                                     "benchmarks/README.md, 'Clean-label objectives'); every other centre "
                                     "(all_centres, exact); or the fat_k centres nearest to the sample's own centre "
                                     "(centre_shortlist, O(B·k·D) a step, for very many identities)")
    fat_k: int = Field(5, ge=1, description="negatives per sample for centre_shortlist / batch_hardest, "
                                            "and the k of fat_aggregation topk")
    fat_shortlist_refresh: int = Field(
        100, ge=1, description="centre_shortlist with centre_update ema: rebuild the centres' neighbour list every "
                               "this many steps (epoch centres rebuild it at each refresh)")
    centre_update: Literal["ema", "epoch"] = Field(
        "ema", description="centres as an EMA bank updated each batch, or refreshed by a pass each epoch")
    centre_momentum: float = Field(0.9, ge=0, lt=1)
    triplet_margin: float | Literal["soft"] = Field(
        0.3, description="margin of the batch-hard triplet, MSML and quadruplet losses, or 'soft' (not quadruplet)")
    flip_test: bool = Field(True, description="average the features of each image and its mirror image")
    distance: Literal["cosine", "euclidean"] = "cosine"

    @model_validator(mode="after")
    def _check(self) -> StudentConfig:
        if isinstance(self.triplet_margin, float) and self.triplet_margin <= 0:
            raise ValueError("triplet_margin must be > 0 or 'soft'")
        if self.triplet_margin == "soft" and self.objective == "ce_quadruplet":
            raise ValueError("the quadruplet loss has no soft margin; set triplet_margin to a number")
        return self

    def training_hash(self) -> str:
        """Hash of the fields that change the trained weights (not the evaluation-only ones), the training
        settings resolved (the regime's lr, epochs, warm-up written out)."""
        return config_hash({**hashed_fields(self, exclude=_EVALUATION_ONLY),
                            "train": hashed_fields(self.train.resolved("student"))})

    @property
    def objective(self) -> str:
        """The ``build_objective`` name this method trains with."""
        if self.method == "oracle":
            return self.oracle_objective
        if self.method == "distilled" and self.metric_term == "batch_hard":
            return "ce_triplet"
        return {"distilled": "fat_hybrid", "ce": "ce", "ce_triplet": "ce_triplet", "ce_msml": "ce_msml",
                "ce_quadruplet": "ce_quadruplet", "fat_hybrid_noisy": "fat_hybrid", "filtered": "ce_triplet",
                "cleanlab": "ce_triplet"}[self.method]
