"""The pipeline as plain library code: typed config, stage functions, stage graph, run folders.

``flows/`` runs the same graph as cached, resumable, device-scheduled Prefect tasks;
:func:`run_direct` runs it without Prefect. Names are imported lazily so that
reading run folders (``fat-distill runs``, ``inspect``) does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DataSection": "config", "NoiseSection": "config", "PipelineConfig": "config", "RetriesSection": "config",
    "RunSection": "config",
    "SynthSection": "config", "demo_config": "config",
    "DirectExecutor": "direct", "run_direct": "direct",
    "StageCall": "graph", "run_graph": "graph",
    "ConfigError": "overrides", "apply_overrides": "overrides", "dump_yaml": "overrides", "load_config": "overrides",
    "validate_config": "overrides",
    "RunPaths": "runs", "RunState": "runs", "find_run": "runs", "list_runs": "runs", "load_run_json": "runs",
    "new_run_id": "runs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"fat_distill.pipeline.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'fat_distill.pipeline' has no attribute {name!r}")
