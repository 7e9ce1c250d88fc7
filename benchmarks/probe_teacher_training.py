"""Probe: does training the teacher's round 0 differently find more of the noise, pair flips above all?

For each finished run with injected noise, this trains one round-0 teacher on every train row with its given
label (the run's teacher model and image size, Adam at lr 3e-3 with a one-cycle cosine schedule, batches of 64
drawn at random, flip and pad-crop augmentation) in one of three ways:

- ``ce``: plain cross-entropy, the pipeline's round 0 in a plain loop;
- ``coteach``: co-teaching (Han et al., NeurIPS 2018): two networks, each updated only on the
  ``1 − forget_rate`` of every batch with the smallest loss under the *other* network, the forget rate
  ramped from 0 over the first quarter of the epochs; the probabilities are the two networks' mean;
- ``mixup``: cross-entropy on mixup batches (λ ~ Beta(α, α) folded to >= 0.5).

It then flags rows with the pipeline's rule (:func:`fat_distill.distill.score_confidence`, ``gmm``, at least 2
kept per identity) on the final probabilities, and reports precision, recall (overall and per noise kind),
the fraction of clean rows kept, and the % right of the labels a student would get (kept rows with their
given label, flagged rows relabelled to the top-1 identity when its probability is >= 0.5, else dropped).
For ``ce`` it also scores the area under the margin (AUM, Pleiss et al., NeurIPS 2020: the mean over training
of the given label's logit minus the largest other logit), flagging the low component of a 2-component GMM.

This is a probe of the detector, outside the pipeline (no caching, no resume). Rows go to
``teacher_training.csv`` under ``--out``.

Example (the numbers in ``benchmarks/README.md``, "Where the student's errors come from")::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/probe_teacher_training.py --runs runs/demo-* --out /tmp/probe
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import yaml
from sklearn.mixture import GaussianMixture

from fat_distill.data.batch_transforms import normalize_batch
from fat_distill.data.image_dataset import build_label_map
from fat_distill.distill._common import load_dataset
from fat_distill.distill.confidence import score_confidence
from fat_distill.models import build_model
from fat_distill.train.config import TrainConfig
from fat_distill.train.data import open_dataset

MODES = ("ce", "coteach", "mixup")
NOISE_KINDS = ("flip", "pair", "outlier")
RESULTS_FILE = "teacher_training.csv"


def load_train_images(run_dir: Path) -> tuple[pd.DataFrame, torch.Tensor, torch.Tensor, dict, str]:
    """The run's noisy train rows, their uint8 images at the teacher's size, given labels as class indices."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    manifest = run_dir / "stages" / "noise" / "dataset_noisy.parquet"
    dataset = load_dataset(manifest)
    train = dataset.frame[dataset.frame["split"] == "train"].reset_index(drop=True)
    if "noise_kind" not in train.columns:
        raise SystemExit(f"{run_dir}: the train rows have no noise_kind; use a run with injected noise")
    teacher = config["teacher"]["train"]
    train_config = TrainConfig(model=teacher["model"], image_size=tuple(teacher["image_size"]))
    label_map = build_label_map(train["pid"])
    images = open_dataset(train, dataset.root, train_config, label_map=label_map,
                          cache_dir=manifest.parent / ".image_cache")
    x = torch.stack([images[i][0] for i in range(len(images))])
    y = torch.tensor([label_map[p] for p in train["pid"]])
    return train, x, y, label_map, teacher["model"]


def augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Random horizontal flip and pad-crop (10 px per 128 px of height) of a uint8 batch, normalised."""
    height, width = x.shape[2], x.shape[3]
    pad = max(1, round(height * 10 / 128))
    flip = torch.from_numpy(rng.random(x.shape[0]) < 0.5)
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (pad, pad, pad, pad))
    i, j = rng.integers(0, 2 * pad + 1, 2)
    return normalize_batch(padded[:, :, i:i + height, j:j + width].contiguous())


def train_probe(x, y, num_classes, model_name, mode, *, epochs, seed, forget_rate, alpha, batch_size=64):
    """Train round 0 as ``mode``; returns (probabilities (N, C), AUM (N,) or None)."""
    n = len(y)
    torch.manual_seed(seed)
    nets = [build_model(model_name, num_classes) for _ in range(2 if mode == "coteach" else 1)]
    steps = (n + batch_size - 1) // batch_size
    optimisers = [torch.optim.Adam(m.parameters(), lr=3e-3, weight_decay=5e-4) for m in nets]
    schedules = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=3e-3, total_steps=steps * epochs, pct_start=0.05)
                 for o in optimisers]
    rng = np.random.default_rng(seed)
    margin_sum, margin_count = torch.zeros(n), torch.zeros(n)
    ramp = max(1, epochs // 4)
    for epoch in range(epochs):
        order = rng.permutation(n)
        for b in range(steps):
            idx = torch.from_numpy(order[b * batch_size:(b + 1) * batch_size])
            xb, yb = augment(x[idx], rng), y[idx]
            if mode == "mixup":
                lam = float(rng.beta(alpha, alpha))
                lam = max(lam, 1 - lam)
                perm = torch.from_numpy(rng.permutation(len(idx)))
                logits = nets[0](lam * xb + (1 - lam) * xb[perm]).logits
                losses = [lam * F.cross_entropy(logits, yb) + (1 - lam) * F.cross_entropy(logits, yb[perm])]
            else:
                outs = [m(xb).logits for m in nets]
                if mode == "ce":
                    with torch.no_grad():
                        own = outs[0].gather(1, yb[:, None])[:, 0]
                        other = outs[0].scatter(1, yb[:, None], float("-inf")).max(1).values
                        margin_sum.index_add_(0, idx, own - other)
                        margin_count.index_add_(0, idx, torch.ones(len(idx)))
                    losses = [F.cross_entropy(outs[0], yb)]
                else:
                    per_sample = [F.cross_entropy(o, yb, reduction="none") for o in outs]
                    keep = max(1, int(round((1 - forget_rate * min(1.0, epoch / ramp)) * len(idx))))
                    small = [torch.argsort(p.detach())[:keep] for p in per_sample]
                    losses = [per_sample[0][small[1]].mean(), per_sample[1][small[0]].mean()]
            for optimiser, loss, schedule in zip(optimisers, losses, schedules):
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
    with torch.no_grad():
        probs = torch.zeros(n, num_classes, dtype=torch.float64)
        for m in nets:
            m.eval()
            for start in range(0, n, 256):
                batch = normalize_batch(x[start:start + 256])
                probs[start:start + 256] += F.softmax(m(batch).logits.double(), 1)
        probs /= len(nets)
    aum = (margin_sum / margin_count.clamp(min=1)).numpy() if mode == "ce" else None
    return probs.numpy(), aum


def detection_row(train: pd.DataFrame, flagged: np.ndarray, probs: np.ndarray, y: np.ndarray,
                  label_map: dict) -> dict:
    kinds = train["noise_kind"].to_numpy()
    noisy = kinds != "clean"
    row = {"flagged": int(flagged.sum()),
           "precision": 100 * float((flagged & noisy).sum() / max(flagged.sum(), 1)),
           "recall": 100 * float((flagged & noisy).sum() / max(noisy.sum(), 1))}
    for kind in NOISE_KINDS:
        row[f"recall_{kind}"] = 100 * float(flagged[kinds == kind].mean()) if (kinds == kind).any() else np.nan
    row["clean_kept"] = 100 * float((~flagged[~noisy]).mean())
    labels = y.copy()
    top, top_prob = probs.argmax(1), probs.max(1)
    relabel = flagged & (top_prob >= 0.5)
    labels[relabel] = top[relabel]
    used = ~flagged | relabel
    truth = np.array([label_map.get(p, -1) for p in train["true_pid"]])
    row["rows_trained"] = int(used.sum())
    row["labels_clean"] = 100 * float((labels[used] == truth[used]).mean())
    return row


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", type=Path, required=True)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--epochs", type=int, default=20, help="epochs of round 0 (the scratch default: 20)")
    parser.add_argument("--forget-rate", type=float, default=0.4, help="co-teaching's final forget rate")
    parser.add_argument("--alpha", type=float, default=0.4, help="mixup's Beta(α, α)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("/tmp/fat_distill_probe_teacher"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / RESULTS_FILE
    for run_dir in [r for r in args.runs if not r.is_symlink()]:
        train, x, y, label_map, model_name = load_train_images(run_dir)
        for mode in args.modes:
            table = pd.read_csv(path) if path.is_file() else None
            if table is not None and ((table["run"] == run_dir.name) & (table["mode"] == mode)).any():
                continue
            started = time.perf_counter()
            probs, aum = train_probe(x, y, len(label_map), model_name, mode, epochs=args.epochs, seed=args.seed,
                                     forget_rate=args.forget_rate, alpha=args.alpha)
            seconds = time.perf_counter() - started
            scores = score_confidence(y.numpy(), probs, rule="gmm", min_per_class=2)
            rows = [{"run": run_dir.name, "mode": mode, "detector": "gmm on final probabilities",
                     "train_acc": 100 * float((probs.argmax(1) == y.numpy()).mean()),
                     **detection_row(train, ~np.asarray(scores.confident), probs, y.numpy(), label_map),
                     "seconds": round(seconds, 1)}]
            if aum is not None:
                mixture = GaussianMixture(2, random_state=0).fit(aum[:, None])
                low = int(np.argmin(mixture.means_[:, 0]))
                flagged = mixture.predict_proba(aum[:, None])[:, low] > 0.5
                rows.append({**rows[0], "detector": "gmm on AUM",
                             **detection_row(train, flagged, probs, y.numpy(), label_map)})
            table = pd.concat([table, pd.DataFrame(rows)], ignore_index=True) if table is not None \
                else pd.DataFrame(rows)
            table.to_csv(path, index=False)
            for row in rows:
                print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}))
    return pd.read_csv(path)


if __name__ == "__main__":
    main()
