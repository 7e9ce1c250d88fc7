"""Input pipeline: fit() images/s against the bare model step, in the same process.

The bare step is what the model alone costs: forward + cross-entropy + backward
+ Adam step on one batch of random tensors already in memory (no data loading,
no augmentation, no objective beyond CE). Against it, ``fit()`` on a synthetic
Market-1501-style dataset of JPEGs with the same model and batch size, three ways:

* **cached + batch aug**: images decoded and resized once into the decoded-image
  cache (``cache: disk``, built before timing), augmented a batch at a time on the
  device (``fat_distill.data.batch_transforms``): today's default.
* **per-sample decode + batch aug**: ``cache: off``; DataLoader workers
  (``num_workers: auto``, persistent) decode and resize every image every epoch,
  augmentation still on batches: the path for datasets that do not fit the cache.
* **per-sample transforms (before)**: the pipeline before the cache: every image
  decoded and transformed by torchvision per sample in the training process
  (``num_workers: 0``, the old default).

Pairing: after every fit() epoch (``on_epoch_end``) the bare step runs as many
steps as an epoch has batches, so each epoch's rate (``images_per_s`` of the
history, the figure fit() logs) is compared with the bare step measured right
before and right after it; on a machine shared with other jobs both see about
the same load. Epoch 1 is left out (warm-up). The table gives, per path, the
median epoch rate, its range, and the median of the per-epoch ratios to the
neighbouring bare windows.

Run:  OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_input.py [--size 32x32] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fat_distill.data import ManifestImageDataset, build_transforms, generate_synthetic_reid, index_dataset
from fat_distill.data.sampler import IdentityBatchSampler
from fat_distill.models import build_model
from fat_distill.train import TrainConfig, build_objective, build_train_data, device_settings, fit

PATHS = ("cached + batch aug", "per-sample decode + batch aug", "per-sample transforms (before)")


def parse_size(text: str) -> tuple[int, int]:
    height, width = (int(v) for v in text.lower().split("x"))
    return height, width


class BareStep:
    """The model alone: forward + CE + backward + Adam step on one in-memory batch of random tensors."""

    def __init__(self, model_name: str, num_classes: int, size: tuple[int, int], batch: int, lr: float) -> None:
        torch.manual_seed(0)
        self.model = build_model(model_name, num_classes)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr)
        self.images, self.labels = torch.randn(batch, 3, *size), torch.randint(0, num_classes, (batch,))
        self.rate(3)  # warm-up

    def step(self) -> None:
        loss = F.cross_entropy(self.model(self.images).logits, self.labels)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def rate(self, steps: int) -> float:
        """Images/s over ``steps`` steps."""
        started = time.perf_counter()
        for _ in range(steps):
            self.step()
        return len(self.images) * steps / (time.perf_counter() - started)


def measure_path(path: str, frame, root: Path, config: TrainConfig, objective_name: str, work: Path, run: int,
                 bare: BareStep) -> tuple[list[float], list[float], list[float]]:
    """One fit() run with a bare window after every epoch: (fit epoch rates, bare rates, ratios), epoch 1 left out."""
    if path == "per-sample transforms (before)":
        dataset = ManifestImageDataset(frame, root, transform=build_transforms(
            tuple(config.image_size), train=True, flip_p=config.flip_p, pad=config.pad,
            random_erasing_p=config.random_erasing_p))
        sampler = IdentityBatchSampler(dataset.labels, config.batch_p, config.batch_k, seed=config.seed)
        num_classes = dataset.num_classes
    else:
        data = build_train_data(frame, root, config, cache_dir=work / ".image_cache")
        dataset, sampler, num_classes = data.dataset, data.batch_sampler, data.num_classes
        if dataset.cached != (path == "cached + batch aug"):
            raise RuntimeError(f"{path}: the dataset is {'' if dataset.cached else 'not '}cached")
    torch.manual_seed(config.seed)
    model = build_model(config.model, num_classes)
    objective = build_objective(objective_name, model=model, num_classes=num_classes, num_samples=len(dataset),
                                image_size=tuple(config.image_size))
    bare_after = [bare.rate(len(sampler))]  # the window right before epoch 1
    result = fit(model, objective, dataset, sampler, config=config, settings=device_settings(torch.device("cpu")),
                 checkpoint_dir=work / f"ckpt-{run}-{PATHS.index(path)}", stage=path, progress=False,
                 on_epoch_end=lambda epoch, stats: bare_after.append(bare.rate(len(sampler))))
    fit_rates = [epoch["images_per_s"] for epoch in result.history]
    ratios = [fit_rates[e] / ((bare_after[e] + bare_after[e + 1]) / 2) for e in range(1, len(fit_rates))]
    return fit_rates[1:], bare_after[1:], ratios


def path_config(path: str, base: TrainConfig) -> TrainConfig:
    if path == "cached + batch aug":
        return base.model_copy(update={"cache": "disk"})
    if path == "per-sample decode + batch aug":
        return base.model_copy(update={"cache": "off", "num_workers": "auto"})
    return base.model_copy(update={"cache": "off", "num_workers": 0})


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} CPU(s) visible"


def load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identities", type=int, default=128, help="synthetic identities (half train, half test)")
    parser.add_argument("--images-per-identity", type=int, default=16)
    parser.add_argument("--size", type=parse_size, default=(32, 32), help="image and model input HxW")
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--objective", default="ce_triplet", help="fit()'s objective (CE + batch-hard triplet)")
    parser.add_argument("--batch-p", type=int, default=16)
    parser.add_argument("--batch-k", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=6, help="epochs per fit() run (the first is not counted)")
    parser.add_argument("--rounds", type=int, default=2, help="fit() runs per path (paths alternate)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS / torch's)")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS, metavar="PATH",
                        help=f"fit() paths to measure: {', '.join(repr(p) for p in PATHS)}")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    batch = args.batch_p * args.batch_k
    base = TrainConfig(model=args.model, image_size=args.size, epochs=args.epochs, batch_p=args.batch_p,
                       batch_k=args.batch_k, optimizer="adam", lr=3e-3, seed=0)
    load_before = load()
    with tempfile.TemporaryDirectory(prefix="bench-input-") as tmp:
        work = Path(tmp)
        root = work / "images"
        generate_synthetic_reid(root, identities=args.identities, cameras=3,
                                images_per_identity=args.images_per_identity, size=args.size, seed=0,
                                distractors=0, junk=0)
        frame = index_dataset(root, "market1501").frame
        frame = frame[(frame["split"] == "train") & (frame["pid"] > 0)].reset_index(drop=True)
        num_classes = int(frame["pid"].nunique())
        bare = BareStep(args.model, num_classes, args.size, batch, base.lr)
        bare_rates: list[float] = []
        rates: dict[str, list[float]] = {path: [] for path in args.paths}
        ratios: dict[str, list[float]] = {path: [] for path in args.paths}
        for run in range(args.rounds):
            for path in args.paths:
                fit_rates, bare_windows, epoch_ratios = measure_path(path, frame, root, path_config(path, base),
                                                                     args.objective, work, run, bare)
                rates[path] += fit_rates
                ratios[path] += epoch_ratios
                bare_rates += bare_windows
    header = (f"{machine()}; torch {torch.__version__}, {torch.get_num_threads()} thread(s); load average "
              f"{load_before} before, {load()} after.\n{args.model} at {args.size[0]}x{args.size[1]}, batch "
              f"{batch} ({args.batch_p}x{args.batch_k}), Adam; fit() objective {args.objective}; "
              f"{len(frame)} train images of {num_classes} identities (JPEG); {args.rounds} fit() run(s) of "
              f"{args.epochs} epochs per path, epoch 1 left out.")
    rows = [("bare model step (tensors in memory)", bare_rates, [1.0])]
    rows += [(f"fit(), {path}", rates[path], ratios[path]) for path in args.paths]
    print(header)
    print("img/s: median (range) over epochs, or over the bare windows between them; of bare step: median over "
          "epochs of the epoch's rate / the bare windows before and after it.")
    print()
    table = [(name, f"{statistics.median(r):,.0f}", f"{min(r):,.0f}–{max(r):,.0f}",
              f"{100 * statistics.median(q):.0f} %") for name, r, q in rows]
    if args.markdown:
        print("| path | img/s | range | of bare step |")
        print("|---|---:|---:|---:|")
        for cells in table:
            print("| " + " | ".join(cells) + " |")
    else:
        widths = [max(len(cells[i]) for cells in table) for i in range(4)]
        for cells in [("path", "img/s", "range", "of bare"), *table]:
            print(f"{cells[0]:<{widths[0]}}  " + "  ".join(f"{c:>{max(w, 7)}}" for c, w in zip(cells[1:], widths[1:])))


if __name__ == "__main__":
    main()
