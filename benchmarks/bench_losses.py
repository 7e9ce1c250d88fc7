"""Speed and memory of normalised FAT against in-batch batch-hard triplet losses.

Forward + backward of one training step's loss, for batch sizes B at D = 2048
and 751 identities (Market-1501), P x K-like labels with K = 4:

- ``fat``: ``FATLoss.normalised()`` against an EMA ``CentreBank`` of all 751
  identities; the timed step includes the bank's EMA update (FAT's real per-step
  cost in our training loop), the full-pass centre initialisation is not timed;
- ``ours_bh``: our ``BatchHardTripletLoss(margin=0.3)``;
- ``pml_bh``: pytorch-metric-learning's ``TripletMarginLoss(margin=0.3)`` fed by
  ``BatchHardMiner()`` (its defaults: L2-normalised embeddings, Euclidean distance).

Time: median over ``--repeats`` steps after ``--warmup`` steps, all methods in
this process and interleaved step by step (so background load on a shared
machine hits them alike); CUDA steps are synchronised before the clock stops.

Peak memory of one step, above what was allocated before it (inputs, centres,
model-free setup excluded):

- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``,
  minus ``memory_allocated()`` before the step;
- CPU: resident-set high-water mark. Each (method, B) runs in a fresh
  subprocess, which builds the inputs, does one small step to initialise the
  libraries, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``),
  runs one step and reports ``VmHWM - VmRSS(before)``. A fresh process and
  ``MALLOC_MMAP_THRESHOLD_=65536`` matter: memory the allocator kept from earlier
  allocations would otherwise hide the step's peak.

Usage::

    python benchmarks/bench_losses.py --sizes 64 256 1024 4096 --device cpu --repeats 5 --markdown
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from fat_distill.losses import BatchHardTripletLoss, CentreBank, FATLoss

METHODS = ("fat", "ours_bh", "pml_bh")
LABELS = {
    "fat": "FAT (normalised, EMA bank)",
    "ours_bh": "ours BatchHardTripletLoss",
    "pml_bh": "pml TripletMarginLoss + BatchHardMiner",
}


def pk_labels(batch: int, num_classes: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """P x K-like labels: P = batch / k identities with k samples each.

    When P exceeds the number of identities (B = 4096, 751 ids), identities are
    drawn again from a fresh permutation, so some appear 2k times.
    """
    groups = -(-batch // k)
    rounds = -(-groups // num_classes)
    ids = torch.cat([torch.randperm(num_classes, generator=generator) for _ in range(rounds)])[:groups]
    return ids.repeat_interleave(k)[:batch]


def build_step(method: str, batch: int, dim: int, num_classes: int, k: int, device: str) -> Callable[[], None]:
    """Inputs for one method and a closure running one forward + backward step."""
    generator = torch.Generator().manual_seed(batch)
    labels = pk_labels(batch, num_classes, k, generator).to(device)
    embeddings = torch.randn(batch, dim, generator=generator).to(device).requires_grad_(True)

    if method == "fat":
        loss_fn = FATLoss.normalised()
        bank = CentreBank(num_classes, dim, mode="ema", centre_mode=loss_fn.centre_mode).to(device)
        init_labels = torch.arange(num_classes).repeat_interleave(k)
        bank.refresh(torch.randn(len(init_labels), dim, generator=generator).to(device), init_labels.to(device))

        def step() -> None:
            embeddings.grad = None
            loss_fn(embeddings, labels, bank).backward()
            bank.update(embeddings.detach(), labels)

    elif method == "ours_bh":
        loss_fn = BatchHardTripletLoss(margin=0.3)

        def step() -> None:
            embeddings.grad = None
            loss_fn(embeddings, labels).backward()

    elif method == "pml_bh":
        from pytorch_metric_learning import losses, miners

        miner, pml_loss = miners.BatchHardMiner(), losses.TripletMarginLoss(margin=0.3)

        def step() -> None:
            embeddings.grad = None
            pml_loss(embeddings, labels, miner(embeddings, labels)).backward()

    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return step


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(steps: dict[str, Callable[[], None]], device: str, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds of one step per method.

    Methods are interleaved within each repeat, so load from other processes on a
    shared machine slows all of them alike instead of whichever ran at that moment.
    """
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
    return {name: statistics.median(values) for name, values in times.items()}


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}; CPU memory needs Linux")


