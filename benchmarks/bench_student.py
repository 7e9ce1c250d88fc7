"""Student ablation on finished runs: what feeds the distilled student, with the teacher held fixed.

The teacher stages are the expensive part of a run and do not depend on the student's
settings, so this script takes finished pipeline runs (``fat-distill run`` / ``demo``,
one per seed) and trains, on each run's noisy dataset manifest, soft labels and final
teacher round,

- variants of the distilled student (``--variants``): how flagged rows are used
  (soft label / relabelled to the teacher's top-1 / dropped), the weight of the given
  label on confident rows, the FAT negatives;
- the baselines a practitioner would use instead (``ce_triplet`` on every row,
  ``filtered``: CE + batch-hard on the teacher's confident rows, ``cleanlab``: the same
  on the rows confident learning keeps, its K fold models trained here with the run's
  teacher settings unless the run has a cleanlab stage) and the ``oracle``,

each with the run's own student training settings (model, image size, epochs, seed), and
reports mAP / rank-1 as mean and min–max over the runs, plus per run the fraction of
the mAP gap from the best non-oracle baseline to the oracle that each student closes,
and the noise detection (precision / recall / F1 against the injected noise) of the final
teacher round and, when the cleanlab peer runs, of cleanlab (``detection.csv``).
Rows go to ``runs.csv`` under ``--out`` as they are measured; a row found there is not
trained again.

Example (the ablation in ``benchmarks/README.md``; three demo runs with seeds 0–2)::

    for s in 0 1 2; do fat-distill demo --direct --set data.synth.seed=$s --set noise.seed=$s \\
        --set teacher.train.seed=$s --set student.train.seed=$s; done
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_student.py --runs runs/demo-* \\
        --out benchmarks/results/student
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
import yaml

from fat_distill.distill import (
    StudentConfig,
    TeacherConfig,
    evaluate_student,
    make_soft_labels,
    student_label_map,
    student_training_rows,
    teacher_checkpoints,
    train_student,
)
from fat_distill.distill.student import distilled_targets, filter_training_rows
from fat_distill.distill.cleanlab_baseline import CleanlabConfig, find_label_issues_manifest
from fat_distill.manifests import read_manifest

log = logging.getLogger("bench_student")

RUNS_FILE = "runs.csv"
SUMMARY_FILE = "summary.md"
DETECTION_FILE = "detection.csv"
BASELINES = ("ce_triplet", "fat_hybrid_noisy", "filtered", "cleanlab")

#: variant name → StudentConfig fields on top of the run's student section.
VARIANTS: dict[str, dict] = {
    "ce_triplet": {"method": "ce_triplet"},
    "filtered": {"method": "filtered"},
    "cleanlab": {"method": "cleanlab"},
    "fat_hybrid_noisy": {"method": "fat_hybrid_noisy"},
    "oracle": {"method": "oracle"},
    "distilled": {"method": "distilled"},
    # the paper's recipe (the defaults before the ablation): soft labels on every row, exact all-centre FAT
    "distilled:paper": {"method": "distilled", "flagged_rows": "soft", "given_label_weight": 0.0,
                        "fat_negatives": "all_centres"},
    "distilled:relabel": {"method": "distilled", "flagged_rows": "relabel"},
    "distilled:drop": {"method": "distilled", "flagged_rows": "drop"},
    "distilled:given1": {"method": "distilled", "given_label_weight": 1.0},
    "distilled:given0.5": {"method": "distilled", "given_label_weight": 0.5},
    "distilled:relabel:given1": {"method": "distilled", "flagged_rows": "relabel", "given_label_weight": 1.0},
    "distilled:relabel:given0.5": {"method": "distilled", "flagged_rows": "relabel", "given_label_weight": 0.5},
    "distilled:drop:given1": {"method": "distilled", "flagged_rows": "drop", "given_label_weight": 1.0},
    "distilled:relabel:prob0.3": {"method": "distilled", "flagged_rows": "relabel", "relabel_min_prob": 0.3},
    "distilled:relabel:prob0.7": {"method": "distilled", "flagged_rows": "relabel", "relabel_min_prob": 0.7},
    "distilled:teacher_labels": {"method": "distilled", "label_source": "teacher"},
    "distilled:relabel:given1:batch5": {"method": "distilled", "flagged_rows": "relabel", "given_label_weight": 1.0,
                                        "fat_negatives": "batch_hardest", "fat_k": 5},
    "distilled:bh": {"method": "distilled", "metric_term": "batch_hard"},
    "distilled:relabel:given1:bh": {"method": "distilled", "flagged_rows": "relabel", "given_label_weight": 1.0,
                                    "metric_term": "batch_hard"},
    "distilled:drop:given1:bh": {"method": "distilled", "flagged_rows": "drop", "given_label_weight": 1.0,
                                 "metric_term": "batch_hard"},
    "distilled:relabel:given1:smooth": {"method": "distilled", "flagged_rows": "relabel", "given_label_weight": 1.0,
                                        "soft_smoothing": 0.1},
    "distilled:relabel:given1:bh:smooth": {"method": "distilled", "flagged_rows": "relabel",
                                           "given_label_weight": 1.0, "metric_term": "batch_hard",
                                           "soft_smoothing": 0.1},
    "distilled:drop:given1:smooth": {"method": "distilled", "flagged_rows": "drop", "given_label_weight": 1.0,
                                     "soft_smoothing": 0.1},
    "distilled:smooth": {"method": "distilled", "soft_smoothing": 0.1},
    "distilled:batch5": {"method": "distilled", "fat_negatives": "batch_hardest", "fat_k": 5},
    "distilled:relabel:given1:batch5:smooth": {"method": "distilled", "flagged_rows": "relabel",
                                               "given_label_weight": 1.0, "fat_negatives": "batch_hardest",
                                               "fat_k": 5, "soft_smoothing": 0.1},
    "distilled:relabel:given1:prob0.3": {"method": "distilled", "flagged_rows": "relabel", "given_label_weight": 1.0,
                                         "relabel_min_prob": 0.3},
    # soft labels made again from the run's teacher checkpoints (SOFT_LABELS: teacher fields)
    "distilled:disagree": {"method": "distilled", "flag_disagreeing": True},
    "distilled:disagree:prob0.3": {"method": "distilled", "flag_disagreeing": True, "relabel_min_prob": 0.3},
    "distilled:disagree:drop": {"method": "distilled", "flag_disagreeing": True, "flagged_rows": "drop"},
    "distilled:mixup0.2": {"method": "distilled", "train": {"mixup_alpha": 0.2}},
    "distilled:mixup0.4": {"method": "distilled", "train": {"mixup_alpha": 0.4}},
    "distilled:mixup1": {"method": "distilled", "train": {"mixup_alpha": 1.0}},
    "ce_triplet:mixup0.4": {"method": "ce_triplet", "train": {"mixup_alpha": 0.4}},
    "distilled:rounds": {"method": "distilled"},
    "distilled:rounds:given0.5": {"method": "distilled", "given_label_weight": 0.5},
    "distilled:given0.5:T2": {"method": "distilled", "given_label_weight": 0.5},
    "distilled:T2": {"method": "distilled"},
    "distilled:paper:rounds": {"method": "distilled", "flagged_rows": "soft", "given_label_weight": 0.0,
                               "fat_negatives": "all_centres"},
}
#: variant name → teacher fields of the soft labels it trains on, made from the run's teacher models (the others
#: use the run's own soft labels).
SOFT_LABELS: dict[str, dict] = {
    "distilled:rounds": {"soft_label_models": "all_rounds"},
    "distilled:rounds:given0.5": {"soft_label_models": "all_rounds"},
    "distilled:given0.5:T2": {"temperature": 2.0},
    "distilled:T2": {"temperature": 2.0},
    "distilled:paper:rounds": {"soft_label_models": "all_rounds"},
}
DEFAULT_VARIANTS = ("ce_triplet", "filtered", "oracle", "distilled", "distilled:relabel", "distilled:drop",
                    "distilled:given1", "distilled:relabel:given1")


def parse_variant(text: str) -> str:
    if text not in VARIANTS:
        raise argparse.ArgumentTypeError(f"unknown variant {text!r}; choose from {', '.join(VARIANTS)}")
    return text


def run_inputs(run_dir: Path) -> dict:
    """The manifests and the student section of a finished run (read from its folder, not from Prefect)."""
    run_dir = Path(run_dir).resolve()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    stages = run_dir / "stages"
    rounds = sorted((stages / "teacher").glob("teacher_round_*.parquet"),
                    key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    inputs = {"dataset": stages / "noise" / "dataset_noisy.parquet",
              "soft_labels": stages / "soft_labels" / "soft_labels.parquet",
              "final_round": rounds[-1] if rounds else None}
    if not inputs["dataset"].is_file():  # no noise injected: the data stage's manifest
        inputs["dataset"] = stages / "data" / "dataset.parquet"
    missing = [name for name, path in inputs.items() if path is None or not Path(path).is_file()]
    if missing:
        raise SystemExit(f"{run_dir}: not a finished run, missing {', '.join(missing)}")
    own_issues = stages / "cleanlab" / "label_issues.parquet"
    return {**inputs, "teacher_dir": stages / "teacher", "student": config["student"], "teacher": config["teacher"],
            "cleanlab": config.get("cleanlab", {}), "label_issues": own_issues if own_issues.is_file() else None,
            "seed": config.get("student", {}).get("train", {}).get("seed")}


def label_issues_for(inputs: dict, work: Path, folds: int | None = None) -> Path:
    """The run's own cleanlab ``label_issues`` manifest, else one made here (K fold models with the run's teacher
    training settings, K = ``folds`` or the run's ``cleanlab.folds``; kept under ``work`` for the next call)."""
    if inputs["label_issues"] is not None and folds is None:
        return inputs["label_issues"]
    config = CleanlabConfig.model_validate({**inputs["cleanlab"], **({"folds": folds} if folds else {})})
    return find_label_issues_manifest(inputs["dataset"], config, TeacherConfig.model_validate(inputs["teacher"]),
                                      work / f"cleanlab-filter-k{config.folds}", "cpu")


