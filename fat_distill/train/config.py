"""Typed training settings shared by every stage that trains a model."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializationInfo, model_serializer, model_validator

from fat_distill.config_hash import HASH_CONTEXT_KEY
from fat_distill.train.regimes import REGIME_FIELDS, Regime, Role, regime_default, regime_of

#: Settings that change how fast images are fed, never what is trained: left out of every config hash,
#: so changing them neither retrains a stage nor refuses to resume its checkpoints.
INPUT_PIPELINE_FIELDS = frozenset({"num_workers", "cache", "cache_dir", "cache_memory_gb", "cache_disk_gb"})


class TrainConfig(BaseModel):
    """How one training stage runs. Unknown keys are errors.

    ``lr``, ``epochs`` and ``warmup_epochs`` default to None: :meth:`resolved` fills them from the
    regime (from scratch, or with pretrained ``weights``; :mod:`fat_distill.train.regimes`). The reference
    ResNet-50 settings of the FAT authors are lr 0.01 backbone / 0.1 head, SGD
    nesterov, 60 epochs, 384×128 input.
    """

    model_config = ConfigDict(extra="forbid")

    model: str = Field("small_cnn", description="model name in fat_distill.models.MODELS")
    weights: str | None = Field(None, description="local file with pretrained backbone weights (never downloaded)")
    embedding_dim: int | None = Field(None, ge=2, description="embedding width; None keeps the backbone's")
    last_stride: int = Field(1, ge=1, le=2, description="ResNet layer4 stride (1 = Bag-of-Tricks ReID)")
    image_size: tuple[int, int] = Field((128, 64), description="input (height, width)")
    epochs: int | None = Field(None, ge=1, description="None: the regime's default (fat_distill.train.regimes)")
    batch_p: int = Field(16, ge=1, description="identities per batch")
    batch_k: int = Field(4, ge=1, description="images per identity per batch")
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float | None = Field(None, gt=0, description="learning rate of the head (and of the backbone × "
                                                     "backbone_lr_mult); None: the regime's default")
    backbone_lr_mult: float = Field(1.0, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    milestones: list[int] = Field(default_factory=list, description="step schedule: epochs where lr × gamma")
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: float | None = Field(None, ge=0, description="linear warmup length (epochs, fractional "
                                                                "allowed); None: the regime's default")
    warmup_factor: float = Field(0.1, gt=0, le=1, description="lr multiplier at the start of warmup")
    min_lr_factor: float = Field(0.01, ge=0, le=1, description="cosine floor as a fraction of lr")
    grad_clip: float | None = Field(None, gt=0, description="clip the gradient norm at this value")
    group_lasso_weight: float = Field(
        0.0, ge=0,
        description="JLML structured sparsity: weight of the group-lasso (L2,1) penalty on each branch's "
                    "feature-selection layer, applied as a proximal step after every optimiser step so unused "
                    "input features become exactly zero; 0 = off (models without feature-selection layers "
                    "refuse a non-zero value)")
    num_workers: int | Literal["auto"] = Field(
        "auto", description="DataLoader worker processes decoding images that are not cached; auto: one per CPU "
                            "but one (at most 8), none when the images are cached")
    cache: Literal["auto", "memory", "disk", "off"] = Field(
        "auto", description="decoded-image cache: images decoded and resized once per (images, image_size) into "
                            "a uint8 array, on disk (memory-mapped .npy, shared by stages and runs) or in memory; "
                            "auto: disk when it fits cache_disk_gb, else memory when it fits cache_memory_gb, "
                            "else decode per sample")
    cache_dir: str | None = Field(None, description="folder of the cache files; None: .image_cache/ beside the "
                                                    "dataset manifest (a pipeline: <run.manifests_root>/.image_cache)")
    cache_memory_gb: float = Field(8.0, ge=0, description="cache auto: the largest array held in memory")
    cache_disk_gb: float = Field(64.0, ge=0, description="cache auto: the largest array written to disk")
    amp: bool | None = Field(None, description="mixed precision; None = on for CUDA only")
    channels_last: bool | None = Field(None, description="None = on for CUDA only")
    flip_p: float = Field(0.5, ge=0, le=1)
    random_erasing_p: float = Field(0.5, ge=0, le=1)
    mixup_alpha: float = Field(
        0.0, ge=0, description="mixup: each batch is blended with a shuffled copy of itself, λ·x + (1−λ)·x[perm], "
                               "λ ~ Beta(α, α) folded to >= 0.5, and the loss is λ·L(own labels) + (1−λ)·L(partner's "
                               "labels); 0 = off. Measured for the student in benchmarks/README.md, 'Where the student's "
                               "errors come from' (below the defaults on synth at 35 epochs)")
    pad: int | None = Field(None, ge=0, description="random-crop padding (pixels); None: 10 per 128 px of image "
                                                    "height (Bag of Tricks' 10 at 128×64; 2 at 32×32)")
    seed: int = 0
    keep_checkpoints: int = Field(2, ge=1, description="epoch checkpoints kept on disk (newest)")
    devices: list[str] = Field(
        default_factory=list,
        description="data-parallel devices: empty or one entry = one process on the stage's device; two or "
                    "more (cuda:0, cuda:1 or cpu, cpu) = DistributedDataParallel, one process per entry, each "
                    "taking its share of the P×K batches (global batch = entries × batch_p × batch_k)")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.schedule == "step" and not self.milestones:
            raise ValueError("schedule 'step' needs milestones (epochs where the lr is multiplied by gamma)")
        if min(self.image_size) < 1:
            raise ValueError(f"image_size {list(self.image_size)} must be two positive sizes (height, width), "
                             "e.g. [128, 64]")
        if self.num_workers != "auto" and self.num_workers < 0:
            raise ValueError(f"num_workers must be 'auto' or >= 0, got {self.num_workers}")
        if self.batch_p * self.batch_k < 2:
            raise ValueError("a batch needs at least 2 images (batch_p × batch_k)")
        if len(self.devices) >= 2:
            _check_parallel_devices(self.devices)
        return self

    @model_serializer(mode="wrap")
    def _hash_without_input_settings(self, handler: Any, info: SerializationInfo) -> dict[str, Any]:
        data = handler(self)
        if isinstance(info.context, dict) and info.context.get(HASH_CONTEXT_KEY):
            # mixup off hashes as before the field existed, so finished stages stay cached
            return {key: value for key, value in data.items() if key not in INPUT_PIPELINE_FIELDS
                    and not (key == "mixup_alpha" and value == 0)}
        return data

    @property
    def regime(self) -> Regime:
        """``scratch`` (no ``weights``) or ``pretrained``: which defaults unset lr/epochs/warm-up take."""
        return regime_of(self.weights)

    def resolved(self, role: Role = "student") -> TrainConfig:
        """A copy with ``lr``, ``epochs``, ``warmup_epochs`` and ``pad`` set: the config's own, else the
        regime's (``pad``: scaled to the image height)."""
        unset = {f: regime_default(self.regime, f, role) for f in REGIME_FIELDS if getattr(self, f) is None}
        if self.pad is None:  # the padding scales with the image: 10 px of a 128 px crop ruin a 32 px face
            unset["pad"] = max(1, round(10 * self.image_size[0] / 128))
        return self.model_copy(update=unset) if unset else self

    @property
    def batch_size(self) -> int:
        return self.batch_p * self.batch_k


def _check_parallel_devices(devices: list[str]) -> None:
    # Checked here, before any process starts: a bad list would otherwise fail inside a spawned worker.
    kinds = set()
    for name in devices:
        if name != "cpu" and not re.fullmatch(r"cuda:\d+", name):
            raise ValueError(f"devices: {name!r} is not 'cpu' or 'cuda:N'; data-parallel training needs "
                             "explicit devices (no 'auto' or bare 'cuda')")
        kinds.add(name.split(":")[0])
    if len(kinds) > 1:
        raise ValueError(f"devices {devices} mix CPU and CUDA; give all-CUDA (NCCL) or all-CPU (gloo) devices")
    if "cuda" in kinds and len(set(devices)) < len(devices):
        raise ValueError(f"devices {devices} name a GPU twice; NCCL runs one process per GPU")
