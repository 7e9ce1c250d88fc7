"""Sweeps on disk: a grid of configs run as one group of runs, and the table that compares them.

Layout of one sweep (``sweep_id`` = ``<name>-sweep-<UTC time>-<4 hex>``; point ``i`` runs as ``<sweep_id>-<i>``):

    runs/<sweep_id>/
        sweep.json      the grid, the base config, and each point: label, values, run id, status
        sweep.parquet   one row per point × trained model (see :func:`sweep_table`)
        config.yaml     the base config the grid is applied to
    runs/<sweep_id>-<i>/
        run.json        an ordinary run; its ``sweep`` entry says which sweep and grid point it is

Everything here reads and writes files only (no Prefect, no torch), so ``fat-distill inspect``
answers at once; ``flows.pipeline.sweep`` calls it to record a sweep as it runs.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import threading
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import yaml

from fat_distill.atomic import atomic_write_text
from fat_distill.manifests import atomic_write_parquet
from fat_distill.pipeline.runs import RUN_FILE, effective_status, load_run_json, new_run_id

SWEEP_FILE = "sweep.json"
SWEEP_TABLE = "sweep.parquet"
BASE_CONFIG_FILE = "config.yaml"

#: Columns of ``sweep.parquet`` besides one column per grid key (placed after ``run_id``).
METRIC_COLUMNS = ("rank1", "rank5", "mAP", "mINP")
NOISE_F1_COLUMN = "noise_detection_f1"

# The points of a sweep finish on threads of one process; each rewrites the table.
_TABLE_LOCK = threading.Lock()


def new_sweep_id(name: str) -> str:
    """``<name>-sweep-<UTC time>-<4 hex>``; its points run as ``<sweep_id>-<i>``."""
    return new_run_id(f"{name}-sweep")


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, first key slowest: ``[{key: value, …}, …]``.

    Raises:
        ValueError: a key has no values.
    """
    empty = [key for key, values in grid.items() if not values]
    if empty:
        raise ValueError(f"grid key(s) {empty} have no values; give --grid key=v1,v2")
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def point_label(point: dict[str, Any]) -> str:
    """``noise.rate=0.2,student.method=distilled``: the overrides that make the point."""
    return ",".join(f"{key}={value}" for key, value in point.items())


def point_overrides(point: dict[str, Any]) -> list[str]:
    """The point as ``key=value`` overrides (values written as YAML, so they parse back to themselves)."""
    return [f"{key}={_yaml_scalar(value)}" for key, value in point.items()]


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def point_run_id(sweep_id: str, index: int) -> str:
    return f"{sweep_id}-{index}"


def sweep_dir(runs_root: str | Path, sweep_id: str) -> Path:
    return Path(runs_root) / sweep_id


def start_sweep(runs_root: str | Path, sweep_id: str, grid: dict[str, list[Any]], points: list[dict[str, Any]],
                base_config: dict[str, Any]) -> dict[str, Any]:
    """Write ``sweep.json`` (status running) and the base ``config.yaml`` before any point starts.

    Returns:
        The sweep record as written.
    """
    folder = sweep_dir(runs_root, sweep_id)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / BASE_CONFIG_FILE, yaml.safe_dump(base_config, sort_keys=False))
    record = {
        "sweep_id": sweep_id,
        "status": "running",
        "created": _now(),
        "grid": grid,
        "points": [{"index": i, "label": point_label(p), "values": p, "run_id": point_run_id(sweep_id, i),
                    "status": "pending"} for i, p in enumerate(points)],
        "table": str(folder / SWEEP_TABLE),
    }
    _save(folder, record)
    return record


def run_sweep_entry(sweep_id: str, point: dict[str, Any], index: int) -> dict[str, Any]:
    """What a point's ``run.json`` records under ``sweep``."""
    return {"sweep_id": sweep_id, "index": index, "label": point_label(point), "point": point}


def refresh_sweep(runs_root: str | Path, sweep_id: str, *, finished: bool = False) -> pd.DataFrame:
    """Rebuild ``sweep.parquet`` and the points' statuses in ``sweep.json`` from the points' run folders.

    Called when a point finishes (also a point resumed later on its own) and when the sweep ends.

    Args:
        runs_root: the folder holding the sweep's and its points' folders.
        sweep_id: the sweep.
        finished: the sweep flow has ended: its status becomes ``completed`` when every point
            completed, else ``failed``.

    Returns:
        The table as written (:func:`sweep_table`).
    """
    folder = sweep_dir(runs_root, sweep_id)
    with _TABLE_LOCK:
        record = load_sweep_json(folder)
        if record is None:
            raise FileNotFoundError(f"no sweep {sweep_id!r} under {runs_root} ({folder / SWEEP_FILE} is missing)")
        for point in record["points"]:
            data = load_run_json(Path(runs_root) / point["run_id"])
            point["status"] = effective_status(data) if data else "pending"
        if finished or record.get("status") != "running":
            done = all(p["status"] == "completed" for p in record["points"])
            record["status"] = "completed" if done else "failed"
        table = sweep_table(Path(runs_root), record)
        _write_table(table, folder / SWEEP_TABLE)
        _save(folder, record)
    return table