def soft_labels_for(inputs: dict, fields: dict, work: Path) -> Path:
    """Soft labels from the run's teacher models with ``fields`` over its teacher section (made once under
    ``work``). ``soft_label_models: all_rounds`` averages every round of the run."""
    config = TeacherConfig.model_validate({**inputs["teacher"], **fields})
    out = work / f"soft-labels-{config.soft_labels_hash()}" / "soft_labels.parquet"
    if out.is_file():
        return out
    rounds = len(sorted(Path(inputs["teacher_dir"]).glob("teacher_round_*.parquet")))
    models = [teacher_checkpoints(inputs["teacher_dir"], r, config) for r in range(rounds)]
    chosen = models if config.soft_label_models == "all_rounds" else models[-1]
    out.parent.mkdir(parents=True, exist_ok=True)
    return make_soft_labels(inputs["dataset"], chosen, inputs["final_round"], config, out, "cpu")


def detection_scores(dataset: Path, flagged: pd.Series) -> dict:
    """Precision / recall / F1 (%) of ``flagged`` (bool, by sample_id) against the injected noise."""
    frame = read_manifest(dataset, "dataset").set_index("sample_id").loc[flagged.index]
    if "noise_kind" in frame.columns and frame["noise_kind"].notna().all():
        noisy = (frame["noise_kind"] != "clean").to_numpy()
    else:
        noisy = (frame["pid"] != frame["true_pid"]).to_numpy()
    hit = flagged.to_numpy(dtype=bool)
    tp = float((hit & noisy).sum())
    precision = tp / hit.sum() if hit.sum() else math.nan
    recall = tp / noisy.sum() if noisy.sum() else math.nan
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else math.nan
    # which kinds of noise the detector misses (pair flips to a look-alike identity are the hard ones)
    by_kind = {}
    if "noise_kind" in frame.columns and frame["noise_kind"].notna().all():
        kinds = frame["noise_kind"].to_numpy()
        by_kind = {f"recall_{kind}": 100 * float(hit[kinds == kind].mean())
                   for kind in sorted(set(kinds) - {"clean"})}
    return {"precision": 100 * precision, "recall": 100 * recall, "f1": 100 * f1, "flagged": int(hit.sum()),
            "noisy": int(noisy.sum()), **by_kind}


