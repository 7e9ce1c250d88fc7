"""The embedded Prefect server of a CLI run: in its own session, recorded, and reaped after a killed CLI.

Without PREFECT_API_URL, Prefect starts a temporary server (uvicorn, a child
process) the first time a client needs one. Started Prefect's way it shares the
CLI's process group, so a terminal's Ctrl-C stops the server at the same moment
as the CLI, and the run's last state changes and log lines then meet a closed
port (minutes of retries and ``httpx.ConnectError`` tracebacks). Here the same
command is started in a session of its own, so a Ctrl-C reaches only the CLI,
which stops the run and then the server in order.

A server in its own session outlives a CLI killed with SIGKILL. Two guards:
on Linux the server gets SIGTERM when the CLI's main thread dies
(``PR_SET_PDEATHSIG``), and every server is recorded under
``$PREFECT_HOME/fat-distill-servers/`` with its own and its owner's PID and start
time, so the next :func:`start_embedded_server` stops any server whose owner is gone.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fat_distill.atomic import atomic_write_text
from fat_distill.processes import ProcessIdentity, is_alive, process_identity

log = logging.getLogger("fat_distill.flows")

RECORDS_DIR = "fat-distill-servers"
_PR_SET_PDEATHSIG = 1


def records_dir() -> Path:
    """Where running embedded servers are recorded (one JSON file per server)."""
    home = os.environ.get("PREFECT_HOME") or str(Path("~/.prefect").expanduser())
    return Path(home).expanduser() / RECORDS_DIR


def _die_with_parent_hook() -> Any:
    """A ``preexec_fn`` that makes the child get SIGTERM when this thread dies (Linux), or None."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None  # PDEATHSIG follows the forking thread: only the main thread lives as long as the process
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child only calls it
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


def _server_class() -> type:
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    class SessionASGIServer(SubprocessASGIServer):
        """Prefect's temporary server, started in its own session and recorded for reaping."""

        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            # The command and environment of SubprocessASGIServer._run_uvicorn_command (Prefect 3.4-3.8),
            # started with start_new_session so that signals to the CLI's process group miss it.
            import prefect

            process = subprocess.Popen(
                args=[sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
                      "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                      "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
                env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                     "PREFECT__SERVER_FINAL": "1",
                     **get_current_settings().to_environment_variables(exclude_unset=True)},
                start_new_session=True,
                preexec_fn=_die_with_parent_hook(),
            )
            _record(process.pid)
            return process

        def stop(self) -> None:
            process = self.server_process
            super().stop()
            if process is not None:
                _forget(process.pid)

    return SessionASGIServer


def _record(server_pid: int) -> None:
    folder = records_dir()
    folder.mkdir(parents=True, exist_ok=True)
    server = process_identity(server_pid)
    if server.started is None:  # not visible yet; the PID alone then identifies it
        time.sleep(0.05)
        server = process_identity(server_pid)
    atomic_write_text(folder / f"{server_pid}.json",
                      json.dumps({"server": server.as_dict(), "owner": process_identity().as_dict()}))


def _forget(server_pid: int) -> None:
    (records_dir() / f"{server_pid}.json").unlink(missing_ok=True)


def reap_orphaned_servers(timeout: float = 5.0) -> list[int]:
    """Stop every recorded embedded server whose owning CLI process is gone; returns their PIDs.

    Servers of live owners (another run in the same folder) are left alone.
    """
    folder = records_dir()
    reaped: list[int] = []
    if not folder.is_dir():
        return reaped
    for record in sorted(folder.glob("*.json")):
        try:
            data = json.loads(record.read_text())
            owner = ProcessIdentity.from_dict(data["owner"])
            server = ProcessIdentity.from_dict(data["server"])
        except (OSError, ValueError, KeyError, TypeError):
            record.unlink(missing_ok=True)
            continue
        if owner is not None and is_alive(owner.pid, owner.started):
            continue
        if server is not None and is_alive(server.pid, server.started):
            log.warning("stopping the embedded Prefect server (PID %d) left by a killed run (PID %s)",
                        server.pid, owner.pid if owner else "?")
            _terminate(server.pid, server.started, timeout)
            reaped.append(server.pid)
        record.unlink(missing_ok=True)
    return reaped


def _terminate(pid: int, started: str | None, timeout: float) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_alive(pid, started):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def uses_embedded_server() -> bool:
    """Whether flows of this process run against Prefect's temporary local server (no PREFECT_API_URL)."""
    from prefect.settings import PREFECT_API_URL

    return not PREFECT_API_URL.value()


def start_embedded_server() -> Any | None:
    """Start this process's embedded Prefect server in its own session (None: a PREFECT_API_URL is set).

    Call it from the main thread before the first flow: Prefect's clients then use
    this server. Servers left by killed runs are stopped first. Safe to call twice.
    """
    if not uses_embedded_server():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    reap_orphaned_servers()
    existing = SubprocessASGIServer._instances.get(None)
    server = existing if existing is not None else _server_class()()
    server.start()
    return server


def stop_embedded_server_now() -> None:
    """Send SIGTERM to this process's embedded server without waiting (before an immediate exit)."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer._instances.get(None)
    process = getattr(server, "server_process", None)
    if process is not None and process.poll() is None:
        process.terminate()
        _forget(process.pid)


__all__ = ["reap_orphaned_servers", "records_dir", "start_embedded_server", "stop_embedded_server_now",
           "uses_embedded_server"]
