"""Prefect flows: the pipeline and the sweep, as cached, resumable, device-scheduled tasks.

The stage graph lives in :mod:`fat_distill.pipeline.graph`; here each stage call
becomes a run of :func:`stage_task`, whose cache key is the stage's own key
(input content hashes, its config section, library version, code) and whose
result (the stage's output paths, JSON) is persisted under ``<runs_root>/.stage-results``
(:data:`RESULTS_FOLDER`): beside the run folders, not in one machine's PREFECT_HOME,
so workers sharing the runs folder and the Prefect server share the cache. A cached
result whose files are gone is recomputed.

In the Prefect UI each stage is its own task (key ``fat-distill.<stage>``, named after
the stage) tagged ``fat-distill``, ``stage:<kind>``, ``run:<run_id>`` and, where known
when it is submitted, ``method:<m>`` and ``device:<i>``; failed stages are retried as
``run.retries`` says when the error looks transient. Each point of a sweep is a
subflow named after its grid point, with its own artifact keys.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact
from prefect.exceptions import CancelledRun
from prefect.states import Cancelled
from prefect.task_runners import ThreadPoolTaskRunner

from fat_distill.cancel import CancelToken, RunCancelled, cancel_reason, cancel_scope, cancel_signal, check_cancelled
from fat_distill.pipeline import PipelineConfig, RunPaths, RunState, run_graph
from fat_distill.pipeline.config import RetriesSection
from fat_distill.pipeline.graph import StageCall
from fat_distill.pipeline.inspect import describe_label_audit
from fat_distill.pipeline.keys import why_changed
from fat_distill.pipeline.overrides import apply_overrides, validate_config
from fat_distill.pipeline.runs import last_components, new_run_id, run_log_handler
from fat_distill.pipeline.stages import log_resume, split_training, training_entry
from fat_distill.pipeline.sweeps import (
    SWEEP_TABLE,
    grid_points,
    new_sweep_id,
    point_label,
    point_overrides,
    point_run_id,
    refresh_sweep,
    run_sweep_entry,
    start_sweep,
)
from fat_distill.train import set_cpu_threads
from flows.devices import DevicePool
from flows.watch import STAGE_KEY_PREFIX

log = logging.getLogger("fat_distill.flows")

# Per-run objects the task threads need (they are not task parameters: tasks take paths and small values):
# the run's state file, its device pool, and the token that stops its stages when another one failed.
_RUNS: dict[str, tuple[RunState, DevicePool, CancelToken]] = {}
# The device pool a sweep's point subflows share, by sweep id (not a flow parameter: it holds threads).
_SWEEP_POOLS: dict[str, DevicePool] = {}

#: Task results (each stage's output paths) are kept here, under ``run.runs_root``.
RESULTS_FOLDER = ".stage-results"


def _cache_key(context, parameters: dict[str, Any]) -> str:
    return parameters["cache_key"]


# Errors that say the input or the config is wrong: retrying cannot help (all but the last are OSErrors).
_PERMANENT_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError,
                     ValueError, KeyError, TypeError)


def is_transient(exc: BaseException) -> bool:
    """Whether a stage that raised ``exc`` may succeed if run again: I/O and connection errors, timeouts.

    Bad input (a missing or damaged file, a wrong config value) and programming errors are not.
    """
    return isinstance(exc, (OSError, TimeoutError, ConnectionError)) and not isinstance(exc, _PERMANENT_ERRORS)


def _retry_if_transient(task, task_run, state) -> bool:
    """Prefect's retry condition of :func:`stage_task` (called with the failed state)."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient(exc)


