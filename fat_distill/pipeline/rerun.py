"""Resuming a run with a changed config: what must be thrown away so that nothing stale is reused.

A stage's epoch checkpoints are guarded by the hash of its own training
settings only: a student resumed after its teacher was re-trained would pick up
the old student's checkpoints (trained on the old soft labels). So when
``fat-distill resume RUN --set …`` changes a config section, that section's
stages and every stage after them are discarded: their folders under
``runs/RUN/stages`` and the manifests they published. They then run again;
the stages before them are reused.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fat_distill.pipeline.config import PipelineConfig
    from fat_distill.pipeline.runs import RunPaths

__all__ = ["SECTION_ORDER", "changed_sections", "discard_stale_stages", "stale_outputs"]

#: Config sections in pipeline order; a change re-runs the section's stages and everything after them.
SECTION_ORDER = ("data", "noise", "teacher", "cleanlab", "student", "baselines")

# Stage folders (under runs/RUN/stages) and published manifests (glob patterns) of each section.
_STAGE_DIRS = {
    "data": ["data"],
    "noise": ["noise"],
    "teacher": ["teacher", "label_audit", "noise_report", "soft_labels"],
    "cleanlab": ["cleanlab"],  # its fold models train with teacher.train, so a teacher change reaches it
    "student": ["student", "evaluate"],
    "baselines": [],
}
_MANIFESTS = {
    "data": ["dataset.parquet"],
    "noise": ["dataset_noisy.parquet"],
    "teacher": ["teacher_round_*.parquet", "soft_labels.parquet", "label_audit*.parquet",
                "metrics_noise_detection.parquet", "metrics_label_audit*.parquet"],
    "cleanlab": ["label_issues.parquet"],
    "student": ["metrics_*.parquet", "metrics.parquet"],
    "baselines": ["metrics.parquet"],
}
# A changed run section moves nothing, except these fields, which would orphan the run's folders.
_FIXED_RUN_FIELDS = ("runs_root", "manifests_root")


def changed_sections(old: PipelineConfig, new: PipelineConfig) -> list[str]:
    """The sections of :data:`SECTION_ORDER` whose settings differ between ``old`` and ``new``.

    Raises:
        ValueError: ``run.runs_root`` or ``run.manifests_root`` differs (a run cannot move).
    """
    for name in _FIXED_RUN_FIELDS:
        if getattr(old.run, name) != getattr(new.run, name):
            raise ValueError(f"run.{name} cannot change when resuming (the run's folders are under "
                             f"{getattr(old.run, name)!r}); start a new run instead")
    before, after = old.model_dump(mode="json"), new.model_dump(mode="json")
    return [name for name in SECTION_ORDER if before[name] != after[name]]


def stale_outputs(paths: RunPaths, sections: list[str]) -> list[Path]:
    """Stage folders and published manifests that a change of ``sections`` makes stale (existing ones only)."""
    if not sections:
        return []
    first = min(SECTION_ORDER.index(name) for name in sections)
    downstream = SECTION_ORDER[first:]
    found: list[Path] = []
    earlier = {p for name in SECTION_ORDER[:first] for pattern in _MANIFESTS[name]
               for p in paths.manifest_dir.glob(pattern)}
    for name in downstream:
        found += [paths.stage_dir(folder) for folder in _STAGE_DIRS[name] if paths.stage_dir(folder).exists()]
        for pattern in _MANIFESTS[name]:  # "metrics_*" of the students is not the teacher's metrics_label_audit
            found += sorted(p for p in paths.manifest_dir.glob(pattern) if p not in found and p not in earlier)
    return found


def discard_stale_stages(paths: RunPaths, old: PipelineConfig, new: PipelineConfig) -> tuple[list[str], list[Path]]:
    """Delete what a config change makes stale; returns (changed sections, deleted paths)."""
    sections = changed_sections(old, new)
    stale = stale_outputs(paths, sections)
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    return sections, stale
