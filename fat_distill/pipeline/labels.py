"""Cleaned labels out of a finished run: one row per train sample, as a file the user's own code reads.

Reads the run's manifests only (the noisy ``dataset`` and its ``teacher_round_<r>``);
no torch model is loaded. The Parquet it writes is a valid ``dataset`` manifest, so
``data.source: manifest`` trains on it again, and a copy filtered in pandas, Polars or
DuckDB comes back in with ``data.root``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fat_distill.atomic import atomic_write_text
from fat_distill.distill.label_audit import RELABEL_MIN_PROB, apply_actions, cleaned_labels
from fat_distill.manifests import parent_ref, read_manifest, write_manifest
from fat_distill.pipeline.runs import load_run_json

ROUND_FILE = re.compile(r"teacher_round_(\d+)\.parquet$")
EXPORT_FORMATS = (".parquet", ".csv")


@dataclass
class LabelsExport:
    """What :func:`export_labels` wrote."""

    path: Path
    round: int
    rows: int
    actions: dict[str, int]


def teacher_rounds_of(run_dir: Path) -> dict[int, Path]:
    """``{round: teacher_round manifest}`` of a run, from its manifest folder."""
    data = load_run_json(run_dir) or {}
    manifest_dir = Path(data.get("manifest_dir", ""))
    found = {}
    if manifest_dir.is_dir():
        for path in manifest_dir.glob("teacher_round_*.parquet"):
            if match := ROUND_FILE.search(path.name):
                found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def export_labels(run_dir: str | Path, out: str | Path, *, round: int | None = None,
                  min_prob: float = RELABEL_MIN_PROB, include_test: bool = False, apply: bool = False) -> LabelsExport:
    """Write the teacher's view of every train sample's label to ``out`` (``.parquet`` or ``.csv``).

    Args:
        run_dir: the run folder (``runs/<run_id>``).
        out: the file to write; its suffix picks the format.
        round: the teacher round to use (default: the last one the run finished).
        min_prob: a flagged row is proposed for relabelling only when the teacher gives its
            suggestion at least this probability (see :func:`~fat_distill.distill.propose_actions`).
        include_test: also write the query and gallery rows (action ``keep``, unchanged), so the
            file is a complete dataset to run the pipeline on again.
        apply: carry the actions out: ``drop`` rows are left out, ``relabel`` rows get the
            suggested pid; the label each row came with stays in ``given_pid``.

    Returns:
        :class:`LabelsExport`.

    Raises:
        FileNotFoundError: the run has no teacher round (yet), or not the one asked for.
        ValueError: an unknown output format.
    """
    run_dir, out = Path(run_dir), Path(out)
    if out.suffix.lower() not in EXPORT_FORMATS:
        raise ValueError(f"--out {out}: write .parquet or .csv (got {out.suffix or 'no suffix'!r})")
    rounds = teacher_rounds_of(run_dir)
    if not rounds:
        raise FileNotFoundError(f"run {run_dir.name} has no teacher round manifest yet; resume it "
                                f"(`fat-distill resume {run_dir.name}`) until its teacher rounds finish")
    if round is None:
        round = max(rounds)
    if round not in rounds:
        raise FileNotFoundError(f"run {run_dir.name} has no teacher round {round}; it has round(s) "
                                f"{', '.join(map(str, rounds))}")
    dataset_path = rounds[round].parent / "dataset_noisy.parquet"
    dataset = read_manifest(dataset_path, "dataset")
    frame = cleaned_labels(dataset, read_manifest(rounds[round], "teacher_round"), min_prob)
    actions = frame["action"].value_counts().reindex(["keep", "relabel", "drop"], fill_value=0)
    if apply:
        frame = apply_actions(frame)
    if include_test:
        test = dataset[dataset["split"] != "train"].assign(action="keep")
        frame = pd.concat([frame, test], ignore_index=True)
    meta = dataset.attrs["manifest"]
    facts = {"run_id": run_dir.name, "round": round, "min_prob": min_prob, "applied": apply}
    if out.suffix.lower() == ".csv":
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, frame.to_csv(index=False))
    else:
        write_manifest(frame, out, "dataset", stage="labels.export",
                       parents=[parent_ref(dataset_path, meta), parent_ref(rounds[round])],
                       extra={**meta.extra, "labels_export": facts})
    return LabelsExport(path=out, round=round, rows=len(frame), actions={k: int(v) for k, v in actions.items()})
