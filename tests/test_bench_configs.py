"""The benchmark configs (benchmarks/configs/*.yaml) are valid pipeline configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fat_distill.pipeline import PipelineConfig
from fat_distill.pipeline.overrides import validate_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "configs").glob("*.yaml"))


def test_there_are_benchmark_configs():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_a_benchmark_config_validates(path):
    config = validate_config(PipelineConfig, yaml.safe_load(path.read_text()), str(path))
    assert config.student.method == "distilled" and config.baselines
