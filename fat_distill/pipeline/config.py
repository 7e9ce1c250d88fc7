"""The pipeline's typed configuration: one section per stage, loaded from YAML with overrides.

Each stage's cache key includes the JSON of its own section only, so changing
``student.*`` re-runs the student and its evaluation but not the teacher.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from fat_distill.config_sections import Section
from fat_distill.distill import STUDENT_METHODS, StudentConfig, TeacherConfig
from fat_distill.data.image_cache import CACHE_DIRNAME
from fat_distill.distill.cleanlab_baseline import CleanlabConfig


class SynthSection(Section):
    """Synthetic Market-1501-style data (``data.source: synth``)."""

    identities: int = Field(200, ge=4, description="identities in all; half train, half test")
    cameras: int = Field(6, ge=2, le=9)
    images_per_identity: int = Field(10, ge=2)
    size: tuple[int, int] = Field((128, 64), description="image (height, width)")
    seed: int = 0
    distractors: int = Field(20, ge=0)
    junk: int = Field(10, ge=0)


class DataSection(Section):
    """Where the images come from: synthesised, a dataset folder, or an existing dataset manifest."""

    source: Literal["synth", "folder", "manifest"] = "synth"
    synth: SynthSection = Field(default_factory=SynthSection)
    root: str | None = Field(None, description="source 'folder': the dataset root; source 'manifest': the folder the "
                                               "manifest's image paths are relative to (replaces the root it records; "
                                               "needed when it records none, e.g. after pandas/Polars/DuckDB)")
    layout: Literal["market1501", "dukemtmc", "msmt17", "folders"] = "market1501"
    camera_regex: str | None = None
    split_identities: float | None = Field(None, gt=0, lt=1)
    split_seed: int = 0
    verify: bool = Field(False, description="decode every image while indexing")
    skip_bad: bool = False
    manifest: str | None = Field(None, description="source 'manifest': a dataset manifest to use as it is")
    allow_outside_root: bool = Field(False, description="read images whose paths are absolute, climb out of the "
                                                        "dataset root with '..' or are symlinks leading out of it "
                                                        "(refused by default)")

    @model_validator(mode="after")
    def _check(self) -> DataSection:
        if self.source == "folder" and not self.root:
            raise ValueError("data.source 'folder' needs data.root (the dataset folder)")
        if self.source == "manifest" and not self.manifest:
            raise ValueError("data.source 'manifest' needs data.manifest (a dataset manifest path)")
        return self


class NoiseSection(Section):
    """Label noise injected into the train split (rate 0: none; the truth columns are still added)."""

    rate: float = Field(0.4, ge=0, lt=1)
    kind: Literal["flip", "pair", "outlier", "multi", "mix"] = "mix"
    seed: int = 0
    pairing: Literal["mean_image", "derangement"] | None = None
    enabled: bool = Field(True, description="false: use the labels as they are (real noisy data)")


class RetriesSection(Section):
    """How often a failed stage is retried, per stage kind, when its error looks transient.

    Transient: an OSError such as a network filesystem or connection hiccup, a timeout. Bad input
    (a missing file, a damaged manifest, a wrong config value) fails at once, whatever the count.
    Stages that train or extract features on a device default to 0 (a retry would repeat minutes to
    hours of work; ``fat-distill resume`` continues from the last epoch instead); the stages that only
    read and write manifests default to 2. Only Prefect runs retry; ``--direct`` runs do not.
    """

    data: int = Field(2, ge=0)
    noise: int = Field(2, ge=0)
    teacher_fold: int = Field(0, ge=0)
    teacher_round: int = Field(0, ge=0)
    label_audit: int = Field(2, ge=0)
    noise_report: int = Field(2, ge=0)
    soft_labels: int = Field(0, ge=0)
    cleanlab: int = Field(0, ge=0)
    student: int = Field(0, ge=0)
    evaluate: int = Field(0, ge=0)
    delay_seconds: float = Field(10.0, ge=0, description="wait before each retry")

    def for_stage(self, kind: str) -> int:
        """The retry count of a stage kind (a key of ``fat_distill.pipeline.keys.STAGE_CODE``)."""
        return int(getattr(self, kind))


class RunSection(Section):
    """Where outputs go, which devices the stages share, and how failed stages are retried."""

    name: str = Field("run", description="prefix of the run id")
    manifests_root: str = "data_manifests"
    runs_root: str = "runs"
    devices: list[str] = Field(default_factory=lambda: ["auto"],
                               description="devices stages are scheduled on: auto, cpu, cuda:N (repeat cpu "
                                           "for virtual devices)")
    max_tasks_per_device: int = Field(1, ge=1)
    progress: bool = Field(True, description="Rich progress bars while training")
    torch_threads: int | None = Field(
        None, ge=1, description="CPU threads torch may use in this process (None: torch's default, one per core); "
                                "1 is often faster on a small or shared CPU machine, where threads wait for "
                                "each other")
    tensorboard: bool = Field(False, description="also log every training stage's epochs to TensorBoard under "
                                                 "runs/<run_id>/tensorboard/<stage> (needs the tensorboard package: "
                                                 "pip install 'fat-distill[tensorboard]'); each stage's "
                                                 "history.parquet is written either way")
    retries: RetriesSection = Field(default_factory=RetriesSection)


class PipelineConfig(Section):
    """The whole pipeline: data → noise → teacher rounds → soft labels → student (+ baselines) → evaluation."""

    run: RunSection = Field(default_factory=RunSection)
    data: DataSection = Field(default_factory=DataSection)
    noise: NoiseSection = Field(default_factory=NoiseSection)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    cleanlab: CleanlabConfig = Field(default_factory=CleanlabConfig,
                                     description="the cleanlab baseline's filter (used when it is in baselines)")
    baselines: list[str] = Field(default_factory=lambda: ["ce_triplet", "fat_hybrid_noisy"],
                                 description=f"student methods trained for comparison: {', '.join(STUDENT_METHODS)}")

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        unknown = [b for b in self.baselines if b not in STUDENT_METHODS]
        if unknown:
            raise ValueError(f"unknown baseline(s) {unknown}; choose from {', '.join(STUDENT_METHODS)}")
        if "distilled" in self.baselines:
            raise ValueError("'distilled' is the student itself, not a baseline")
        return self

    def baseline_config(self, method: str) -> StudentConfig:
        """The student section with another method: baselines share every other setting."""
        return self.student.model_copy(update={"method": method})

    def student_configs(self) -> dict[str, StudentConfig]:
        """Every model the run trains, keyed by its actual method: the student first, then the baselines.

        A baseline equal to the student's own method (a sweep point with ``student.method=ce_triplet``
        and ``ce_triplet`` among the baselines) is the same model, so it is trained and listed once.
        """
        configs = {self.student.method: self.student}
        for method in self.baselines:
            configs.setdefault(method, self.baseline_config(method))
        return configs

    def with_shared_image_cache(self) -> PipelineConfig:
        """This config with ``train.cache_dir`` of the teacher and the student, where unset, at
        ``<run.manifests_root>/.image_cache`` (absolute), so every run under that root shares one
        decoded-image cache. The cache folder is not part of any config hash: stage keys stay the same."""
        directory = str((Path(self.run.manifests_root) / CACHE_DIRNAME).resolve())

        def section(stage: TeacherConfig | StudentConfig) -> TeacherConfig | StudentConfig:
            if stage.train.cache_dir is not None:
                return stage
            return stage.model_copy(update={"train": stage.train.model_copy(update={"cache_dir": directory})})

        return self.model_copy(update={"teacher": section(self.teacher), "student": section(self.student)})


def demo_config() -> PipelineConfig:
    """The built-in demo: synthetic data with 40% mixed noise, tiny_cnn on the CPU, a few minutes on 2 cores.

    lr, epochs and warm-up are the scratch regime's (Adam 3e-3; 20 epochs a teacher round, 35 a student),
    a budget in which tiny_cnn reaches >= 95 % train accuracy on clean data (benchmarks/README.md, "Backbones").
    """
    train = {"model": "tiny_cnn", "image_size": [64, 32], "optimizer": "adam",
             "batch_p": 16, "batch_k": 4, "random_erasing_p": 0.0}
    return PipelineConfig.model_validate({
        "run": {"name": "demo"},
        "data": {"source": "synth", "synth": {"identities": 200, "images_per_identity": 8, "size": [64, 32]}},
        "noise": {"rate": 0.4, "kind": "mix"},
        "teacher": {"rounds": 3, "train": train},
        "student": {"method": "distilled", "train": train},
        "baselines": ["ce_triplet", "fat_hybrid_noisy"],
    })