def sweep_table(runs_root: Path, record: dict[str, Any]) -> pd.DataFrame:
    """One row per point × trained model of the points that have metrics.

    Columns: ``sweep_id``, ``point`` (its label), ``run_id``, one column per grid key (the
    point's value; a key whose values mix types is written as text), ``method`` (the model's
    actual method), ``rank1``, ``rank5``, ``mAP``, ``mINP``, and ``noise_detection_f1`` (the
    final teacher round's noise-detection F1, the same for every model of a point; missing
    without ground truth).
    """
    keys = list(record.get("grid", {}))
    rows = []
    for point in record["points"]:
        data = load_run_json(runs_root / point["run_id"]) or {}
        metrics = data.get("metrics") or {}
        f1 = (metrics.get("noise_detection") or {}).get("all.f1")
        for method, values in (metrics.get("retrieval") or {}).items():
            rows.append({"sweep_id": record["sweep_id"], "point": point["label"], "run_id": point["run_id"],
                         **{key: point["values"].get(key) for key in keys}, "method": method,
                         **{m: values.get(m) for m in METRIC_COLUMNS}, NOISE_F1_COLUMN: f1})
    columns = ["sweep_id", "point", "run_id", *keys, "method", *METRIC_COLUMNS, NOISE_F1_COLUMN]
    table = pd.DataFrame(rows, columns=columns)
    for key in keys:
        table[key] = _grid_column(table[key], record["grid"][key])
    for name in (*METRIC_COLUMNS, NOISE_F1_COLUMN):
        table[name] = pd.to_numeric(table[name], errors="coerce").astype("float64")
    return table


def _grid_column(column: pd.Series, grid_values: list[Any]) -> pd.Series:
    """Keep a grid key's values typed when they share one type (ints and floats count as numbers), else text."""
    kinds = {type(v) for v in grid_values if v is not None}
    if kinds <= {int, float} and kinds:
        return pd.to_numeric(column).astype("float64" if float in kinds else "Int64")
    if kinds in ({str}, {bool}):
        return column.astype("object")
    return column.map(lambda v: None if v is None else json.dumps(v) if not isinstance(v, str) else v)


def _write_table(table: pd.DataFrame, path: Path) -> None:
    atomic_write_parquet(pa.Table.from_pandas(table, preserve_index=False), path)


def read_sweep_table(folder: str | Path) -> pd.DataFrame:
    """``sweep.parquet`` of a sweep folder (an empty frame before any point finished)."""
    path = Path(folder) / SWEEP_TABLE
    if not path.exists():
        return pd.DataFrame()
    return pd.read_parquet(path)


def load_sweep_json(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / SWEEP_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is damaged ({exc}); each point's run folder still holds its own results") from exc


def is_sweep(folder: str | Path) -> bool:
    return (Path(folder) / SWEEP_FILE).is_file()


def list_sweeps(runs_root: str | Path) -> list[dict[str, Any]]:
    """Every sweep under ``runs_root`` (its ``sweep.json``), newest first."""
    root = Path(runs_root)
    if not root.is_dir():
        return []
    sweeps = []
    for folder in root.iterdir():
        if folder.is_symlink() or not is_sweep(folder):
            continue
        try:
            record = load_sweep_json(folder)
        except ValueError:
            record = {"sweep_id": folder.name, "status": "damaged", "points": []}
        sweeps.append(record)
    sweeps.sort(key=lambda r: r.get("created", ""), reverse=True)
    return sweeps


def find_sweep(runs_root: str | Path, ident: str) -> Path | None:
    """The folder of sweep ``ident`` when it names one: its id, or a prefix that only it and its points share.

    Returns None when ``ident`` names no sweep (it may name a run).
    """
    root = Path(runs_root)
    if is_sweep(root / ident):
        return root / ident
    if not root.is_dir():
        return None
    sweeps = [p for p in root.glob(f"{ident}*") if is_sweep(p)]
    if len(sweeps) != 1:
        return None
    (folder,) = sweeps
    runs = [p for p in root.glob(f"{ident}*") if (p / RUN_FILE).exists()]
    return folder if all(p.name.startswith(f"{folder.name}-") for p in runs) else None


def inspect_sweep(folder: str | Path) -> dict[str, Any]:
    """What ``fat-distill inspect <sweep_id>`` shows: the sweep record and its table's rows."""
    folder = Path(folder)
    record = load_sweep_json(folder) or {}
    runs_root = folder.parent
    for point in record.get("points", []):  # statuses as they are now (a point may have been resumed)
        data = load_run_json(runs_root / point["run_id"])
        point["status"] = effective_status(data) if data else "pending"
    table = read_sweep_table(folder)
    rows = json.loads(table.to_json(orient="records")) if len(table) else []
    return {**record, "sweep_dir": str(folder), "config_path": str(folder / BASE_CONFIG_FILE), "rows": rows}


def _save(folder: Path, record: dict[str, Any]) -> None:
    record["updated"] = _now()
    atomic_write_text(folder / SWEEP_FILE, json.dumps(record, indent=2, default=str))


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
