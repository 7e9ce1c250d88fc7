"""Prefect settings for embedded runs: set before Prefect is imported.

Without PREFECT_API_URL, flows run against Prefect's ephemeral local server with
its database under the project's home folder (``.prefect/`` beside ``runs/``),
so no server has to be started. With PREFECT_API_URL set, nothing is changed and
the same flows report to that server.
"""

from __future__ import annotations

import os
from pathlib import Path

# The ephemeral server's first start on an empty PREFECT_HOME takes 20-30 s on 2 cores:
# Prefect's default 20 s startup timeout is too short.
EPHEMERAL_STARTUP_TIMEOUT_S = "120"


def configure_prefect(home: str | os.PathLike | None = None) -> dict[str, str]:
    """Set defaults for Prefect's environment (existing values win); returns what was set."""
    applied: dict[str, str] = {}

    def default(name: str, value: str) -> None:
        if name not in os.environ:
            os.environ[name] = value
            applied[name] = value

    if "PREFECT_API_URL" not in os.environ:
        default("PREFECT_HOME", str(Path(home or ".prefect").resolve()))
        default("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", EPHEMERAL_STARTUP_TIMEOUT_S)
    default("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    default("PREFECT_LOGGING_EXTRA_LOGGERS", "fat_distill")
    # Library code also runs outside flows (tests, notebooks): don't warn that those logs have no flow run.
    default("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    default("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "false")
    if "PREFECT_API_URL" not in os.environ:
        # Prefect creates its home without parents and then fails to open its database.
        Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    return applied