def cpu_peak_mib_here(method: str, batch: int, dim: int, num_classes: int, k: int) -> float:
    """Run inside a fresh process: peak RSS growth of one step, MiB."""
    build_step(method, 8, dim, num_classes, k, "cpu")()  # initialise BLAS, allocator, lazy imports
    step = build_step(method, batch, dim, num_classes, k, "cpu")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current RSS
    before = _proc_status_kib("VmRSS")
    step()
    return (_proc_status_kib("VmHWM") - before) / 1024


def cpu_peak_mib(method: str, batch: int, dim: int, num_classes: int, k: int) -> float:
    command = [
        sys.executable, os.path.abspath(__file__), "--memory-probe", method,
        "--sizes", str(batch), "--dim", str(dim), "--classes", str(num_classes), "--k", str(k),
    ]
    # A fixed mmap threshold makes glibc return every large block to the kernel on
    # free (the default threshold adapts upwards and then keeps freed blocks), so
    # RSS follows live memory and the step's own peak is visible.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"memory probe {method} B={batch} failed:\n{result.stderr}")
    return float(json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"])


def cuda_peak_mib(step: Callable[[], None]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def describe_device(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {torch.get_num_threads()} torch threads"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024, 4096])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=751)
    parser.add_argument("--k", type=int, default=4, help="samples per identity (P x K batches)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--memory-probe", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_probe:
        peak = cpu_peak_mib_here(args.memory_probe, args.sizes[0], args.dim, args.classes, args.k)
        print(json.dumps({"peak_mib": peak}))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch; run with --device cpu")

    import pytorch_metric_learning

    # All timings first, then the memory probes, to keep the timed window short.
    results: dict[tuple[str, int], dict[str, float]] = {}
    for batch in args.sizes:
        steps = {m: build_step(m, batch, args.dim, args.classes, args.k, args.device) for m in METHODS}
        seconds = time_steps(steps, args.device, args.warmup, args.repeats)
        for method in METHODS:
            peak = float("nan")
            if not args.no_memory and args.device == "cuda":
                peak = cuda_peak_mib(steps[method])
            results[(method, batch)] = {"ms": seconds[method] * 1e3, "mib": peak}
            print(f"B={batch:5d} {method:8s} {seconds[method] * 1e3:10.2f} ms", file=sys.stderr)
        del steps
    if not args.no_memory and args.device == "cpu":
        for batch in args.sizes:
            for method in METHODS:
                peak = cpu_peak_mib(method, batch, args.dim, args.classes, args.k)
                results[(method, batch)]["mib"] = peak
                print(f"B={batch:5d} {method:8s} {peak:10.1f} MiB", file=sys.stderr)

    memory_method = (
        "torch.cuda.max_memory_allocated above memory_allocated before the step"
        if args.device == "cuda"
        else "peak RSS growth of one step (VmHWM - VmRSS) in a fresh subprocess"
    )
    lines = [
        f"Device: {describe_device(args.device)}; torch {torch.__version__}, "
        f"pytorch-metric-learning {pytorch_metric_learning.__version__}.",
        f"D = {args.dim}, {args.classes} identities, K = {args.k}; median of {args.repeats} "
        f"forward+backward steps after {args.warmup} warm-up steps. Memory: {memory_method}.",
        "",
        "| B | FAT ms | ours BH ms | pml BH ms | pml BH / FAT | ours BH / FAT "
        "| FAT MiB | ours BH MiB | pml BH MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for batch in args.sizes:
        fat, ours, pml = (results[(m, batch)] for m in METHODS)
        lines.append(
            f"| {batch} | {fat['ms']:.2f} | {ours['ms']:.2f} | {pml['ms']:.2f} "
            f"| {pml['ms'] / fat['ms']:.2f}x | {ours['ms'] / fat['ms']:.2f}x "
            f"| {fat['mib']:.1f} | {ours['mib']:.1f} | {pml['mib']:.1f} |"
        )
    lines.append("")
    if 1024 in args.sizes:
        speedup = results[("pml_bh", 1024)]["ms"] / results[("fat", 1024)]["ms"]
        verdict = "met" if speedup >= 20 else "MISSED"
        lines.append(f"- Target FAT >= 20x faster than pml batch hard at B = 1024: {speedup:.2f}x, {verdict}.")
    if 1024 in args.sizes and 4096 in args.sizes:
        growth = results[("fat", 4096)]["ms"] / results[("fat", 1024)]["ms"]
        verdict = "met" if growth <= 5 else "MISSED"
        lines.append(f"- Target FAT(4096) / FAT(1024) <= 5: {growth:.2f}, {verdict}.")

    if args.markdown:
        print("\n".join(lines))
    else:
        print("\n".join(line for line in lines if not line.startswith("|---")))


if __name__ == "__main__":
    main()
