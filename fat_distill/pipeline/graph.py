"""The pipeline's stage graph, written once and run by an executor (direct, or Prefect in ``flows/``).

data → noise → teacher rounds (folds in parallel) → soft labels → students and baselines (in parallel)
→ their evaluations, plus the teacher's noise-detection report.

An executor decides how a stage call runs: :class:`fat_distill.pipeline.direct.DirectExecutor`
calls it in place; ``flows.pipeline.PrefectExecutor`` submits it as a cached,
device-scheduled Prefect task. Both record the stage in the run's ``run.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from fat_distill.distill.noise_report import has_ground_truth
from fat_distill.manifests import read_manifest, read_manifest_meta, write_manifest
from fat_distill.pipeline import stages
from fat_distill.pipeline.config import PipelineConfig
from fat_distill.pipeline.keys import key_components, stage_key
from fat_distill.pipeline.runs import RunPaths, RunState
from fat_distill.train.history import require_tensorboard

log = logging.getLogger("fat_distill.pipeline")


@dataclass
class StageCall:
    """One stage invocation: what to call, with what, and what its cache key is made of."""

    name: str                      # unique in the run, e.g. "teacher.round1.fold0"
    kind: str                      # key of keys.STAGE_CODE, e.g. "teacher_fold"
    fn: Callable[..., dict]
    kwargs: dict[str, Any]
    components: dict[str, Any]
    needs_device: bool = False
    # A data-parallel stage (train.devices with 2+ entries) holds all of these devices at once.
    parallel_devices: tuple[str, ...] = ()
    key: str = field(init=False)

    def __post_init__(self) -> None:
        self.key = stage_key(self.components)


class Handle(Protocol):
    def result(self) -> dict: ...


class Executor(Protocol):
    def submit(self, call: StageCall) -> Handle: ...


def make_call(name: str, kind: str, fn: Callable[..., dict], *, inputs: dict[str, Any], config: Any,
              kwargs: dict[str, Any], extra: dict[str, Any] | None = None, needs_device: bool = False,
              parallel_devices: list[str] | tuple[str, ...] = ()) -> StageCall:
    return StageCall(name=name, kind=kind, fn=fn, kwargs=kwargs, needs_device=needs_device,
                     parallel_devices=tuple(parallel_devices) if len(parallel_devices) >= 2 else (),
                     components=key_components(kind, inputs, config, extra))


def run_graph(config: PipelineConfig, paths: RunPaths, state: RunState, executor: Executor) -> dict[str, Any]:
    """Run every stage of the pipeline through ``executor``; returns the run's metrics summary."""
    progress = config.run.progress
    # Training stages log their epochs there too; not part of any cache key (it changes no result).
    tensorboard = str(paths.run_dir / "tensorboard") if config.run.tensorboard else None
    if tensorboard:
        require_tensorboard()
    config = config.with_shared_image_cache()

    # A given manifest is an input: editing it (in pandas, say) must re-run the data stage.
    given = config.data.manifest if config.data.source == "manifest" else None
    data = executor.submit(make_call("data", "data", stages.data_stage,
                                     inputs={"manifest": given} if given and Path(given).is_file() else {},
                                     config=config.data,
                                     kwargs={"config": config.data, "work_dir": str(paths.stage_dir("data"))})).result()
    paths.publish(data["dataset"], "dataset.parquet")
    noisy = executor.submit(make_call(
        "noise", "noise", stages.noise_stage, inputs={"dataset": data["dataset"]}, config=config.noise,
        kwargs={"dataset": data["dataset"], "config": config.noise, "work_dir": str(paths.stage_dir("noise"))},
    )).result()
    dataset = noisy["dataset"]
    paths.publish(dataset, "dataset_noisy.parquet")
    # Real data has no true_pid: the label audit replaces the truth-based report, and the oracle cannot train.
    truth = has_ground_truth(read_manifest(dataset, "dataset"))
    if not truth:
        log.info("data: no ground truth (true_pid / noise_kind) in %s: the label audit replaces the "
                 "noise-detection report", dataset)
        if "oracle" in (config.student.method, *config.baselines):
            raise ValueError("the oracle trains on the true labels, but this dataset has none (noise.enabled is "
                             "false or the manifest has no true_pid); remove 'oracle' from baselines")

    teacher_cfg = config.teacher
    teacher_dir = str(paths.stage_dir("teacher"))
    previous: str | None = None
    rounds: list[str] = []
    round_out: dict[str, Any] = {}
    round_checkpoints: list[list[str]] = []  # every round's model(s), for soft_label_models: all_rounds
    warnings: list[str] = []  # teacher rounds that ended near chance: shown with the run's metrics
    for r in range(teacher_cfg.rounds):
        inputs = {"dataset": dataset, "previous_round": previous}
        if teacher_cfg.scoring == "oof":
            folds = [executor.submit(make_call(
                f"teacher.round{r}.fold{k}", "teacher_fold", stages.teacher_fold_stage, inputs=inputs,
                config=teacher_cfg.round_hash(), extra={"round": r, "fold": k}, needs_device=True,
                kwargs={"dataset": dataset, "previous_round": previous, "config": teacher_cfg, "round": r,
                        "fold": k, "work_dir": teacher_dir, "progress": progress, "tensorboard_dir": tensorboard},
            )) for k in range(teacher_cfg.folds)]
            for handle in folds:
                handle.result()
        round_out = executor.submit(make_call(
            f"teacher.round{r}", "teacher_round", stages.teacher_round_stage, inputs=inputs,
            config=teacher_cfg.round_hash(), extra={"round": r}, needs_device=True,
            kwargs={"dataset": dataset, "previous_round": previous, "config": teacher_cfg, "round": r,
                    "work_dir": teacher_dir, "progress": progress, "tensorboard_dir": tensorboard},
        )).result()
        paths.publish(round_out["teacher_round"], f"teacher_round_{r}.parquet")
        round_checkpoints.append(round_out["checkpoints"])
        previous = round_out["teacher_round"]
        rounds.append(previous)
        warning = read_manifest_meta(previous).extra.get("warning")  # not an output: outputs name files
        if warning:
            warnings.append(warning)
        change = round_out.get("change")
        if change is not None and change <= teacher_cfg.tolerance:
            log.info("teacher: confident set changed by %.2f%% <= tolerance after round %d; stopping",
                     100 * change, r)
            break

    audit = executor.submit(make_call(
        "label_audit", "label_audit", stages.label_audit_stage,
        inputs={"dataset": dataset, "rounds": rounds}, config={},
        kwargs={"dataset": dataset, "rounds": rounds, "work_dir": str(paths.stage_dir("label_audit")),
                "plots_dir": str(paths.plots_dir)},
    ))
    noise_report = executor.submit(make_call(
        "noise_report", "noise_report", stages.noise_report_stage,
        inputs={"dataset": dataset, "teacher_round": previous}, config={},
        kwargs={"dataset": dataset, "teacher_round": previous, "work_dir": str(paths.stage_dir("noise_report")),
                "plots_dir": str(paths.plots_dir)},
    )) if truth else None
    soft_models = round_out["checkpoints"] if teacher_cfg.soft_label_models == "final_round" else round_checkpoints
    soft = executor.submit(make_call(
        "soft_labels", "soft_labels", stages.soft_labels_stage,
        inputs={"dataset": dataset, "final_round": previous, "checkpoints": soft_models},
        config=teacher_cfg.soft_labels_hash(), needs_device=True,
        kwargs={"dataset": dataset, "final_round": previous, "checkpoints": soft_models,
                "config": teacher_cfg, "work_dir": str(paths.stage_dir("soft_labels"))},
    )).result()
    paths.publish(soft["soft_labels"], "soft_labels.parquet")

    # The filter-and-retrain baselines: rows kept by the final teacher round, or by cleanlab.
    row_filters = {"filtered": previous}
    if "cleanlab" in config.student_configs():
        row_filters["cleanlab"] = _run_cleanlab(config, paths, executor, dataset, progress, tensorboard)
    students = {}
    for method, cfg in config.student_configs().items():  # named by the method each model really trains with
        soft_input = soft["soft_labels"] if method == "distilled" else None
        rows = row_filters.get(method)
        inputs = {"dataset": dataset, "soft_labels": soft_input, **({"rows": rows} if rows else {})}
        students[method] = (cfg, executor.submit(make_call(
            f"student.{method}", "student", stages.student_stage,
            inputs=inputs, config=cfg, needs_device=True,
            parallel_devices=cfg.train.devices,
            kwargs={"dataset": dataset, "soft_labels": soft_input, "config": cfg,
                    "work_dir": str(paths.stage_dir("student", method)), "progress": progress,
                    "tensorboard_dir": tensorboard, **({"rows": rows} if rows else {})},
        )))
    evaluations = {}
    for method, (cfg, handle) in students.items():
        checkpoint = handle.result()["checkpoint"]
        evaluations[method] = executor.submit(make_call(
            f"evaluate.{method}", "evaluate", stages.evaluate_stage,
            inputs={"dataset": dataset, "checkpoint": checkpoint}, config=cfg, needs_device=True,
            kwargs={"dataset": dataset, "checkpoint": checkpoint, "config": cfg,
                    "work_dir": str(paths.stage_dir("evaluate")), "plots_dir": str(paths.plots_dir)},
        ))
    metric_paths = {method: h.result()["metrics"] for method, h in evaluations.items()}
    audited = audit.result()
    paths.publish(audited["identities"])
    noise_metrics = noise_report.result()["metrics"] if noise_report is not None else None
    for path in [*metric_paths.values(), audited["metrics"], noise_metrics]:
        if path is not None:
            paths.publish(path)
    return {**summarise_metrics(paths, metric_paths, audited["metrics"], noise_metrics), "warnings": warnings}


