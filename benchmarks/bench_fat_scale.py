"""FAT at face-recognition scale: exact FAT, short-list FAT and batch hard, as the number of identities grows.

One training step's loss (forward + backward) at D = 2048 for C identities and
batch size B, P x K labels with K = 4:

- ``fat_exact``: ``FATLoss.normalised()`` (every other centre a negative, the
  hardest one taken): one (B, C) GEMM forward and one backward, O(B*C*D);
- ``fat_shortlist``: ``FATLoss.normalised(negatives="centre_shortlist", k=5)``:
  each sample's negatives are the 5 centres nearest to its own class centre,
  O(B*k*D);
- ``pml_bh``: pytorch-metric-learning's ``TripletMarginLoss(margin=0.3)`` fed by
  ``BatchHardMiner()``, O(B^2*D) and independent of C.

Both FAT variants read the same centre bank, in ``mode="epoch"`` (centres from
a pass, as the reference code): the timed step is the loss alone. The bank's
neighbour list is rebuilt outside the step (at each epoch refresh or every N
EMA steps); its O(C^2*D) rebuild is timed on its own. At C above
``--rebuild-max-classes`` (default 5,000: a CPU rebuild at C = 85,000 is
~1.5e13 multiply-adds) the rebuild time is extrapolated quadratically from the
largest measured C and the step uses a stand-in list of k distinct other
classes per class: the step gathers k rows per sample whatever they are, so its
time is that of the real list (its loss value is not, and none is reported).

Data: synthetic identities with look-alikes (groups of 8 unit prototypes
``normalize(group direction + 0.45 * own direction)``), samples
``normalize(prototype + unit noise)``; the bank's centres are the means of a
pass of 4 samples per identity. In this regime about half of the samples still
violate the margin at their hardest negative centre, as in mid-training. On
this data the script also reports, at every C with a real list, how far
short-list FAT is from exact FAT on the same batch: the relative loss
difference, the cosine between the two gradients and the share of samples
whose hardest negative centre is in their class's short list. Synthetic
structure says little about real identities; the student's mAP with each mode
is the measure that decides.

Time: median of ``--repeats`` steps after ``--warmup``, the variants
interleaved within each repeat (load from other processes hits them alike),
with the spread (min-max). Memory: peak above what was allocated before the
step (bank and inputs excluded): on CUDA ``torch.cuda.max_memory_allocated``;
on CPU the resident-set high-water mark of one step in a fresh subprocess, as
in ``bench_losses.py`` (``tracemalloc`` does not see torch's allocations).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_fat_scale.py              # --quick grid, a few minutes on a CPU
    python benchmarks/bench_fat_scale.py --full --device cuda           # B up to 4096, real lists at every C
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_losses import _proc_status_kib, cuda_peak_mib, describe_device, pk_labels, synchronize  # noqa: E402

from fat_distill.losses import CentreBank, FATLoss  # noqa: E402

METHODS = ("fat_exact", "fat_shortlist", "pml_bh")
NAMES = {"fat_exact": "exact FAT", "fat_shortlist": "short-list FAT", "pml_bh": "pml batch hard"}
SAMPLES_PER_ID = 4  # K of the P x K batches
GROUP = 8  # look-alike identities per group
SPREAD = 0.45  # a prototype's own direction against its group's (smaller: closer look-alikes)
NOISE = 1.0  # sample spread around its prototype (unit vectors)
WARM_SAMPLES = 4  # samples per identity in the pass that builds the centres
QUICK = {"batches": [256, 1024], "classes": [751, 4101, 85_000], "repeats": 5, "warmup": 1}
FULL = {"batches": [256, 1024, 4096], "classes": [751, 4101, 85_000], "repeats": 9, "warmup": 2}


def prototypes(num_classes: int, dim: int) -> torch.Tensor:
    """Unit identity prototypes in groups of GROUP look-alikes (a shared direction plus their own)."""
    generator = torch.Generator().manual_seed(num_classes)
    groups = torch.randn(-(-num_classes // GROUP), dim, generator=generator)
    own = torch.randn(num_classes, dim, generator=generator)
    return F.normalize(F.normalize(groups, dim=1).repeat_interleave(GROUP, 0)[:num_classes]
                       + SPREAD * F.normalize(own, dim=1), dim=1)


def samples(protos: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = F.normalize(torch.randn(len(labels), protos.shape[1], generator=generator), dim=1)
    return F.normalize(protos[labels] + NOISE * noise, dim=1)


@dataclass
class Setup:
    embeddings: torch.Tensor
    labels: torch.Tensor
    bank: CentreBank
    real_list: bool


def build_bank(protos: torch.Tensor, device: str, rebuild_max: int | None) -> tuple[CentreBank, bool]:
    """A bank warmed by a pass of WARM_SAMPLES samples per identity, with its neighbour list (real or stand-in)."""
    num_classes, dim = protos.shape
    generator = torch.Generator().manual_seed(num_classes + 1)
    bank = FATLoss.normalised(negatives="centre_shortlist", k=5).new_centre_bank(num_classes, dim, mode="epoch")
    bank = bank.to(device)
    # The pass, class chunk by class chunk through an EMA bank without a list: a class's
    # first update takes its samples' mean as it is, so each centre is its pass mean.
    warm = CentreBank(num_classes, dim, mode="ema", centre_mode=4).to(device)
    for start in range(0, num_classes, 4096):
        ids = torch.arange(start, min(num_classes, start + 4096)).repeat_interleave(WARM_SAMPLES)
        warm.update(samples(protos, ids, generator).to(device), ids.to(device))
    bank.load_state_dict(warm.state_dict(), strict=False)  # centres, running mean, valid, counts
    real_list = rebuild_max is None or num_classes <= rebuild_max
    if real_list:
        bank.rebuild_shortlist()
    else:
        # Timing-only stand-in: k distinct classes other than c, (c + r_c + j) mod C.
        start = torch.randint(1, num_classes - bank.shortlist_k, (num_classes, 1), generator=generator)
        stand_in = (torch.arange(num_classes).unsqueeze(1) + start + torch.arange(bank.shortlist_k)) % num_classes
        bank.shortlist.copy_(stand_in.to(device))
        bank.shortlist_age.zero_()
    return bank, real_list


def build_setup(protos: torch.Tensor, bank: CentreBank, real_list: bool, batch: int, device: str) -> Setup:
    """A P x K batch of samples around the prototypes, requiring grad."""
    generator = torch.Generator().manual_seed(batch)
    labels = pk_labels(batch, protos.shape[0], SAMPLES_PER_ID, generator)
    embeddings = samples(protos, labels, generator).to(device).requires_grad_(True)
    return Setup(embeddings, labels.to(device), bank, real_list)


def make_step(method: str, setup: Setup) -> Callable[[], None]:
    embeddings, labels, bank = setup.embeddings, setup.labels, setup.bank
    if method == "pml_bh":
        from pytorch_metric_learning import losses, miners

        miner, pml_loss = miners.BatchHardMiner(), losses.TripletMarginLoss(margin=0.3)

        def step() -> None:
            embeddings.grad = None
            pml_loss(embeddings, labels, miner(embeddings, labels)).backward()

        return step
    negatives = "all_centres" if method == "fat_exact" else "centre_shortlist"
    loss_fn = FATLoss.normalised(negatives=negatives, k=5)

    def step() -> None:
        embeddings.grad = None
        loss_fn(embeddings, labels, bank).backward()

    return step


def time_steps(steps: dict[str, Callable[[], None]], device: str, warmup: int, repeats: int
               ) -> dict[str, list[float]]:
    """Seconds of each repeat per method, the methods interleaved within every repeat."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def approximation(setup: Setup) -> dict[str, float]:
    """Short-list against exact FAT on the same batch and bank: loss difference, gradient cosine, recall."""
    embeddings, labels, bank = setup.embeddings, setup.labels, setup.bank
    exact = FATLoss.normalised().compute(embeddings, labels, bank)
    (exact_grad,) = torch.autograd.grad(exact.loss, embeddings)
    approx = FATLoss.normalised(negatives="centre_shortlist", k=5).compute(embeddings, labels, bank)
    (approx_grad,) = torch.autograd.grad(approx.loss, embeddings)
    with torch.no_grad():
        squared = torch.cdist(F.normalize(embeddings, dim=1), bank.centres).square()
        squared[torch.arange(len(labels)), labels] = float("inf")
        hardest = squared.argmin(dim=1)
        recall = (bank.shortlist[labels] == hardest.unsqueeze(1)).any(dim=1).float().mean()
    return {
        "exact_loss": exact.loss.item(),
        "exact_active": exact.active_fraction.item(),
        "loss_rel_diff": (approx.loss - exact.loss).abs().item() / max(abs(exact.loss.item()), 1e-12),
        "p2s_rel_diff": (approx.terms["p2s"] - exact.terms["p2s"]).abs().item()
        / max(abs(exact.terms["p2s"].item()), 1e-12),
        "grad_cosine": F.cosine_similarity(approx_grad.flatten(), exact_grad.flatten(), dim=0).item(),
        "hardest_recall": recall.item(),
    }


