"""Clean-label objectives: the FAT hybrid's options against CE + batch-hard triplet (issues 15 part 4 and 17).

The student inherits its objective (hybrid normalised FAT + CE), so on clean labels
that objective must be as strong as the peer it competes with, ``ce_triplet``
(label-smoothed CE + batch-hard triplet, Bag of Tricks). This script trains, on
clean labels (no injected noise) and with the same backbone, schedule and seed,

- ``ce_triplet``, the peer;
- the FAT hybrid with the project's defaults (``fat``) and one option changed
  at a time (``--variants``): negatives from a centre short list or the hardest
  in-batch samples (the reference code's default), the reference code's cohesion
  weight 1.0, centres from a pass each epoch instead of an EMA bank, another
  margin, top-k aggregation, a smaller CE weight;

and reports mAP / rank-1 on query/gallery and the accuracy on the training
labels (which says every model learnt), as mean and min–max over seeds, plus each
variant's difference to ``ce_triplet`` per seed. Every (dataset, epochs, seed,
variant) row is appended to ``runs.csv`` under ``--out`` when it is measured, and
a row found there is not trained again, so a run cut short resumes.

Example (the tables in ``benchmarks/README.md``, "Clean-label objectives")::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_objectives.py --datasets synth orl \\
        --epochs 35 --seeds 0 1 2 --out benchmarks/results/objectives
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fat_distill.distill import StudentConfig, evaluate_student, train_student
from fat_distill.manifests import read_manifest
from fat_distill.train import TrainConfig

log = logging.getLogger("bench_objectives")

RUNS_FILE = "runs.csv"
SUMMARY_FILE = "summary.md"
PEER = "ce_triplet"

#: variant name → (method, StudentConfig fields). Every FAT variant pins the settings this study changed (the
#: cohesion weight 0.1 → 1.0, the negatives all_centres → batch_hardest), so a row keeps meaning what it meant
#: when it was measured: names without ``cohesion`` are at λ_coh 0.1, names without ``batch``/``shortlist`` use
#: every centre as negatives. ``fat_batch5_cohesion1`` is the current default.
_OLD = {"fat_cohesion_weight": 0.1, "fat_negatives": "all_centres"}
VARIANTS: dict[str, tuple[str, dict]] = {
    PEER: ("ce_triplet", {}),
    "fat": ("fat_hybrid_noisy", {**_OLD}),
    "fat_shortlist5": ("fat_hybrid_noisy", {**_OLD, "fat_negatives": "centre_shortlist", "fat_k": 5}),
    "fat_batch5": ("fat_hybrid_noisy", {**_OLD, "fat_negatives": "batch_hardest", "fat_k": 5}),
    "fat_batch5_mean": ("fat_hybrid_noisy", {**_OLD, "fat_negatives": "batch_hardest", "fat_k": 5,
                                             "fat_aggregation": "mean"}),
    "fat_cohesion1": ("fat_hybrid_noisy", {**_OLD, "fat_cohesion_weight": 1.0}),
    "fat_epoch_centres": ("fat_hybrid_noisy", {**_OLD, "centre_update": "epoch"}),
    "fat_margin0.3": ("fat_hybrid_noisy", {**_OLD, "fat_margin": 0.3}),
    "fat_margin0.05": ("fat_hybrid_noisy", {**_OLD, "fat_margin": 0.05}),
    "fat_top5": ("fat_hybrid_noisy", {**_OLD, "fat_aggregation": "topk", "fat_k": 5}),
    "fat_ce0.5": ("fat_hybrid_noisy", {**_OLD, "ce_weight": 0.5}),
    "fat_momentum0.5": ("fat_hybrid_noisy", {**_OLD, "centre_momentum": 0.5}),
    "fat_batch5_margin0.2": ("fat_hybrid_noisy", {**_OLD, "fat_negatives": "batch_hardest", "fat_k": 5,
                                                  "fat_margin": 0.2}),
    "fat_batch5_margin0.3": ("fat_hybrid_noisy", {**_OLD, "fat_negatives": "batch_hardest", "fat_k": 5,
                                                  "fat_margin": 0.3}),
    "fat_batch5_cohesion0": ("fat_hybrid_noisy", {"fat_negatives": "batch_hardest", "fat_k": 5,
                                                  "fat_cohesion_weight": 0.0}),
    "fat_batch5_cohesion1": ("fat_hybrid_noisy", {"fat_negatives": "batch_hardest", "fat_k": 5,
                                                  "fat_cohesion_weight": 1.0}),
    "fat_shortlist5_cohesion1": ("fat_hybrid_noisy", {"fat_negatives": "centre_shortlist", "fat_k": 5,
                                                      "fat_cohesion_weight": 1.0}),
    # The reference code's normalised recipe: 5 hardest in-batch negatives, cohesion 1.0, centres from a pass.
    "fat_reference": ("fat_hybrid_noisy", {"fat_negatives": "batch_hardest", "fat_k": 5, "fat_aggregation": "mean",
                                           "fat_cohesion_weight": 1.0, "centre_update": "epoch"}),
}
DEFAULT_VARIANTS = (PEER, "fat", "fat_shortlist5", "fat_batch5", "fat_cohesion1", "fat_epoch_centres",
                    "fat_margin0.3", "fat_reference")


def _bench_noise():
    """benchmarks/bench_noise.py as a module: its dataset preparation and fit measurement are reused."""
    if "bench_noise" in sys.modules:
        return sys.modules["bench_noise"]
    path = Path(__file__).resolve().with_name("bench_noise.py")
    spec = importlib.util.spec_from_file_location("bench_noise", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_noise"] = module  # its dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def parse_variant(text: str) -> str:
    if text not in VARIANTS:
        raise argparse.ArgumentTypeError(f"unknown variant {text!r}; choose from {', '.join(VARIANTS)}")
    return text


def student_config(variant: str, train: TrainConfig) -> StudentConfig:
    method, fields = VARIANTS[variant]
    return StudentConfig(train=train, method=method, **fields)


def run_variant(manifest: Path, work: Path, variant: str, train: TrainConfig) -> dict:
    """Train and evaluate one variant on a clean ``dataset`` manifest; mAP, rank-1, train accuracy, seconds."""
    config = student_config(variant, train)
    out_dir = work / f"{variant}-e{train.epochs}"
    started = time.perf_counter()
    result = train_student(manifest, config, out_dir, "cpu")
    seconds = time.perf_counter() - started
    metrics_path = evaluate_student(manifest, result.checkpoint, config, out_dir / "metrics.parquet", "cpu")
    metrics = read_manifest(metrics_path, "metrics").set_index("metric")["value"]
    fit = _bench_noise().fit_on_training_labels(manifest, config, result.checkpoint)
    return {"mAP": float(metrics["mAP"]), "rank1": float(metrics["rank1"]), "train_acc": fit["train_acc"],
            "train_seconds": seconds}


def _done(table: pd.DataFrame | None, key: dict) -> bool:
    if table is None or table.empty:
        return False
    mask = np.ones(len(table), dtype=bool)
    for column, value in key.items():
        mask &= (table[column] == value).to_numpy()
    return bool(mask.any())


def _mean_range(values: pd.Series, scale: float = 100.0) -> str:
    values = values.dropna() * scale
    if values.empty:
        return "–"
    if len(values) == 1:
        return f"{values.iloc[0]:.1f}"
    return f"{values.mean():.1f} [{values.min():.1f}, {values.max():.1f}]"


def summarise(runs: pd.DataFrame) -> str:
    """Markdown: per (dataset, epochs) every variant's mAP, rank-1, train accuracy and its mAP minus the peer's
    (per seed, then mean and min–max), best variant first."""
    lines = ["| dataset | epochs | variant | seeds | mAP | rank-1 | train acc | mAP − ce_triplet (per seed) | "
             "train s |", "|---|---:|---|---:|---|---|---|---|---:|"]
    for (dataset, epochs), group in runs.groupby(["dataset", "epochs"], sort=True):
        peer = group[group["variant"] == PEER].set_index("seed")["mAP"]
        rows = []
        for variant, g in group.groupby("variant"):
            per_seed = g.set_index("seed")["mAP"]
            common = per_seed.index.intersection(peer.index)
            diff = (per_seed[common] - peer[common]) if variant != PEER else pd.Series(dtype=float)
            rows.append((float(per_seed.mean()), variant, g, diff))
        for _, variant, g, diff in sorted(rows, key=lambda r: -r[0]):
            lines.append(f"| {dataset} | {epochs} | {variant} | {g['seed'].nunique()} | {_mean_range(g['mAP'])} | "
                         f"{_mean_range(g['rank1'])} | {_mean_range(g['train_acc'])} | "
                         f"{_mean_range(diff) if len(diff) else '–'} | {g['train_seconds'].mean():.0f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    bench = _bench_noise()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["synth", "orl"], choices=["synth", "orl"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", nargs="+", type=int, default=[35], help="training budgets to compare")
    parser.add_argument("--variants", nargs="+", type=parse_variant, default=list(DEFAULT_VARIANTS))
    parser.add_argument("--model", default=None, help="backbone (default: TrainConfig's)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--synth-identities", type=int, default=200)
    parser.add_argument("--synth-images", type=int, default=8, help="images per synthetic identity")
    parser.add_argument("--synth-size", nargs=2, type=int, default=[64, 32])
    parser.add_argument("--orl-root", type=Path, default=bench.DEFAULT_ORL)
    parser.add_argument("--orl-size", nargs=2, type=int, default=[56, 46])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/fat_distill_bench_objectives"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/objectives"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of this process")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    bench = _bench_noise()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / RUNS_FILE
    started = time.perf_counter()
    for dataset in args.datasets:
        if dataset == "orl" and not Path(args.orl_root).is_dir():
            log.warning("ORL faces not found at %s; skipping orl (pass --orl-root)", args.orl_root)
            continue
        size = tuple(args.synth_size if dataset == "synth" else args.orl_size)
        common = dict(image_size=size, lr=args.lr, random_erasing_p=0.0, keep_checkpoints=1,
                      pad=max(2, size[0] // 12))
        if args.model:
            common["model"] = args.model
        if dataset == "orl":
            common.update(batch_p=8, batch_k=4)  # 20 train identities
        # Budgets outer, seeds inner: a run cut short has every seed of the first budget.
        for epochs in args.epochs:
            for seed in args.seeds:
                if dataset == "synth":
                    root = bench.synth_root(args.work_dir, seed, identities=args.synth_identities,
                                            images_per_identity=args.synth_images, size=size)
                else:
                    root = Path(args.orl_root).resolve()
                work = args.work_dir / dataset / f"seed{seed}"
                work.mkdir(parents=True, exist_ok=True)
                manifest = bench.noisy_manifest(bench.clean_frame(dataset, root, seed), root, 0.0, seed,
                                                work / "dataset.parquet")
                train = TrainConfig(epochs=epochs, seed=seed, **common)
                for variant in args.variants:
                    key = {"dataset": dataset, "epochs": epochs, "seed": seed, "variant": variant}
                    table = pd.read_csv(runs_path) if runs_path.is_file() else None
                    if _done(table, key):
                        continue
                    row = {**key, "model": train.model, **run_variant(manifest, work, variant, train)}
                    log.info("%s: mAP %.1f, train acc %.1f, %.0f s", key, 100 * row["mAP"],
                             100 * row["train_acc"], row["train_seconds"])
                    bench.append_rows(runs_path, [row])
    runs = pd.read_csv(runs_path)
    text = summarise(runs)
    (out / SUMMARY_FILE).write_text(text)
    print(text)
    log.info("bench_objectives: finished in %.0f s", time.perf_counter() - started)
    return runs


if __name__ == "__main__":
    main()
