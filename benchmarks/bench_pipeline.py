"""Orchestration overhead: the demo pipeline through Prefect vs the same library stages called directly.

Three timed runs of the same config, each a fresh `fat-distill` process (imports included):

1. `fat-distill demo --direct`            the stages in order, no Prefect
2. `fat-distill demo`                     embedded Prefect (server start, task runs, caching, artifacts),
                                          nothing cached; PREFECT_HOME is warmed first by an empty flow,
                                          whose time (the one-off database creation) is reported apart
3. `fat-distill demo` again               same PREFECT_HOME: every stage from cache

Target (issue "Prefect orchestration"): (2)/(1) ≤ 1.10 and (3) ≤ 15 s.

    python benchmarks/bench_pipeline.py [--set run.devices=[cpu]] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(cmd: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], help="config override passed to `fat-distill demo`")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    exe = shutil.which("fat-distill", path=str(Path(sys.executable).parent)) or "fat-distill"
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect-home")}
    sets = [a for s in args.set for a in ("--set", s)]
    roots = lambda name: ["--set", f"run.runs_root={work / name / 'runs'}",  # noqa: E731
                          "--set", f"run.manifests_root={work / name / 'manifests'}", "--set", "run.progress=false"]
    direct = timed([exe, "demo", "--direct", *sets, *roots("direct")], env)
    warm_up = ("from flows.environment import configure_prefect; configure_prefect(); "
               "from prefect import flow; flow(name='warm-up')(lambda: None)()")
    first_start = timed([sys.executable, "-c", warm_up], env)
    prefect = timed([exe, "demo", *sets, *roots("prefect")], env)
    cached = timed([exe, "demo", *sets, *roots("prefect")], env)
    result = {"direct_s": round(direct, 1), "prefect_s": round(prefect, 1), "cached_rerun_s": round(cached, 1),
              "first_server_start_s": round(first_start, 1),
              "overhead_ratio": round(prefect / direct, 3), "overrides": args.set}
    if args.markdown:
        print("| run | wall time (s) |\n|---|---:|")
        print(f"| stages called directly (`demo --direct`) | {direct:.1f} |")
        print(f"| (once per PREFECT_HOME: empty flow creating the server database) | {first_start:.1f} |")
        print(f"| through embedded Prefect, nothing cached | {prefect:.1f} |")
        print(f"| through embedded Prefect, fully cached re-run | {cached:.1f} |")
        print(f"\nPrefect / direct = {prefect / direct:.3f} (target ≤ 1.10); cached re-run {cached:.1f} s "
              "(target ≤ 15 s)")
    print(json.dumps(result))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
