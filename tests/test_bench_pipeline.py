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
    # Interleaved: every block of two holds one run of each side, in an order that varies with the seed.
    for s in range(5):
        order = bench.schedule(["direct", "prefect"], 4, seed=s)
        assert all(sorted(order[i:i + 2]) == ["direct", "prefect"] for i in range(0, 8, 2))
    assert len({tuple(bench.schedule(["direct", "prefect"], 4, seed=s)) for s in range(5)}) > 1


def test_spread_is_median_and_range():
    assert _bench().spread([12.0, 10.04, 30.0]) == {"median_s": 12.0, "min_s": 10.0, "max_s": 30.0}
