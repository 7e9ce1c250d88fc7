"""What each kind of wrong label costs the distilled student, measured by repairing it.

For each finished run (``runs/<run_id>``, one with injected noise, so the ground truth is known), this script
takes exactly the train rows the distilled student trains on and their hard labels (the given label, or the
teacher's top-1 where the student relabels a flagged row; :func:`fat_distill.distill.distilled_targets`) and
trains the oracle's model and objective on them, with the run's student settings, under these labels:

- ``student labels``: the student's own hard labels (its training data without the soft labels);
- ``true labels``: every kept row's true identity (what a perfect label cleaner would give the same rows);
- ``true except <kind>``: true labels, except that the rows of one noise kind (``flip``, ``pair``,
  ``outlier``) keep the student's label;
- ``oracle``: every train row with its true identity.

``true labels`` − ``true except <kind>`` is what that kind's remaining wrong labels cost; ``oracle`` −
``true labels`` is what the rows the student does not train on cost. Outlier rows are images of held-out
identities; ``true labels`` gives them their own identity, as the oracle does.

Rows go to ``label_cost.csv`` under ``--out`` as they are measured (a finished (run, variant) is skipped when the
script runs again); ``label_cost.md`` is the mean [min, max] table over runs.

Example (the numbers in ``benchmarks/README.md``, "Where the student's errors come from")::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_label_cost.py --runs runs/demo-* --epochs 35 \\
        --out benchmarks/results/student
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from fat_distill.distill import StudentConfig, evaluate_student, train_student
from fat_distill.distill._common import load_dataset
from fat_distill.distill.student import distilled_targets, student_label_map, student_training_rows
from fat_distill.manifests import read_manifest, write_manifest

from bench_student import _mean_range, run_inputs

NOISE_KINDS = ("flip", "pair", "outlier")
VARIANTS = ("student labels", "true labels", *(f"true except {kind}" for kind in NOISE_KINDS), "oracle")
RESULTS_FILE = "label_cost.csv"
SUMMARY_FILE = "label_cost.md"


def relabelled_dataset(frame: pd.DataFrame, student_rows: pd.DataFrame, student_column: str,
                       variant: str) -> pd.DataFrame:
    """The dataset frame with ``true_pid`` of the train rows set to the labels ``variant`` trains on.

    The oracle method trains on ``true_pid``, so writing the wanted label there trains the oracle's
    objective on it. Train rows the student does not train on are removed (except for ``oracle``).
    """
    if variant == "oracle":
        return frame.reset_index(drop=True)
    if "noise_kind" not in frame.columns or frame["noise_kind"].isna().any():
        raise SystemExit("bench_label_cost: the dataset has no noise_kind column; use a run with injected noise")
    student_label = dict(zip(student_rows["sample_id"].astype(str), student_rows[student_column]))
    is_train = frame["split"] == "train"
    kept = frame["sample_id"].astype(str).isin(student_label)
    out = frame[~is_train | kept].copy()
    train = out["split"] == "train"
    if variant == "true labels":
        keep_student = pd.Series(False, index=out.index)
    elif variant == "student labels":
        keep_student = train
    elif variant.startswith("true except "):
        keep_student = train & (out["noise_kind"] == variant.removeprefix("true except "))
    else:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    labels = out.loc[keep_student, "sample_id"].astype(str).map(student_label)
    out["true_pid"] = out["true_pid"].astype("int64")
    out.loc[keep_student, "true_pid"] = labels.astype("int64")
    return out.reset_index(drop=True)


def run_variant(run_dir: Path, variant: str, work: Path, epochs: int | None) -> dict:
    inputs = run_inputs(run_dir)
    dataset = load_dataset(inputs["dataset"])
    fields = dict(inputs["student"])
    if epochs is not None:
        fields["train"] = {**fields["train"], "epochs": epochs}
    config = StudentConfig.model_validate({**fields, "method": "distilled"})
    train, _ = student_training_rows(dataset.frame, config)
    rows, *_, column = distilled_targets(inputs["soft_labels"], train, student_label_map(dataset.frame, config),
                                         config)
    frame = relabelled_dataset(dataset.frame, rows, column, variant)
    is_train = frame["split"] == "train"
    truth = dataset.frame.set_index("sample_id")["true_pid"]
    wrong = int((frame.loc[is_train, "true_pid"].to_numpy()
                 != truth.loc[frame.loc[is_train, "sample_id"]].to_numpy()).sum())
    out_dir = work / run_dir.name / variant.replace(" ", "-")
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / "dataset.parquet"
    write_manifest(frame, manifest, "dataset", stage="bench_label_cost",
                   extra={"dataset_root": str(dataset.root.resolve()),
                          "allow_outside_root": dataset.allow_outside_root})
    oracle = config.model_copy(update={"method": "oracle"})
    started = time.perf_counter()
    result = train_student(manifest, oracle, out_dir / "student", "cpu")
    seconds = time.perf_counter() - started
    metrics = read_manifest(evaluate_student(manifest, result.checkpoint, oracle, out_dir / "metrics.parquet", "cpu"),
                            "metrics").set_index("metric")["value"]
    return {"run": run_dir.name, "variant": variant, "rows": int(is_train.sum()), "wrong_labels": wrong,
            "mAP": float(metrics["mAP"]), "rank1": float(metrics["rank1"]), "train_seconds": round(seconds, 1)}


def summarise(results: pd.DataFrame) -> str:
    """Markdown: mAP mean [min, max] per variant, and its difference from ``true labels`` (mean over runs)."""
    lines = ["| labels | runs | train rows | wrong labels | mAP | − true labels (per run) |",
             "|---|---:|---:|---:|---|---|"]
    by_run = results.drop_duplicates(["run", "variant"], keep="last").pivot(index="run", columns="variant",
                                                                            values="mAP")
    for variant in [v for v in VARIANTS if v in by_run.columns]:
        g = results[results["variant"] == variant]
        diff = "–"
        if "true labels" in by_run.columns and variant != "true labels":
            d = (by_run[variant] - by_run["true labels"]).dropna() * 100
            if len(d):
                diff = f"{d.mean():+.1f} ({', '.join(f'{x:+.1f}' for x in d)})"
        lines.append(f"| {variant} | {g['run'].nunique()} | {g['rows'].mean():.0f} | {g['wrong_labels'].mean():.0f} | "
                     f"{_mean_range(g['mAP'])} | {diff} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", type=Path, required=True, help="finished run folders (runs/<run_id>)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: each run's student's)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/fat_distill_bench_label_cost"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/student"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of this process")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / RESULTS_FILE
    for run_dir in [r for r in args.runs if not r.is_symlink()]:
        for variant in args.variants:
            table = pd.read_csv(path) if path.is_file() else None
            if table is not None and ((table["run"] == run_dir.name) & (table["variant"] == variant)).any():
                continue
            row = run_variant(run_dir, variant, args.work_dir, args.epochs)
            table = pd.concat([table, pd.DataFrame([row])], ignore_index=True) if table is not None \
                else pd.DataFrame([row])
            table.to_csv(path, index=False)
            (args.out / SUMMARY_FILE).write_text(summarise(table))
            logging.info("%s / %s: mAP %.1f on %d rows (%d wrong)", run_dir.name, variant, 100 * row["mAP"],
                         row["rows"], row["wrong_labels"])
    results = pd.read_csv(path) if path.is_file() else pd.DataFrame()
    if not results.empty:
        print(summarise(results))
    return results


if __name__ == "__main__":
    main()