def detection_rows(run_name: str, inputs: dict, label_issues: Path | None) -> list[dict]:
    """The final teacher round's and (when made) cleanlab's noise detection on one run."""
    final = read_manifest(inputs["final_round"], "teacher_round").set_index("sample_id")
    rows = [{"run": run_name, "detector": "teacher (final round)",
             **detection_scores(inputs["dataset"], ~final["confident"].astype(bool))}]
    if label_issues is not None:
        issues = read_manifest(label_issues, "label_issues").set_index("sample_id")
        rows.append({"run": run_name, "detector": "cleanlab", **detection_scores(inputs["dataset"],
                                                                                 issues["flagged"].astype(bool))})
    return rows


def training_label_quality(dataset: Path, config: StudentConfig, soft_labels: Path | None,
                           rows: Path | None) -> dict:
    """How many train rows a model trains on and the % whose hard label (the one FAT, batch hard and the sampler
    use) is the true identity; NaN without ground truth."""
    frame = read_manifest(dataset, "dataset")
    train, column = student_training_rows(frame, config)
    if config.method in ("filtered", "cleanlab"):
        train = filter_training_rows(train, rows, config.method)
    elif config.method == "distilled":
        train, _, _, _, column = distilled_targets(soft_labels, train, student_label_map(frame, config), config)
    truth = train["true_pid"] if "true_pid" in train.columns else None
    clean = (100.0 * float((train[column].to_numpy() == truth.to_numpy()).mean())
             if truth is not None and truth.notna().all() else math.nan)
    return {"rows_trained": len(train), "labels_clean": clean}