def rebuild_seconds(bank: CentreBank, device: str, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        bank.rebuild_shortlist()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_peak_mib_here(method: str, batch: int, num_classes: int, dim: int, rebuild_max: int | None) -> float:
    """Inside a fresh process: peak RSS growth of one step, MiB."""
    small = prototypes(16, dim)
    make_step(method, build_setup(small, *build_bank(small, "cpu", None), 8, "cpu"))()  # initialise libraries
    protos = prototypes(num_classes, dim)
    bank, real_list = build_bank(protos, "cpu", rebuild_max) if method != "pml_bh" else (None, False)
    step = make_step(method, build_setup(protos, bank, real_list, batch, "cpu"))
    del protos
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current RSS
    before = _proc_status_kib("VmRSS")
    step()
    return (_proc_status_kib("VmHWM") - before) / 1024


def cpu_peak_mib(method: str, batch: int, num_classes: int, dim: int, rebuild_max: int | None) -> float:
    command = [sys.executable, os.path.abspath(__file__), "--memory-probe", method, "--probe-batch", str(batch),
               "--probe-classes", str(num_classes), "--dim", str(dim),
               "--rebuild-max-classes", str(rebuild_max or 0)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed blocks go back: RSS follows live memory
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"memory probe {method} B={batch} C={num_classes} failed:\n{result.stderr}")
    return float(json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"])


def spread(values: list[float]) -> str:
    return f"{min(values) * 1e3:.1f}-{max(values) * 1e3:.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument("--quick", action="store_true", help="B 256/1024, C 751/4101/85,000, 5 repeats (default)")
    grid.add_argument("--full", action="store_true", help="the issue's grid: B 256/1024/4096, 9 repeats, "
                                                          "real neighbour lists at every C")
    parser.add_argument("--batches", type=int, nargs="+", help="override the grid's batch sizes")
    parser.add_argument("--classes", type=int, nargs="+", help="override the grid's identity counts")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared machine)")
    parser.add_argument("--rebuild-max-classes", type=int, default=None,
                        help="largest C whose neighbour list is really rebuilt (default 5000 with --quick, "
                             "every C with --full; 0 = every C)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--memory-probe", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--probe-batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--probe-classes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.memory_probe:
        rebuild_max = args.rebuild_max_classes or None
        peak = cpu_peak_mib_here(args.memory_probe, args.probe_batch, args.probe_classes, args.dim, rebuild_max)
        print(json.dumps({"peak_mib": peak}))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch; run with --device cpu")
    preset = FULL if args.full else QUICK
    batches = args.batches or preset["batches"]
    class_counts = sorted(args.classes or preset["classes"])
    repeats = args.repeats or preset["repeats"]
    warmup = args.warmup if args.warmup is not None else preset["warmup"]
    if args.rebuild_max_classes is None:
        rebuild_max = None if args.full else 5000
    else:
        rebuild_max = args.rebuild_max_classes or None

    import pytorch_metric_learning

    timings: dict[tuple[str, int, int], list[float]] = {}
    quality: dict[tuple[int, int], dict[str, float]] = {}
    rebuilds: dict[int, tuple[float, bool]] = {}
    began = time.perf_counter()
    banks = {}
    for num_classes in class_counts:
        protos = prototypes(num_classes, args.dim)
        bank, real_list = build_bank(protos, args.device, rebuild_max)
        if real_list:
            rebuilds[num_classes] = (rebuild_seconds(bank, args.device), True)
        banks[num_classes] = (protos, bank, real_list)
        print(f"C={num_classes:6d} bank ready ({'real' if real_list else 'stand-in'} neighbour list)", file=sys.stderr)
    for batch in batches:
        # Every C and method in one interleaved loop, so that the ratios across C see the same load.
        setups = {c: build_setup(*banks[c], batch, args.device) for c in class_counts}
        steps = {("pml_bh", 0): make_step("pml_bh", setups[class_counts[0]])}
        for num_classes, setup in setups.items():
            if setup.real_list:
                quality[(num_classes, batch)] = approximation(setup)
            for method in ("fat_exact", "fat_shortlist"):
                steps[(method, num_classes)] = make_step(method, setup)
        for (method, num_classes), values in time_steps(steps, args.device, warmup, repeats).items():
            for c in class_counts if method == "pml_bh" else [num_classes]:
                timings[(method, c, batch)] = values
            print(f"B={batch:5d} {method:14s} C={num_classes or 'any':>6} median "
                  f"{statistics.median(values) * 1e3:9.1f} ms [{spread(values)}]", file=sys.stderr)
        del steps, setups
    del banks
    measured = [c for c in rebuilds if rebuilds[c][1]]
    for num_classes in class_counts:
        if num_classes not in rebuilds and measured:
            base = max(measured)
            rebuilds[num_classes] = (rebuilds[base][0] * (num_classes / base) ** 2, False)

    memory: dict[tuple[str, int, int], float] = {}
    if not args.no_memory:
        for num_classes in class_counts:
            for batch in batches:
                for method in METHODS:
                    if method == "pml_bh" and num_classes != class_counts[0]:
                        memory[(method, num_classes, batch)] = memory[(method, class_counts[0], batch)]
                        continue
                    if args.device == "cuda":
                        protos = prototypes(num_classes, args.dim)
                        setup = build_setup(protos, *build_bank(protos, "cuda", rebuild_max), batch, "cuda")
                        memory[(method, num_classes, batch)] = cuda_peak_mib(make_step(method, setup))
                        del setup, protos
                    else:
                        memory[(method, num_classes, batch)] = cpu_peak_mib(
                            method, batch, num_classes, args.dim, rebuild_max)
                    print(f"C={num_classes:6d} B={batch:5d} {method:14s} peak "
                          f"{memory[(method, num_classes, batch)]:9.1f} MiB", file=sys.stderr)

    median = {key: statistics.median(values) * 1e3 for key, values in timings.items()}
    smallest = class_counts[0]
    memory_how = ("torch.cuda.max_memory_allocated above the allocation before the step" if args.device == "cuda"
                  else "peak RSS growth of one step in a fresh subprocess (VmHWM - VmRSS)")
    lines = [
        f"Device: {describe_device(args.device)}; torch {torch.__version__}, "
        f"pytorch-metric-learning {pytorch_metric_learning.__version__}; "
        f"run took {time.perf_counter() - began:.0f} s.",
        f"D = {args.dim}, K = {SAMPLES_PER_ID} per identity; median [min-max] of {repeats} forward+backward "
        f"steps after {warmup} warm-up, variants interleaved. Memory: {memory_how}.",
        "",
        "| C | B | exact FAT ms | short-list FAT ms | pml BH ms | pml BH / short-list | pml BH / exact "
        f"| short-list / its C={smallest} | exact / its C={smallest} | exact MiB | short-list MiB | pml BH MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for num_classes in class_counts:
        for batch in batches:
            exact, short, pml = (median[(m, num_classes, batch)] for m in METHODS)
            mib = [memory.get((m, num_classes, batch), float("nan")) for m in METHODS]
            cell = [timings[(m, num_classes, batch)] for m in METHODS]
            lines.append(
                f"| {num_classes:,} | {batch} | {exact:.1f} [{spread(cell[0])}] | {short:.1f} [{spread(cell[1])}] "
                f"| {pml:.1f} [{spread(cell[2])}] | {pml / short:.1f}x | {pml / exact:.2f}x "
                f"| {short / median[('fat_shortlist', smallest, batch)]:.2f}x "
                f"| {exact / median[('fat_exact', smallest, batch)]:.2f}x "
                f"| {mib[0]:.1f} | {mib[1]:.1f} | {mib[2]:.1f} |"
            )
    lines += ["", "Neighbour-list rebuild (O(C^2*D), outside the step; amortised over N steps or an epoch):", "",
              "| C | rebuild s | per step, rebuilt every 100 steps (ms) | |", "|---:|---:|---:|---|"]
    for num_classes in class_counts:
        seconds, real = rebuilds.get(num_classes, (float("nan"), False))
        lines.append(f"| {num_classes:,} | {seconds:.2f} | {seconds * 10:.1f} | "
                     f"{'measured' if real else 'extrapolated (C^2) from C = ' + f'{max(measured):,}'} |")
    if quality:
        lines += ["", "Short-list FAT (k = 5) against exact FAT, same batch and bank (synthetic look-alike data):", "",
                  "| C | B | exact loss | exact active hinges | loss rel. diff | p2s rel. diff | gradient cosine "
                  "| hardest negative in short list |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for (num_classes, batch), q in sorted(quality.items()):
            lines.append(f"| {num_classes:,} | {batch} | {q['exact_loss']:.4f} | {q['exact_active']:.1%} "
                         f"| {q['loss_rel_diff']:.2%} "
                         f"| {q['p2s_rel_diff']:.2%} | {q['grad_cosine']:.4f} | {q['hardest_recall']:.1%} |")
    lines.append("")
    if ("fat_shortlist", 751, 1024) in median:
        speedup = median[("pml_bh", 751, 1024)] / median[("fat_shortlist", 751, 1024)]
        lines.append(f"- Target short-list FAT >= 20x faster than pml batch hard at B = 1024, C = 751: "
                     f"{speedup:.1f}x, {'met' if speedup >= 20 else 'MISSED'}.")
    if 85_000 in class_counts and smallest == 751:
        for batch in batches:
            growth = median[("fat_shortlist", 85_000, batch)] / median[("fat_shortlist", 751, batch)]
            lines.append(f"- Target short-list FAT step at C = 85,000 within 2x of C = 751, B = {batch}: "
                         f"{growth:.2f}x, {'met' if growth <= 2 else 'MISSED'}.")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
