"""Run the pipeline without Prefect: every stage called in place, one after another, on one device."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from fat_distill.cancel import RunCancelled, cancel_signal, check_cancelled
from fat_distill.pipeline.config import PipelineConfig
from fat_distill.pipeline.graph import StageCall, run_graph
from fat_distill.pipeline.runs import RunPaths, RunState, new_run_id, run_log_handler
from fat_distill.pipeline.stages import log_resume, split_training, training_entry
from fat_distill.train import resolve_device, set_cpu_threads

log = logging.getLogger("fat_distill.pipeline")


@dataclass
class _Done:
    value: dict

    def result(self) -> dict:
        return self.value


class DirectExecutor:
    """Calls each stage immediately. Finished work is still skipped by the stages themselves
    (existing rounds, final checkpoints), but there is no cross-run cache and no parallelism."""

    def __init__(self, state: RunState, device: str):
        self.state = state
        self.device = device

    def submit(self, call: StageCall) -> _Done:
        started = time.perf_counter()
        self.state.stage(call.name, state="running", key=call.key, components=call.components)
        kwargs = dict(call.kwargs)
        if call.needs_device:
            kwargs["device"] = self.device
        try:
            check_cancelled(f"stage {call.name} (not started)")
            out = call.fn(**kwargs)
        except BaseException as exc:
            try:
                self.state.stage(call.name, state="cancelled" if isinstance(exc, RunCancelled) else "failed",
                                 error=str(exc), seconds=round(time.perf_counter() - started, 2))
            except OSError:  # run.json cannot be written either (a full disk): report the stage's error
                pass
            raise
        outputs, training = split_training(out)
        self.state.stage(call.name, state="ran", why="direct run (no cache)", outputs=outputs,
                         seconds=round(time.perf_counter() - started, 2),
                         **training_entry(self.state.stage_entry(call.name), training))
        log_resume(call.name, training)
        return _Done(out)


def run_direct(config: PipelineConfig, run_id: str | None = None) -> tuple[str, dict[str, Any]]:
    """Run the whole pipeline in this process without Prefect; returns (run id, metrics summary)."""
    run_id = run_id or new_run_id(config.run.name)
    paths = RunPaths.for_run(config, run_id)
    state = RunState.create(paths, config)
    set_cpu_threads(config.run.torch_threads)
    device = config.run.devices[0] if config.run.devices else "auto"
    device = str(resolve_device(device))
    # The run's log, as a Prefect run has it: the console shows one line per failure, run.log the traceback.
    handler = run_log_handler(paths)
    library_logger = logging.getLogger("fat_distill")
    library_logger.addHandler(handler)
    try:
        summary = run_graph(config, paths, state, DirectExecutor(state, device))
    except BaseException as exc:
        cancelled = isinstance(exc, RunCancelled) or cancel_signal() is not None
        try:
            state.update(status="cancelled" if cancelled else "failed", error=f"{type(exc).__name__}: {exc}")
        except OSError:  # a full disk fails run.json too: the first error is the one to report
            pass
        handler.handle(log.makeRecord(log.name, logging.INFO if cancelled else logging.ERROR, __file__, 0,
                                      "run %s %s: %s", (run_id, "cancelled" if cancelled else "failed", exc),
                                      None if cancelled else (type(exc), exc, exc.__traceback__)))
        raise
    finally:
        library_logger.removeHandler(handler)
        handler.close()
    state.update(status="completed", metrics=summary)
    return run_id, summary
