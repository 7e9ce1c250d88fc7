"""Training: device handling, typed config, objectives, the epoch loop with checkpoints and resume, data-parallel."""

from fat_distill.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from fat_distill.train.config import TrainConfig
from fat_distill.train.data import TrainData, build_train_data, cache_policy, open_dataset
from fat_distill.train.device import DeviceSettings, device_settings, resolve_device, set_cpu_threads
from fat_distill.train.distributed import (
    DistributedTrainingError,
    SetupFactory,
    SyncedObjective,
    TrainingSetup,
    fit_distributed,
    is_data_parallel,
    state_digest,
)
from fat_distill.train.history import EpochRecorder, read_history, require_tensorboard, write_history
from fat_distill.train.loop import FitResult, LossDivergedError, NonFiniteLossError, fit
from fat_distill.train.model_card import ModelCard, ModelCardError, describe_model, read_model_card
from fat_distill.train.objectives import (
    OBJECTIVES,
    ClassificationObjective,
    FATObjective,
    MetricObjective,
    Objective,
    SampleTable,
    build_objective,
)
from fat_distill.train.record import recording_fits, summarise_fits

__all__ = [
    "OBJECTIVES", "CheckpointError", "ClassificationObjective", "DeviceSettings", "DistributedTrainingError",
    "EpochRecorder", "FATObjective", "FitResult", "LossDivergedError", "MetricObjective", "ModelCard", "ModelCardError",
    "NonFiniteLossError", "Objective", "SampleTable", "SetupFactory", "SyncedObjective", "TrainConfig", "TrainData",
    "TrainingSetup", "build_objective", "build_train_data", "cache_policy", "describe_model", "device_settings", "fit",
    "fit_distributed", "is_data_parallel", "latest_checkpoint", "load_checkpoint", "open_dataset", "read_history",
    "read_model_card", "recording_fits", "require_tensorboard", "resolve_device", "save_checkpoint", "set_cpu_threads",
    "state_digest", "summarise_fits", "write_history",
]