def variant_config(student: dict, variant: str, overrides: dict | None = None) -> StudentConfig:
    """The run's student section with ``overrides`` and the variant's fields on top; a variant's ``train``
    fields are merged into the run's (``train_epochs`` in ``overrides`` sets ``train.epochs``)."""
    overrides = dict(overrides or {})
    epochs = overrides.pop("train_epochs", None)
    variant_fields = dict(VARIANTS[variant])
    fields = {**student, **overrides, **variant_fields}
    fields["train"] = {**student.get("train", {}), **variant_fields.get("train", {})}
    if epochs is not None:
        fields["train"] = {**fields["train"], "epochs": epochs}
    return StudentConfig.model_validate(fields)


def run_variant(inputs: dict, variant: str, work: Path, overrides: dict | None = None,
                cleanlab_folds: int | None = None) -> dict:
    config = variant_config(inputs["student"], variant, overrides)
    kwargs = {}
    if config.method == "distilled":
        kwargs["soft_labels_manifest"] = (soft_labels_for(inputs, SOFT_LABELS[variant], work) if variant in SOFT_LABELS
                                          else inputs["soft_labels"])
    if config.method == "filtered":
        kwargs["rows_manifest"] = inputs["final_round"]
    if config.method == "cleanlab":
        kwargs["rows_manifest"] = label_issues_for(inputs, work, cleanlab_folds)
    quality = training_label_quality(inputs["dataset"], config, kwargs.get("soft_labels_manifest"),
                                     kwargs.get("rows_manifest"))
    out_dir = work / variant.replace(":", "-")
    started = time.perf_counter()
    result = train_student(inputs["dataset"], config, out_dir, "cpu", **kwargs)
    seconds = time.perf_counter() - started
    metrics_path = evaluate_student(inputs["dataset"], result.checkpoint, config, out_dir / "metrics.parquet", "cpu")
    metrics = read_manifest(metrics_path, "metrics").set_index("metric")["value"]
    accuracy = result.history[-1].get("accuracy", math.nan) if result.history else math.nan
    return {"mAP": float(metrics["mAP"]), "rank1": float(metrics["rank1"]), "last_epoch_batch_acc": accuracy,
            "train_seconds": seconds, **quality}


def _mean_range(values: pd.Series) -> str:
    values = values.dropna() * 100
    if values.empty:
        return "–"
    if len(values) == 1:
        return f"{values.iloc[0]:.1f}"
    return f"{values.mean():.1f} [{values.min():.1f}, {values.max():.1f}]"


