"""Do the CPU-sized backbones learn? Train accuracy on clean labels, per backbone, dataset and image size.

For each (dataset, image size, backbone) one model trains CE + batch-hard triplet (the ``ce_triplet``
baseline, which on clean labels is the oracle's setting) through :func:`fat_distill.distill.train_student`
with the scratch-regime defaults (``lr`` and warm-up left unset, resolved by
:meth:`fat_distill.train.TrainConfig.resolved`) unless ``--lr`` is given, and reports its last epoch's
train accuracy (batch accuracy under the training augmentation, as ``history.parquet`` records it), the first
epoch at which it reached 95 %, and the wall time. One torch thread.

Datasets:

- ``orl``: ORL faces (``folders`` layout: 40 identities × 10 images), every identity a train identity;
- ``synth``: ``fat-distill data synth`` data the size of the demo's (200 identities × 8 images, 64×32, seed 0),
  its train split.

Target (issue "Distillation that wins", part 1): >= 95 % within the demo's budget (20 epochs a teacher round,
35 a student).

    python benchmarks/bench_backbones.py --orl /work/shared/data/orl_faces [--models small_cnn tiny_cnn]
        [--epochs 20] [--cases orl:32x32 orl:56x46 synth:64x32] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from fat_distill.data import generate_synthetic_reid, index_dataset
from fat_distill.distill import StudentConfig, train_student
from fat_distill.manifests import write_manifest
from fat_distill.models import build_model
from fat_distill.train import TrainConfig

TARGET = 0.95


def dataset_manifest(kind: str, orl: Path | None, work: Path) -> Path:
    """A ``dataset`` manifest of clean labels for ``orl`` or ``synth``, written under ``work``."""
    out = work / f"{kind}.parquet"
    if out.exists():
        return out
    if kind == "orl":
        if orl is None:
            sys.exit("bench_backbones: the orl cases need --orl DIR (the ORL faces folder, s1 … s40)")
        root = orl
        frame = index_dataset(root, "folders").frame
    else:
        root = work / "synth"
        if not (root / "synth.json").exists():
            generate_synthetic_reid(root, identities=200, images_per_identity=8, size=(64, 32), seed=0)
        frame = index_dataset(root, "market1501").frame
    write_manifest(frame, out, "dataset", stage="bench.backbones", extra={"dataset_root": str(Path(root).resolve())})
    return out


def measure(manifest: Path, model: str, size: tuple[int, int], epochs: int, lr: float | None, pad: int | None,
            seed: int, out_dir: Path) -> dict:
    """Train one clean-label model; its final train accuracy, first epoch >= TARGET, wall seconds."""
    train = TrainConfig(model=model, image_size=size, epochs=epochs, lr=lr, seed=seed, random_erasing_p=0.0,
                        keep_checkpoints=1, **({} if pad is None else {"pad": pad}))
    config = StudentConfig(method="ce_triplet", train=train)
    started = time.perf_counter()
    result = train_student(manifest, config, out_dir, "cpu")
    seconds = time.perf_counter() - started
    accuracy = [float(row["accuracy"]) for row in result.history]
    reached = next((i + 1 for i, a in enumerate(accuracy) if a >= TARGET), None)
    resolved = train.resolved()
    return {"params": sum(p.numel() for p in build_model(model, 0).parameters()), "lr": resolved.lr, "pad": resolved.pad,
            "warmup": resolved.warmup_epochs, "epochs": epochs, "accuracy": accuracy[-1], "reached": reached,
            "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orl", type=Path, default=None, help="ORL faces folder (folders layout)")
    parser.add_argument("--models", nargs="+", default=["small_cnn", "tiny_cnn"])
    parser.add_argument("--cases", nargs="+", default=["orl:32x32", "orl:56x46", "synth:64x32"],
                        help="dataset:HxW")
    parser.add_argument("--epochs", type=int, default=20, help="epochs per model (demo: 20 a teacher round)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the scratch regime's)")
    parser.add_argument("--pad", type=int, default=None, help="random-crop padding (default: scaled to the image height)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="folder for manifests and checkpoints (default: temp)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_backbones-"))
    rows = []
    for case in args.cases:
        kind, _, size_text = case.partition(":")
        size = tuple(int(v) for v in size_text.split("x"))
        manifest = dataset_manifest(kind, args.orl, work)
        for model in args.models:
            row = measure(manifest, model, size, args.epochs, args.lr, args.pad, args.seed,
                          work / f"{kind}-{size_text}-{model}-{args.epochs}-{args.lr}-{args.pad}-{args.seed}")
            rows.append({"dataset": kind, "size": size_text, "model": model, "pad": row.pop("pad"), **row})
            print(f"{kind} {size_text} {model}: train accuracy {100 * row['accuracy']:.1f}% after {args.epochs} "
                  f"epochs (>= 95% at epoch {row['reached']}), {row['seconds']:.0f}s", file=sys.stderr, flush=True)
    header = ["dataset", "size", "backbone", "params", "lr", "warm-up", "pad", "epochs", "train acc",
              "≥95% at epoch", "wall s"]
    lines = [header] + [[r["dataset"], r["size"], r["model"], f"{r['params'] / 1e6:.2f} M", f"{r['lr']:g}",
                         f"{r['warmup']:g}", str(r["pad"]), str(r["epochs"]), f"{100 * r['accuracy']:.1f} %",
                         str(r["reached"] or "—"), f"{r['seconds']:.0f}"] for r in rows]
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for line in lines[1:]:
            print("| " + " | ".join(line) + " |")
    else:
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        for line in lines:
            print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)))
    print(f"torch threads 1, cpu: {os.cpu_count()} cores, seed {args.seed}", file=sys.stderr)


if __name__ == "__main__":
    main()