@task(name="stage", cache_key_fn=_cache_key, persist_result=True, result_serializer="json")
def stage_task(call_name: str, cache_key: str, run_id: str, stage_fn: str, kwargs: dict[str, Any],
               needs_device: bool, parallel_devices: list[str] | None = None) -> dict:
    """Run one stage (a plain library function), holding a device slot if it trains or extracts features.

    A data-parallel stage (``parallel_devices``: its ``train.devices``) holds a slot of each of them.
    """
    from fat_distill.pipeline import stages

    if run_id not in _RUNS:  # picked up by a worker thread after its run ended
        raise RunCancelled(f"stage {call_name} not started: run {run_id} has ended")
    state, pool, token = _RUNS[run_id]
    fn = getattr(stages, stage_fn)
    try:
        with cancel_scope(token):
            check_cancelled(f"stage {call_name} (not started)")  # a cancelled or failed run starts nothing new
            out = _run_stage(state, pool, call_name, fn, kwargs, needs_device, parallel_devices)
    except BaseException as exc:  # RunCancelled is raised, not returned as a Cancelled state: that one is cached
        cancelled = isinstance(exc, RunCancelled)
        try:
            state.stage(call_name, state="cancelled" if cancelled else "failed",
                        error=str(exc) if cancelled else f"{type(exc).__name__}: {exc}", finished=time.time())
        except OSError:  # run.json cannot be written either (a full disk): report the stage's own error
            pass
        raise
    # Recorded here too, not only when the flow collects the result: a run that fails elsewhere first
    # never collects it, and the stage would stay "running" in run.json.
    state.stage(call_name, state="ran", outputs=out, finished=time.time())
    return out


def _run_stage(state: RunState, pool: DevicePool, call_name: str, fn, kwargs: dict[str, Any], needs_device: bool,
               parallel_devices: list[str] | None) -> dict:
    state.stage(call_name, state="running", started=time.time())
    if not needs_device:
        return fn(**kwargs)
    if parallel_devices:
        with pool.acquire_devices(call_name, parallel_devices) as (indices, devices):
            check_cancelled(f"stage {call_name} (not started)")
            state.stage(call_name, device=",".join(devices), device_index=indices[0], device_indices=indices,
                        slot_acquired=time.time())
            try:  # the stage spawns one process per train.devices entry
                return pool.run_on(indices[0], fn, **kwargs, device=devices[0])
            finally:
                state.stage(call_name, slot_released=time.time())
    with pool.acquire(call_name) as (index, device):
        check_cancelled(f"stage {call_name} (not started)")
        state.stage(call_name, device=device, device_index=index, device_indices=[index], slot_acquired=time.time())
        try:
            return pool.run_on(index, fn, **kwargs, device=device)
        finally:
            state.stage(call_name, slot_released=time.time())


def _outputs_exist(outputs: dict) -> bool:
    for value in outputs.values():
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, str) and ("/" in v or v.endswith((".parquet", ".pt", ".png"))) and not Path(v).exists():
                return False
    return True


class _StageHandle:
    def __init__(self, executor: PrefectExecutor, call: StageCall, why: str):
        self.executor, self.call, self.why = executor, call, why
        self.future = executor._submit(call, refresh=False)
        self._value: dict | None = None

    def result(self) -> dict:
        if self._value is not None:
            return self._value
        state, call = self.executor.state, self.call
        started = time.time()
        try:
            value = self.future.result()
            cached = self.future.state.name == "Cached"
            if cached and not _outputs_exist(value):
                log.warning("%s: cached result points to missing files; running it again", call.name)
                self.future = self.executor._submit(call, refresh=True)
                value, cached = self.future.result(), False
                self.why = "cached outputs were deleted"
        except BaseException as exc:
            if state.stage_entry(call.name).get("state") not in ("failed", "cancelled"):
                state.stage(call.name, state="failed", error=f"{type(exc).__name__}: {exc}")
            raise
        entry = state.stage_entry(call.name)
        if "slot_acquired" in entry:  # time on the device, not the wait for a free slot
            seconds = entry.get("slot_released", time.time()) - entry["slot_acquired"]
        else:
            seconds = (entry.get("finished") or time.time()) - entry.get("started", started)
        # How the call that computed the value trained is not part of the result: recorded only when it ran.
        outputs, training = split_training(value)
        if cached:
            state.stage(call.name, state="cached", outputs=outputs, seconds=0.0,
                        why=f"same inputs, config and code as an earlier run (key {call.key[:12]})",
                        **training_entry(entry, {}))
            log.info("stage %s: cached (key %s) → %s", call.name, call.key[:12], _where(value))
        else:
            state.stage(call.name, state="ran", outputs=outputs, seconds=round(seconds, 2), why=self.why,
                        **training_entry(entry, training))
            log.info("stage %s: ran (%s) in %.1fs → %s", call.name, self.why, seconds, _where(value))
            log_resume(call.name, training)
        self._value = value
        return value


