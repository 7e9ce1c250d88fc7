"""Prefect settings for embedded runs: set before Prefect is imported.

Without PREFECT_API_URL, flows run against Prefect's ephemeral local server with
its database under the project's home folder (``.prefect/`` beside ``runs/``),
so no server has to be started. With PREFECT_API_URL set, nothing is changed and
the same flows report to that server.
"""

from __future__ import annotations

import logging
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


class _BriefFormatter(logging.Formatter):
    """Formats a record with another formatter, leaving out its traceback (kept for the other handlers)."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def brief_console_logging() -> int:
    """Leave tracebacks out of Prefect's console output (not out of the API's logs) unless FAT_DISTILL_DEBUG is set.

    A failed stage is then one error line from Prefect and the CLI's own message;
    the traceback stays in the Prefect UI and in the run's ``run.log``. Returns
    the number of console handlers changed. Call it after Prefect is imported.
    """
    if os.environ.get("FAT_DISTILL_DEBUG"):
        return 0
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger()] + [logger for logger in logging.Logger.manager.loggerDict.values()
                                       if isinstance(logger, logging.Logger)]
    changed = 0
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter, _BriefFormatter):
                handler.setFormatter(_BriefFormatter(handler.formatter))
                changed += 1
    return changed
