"""Prefect flows: the pipeline and the sweep, as cached, resumable, device-scheduled tasks.

The stage graph lives in :mod:`fat_distill.pipeline.graph`; here each stage call
becomes a run of :func:`stage_task`, whose cache key is the stage's own key
(input content hashes, its config section, library version, code) and whose
result (the stage's output paths, JSON) is persisted under PREFECT_HOME. A cached
result whose files are gone is recomputed.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
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
from fat_distill.pipeline.graph import StageCall
from fat_distill.pipeline.inspect import describe_label_audit
from fat_distill.pipeline.keys import why_changed
from fat_distill.pipeline.overrides import apply_overrides, validate_config
from fat_distill.pipeline.runs import last_components, new_run_id, run_log_handler
from fat_distill.train import set_cpu_threads
from flows.devices import DevicePool

log = logging.getLogger("fat_distill.flows")

# Per-run objects the task threads need (they are not task parameters: tasks take paths and small values):
# the run's state file, its device pool, and the token that stops its stages when another one failed.
_RUNS: dict[str, tuple[RunState, DevicePool, CancelToken]] = {}


def _cache_key(context, parameters: dict[str, Any]) -> str:
    return parameters["cache_key"]


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
        if cached:
            state.stage(call.name, state="cached", outputs=value, seconds=0.0,
                        why=f"same inputs, config and code as an earlier run (key {call.key[:12]})")
            log.info("stage %s: cached (key %s) → %s", call.name, call.key[:12], _where(value))
        else:
            state.stage(call.name, state="ran", outputs=value, seconds=round(seconds, 2), why=self.why)
            log.info("stage %s: ran (%s) in %.1fs → %s", call.name, self.why, seconds, _where(value))
        self._value = value
        return value


def _where(outputs: dict) -> str:
    paths = [v for v in outputs.values() if isinstance(v, str) and "/" in v]
    return ", ".join(paths[:3]) or "-"


class PrefectExecutor:
    """Submits stage calls as Prefect task runs of :func:`stage_task`."""

    def __init__(self, state: RunState, pool: DevicePool, runs_root: str, token: CancelToken):
        self.state = state
        self.pool = pool
        self.runs_root = runs_root
        _RUNS[state.paths.run_id] = (state, pool, token)

    def _submit(self, call: StageCall, refresh: bool):
        kwargs = dict(call.kwargs)
        return stage_task.with_options(name=f"stage-{call.kind}", task_run_name=call.name,
                                       refresh_cache=refresh).submit(
            call_name=call.name, cache_key=call.key, run_id=self.state.paths.run_id,
            stage_fn=call.fn.__name__, kwargs=kwargs, needs_device=call.needs_device,
            parallel_devices=list(call.parallel_devices) or None)

    def submit(self, call: StageCall) -> _StageHandle:
        previous = self.state.stage_entry(call.name).get("components") or last_components(
            self.runs_root, call.name, exclude=self.state.paths.run_id)
        why = why_changed(previous if previous != call.components else None, call.components)
        self.state.stage(call.name, state="submitted", key=call.key, components=call.components)
        return _StageHandle(self, call, why)


def _attach_artifacts(paths: RunPaths, summary: dict, state: RunState) -> None:
    rows = [{"method": m, **{k: round(v, 4) for k, v in metrics.items()}} for m, metrics in summary["retrieval"].items()]
    if rows:
        create_table_artifact(rows, key="retrieval-metrics", description=f"Retrieval metrics of run {paths.run_id}")
    stage_lines = [f"| {name} | {e.get('state')} | {e.get('seconds', '')} | {e.get('why', '')} |"
                   for name, e in state.data["stages"].items()]
    detection = ", ".join(f"{k.split('.', 1)[1]} {v:.3f}" for k, v in summary["noise_detection"].items()
                          if v is not None and k.split(".", 1)[1] in ("precision", "recall", "f1", "auroc"))
    create_markdown_artifact(
        "\n".join([f"# fat-distill run `{paths.run_id}`", "",
                   f"Manifests: `{paths.manifest_dir}` · run folder: `{paths.run_dir}`", "",
                   f"Noise detection (final teacher round): {detection or 'n/a (no ground truth)'}", "",
                   f"Label audit (final teacher round): {describe_label_audit(summary.get('label_audit') or {})}",
                   "",
                   "| stage | state | seconds | why |", "|---|---|---|---|", *stage_lines]),
        key="run-summary", description=f"Stages of run {paths.run_id}")
    for png in sorted(paths.plots_dir.glob("*.png")):
        create_image_artifact(png.resolve().as_uri(), description=f"{png.stem} ({paths.run_id})")


def _run_one(config: PipelineConfig, run_id: str, pool: DevicePool, resume: bool) -> dict[str, Any]:
    paths = RunPaths.for_run(config, run_id)
    state = RunState.create(paths, config, resumed=resume)
    handler = run_log_handler(paths)
    library_logger = logging.getLogger("fat_distill")
    library_logger.addHandler(handler)
    if library_logger.level == logging.NOTSET or library_logger.level > logging.INFO:
        library_logger.setLevel(logging.INFO)
    token = CancelToken()
    try:
        state.update(flow_run_id=_flow_run_id())
        for method in ("distilled", *config.baselines):  # before hours of teacher training, not after
            student = config.student if method == "distilled" else config.baseline_config(method)
            if len(student.train.devices) >= 2:
                pool.indices_for(f"student.{method}", student.train.devices)
        with cancel_scope(token):
            summary = run_graph(config, paths, state, PrefectExecutor(state, pool, config.run.runs_root, token))
        state.update(status="completed", metrics=summary, error=None)
        _attach_artifacts(paths, summary, state)
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
        library_logger.removeHandler(handler)
        handler.close()
        _RUNS.pop(run_id, None)


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
    keys = list(grid)
    points = []
    for values in itertools.product(*(grid[k] for k in keys)):
        overrides = [f"{k}={v}" for k, v in zip(keys, values)]
        label = ",".join(overrides)
        points.append((label, apply_overrides(base, overrides)))
    return points


@flow(name="fat-distill-sweep")
def sweep(config: dict[str, Any], grid: dict[str, list[Any]], sweep_id: str) -> dict[str, Any]:
    """Run the pipeline for every point of a grid; points run concurrently and share the device pool.

    Stages shared by several points (e.g. the teacher when only student settings vary)
    are computed once and taken from cache by the others.
    """
    base = validate_config(PipelineConfig, config)
    set_cpu_threads(base.run.torch_threads)  # one process: the points share the setting of the base config
    pool = DevicePool(base.run.devices, base.run.max_tasks_per_device)
    pool.create_limits()
    points = expand_grid(base.model_dump(mode="json"), grid)
    configs = [(label, validate_config(PipelineConfig, data, f"sweep point {label}")) for label, data in points]
    run_ids = [f"{sweep_id}-{i}" for i in range(len(configs))]
    get_run_logger().info("sweep %s: %d point(s) on %s", sweep_id, len(configs), pool.devices)
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(len(configs), pool.slots))) as threads:
            futures = [threads.submit(contextvars.copy_context().run, _run_one, cfg, rid, pool, False)
                       for (label, cfg), rid in zip(configs, run_ids)]
            results = {label: {"run_id": rid, **f.result()}
                       for (label, _), rid, f in zip(configs, run_ids, futures)}
    finally:
        pool.close()
    rows = [{"point": label, "run_id": r["run_id"], "method": m, **{k: round(v, 4) for k, v in met.items()}}
            for label, r in results.items() for m, met in r["retrieval"].items()]
    create_table_artifact(rows, key="sweep-metrics", description=f"Sweep {sweep_id}")
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
    sweep_id = sweep_id or new_run_id(f"{config.run.name}-sweep")
    workers = max(4, 2 * len(config.run.devices) * config.run.max_tasks_per_device + 4)
    flow_fn = sweep.with_options(task_runner=ThreadPoolTaskRunner(max_workers=workers), flow_run_name=sweep_id)
    return flow_fn(config=config.model_dump(mode="json"), grid=grid, sweep_id=sweep_id)


__all__ = ["expand_grid", "pipeline", "run_pipeline", "run_sweep", "stage_task", "sweep"]