def _where(outputs: dict) -> str:
    paths = [v for v in outputs.values() if isinstance(v, str) and "/" in v]
    return ", ".join(paths[:3]) or "-"


def stage_tags(call: StageCall, run_id: str, pool: DevicePool) -> list[str]:
    """Prefect tags of a stage's task run: what it is, which run, and what is known of where it runs.

    ``device:<i>`` (the position in ``run.devices``) is known before the stage starts when it trains
    data-parallel (all its devices) or when the pool has a single device; otherwise the scheduler
    picks a free device when it starts (``run.json`` records it).
    """
    tags = ["fat-distill", f"stage:{call.kind}", f"run:{run_id}"]
    method = getattr(call.kwargs.get("config"), "method", None)
    if method:
        tags.append(f"method:{method}")
    if call.parallel_devices:
        tags += [f"device:{i}" for i in pool.indices_for(call.name, list(call.parallel_devices))]
    elif call.needs_device and len(pool.devices) == 1:
        tags.append("device:0")
    return tags


class PrefectExecutor:
    """Submits stage calls as Prefect task runs of :func:`stage_task`."""

    def __init__(self, state: RunState, pool: DevicePool, runs_root: str, token: CancelToken,
                 retries: RetriesSection | None = None):
        self.state = state
        self.pool = pool
        self.runs_root = runs_root
        self.retries = retries or RetriesSection()
        # Relative to the flow's working directory (the project, on every worker): portable across hosts.
        self.result_storage = Path(runs_root) / RESULTS_FOLDER
        _RUNS[state.paths.run_id] = (state, pool, token)

    def _submit(self, call: StageCall, refresh: bool):
        kwargs = dict(call.kwargs)
        run_id = self.state.paths.run_id
        stage = stage_task.with_options(
            name=call.name, task_run_name=call.name, refresh_cache=refresh, tags=stage_tags(call, run_id, self.pool), result_storage=self.result_storage,
            retries=self.retries.for_stage(call.kind), retry_delay_seconds=self.retries.delay_seconds,
            retry_condition_fn=_retry_if_transient)
        stage.task_key = f"{STAGE_KEY_PREFIX}{call.name}"  # default: one key for every stage (the function's)
        return stage.submit(
            call_name=call.name, cache_key=call.key, run_id=run_id,
            stage_fn=call.fn.__name__, kwargs=kwargs, needs_device=call.needs_device,
            parallel_devices=list(call.parallel_devices) or None)

    def submit(self, call: StageCall) -> _StageHandle:
        previous = self.state.stage_entry(call.name).get("components") or last_components(
            self.runs_root, call.name, exclude=self.state.paths.run_id)
        why = why_changed(previous if previous != call.components else None, call.components)
        self.state.stage(call.name, state="submitted", key=call.key, components=call.components)
        return _StageHandle(self, call, why)


def stage_pictures(state: RunState) -> list[Path]:
    """The PNGs a run's stages drew, as their outputs name them (existing files only).

    A stage taken from cache names the pictures of the run that computed it, so a cached
    run shows the same pictures without drawing them again.
    """
    found: dict[str, Path] = {}
    for entry in state.data["stages"].values():
        for value in (entry.get("outputs") or {}).values():
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, str) and v.endswith(".png") and Path(v).exists():
                    found.setdefault(str(Path(v).resolve()), Path(v))
    for png in sorted(state.paths.plots_dir.glob("*.png")):
        found.setdefault(str(png.resolve()), png)
    return list(found.values())


