"""Run folders and their state file: what the CLI reads without starting a Prefect server.

Layout of one run (``run_id`` = ``<name>-<UTC time>-<4 hex>``):

    runs/<run_id>/
        config.yaml        the resolved config (what `resume` re-runs)
        run.json           status, stages (ran / cached / failed / running, why, duration, outputs), metrics
        run.log            the run's log
        plots/             PNGs (also attached to the Prefect run as artifacts)
        stages/<stage>/    checkpoints and intermediate files of each stage
    data_manifests/<run_id>/
        *.parquet          every manifest the run produced or took from cache

``runs/latest`` is a relative symlink to the newest run started under ``runs/`` (for the shell:
``runs/latest/run.json``, ``readlink runs/latest``); ``find_run(runs_root, "latest")`` picks the
newest run by the creation time in run.json, so it is right even without the link. Listings skip it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import secrets
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from fat_distill.atomic import atomic_write_text, temporary_sibling
from fat_distill.disk import output_error, write_failure
from fat_distill.processes import is_alive, process_identity

if TYPE_CHECKING:
    from fat_distill.pipeline.config import PipelineConfig

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
LATEST = "latest"  # the name `inspect`/`resume` take for the newest run, and the file naming it


def new_run_id(name: str) -> str:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{name}-{stamp}-{secrets.token_hex(2)}"


@dataclass
class RunPaths:
    run_id: str
    run_dir: Path
    manifest_dir: Path

    @classmethod
    def for_run(cls, config: PipelineConfig, run_id: str) -> RunPaths:
        return cls(run_id, Path(config.run.runs_root) / run_id, Path(config.run.manifests_root) / run_id)

    @property
    def plots_dir(self) -> Path:
        return self.run_dir / "plots"

    def stage_dir(self, *parts: str) -> Path:
        return self.run_dir.joinpath("stages", *parts)

    def publish(self, manifest: str | Path, name: str | None = None) -> Path:
        """Place a manifest into this run's manifest folder (hard link, or an atomic copy across devices)."""
        src = Path(manifest)
        dst = self.manifest_dir / (name or src.name)
        # Already in place (a resume publishes every manifest again): a hard link of the same file. Renaming a
        # second link of that file over it would do nothing and leave the temporary name behind.
        if dst.exists() and os.path.samefile(src, dst):
            return dst
        tmp = temporary_sibling(dst)
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        except OSError as exc:
            explained = write_failure(exc, dst)
            if explained is exc:
                raise
            raise explained from exc
        finally:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
        return dst


