"""Test-session settings (an isolated Prefect home: embedded server, fresh database; no display) and the
session's shared tiny pipeline runs."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("MPLBACKEND", "Agg")
_PREFECT_HOME = tempfile.mkdtemp(prefix="fat-distill-prefect-")
os.environ.pop("PREFECT_API_URL", None)
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from flows.environment import configure_prefect  # noqa: E402

configure_prefect(_PREFECT_HOME)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_run(tmp_path_factory):
    """One tiny pipeline run through embedded Prefect, on its own data: (runs root, run id). Shared: do not
    change what it wrote (adding pictures is fine)."""
    from fat_distill.pipeline import PipelineConfig, validate_config
    from flows.pipeline import run_pipeline
    from tests.pipeline_configs import own_data_config

    root = tmp_path_factory.mktemp("prefect_run")
    run_id, _ = run_pipeline(validate_config(PipelineConfig, own_data_config(root)))
    return root / "runs", run_id


@pytest.fixture(scope="session")
def direct_run(tmp_path_factory):
    """The same tiny config run without Prefect (``run_direct``): (runs root, run id). Shared, as above."""
    from fat_distill.pipeline import PipelineConfig, run_direct, validate_config
    from tests.pipeline_configs import own_data_config

    root = tmp_path_factory.mktemp("direct_run")
    run_id, _ = run_direct(validate_config(PipelineConfig, own_data_config(root)))
    return root / "runs", run_id