def artifact_key(base: str, point: str | None = None) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes), one per sweep point when ``point`` is given."""
    if point is None:
        return base
    slug = re.sub(r"[^a-z0-9]+", "-", point.lower()).strip("-")
    return f"{base}-{slug}" if slug else base


def _attach_artifacts(paths: RunPaths, summary: dict, state: RunState, point: str | None = None) -> None:
    rows = [{"method": m, **{k: round(v, 4) for k, v in metrics.items()}} for m, metrics in summary["retrieval"].items()]
    if rows:
        create_table_artifact(rows, key=artifact_key("retrieval-metrics", point),
                              description=f"Retrieval metrics of run {paths.run_id}")
    stage_lines = [f"| {name} | {e.get('state')} | {e.get('seconds', '')} | {e.get('why', '')} |"
                   for name, e in state.data["stages"].items()]
    detection = ", ".join(f"{k.split('.', 1)[1]} {v:.3f}" for k, v in summary["noise_detection"].items()
                          if v is not None and k.split(".", 1)[1] in ("precision", "recall", "f1", "auroc"))
    pictures = stage_pictures(state)
    create_markdown_artifact(
        "\n".join([f"# fat-distill run `{paths.run_id}`", "",
                   *([f"Sweep point: `{point}`", ""] if point else []),
                   f"Manifests: `{paths.manifest_dir}` · run folder: `{paths.run_dir}`", "",
                   f"Noise detection (final teacher round): {detection or 'n/a (no ground truth)'}", "",
                   f"Label audit (final teacher round): {describe_label_audit(summary.get('label_audit') or {})}",
                   "",
                   "| stage | state | seconds | why |", "|---|---|---|---|", *stage_lines, "",
                   "Pictures (as the stages name them; relative paths are inside the project folder the flow "
                   "ran in):", "",
                   *(f"- `{png}`" for png in pictures)]),
        key=artifact_key("run-summary", point), description=f"Stages of run {paths.run_id}")
    # Prefect's image artifacts take a URL: the file URI of the PNG on the machine that ran the flow.
    for png in pictures:
        create_image_artifact(png.resolve().as_uri(), description=f"{png.stem} ({png})")


def _run_one(config: PipelineConfig, run_id: str, pool: DevicePool, resume: bool,
             sweep_point: dict[str, Any] | None = None) -> dict[str, Any]:
    """One run of the stage graph; ``sweep_point`` (:func:`run_sweep_entry`) marks it as a point of a sweep."""
    paths = RunPaths.for_run(config, run_id)
    state = RunState.create(paths, config, resumed=resume)
    if sweep_point is not None:
        state.update(sweep=sweep_point)
    sweep_point = state.data.get("sweep")  # a resumed point is still part of its sweep
    handler = run_log_handler(paths)
    library_logger = logging.getLogger("fat_distill")
    library_logger.addHandler(handler)
    if library_logger.level == logging.NOTSET or library_logger.level > logging.INFO:
        library_logger.setLevel(logging.INFO)
    token = CancelToken()
    try:
        state.update(flow_run_id=_flow_run_id())
        for method, student in config.student_configs().items():  # before hours of teacher training, not after
            if len(student.train.devices) >= 2:
                pool.indices_for(f"student.{method}", student.train.devices)
        label = sweep_point["label"] if sweep_point else ""
        # A sweep point runs as a subflow named after its point: its task runs are told apart there.
        executor = PrefectExecutor(state, pool, config.run.runs_root, token, config.run.retries)
        with cancel_scope(token):
            summary = run_graph(config, paths, state, executor)
        state.update(status="completed", metrics=summary, error=None)
        _attach_artifacts(paths, summary, state, label or None)
        return summary
    except BaseException as exc:
        cancelled = isinstance(exc, RunCancelled) or cancel_signal() is not None
        # The run is over: its other stages stop at their next batch, and queued ones do not start.
        token.cancel(f"run {run_id} {'was cancelled' if cancelled else 'failed'}")
        try:
            state.update(status="cancelled" if cancelled else "failed", error=f"{type(exc).__name__}: {exc}")
            for name, entry in list(state.data["stages"].items()):
                if entry.get("state") == "submitted":  # queued: Prefect drops it when the flow ends
                    state.stage(name, state="cancelled", error=f"not started: {token.reason}")
        except OSError as state_error:  # a full disk fails run.json too: report the first error, not this one
            log.warning("could not record the end of run %s in run.json: %s", run_id, state_error)
        # The traceback goes to run.log only: the console shows one line (see brief_console_logging).
        handler.handle(log.makeRecord(log.name, logging.INFO if cancelled else logging.ERROR, __file__, 0,
                                      "run %s %s: %s", (run_id, "cancelled" if cancelled else "failed", exc),
                                      None if cancelled else (type(exc), exc, exc.__traceback__)))
        raise
    finally:
        if sweep_point is not None:
            _refresh_sweep_of_point(config.run.runs_root, sweep_point["sweep_id"], run_id)
        library_logger.removeHandler(handler)
        handler.close()
        _RUNS.pop(run_id, None)


def _refresh_sweep_of_point(runs_root: str, sweep_id: str, run_id: str) -> None:
    """Bring the sweep's table up to date with this point; a problem there must not hide the run's own outcome."""
    try:
        refresh_sweep(runs_root, sweep_id)
    except (OSError, ValueError) as exc:
        log.warning("run %s is a point of sweep %s, whose table could not be updated: %s", run_id, sweep_id, exc)


def _flow_run_id() -> str | None:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx and ctx.flow_run else None


@flow(name="fat-distill-pipeline")
def pipeline(config: dict[str, Any], run_id: str, resume: bool = False) -> dict[str, Any]:
    """Data → noise → teacher rounds → soft labels → student and baselines → evaluation, for one config."""
    cfg = validate_config(PipelineConfig, config)
    set_cpu_threads(cfg.run.torch_threads)
    pool = DevicePool(cfg.run.devices, cfg.run.max_tasks_per_device)
    pool.create_limits()
    get_run_logger().info("run %s: devices %s; manifests → %s/%s, outputs → %s/%s", run_id, pool.devices,
                          cfg.run.manifests_root, run_id, cfg.run.runs_root, run_id)
    try:
        return _run_one(cfg, run_id, pool, resume)
    except RunCancelled as exc:  # the flow run ends Cancelled, not Failed
        return Cancelled(message=str(exc))
    finally:
        pool.close()


def expand_grid(base: dict[str, Any], grid: dict[str, list[Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Every combination of the grid's values applied to ``base``: [(label, config dict)]."""
    return [(point_label(p), apply_overrides(base, point_overrides(p))) for p in grid_points(grid)]