def summarise(runs: pd.DataFrame) -> str:
    """Markdown: every variant's mAP / rank-1 over runs, its margin over the best baseline, the gap closed, and
    the % of the rows it trained on whose hard label is the true one."""
    lines = ["| variant | runs | mAP | rank-1 | mAP − best baseline (per run) | gap to oracle closed (per run) | "
             "labels clean % (rows) |", "|---|---:|---|---|---|---|---|"]
    margins: dict[str, list[float]] = {}
    closed: dict[str, list[float]] = {}
    for _, group in runs.groupby("run"):
        by = group.drop_duplicates("variant", keep="last").set_index("variant")["mAP"]
        present = [b for b in BASELINES if b in by.index]
        if not present:
            continue
        best = max(by[b] for b in present)
        gap = by["oracle"] - best if "oracle" in by.index else math.nan
        for variant, value in by.items():
            if variant in BASELINES or variant == "oracle":
                continue
            margins.setdefault(variant, []).append(value - best)
            closed.setdefault(variant, []).append((value - best) / gap if gap > 0 else math.nan)
    order = runs.groupby("variant")["mAP"].mean().sort_values(ascending=False).index
    for variant in order:
        g = runs[runs["variant"] == variant]
        margin = _mean_range(pd.Series(margins[variant])) if variant in margins else "–"
        gap = _mean_range(pd.Series(closed[variant])) + " %" if variant in closed else "–"
        labels = "–"
        if "labels_clean" in g.columns and g["labels_clean"].notna().any():
            labels = f"{_mean_range(g['labels_clean'] / 100)} ({g['rows_trained'].mean():.0f})"
        lines.append(f"| {variant} | {g['run'].nunique()} | {_mean_range(g['mAP'])} | {_mean_range(g['rank1'])} | "
                     f"{margin} | {gap} | {labels} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", type=Path, required=True, help="finished run folders (runs/<run_id>)")
    parser.add_argument("--variants", nargs="+", type=parse_variant, default=list(DEFAULT_VARIANTS))
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/fat_distill_bench_student"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/student"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of this process")
    parser.add_argument("--epochs", type=int, default=None, help="student epochs (default: each run's own)")
    parser.add_argument("--cleanlab-folds", type=int, default=None,
                        help="K of the cleanlab peer's fold models (default: the run's cleanlab.folds, cleanlab's 5; "
                             "a run's own cleanlab stage is used when this is not given)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="a student field for every variant, e.g. fat_cohesion_weight=1.0 (repeatable)")
    args = parser.parse_args(argv)
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.overrides)}
    if args.epochs is not None:  # runs made only for their teacher can carry a cut-down student budget
        overrides["train_epochs"] = args.epochs
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    runs_path = args.out / RUNS_FILE
    started = time.perf_counter()
    detection: list[dict] = []
    for run_dir in [r for r in args.runs if not r.is_symlink()]:
        inputs = run_inputs(run_dir)
        for variant in args.variants:
            table = pd.read_csv(runs_path) if runs_path.is_file() else None
            if table is not None and ((table["run"] == run_dir.name) & (table["variant"] == variant)).any():
                continue
            row = {"run": run_dir.name, "seed": inputs["seed"], "variant": variant,
                   **run_variant(inputs, variant, args.work_dir / run_dir.name, overrides, args.cleanlab_folds)}
            log.info("%s %s: mAP %.1f (%.0f s)", run_dir.name, variant, 100 * row["mAP"], row["train_seconds"])
            frame = pd.DataFrame([row])
            if runs_path.is_file():
                frame = pd.concat([pd.read_csv(runs_path), frame], ignore_index=True)
            tmp = runs_path.with_suffix(".tmp")
            frame.to_csv(tmp, index=False, float_format="%.4f")
            tmp.replace(runs_path)
        issues = (label_issues_for(inputs, args.work_dir / run_dir.name, args.cleanlab_folds)
                  if "cleanlab" in args.variants else None)
        detection.extend(detection_rows(run_dir.name, inputs, issues))
    runs = pd.read_csv(runs_path)
    text = summarise(runs)
    if detection:
        table = pd.DataFrame(detection)
        table.to_csv(args.out / DETECTION_FILE, index=False, float_format="%.2f")
        text += "\nNoise detection against the injected noise (%, mean [min, max] over runs):\n\n"
        columns = ["precision", "recall", "f1"] + sorted(c for c in table.columns if c.startswith("recall_"))
        names = [c.replace("recall_", "recall of ") if c.startswith("recall_") else c for c in columns]
        text += ("| detector | runs | " + " | ".join(names) + " |\n|---|---:|" + "---|" * len(columns) + "\n")
        for detector, g in table.groupby("detector", sort=False):
            text += (f"| {detector} | {len(g)} | " + " | ".join(_mean_range(g[c] / 100) for c in columns) + " |\n")
    (args.out / SUMMARY_FILE).write_text(text)
    print(text)
    log.info("bench_student: finished in %.0f s", time.perf_counter() - started)
    return runs


if __name__ == "__main__":
    main()