def _run_cleanlab(config: PipelineConfig, paths: RunPaths, executor: Executor, dataset: str, progress: bool,
                  tensorboard: str | None) -> str:
    """The cleanlab baseline's K fold models (in parallel), then its filter; returns the label_issues manifest."""
    fold_teacher = config.cleanlab.fold_teacher(config.teacher)
    work_dir = str(paths.stage_dir("cleanlab"))
    inputs = {"dataset": dataset, "previous_round": None}
    folds = [executor.submit(make_call(
        f"cleanlab.fold{k}", "teacher_fold", stages.teacher_fold_stage, inputs=inputs,
        config=fold_teacher.round_hash(), extra={"round": 0, "fold": k, "for": "cleanlab"}, needs_device=True,
        kwargs={"dataset": dataset, "previous_round": None, "config": fold_teacher, "round": 0, "fold": k,
                "work_dir": work_dir, "progress": progress, "tensorboard_dir": tensorboard},
    )) for k in range(fold_teacher.folds)]
    for handle in folds:
        handle.result()
    out = executor.submit(make_call(
        "cleanlab", "cleanlab", stages.cleanlab_stage, inputs={"dataset": dataset},
        config={"cleanlab": config.cleanlab, "fold_teacher": fold_teacher.round_hash()}, needs_device=True,
        kwargs={"dataset": dataset, "config": config.cleanlab, "teacher": config.teacher, "work_dir": work_dir,
                "progress": progress, "tensorboard_dir": tensorboard},
    )).result()
    paths.publish(out["label_issues"])
    return out["label_issues"]