@flow(name="fat-distill-sweep-point")
def sweep_point(config: dict[str, Any], run_id: str, entry: dict[str, Any], sweep_id: str) -> dict[str, Any]:
    """One grid point of a sweep: the pipeline on the device pool the sweep shares, as a subflow of it.

    ``entry`` (:func:`run_sweep_entry`) is recorded in the point's run.json.
    """
    cfg = validate_config(PipelineConfig, config, f"sweep point {entry['label']}")
    get_run_logger().info("sweep %s, point %s: run %s", sweep_id, entry["label"], run_id)
    return _run_one(cfg, run_id, _SWEEP_POOLS[sweep_id], False, sweep_point=entry)


def _flow_run_name(label: str) -> str:
    """A grid point as a flow run name (Prefect refuses some characters in names)."""
    return re.sub(r"[/%&<>]", "_", label)


@flow(name="fat-distill-sweep")
def sweep(config: dict[str, Any], grid: dict[str, list[Any]], sweep_id: str) -> dict[str, Any]:
    """Run the pipeline for every point of a grid; points run concurrently and share the device pool.

    Each point is a subflow (:func:`sweep_point`) named after its grid point. Stages shared by
    several points (e.g. the teacher when only student settings vary) are computed once and taken
    from cache by the others. The sweep is recorded in ``runs/<sweep_id>/`` (``sweep.json``,
    ``sweep.parquet``: one row per point × model); point ``i`` runs as ``<sweep_id>-<i>``. A failed
    point does not stop the others: the table holds every point that finished, and the flow then
    fails naming the failed ones.
    """
    base = validate_config(PipelineConfig, config)
    set_cpu_threads(base.run.torch_threads)  # one process: the points share the setting of the base config
    base_data = base.model_dump(mode="json")
    points = grid_points(grid)
    configs = [validate_config(PipelineConfig, apply_overrides(base_data, point_overrides(p)),
                               f"sweep point {point_label(p)}") for p in points]
    start_sweep(base.run.runs_root, sweep_id, grid, points, base_data)
    run_ids = [point_run_id(sweep_id, i) for i in range(len(points))]
    pool = DevicePool(base.run.devices, base.run.max_tasks_per_device)
    pool.create_limits()
    get_run_logger().info("sweep %s: %d point(s) on %s", sweep_id, len(points), pool.devices)
    workers = max(2, pool.slots + 2)
    _SWEEP_POOLS[sweep_id] = pool
    results: dict[str, Any] = {}
    failed: list[tuple[str, str, BaseException]] = []
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(len(configs), pool.slots))) as threads:
            futures = [threads.submit(
                contextvars.copy_context().run,
                sweep_point.with_options(flow_run_name=_flow_run_name(point_label(point)),
                                         task_runner=ThreadPoolTaskRunner(max_workers=workers)),
                config=cfg.model_dump(mode="json"), run_id=rid, entry=run_sweep_entry(sweep_id, point, i),
                sweep_id=sweep_id)
                for i, (point, cfg, rid) in enumerate(zip(points, configs, run_ids))]
            for point, rid, future in zip(points, run_ids, futures):
                try:
                    results[point_label(point)] = {"run_id": rid, **future.result()}
                except Exception as exc:  # noqa: BLE001 - the other points go on; reported below
                    failed.append((point_label(point), rid, exc))
    finally:
        _SWEEP_POOLS.pop(sweep_id, None)
        pool.close()
        table = refresh_sweep(base.run.runs_root, sweep_id, finished=True)
    rows = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if v is not None}
            for row in json.loads(table.to_json(orient="records"))]
    if rows:
        create_table_artifact(rows, key="sweep-metrics",
                              description=f"Sweep {sweep_id}: one row per point and model")
    if failed:
        lines = "; ".join(f"{label} (run {rid}): {type(exc).__name__}: {exc}" for label, rid, exc in failed)
        raise RuntimeError(f"sweep {sweep_id}: {len(failed)} of {len(points)} point(s) failed: {lines}. "
                           f"The others are in {Path(base.run.runs_root) / sweep_id / SWEEP_TABLE}; continue a "
                           "failed point with `fat-distill resume <its run id>`") from failed[0][2]
    return results


