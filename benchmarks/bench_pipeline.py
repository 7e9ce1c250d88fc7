"""Orchestration overhead: the demo pipeline through Prefect vs the same library stages called directly.

Every timed run is a fresh `fat-distill demo` process (imports included) with its own output folders:

- ``direct``:  `fat-distill demo --direct`, the stages in order, no Prefect;
- ``prefect``: `fat-distill demo`, embedded Prefect (server start, task runs, caching, artifacts), nothing
  cached: each run gets its own PREFECT_HOME, a copy of one warmed by an empty flow, so the one-off
  database creation (reported apart) is in no run and no run finds another's cached results;
- ``direct-<N>t`` (``--threads N ...``): `demo --direct` with ``run.torch_threads=N``;
- afterwards, ``--cached-runs`` re-runs of the last Prefect run (same PREFECT_HOME and folders): every
  stage from cache.

One warm-up run per side comes first (not counted: it fills the page cache and Python's bytecode
caches), then ``--runs`` blocks of one run per side, each block in a random order drawn from
``--seed``, so that load from other jobs and the machine's drift fall on every side alike. Reported per side: median and
min–max; and the ratio of the medians.

Target (issue "Prefect orchestration"): median(prefect) / median(direct) ≤ 1.10 and cached ≤ 15 s.

    python benchmarks/bench_pipeline.py [--runs 3] [--threads 1 2] [--set KEY=VALUE ...] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(cmd: list[str], env: dict[str, str]) -> float:
    """Wall time of ``cmd`` in seconds; exits with its output when it fails."""
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return elapsed


def schedule(sides: list[str], runs: int, seed: int) -> list[str]:
    """``runs`` blocks of one run per side, each block in a random order drawn from ``seed``.

    Blocks rather than one shuffle of all runs: a plain shuffle can put one side's runs
    together (seed 0 gave prefect, direct, direct, direct, prefect, prefect), so a quiet or busy
    spell of the machine would fall on one side; in blocks every side runs once per block.
    """
    rng = random.Random(seed)
    return [side for _ in range(runs) for side in rng.sample(sides, len(sides))]


def spread(times: list[float]) -> dict[str, float]:
    """Median, min and max of a side's times, rounded to 0.1 s."""
    return {"median_s": round(statistics.median(times), 1), "min_s": round(min(times), 1),
            "max_s": round(max(times), 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], help="config override passed to `fat-distill demo`")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per side, after one warm-up each")
    parser.add_argument("--cached-runs", type=int, default=3, help="fully cached re-runs of the last Prefect run")
    parser.add_argument("--threads", type=int, nargs="*", default=[],
                        help="also time `demo --direct` with run.torch_threads set to each of these")
    parser.add_argument("--no-prefect", action="store_true", help="time only the direct side(s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the run order")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    exe = shutil.which("fat-distill", path=str(Path(sys.executable).parent)) or "fat-distill"
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    sets = [a for s in args.set for a in ("--set", s)]
    sides: dict[str, list[str]] = {"direct": [exe, "demo", "--direct"]}
    if not args.no_prefect:
        sides["prefect"] = [exe, "demo"]
    for n in args.threads:
        sides[f"direct-{n}t"] = [exe, "demo", "--direct", "--set", f"run.torch_threads={n}"]

    template = work / "prefect-home-template"
    first_start = None
    if not args.no_prefect:
        warm_up = ("from flows.environment import configure_prefect; configure_prefect(); "
                   "from prefect import flow; flow(name='warm-up')(lambda: None)()")
        first_start = timed([sys.executable, "-c", warm_up], {**os.environ, "PREFECT_HOME": str(template)})

    def run(side: str, name: str) -> tuple[float, list[str], dict[str, str]]:
        env = dict(os.environ)
        if side == "prefect":
            home = work / name / "prefect-home"
            shutil.copytree(template, home)
            env["PREFECT_HOME"] = str(home)
        cmd = [*sides[side], *sets, "--set", f"run.runs_root={work / name / 'runs'}",
               "--set", f"run.manifests_root={work / name / 'manifests'}", "--set", "run.progress=false"]
        return timed(cmd, env), cmd, env

    warm = {side: round(run(side, f"warm-{side}")[0], 1) for side in sides}
    order = schedule(list(sides), args.runs, args.seed)
    times: dict[str, list[float]] = {side: [] for side in sides}
    last_prefect = None
    for i, side in enumerate(order):
        elapsed, cmd, env = run(side, f"{i}-{side}")
        times[side].append(elapsed)
        if side == "prefect":
            last_prefect = cmd, env
        print(f"run {i + 1}/{len(order)} {side}: {elapsed:.1f} s", file=sys.stderr, flush=True)
    cached = [timed(*last_prefect) for _ in range(args.cached_runs)] if last_prefect else []

    result = {"order": order, "times_s": {s: [round(t, 1) for t in ts] for s, ts in times.items()},
              "warm_up_s": warm, "sides": {s: spread(ts) for s, ts in times.items()},
              "cached_rerun_s": [round(t, 1) for t in cached], "overrides": args.set, "seed": args.seed}
    if first_start is not None:
        result["first_server_start_s"] = round(first_start, 1)
    medians = {s: statistics.median(ts) for s, ts in times.items()}
    if "prefect" in medians:
        result["prefect_over_direct"] = round(medians["prefect"] / medians["direct"], 3)
        # The absolute overhead too: on a small config the ratio mostly says how small the config is.
        result["prefect_minus_direct_s"] = round(medians["prefect"] - medians["direct"], 1)
    for n in args.threads:
        result[f"direct_{n}t_over_direct"] = round(medians[f"direct-{n}t"] / medians["direct"], 3)
    if args.markdown:
        print(f"Order (seed {args.seed}): {', '.join(order)}; one warm-up run per side first: "
              + ", ".join(f"{s} {t:.1f} s" for s, t in warm.items()) + ".\n")
        print("| side | runs | median (s) | min–max (s) | runs in order (s) |\n|---|---:|---:|---:|---|")
        for side, ts in times.items():
            print(f"| {side} | {len(ts)} | {medians[side]:.1f} | {min(ts):.1f}–{max(ts):.1f} | "
                  f"{', '.join(f'{t:.1f}' for t in ts)} |")
        if cached:
            print(f"| prefect, fully cached re-run | {len(cached)} | {statistics.median(cached):.1f} | "
                  f"{min(cached):.1f}–{max(cached):.1f} | {', '.join(f'{t:.1f}' for t in cached)} |")
        if first_start is not None:
            print(f"\nOnce per PREFECT_HOME (not in any run): empty flow creating the server database "
                  f"{first_start:.1f} s.")
        if "prefect_minus_direct_s" in result:
            print(f"median prefect - median direct = {result['prefect_minus_direct_s']:.1f} s")
        for key, value in result.items():
            if key.endswith("_over_direct"):
                print(f"{key.replace('_over_', ' / median ').replace('prefect', 'median prefect')} = {value:.3f}")
    print(json.dumps(result))
    shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
