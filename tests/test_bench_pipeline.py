"""benchmarks/bench_pipeline.py: its run order interleaves the sides and its summary is the median and range."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_pipeline.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_pipeline", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_schedule_runs_every_side_as_often_in_a_seeded_random_order():
    bench = _bench()
    order = bench.schedule(["direct", "prefect"], 4, seed=0)
    assert sorted(order) == ["direct"] * 4 + ["prefect"] * 4
    assert order == bench.schedule(["direct", "prefect"], 4, seed=0)
    # Not one side's runs first: some seed among a few interleaves them.
    orders = {tuple(bench.schedule(["direct", "prefect"], 4, seed=s)) for s in range(5)}
    assert len(orders) > 1 and any(o[:4] != ("direct",) * 4 and o[:4] != ("prefect",) * 4 for o in orders)


def test_spread_is_median_and_range():
    assert _bench().spread([12.0, 10.04, 30.0]) == {"median_s": 12.0, "min_s": 10.0, "max_s": 30.0}