def run_pipeline(config: PipelineConfig, run_id: str | None = None, *, resume: bool = False) -> tuple[str, dict]:
    """Run the pipeline flow (embedded Prefect unless PREFECT_API_URL is set); returns (run id, summary)."""
    run_id = run_id or new_run_id(config.run.name)
    workers = max(2, len(config.run.devices) * config.run.max_tasks_per_device + 2)
    flow_fn = pipeline.with_options(task_runner=ThreadPoolTaskRunner(max_workers=workers),
                                    flow_run_name=run_id)
    try:
        summary = flow_fn(config=config.model_dump(mode="json"), run_id=run_id, resume=resume)
    except CancelledRun as exc:
        raise RunCancelled(str(exc), cancel_reason() or "", cancel_signal()) from None
    return run_id, summary


def run_sweep(config: PipelineConfig, grid: dict[str, list[Any]], sweep_id: str | None = None) -> dict:
    """Run the sweep flow (embedded Prefect unless PREFECT_API_URL is set); returns {point label: run summary}.

    The sweep's table is written to ``runs/<sweep_id>/sweep.parquet``.
    """
    sweep_id = sweep_id or new_sweep_id(config.run.name)
    workers = max(4, 2 * len(config.run.devices) * config.run.max_tasks_per_device + 4)
    flow_fn = sweep.with_options(task_runner=ThreadPoolTaskRunner(max_workers=workers), flow_run_name=sweep_id)
    return flow_fn(config=config.model_dump(mode="json"), grid=grid, sweep_id=sweep_id)


__all__ = ["RESULTS_FOLDER", "artifact_key", "expand_grid", "is_transient", "pipeline", "run_pipeline", "run_sweep",
           "stage_pictures", "stage_tags", "stage_task", "sweep", "sweep_point"]
