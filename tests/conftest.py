"""Test-session settings: an isolated Prefect home (embedded server, fresh database) and no display."""

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