class _RunLogHandler(logging.FileHandler):
    """Writes the run's ``run.log``; what it cannot write (a full disk) is dropped, silently: the run's own
    error says what happened, and a failing log must not replace it."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        pass

    def flush(self) -> None:
        try:
            super().flush()
        except OSError:
            pass

    def close(self) -> None:
        try:
            super().close()
        except OSError:
            pass


def run_log_handler(paths: RunPaths) -> logging.Handler:
    """A handler appending to the run's ``run.log`` (time, level, logger, message; tracebacks included)."""
    handler = _RunLogHandler(paths.run_dir / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


class RunState:
    """The run's ``run.json``, updated atomically (and thread-safely) as stages start and end."""

    def __init__(self, paths: RunPaths, data: dict[str, Any]):
        self.paths = paths
        self.data = data
        self._lock = threading.Lock()

    @classmethod
    def create(cls, paths: RunPaths, config: PipelineConfig, *, resumed: bool = False) -> RunState:
        for folder in (paths.run_dir, paths.manifest_dir):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise output_error(exc, folder, action="create the folder") from exc
        atomic_write_text(paths.run_dir / CONFIG_FILE, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        existing = load_run_json(paths.run_dir)
        now = _now()
        fresh = not (resumed and existing)
        data = ({"run_id": paths.run_id, "created": now, "created_unix": time.time(), "stages": {}} if fresh
                else existing)
        data.update({"status": "running", **process_identity().as_dict(), "host": socket.gethostname(),
                     "updated": now, "manifest_dir": str(paths.manifest_dir), "run_dir": str(paths.run_dir)})
        data.setdefault("attempts", 0)
        data["attempts"] += 1
        state = cls(paths, data)
        state.save()
        if fresh:
            point_latest_at(paths.run_dir)
        return state

    def save(self) -> None:
        self.data["updated"] = _now()
        atomic_write_text(self.paths.run_dir / RUN_FILE, json.dumps(self.data, indent=2, default=str))

    def update(self, **fields: Any) -> None:
        with self._lock:
            self.data.update(fields)
            self.save()

    def stage(self, name: str, **fields: Any) -> None:
        with self._lock:
            entry = self.data["stages"].setdefault(name, {})
            entry.update(fields)
            self.save()

    def stage_entry(self, name: str) -> dict[str, Any]:
        return dict(self.data["stages"].get(name, {}))


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def load_run_json(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RUN_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is damaged ({exc}); the run's manifests are still in its manifest folder") from exc


def effective_status(data: dict[str, Any]) -> str:
    """'running' for a run whose process is gone becomes 'interrupted' (resume it)."""
    status = data.get("status", "unknown")
    if status == "running" and not run_process_alive(data):
        return "interrupted"
    return status


def run_process_alive(data: dict[str, Any]) -> bool:
    """Whether the process recorded in a run.json (PID and start time) is still running.

    A run of another machine (``host``, e.g. a worker's) is taken as alive: its PID says nothing here.
    """
    if data.get("host") not in (None, socket.gethostname()):
        return True
    return is_alive(data.get("pid"), data.get("pid_started"))


def point_latest_at(run_dir: Path) -> None:
    """Make ``<runs_root>/latest`` a relative symlink to ``run_dir``, replacing the old link atomically."""
    link = run_dir.parent / LATEST
    if link.exists() and not link.is_symlink():
        return  # not ours (a run or a file named "latest"): leave it
    tmp = temporary_sibling(link)
    try:
        os.symlink(run_dir.name, tmp, target_is_directory=True)
        os.replace(tmp, link)
    except OSError:  # a file system without symlinks: `latest` still works through find_run
        tmp.unlink(missing_ok=True)


def list_runs(runs_root: str | Path) -> list[dict[str, Any]]:
    """Every run under ``runs_root`` with its status, newest first (reads run.json files only)."""
    root = Path(runs_root)
    runs = []
    if not root.is_dir():
        return runs
    for run_dir in root.iterdir():
        if not run_dir.is_dir() or run_dir.is_symlink() or run_dir.name.startswith("."):
            continue
        try:
            data = load_run_json(run_dir)
        except (ValueError, OSError):
            data = {}
        if data is None:
            continue
        if not isinstance(data, dict) or not isinstance(data.get("stages", {}), dict):
            data = {}
        if not data:  # unreadable: listed so it can be found and removed, without hiding the other runs
            data = {"run_id": run_dir.name, "status": "damaged", "stages": {}}
        data["status"] = effective_status(data)
        runs.append(data)
    runs.sort(key=_creation_order, reverse=True)
    return runs


def _creation_order(data: dict[str, Any]) -> tuple[str, float]:
    # "created" has whole seconds; the points of a sweep start within one, so the exact time breaks ties.
    return data.get("created", ""), float(data.get("created_unix") or 0.0)


def find_run(runs_root: str | Path, run_id: str) -> Path:
    """The folder of ``run_id`` (a unique prefix is enough; ``latest``: the newest run by creation time)."""
    root = Path(runs_root)
    if run_id == LATEST:
        newest = list_runs(root)
        if not newest:
            raise FileNotFoundError(f"no runs under {root} yet, so there is no latest run")
        return root / newest[0]["run_id"]
    exact = root / run_id
    if (exact / RUN_FILE).exists():
        return exact
    matches = ([p for p in root.glob(f"{run_id}*") if not p.is_symlink() and (p / RUN_FILE).exists()]
               if root.is_dir() else [])
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise FileNotFoundError(f"no run {run_id!r} under {root}; `fat-distill runs` lists them")
    hint = ""
    if (root / run_id / "sweep.json").exists():
        hint = (f"; {run_id} is a sweep, so `fat-distill inspect {run_id}` shows its table, and each point is "
                "resumed by its own run id")
    raise ValueError(f"run id {run_id!r} is ambiguous: {', '.join(sorted(p.name for p in matches))}{hint}")


def last_components(runs_root: str | Path, stage: str, exclude: str | None = None) -> dict | None:
    """The cache-key components of ``stage`` in the most recent other run (to explain why a stage ran)."""
    for data in list_runs(runs_root):
        if data.get("run_id") == exclude:
            continue
        entry = data.get("stages", {}).get(stage)
        if entry and entry.get("components"):
            return entry["components"]
    return None