KEY_METRICS = ("rank1", "rank5", "mAP", "mINP")


def summarise_metrics(paths: RunPaths, metric_paths: dict[str, str], audit_metrics: str,
                      noise_metrics: str | None) -> dict[str, Any]:
    """Collect every stage's metrics into one ``metrics.parquet`` and a small JSON-ready summary.

    ``noise_detection`` (scored against the ground truth) is empty when the data has none;
    ``label_audit`` (the final teacher round's own view of the labels) is always there.
    """
    sources = [*metric_paths.values(), audit_metrics, *([noise_metrics] if noise_metrics else [])]
    table = pd.concat([read_manifest(p, "metrics") for p in sources], ignore_index=True)
    write_manifest(table, paths.manifest_dir / "metrics.parquet", "metrics", stage="summary")
    retrieval = {}
    for method, path in metric_paths.items():
        f = read_manifest(path, "metrics").set_index("metric")["value"]
        retrieval[method] = {m: float(f[m]) for m in KEY_METRICS if m in f.index}
    audit = read_manifest(audit_metrics, "metrics")
    final = audit[audit["step"] == audit["step"].max()]
    label_audit = {"round": int(final["step"].iloc[0]),
                   **{m: (None if pd.isna(v) else float(v)) for m, v in zip(final["metric"], final["value"])}}
    detection = {}
    if noise_metrics:
        noise = read_manifest(noise_metrics, "metrics").set_index("metric")["value"]
        detection = {k: (None if pd.isna(v) else float(v)) for k, v in noise.items() if k.startswith("all.")}
    return {"retrieval": retrieval, "noise_detection": detection, "label_audit": label_audit}

