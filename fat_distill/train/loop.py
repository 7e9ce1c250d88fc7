"""The one training loop every stage uses: epochs, checkpoints, resume, NaN guard, progress."""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.errors import LiveError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor, nn
from torch.utils.data import Dataset

from fat_distill.cancel import check_cancelled
from fat_distill.config_hash import config_hash
from fat_distill.data.batch_transforms import BatchAugmentation, to_model_input
from fat_distill.data.loading import ImageBatches, sequential_batches
from fat_distill.data.sampler import IdentityBatchSampler
from fat_distill.models.sparsity import group_l21_norm, prox_group_l21_, zero_group_fraction
from fat_distill.train.checkpoint import (
    FINAL_NAME,
    CheckpointError,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from fat_distill.train.config import TrainConfig
from fat_distill.train.device import DeviceSettings
from fat_distill.train.history import EpochRecorder, history_path, write_history
from fat_distill.train.mixup import mix_images, mixup_loss, mixup_params
from fat_distill.train.model_card import MODEL_CARD_KEY, store_model_card
from fat_distill.train.objectives import Objective
from fat_distill.train.record import record_fit

log = logging.getLogger("fat_distill.train")


#: A batch loss above this multiple of the stage's first batch loss (or of 1, if larger) means training
#: diverged. Healthy training starts at its highest loss; an lr a thousand times too high passes 1e12.
DIVERGENCE_FACTOR = 1e3


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names stage, epoch, batch and the last good checkpoint."""

    def __init__(self, stage: str, epoch: int, batch: int, terms: dict[str, float], last_checkpoint: Path | None,
                 *, what: str = "non-finite loss"):
        self.stage, self.epoch, self.batch, self.last_checkpoint = stage, epoch, batch, last_checkpoint
        self.terms = dict(terms)
        where = f"stage {stage!r}, epoch {epoch + 1}, batch {batch + 1}"
        ckpt = (f"last good checkpoint: {last_checkpoint}" if last_checkpoint
                else "no checkpoint yet (it failed in the first epoch)")
        super().__init__(
            f"{what} in {where} (terms: {', '.join(f'{k}={v:.4g}' for k, v in terms.items())}); {ckpt}. "
            "Lower the learning rate (train.lr), set train.grad_clip, or check the inputs; "
            "the same settings fail the same way again."
        )


class LossDivergedError(NonFiniteLossError):
    """The loss grew by orders of magnitude (``DIVERGENCE_FACTOR``) over the stage's first batch: it diverged.

    A subclass of :class:`NonFiniteLossError`: a loss of 1e12 is as useless as NaN, a few steps earlier.
    """

    def __init__(self, stage: str, epoch: int, batch: int, terms: dict[str, float], last_checkpoint: Path | None,
                 *, loss: float, reference: float):
        self.loss, self.reference = loss, reference
        super().__init__(stage, epoch, batch, terms, last_checkpoint,
                         what=f"diverging loss ({loss:.4g}, over {DIVERGENCE_FACTOR:g} × the first batch's "
                              f"{reference:.4g})")


@dataclass
class LossGuard:
    """Stops training whose loss is NaN/inf or has grown ``factor`` times over ``reference`` (floor 1)."""

    reference: float | None = None
    factor: float = DIVERGENCE_FACTOR

    def check(self, value: float, stage: str, epoch: int, batch: int, terms: dict[str, float],
              last_checkpoint: Path | None) -> None:
        if not math.isfinite(value):
            raise NonFiniteLossError(stage, epoch, batch, terms, last_checkpoint)
        if self.reference is None:
            self.reference = value
        elif value > self.factor * max(self.reference, 1.0):
            raise LossDivergedError(stage, epoch, batch, terms, last_checkpoint, loss=value,
                                    reference=self.reference)


@dataclass
class FitResult:
    """What :func:`fit` did: per-epoch history, where the final weights are, and whether it resumed."""

    history: list[dict[str, float]]
    final_checkpoint: Path
    resumed_from_epoch: int = 0
    ran_epochs: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def build_optimizer(model: nn.Module, objective: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    backbone = getattr(model, "backbone", None)
    backbone_ids = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    groups = [
        {"params": [p for p in model.parameters() if id(p) in backbone_ids and p.requires_grad],
         "lr": config.lr * config.backbone_lr_mult, "name": "backbone"},
        {"params": [p for p in model.parameters() if id(p) not in backbone_ids and p.requires_grad],
         "lr": config.lr, "name": "head"},
        {"params": [p for p in objective.parameters() if p.requires_grad], "lr": config.lr, "name": "loss"},
    ]
    groups = [g for g in groups if g["params"]]
    # The fused kernels update every parameter in one call instead of ~10 small ops per tensor: ~5x
    # faster on the CPU (small_cnn, Adam: 0.6 vs 3 ms), where the per-tensor loop cost 5-10 % of a step.
    fused = {"fused": True} if _fusable([p for g in groups for p in g["params"]]) else {}
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0,
                               weight_decay=config.weight_decay, **fused)
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=config.lr, weight_decay=config.weight_decay, **fused)


def _fusable(params: list[Tensor]) -> bool:
    """Whether torch's fused optimiser kernels take these parameters (float, all on one CPU or CUDA device)."""
    return bool(params) and len({p.device for p in params}) == 1 and all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
        for p in params)


def lr_multiplier(config: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Per-step lr multiplier: linear warmup, then cosine / step / constant."""
    total = max(1, config.epochs * steps_per_epoch)
    warmup = int(round(config.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return config.warmup_factor + (1 - config.warmup_factor) * step / max(1, warmup)
        if config.schedule == "cosine":
            t = (step - warmup) / max(1, total - warmup)
            return config.min_lr_factor + (1 - config.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        if config.schedule == "step":
            epoch = step // steps_per_epoch
            return config.gamma ** sum(epoch >= m for m in config.milestones)
        return 1.0

    return factor


def _progress(console: Console | None) -> Progress:
    return Progress(
        TextColumn("[bold]{task.fields[stage]}[/] epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[metrics]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def fit(
    model: nn.Module,
    objective: Objective,
    dataset: Dataset,
    batch_sampler: IdentityBatchSampler,
    *,
    config: TrainConfig,
    settings: DeviceSettings,
    checkpoint_dir: str | Path,
    stage: str,
    feature_dataset: Dataset | None = None,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
    console: Console | None = None,
    tensorboard_dir: str | Path | None = None,
    model_card: Mapping[str, Any] | None = None,
) -> FitResult:
    """Train ``model`` with ``objective`` for ``config.epochs`` epochs, resuming from ``checkpoint_dir``.

    After every epoch a checkpoint (model, objective state such as centres, optimizer,
    scheduler, sampler and RNG state, history) is written atomically to
    ``checkpoint_dir/epoch-NNNN.pt``, and the history so far to ``history.parquet``
    (:mod:`fat_distill.train.history`); at the end the weights go to ``final.pt``.
    Started again with the same ``checkpoint_dir``, ``fit`` continues after the
    last checkpoint and, on the CPU with a fixed seed, ends with the same weights as
    an uninterrupted run. A ``final.pt`` made with the same config is taken as done.

    Args:
        model: an EmbeddingModel (already on ``settings.device``).
        objective: the training objective (moved to the device here).
        dataset: training images, yielding ``(image, label, index)``: uint8 images (augmented and
            normalised here, a batch at a time on the device, see
            :class:`~fat_distill.data.batch_transforms.BatchAugmentation`) or float images already
            transformed per sample. A cached :class:`~fat_distill.data.ManifestImageDataset` is read
            by whole-batch gathers; otherwise DataLoader workers decode (``config.num_workers``).
        batch_sampler: P×K batches over ``dataset``.
        config: the stage's TrainConfig (its hash guards against resuming another config).
        settings: device, AMP and memory-format choices.
        checkpoint_dir: where checkpoints go.
        stage: name used in logs and error messages.
        feature_dataset: the training images for objectives that refresh centres from a
            full feature pass each epoch (normalised, not augmented; usually ``dataset`` itself).
        on_epoch_end: called with ``(epoch, stats)`` after each epoch's checkpoint.
        progress: show a Rich progress bar.
        tensorboard_dir: also log each epoch's statistics as TensorBoard scalars under
            ``tensorboard_dir/<stage>`` (needs the ``tensorboard`` package).
        model_card: a JSON-ready description of the model
            (:meth:`fat_distill.train.model_card.ModelCard.to_dict`) stored in
            ``final.pt``; a finished ``final.pt`` with another card gets this one
            without retraining.

    Raises:
        NonFiniteLossError: the loss became NaN/inf, or (:class:`LossDivergedError`) grew over
            ``DIVERGENCE_FACTOR`` times its first batch's value; names stage, epoch, batch, last checkpoint.
        RunCancelled: a cancel was requested (:mod:`fat_distill.cancel`); raised at a batch boundary.
        CheckpointError: the checkpoint directory holds a run of another config.
    """
    config = config.resolved()  # unset lr/epochs/warm-up take the regime's defaults (no-op when resolved)
    checkpoint_dir = Path(checkpoint_dir)
    device = settings.device
    objective.to(device)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    cfg_hash = config_hash(config)
    final_path = checkpoint_dir / FINAL_NAME
    state = load_finished(checkpoint_dir, cfg_hash, device)
    if state is not None:
        model.load_state_dict(state["model"])
        objective.load_state_dict(state["objective"])
        if model_card is not None and store_model_card(final_path, state, model_card):
            log.info("%s: updated the model card in %s", stage, final_path)
        log.info("%s: already trained (%s), loaded its weights", stage, final_path)
        if not history_path(checkpoint_dir).exists():  # trained before histories were written
            write_history(checkpoint_dir, list(state.get("history", [])))
        return FitResult(history=list(state.get("history", [])), final_checkpoint=final_path,
                         resumed_from_epoch=config.epochs, ran_epochs=0)

    torch.manual_seed(config.seed)
    optimizer = build_optimizer(model, objective, config)
    steps_per_epoch = len(batch_sampler)
    if steps_per_epoch == 0:
        raise ValueError(f"stage {stage!r}: the sampler yields no batch (too few identities for P={config.batch_p})")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(config, steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=settings.amp_dtype == torch.float16)

    start_epoch, history = 0, []
    guard = LossGuard()
    last_ckpt, state = load_resumable(checkpoint_dir, cfg_hash, device)
    if state is not None:
        start_epoch, history = restore_training_state(state, model, objective, optimizer, scheduler, scaler,
                                                      batch_sampler)
        set_rng_state(state["rng"])
        guard.reference = state.get("loss_reference", history[0]["loss"] if history else None)
        log.info("%s: resuming after epoch %d from %s", stage, start_epoch, last_ckpt)

    loader = ImageBatches(dataset, batch_sampler, num_workers=config.num_workers, pin_memory=settings.pin_memory,
                          seed=config.seed)
    recorder = EpochRecorder(checkpoint_dir, stage, tensorboard_dir)
    recorder.resume(history)
    bar = _progress(console) if progress else None
    if bar is not None:
        try:
            bar.start()
        except LiveError:  # another stage in this process already shows a live display
            bar = None
    try:
        for epoch in range(start_epoch, config.epochs):
            batch_sampler.set_epoch(epoch)
            if objective.needs_feature_pass:
                _refresh_centres(model, objective, feature_dataset, config, settings, stage)
            stats = _train_epoch(model, objective, loader, optimizer, scheduler, scaler, config, settings,
                                 stage, epoch, last_ckpt, bar, guard)
            history.append(stats)
            checkpoint = epoch_state(epoch, cfg_hash, stage, model, objective, optimizer, scheduler, scaler,
                                     batch_sampler, history, rng_state())
            checkpoint["loss_reference"] = guard.reference
            last_ckpt = save_checkpoint(checkpoint_path(checkpoint_dir, epoch), checkpoint)
            recorder.epoch_done(history)
            finish_epoch(checkpoint_dir, epoch, config, stage, stats, on_epoch_end)
    finally:
        loader.close()
        if bar is not None:
            bar.stop()
        recorder.close()
    save_checkpoint(final_path, final_state(cfg_hash, stage, model, objective, history, model_card))
    log.info("%s: trained %d epoch(s), weights in %s", stage, config.epochs - start_epoch, final_path)
    return record_fit(FitResult(history=history, final_checkpoint=final_path, resumed_from_epoch=start_epoch,
                                ran_epochs=config.epochs - start_epoch))


def load_finished(checkpoint_dir: Path, cfg_hash: str, map_location: str | torch.device) -> dict[str, Any] | None:
    """The state in ``checkpoint_dir/final.pt`` when a run of this config finished there (None: no final.pt).

    Raises:
        CheckpointError: ``final.pt`` was written by a run of another config.
    """
    final_path = checkpoint_dir / FINAL_NAME
    if not final_path.exists():
        return None
    state = load_checkpoint(final_path, map_location=map_location)
    if state.get("config_hash") != cfg_hash:
        raise CheckpointError(f"{final_path} was trained with another config (hash {state.get('config_hash')} "
                              f"!= {cfg_hash}); delete {checkpoint_dir} or choose another output folder")
    return state


def load_resumable(checkpoint_dir: Path, cfg_hash: str,
                   map_location: str | torch.device) -> tuple[Path | None, dict[str, Any] | None]:
    """The newest epoch checkpoint in ``checkpoint_dir`` and its state (``(None, None)``: start afresh).

    Raises:
        CheckpointError: the checkpoint belongs to a run of another config.
    """
    last_ckpt = latest_checkpoint(checkpoint_dir)
    if last_ckpt is None:
        return None, None
    state = load_checkpoint(last_ckpt, map_location=map_location)
    if state.get("config_hash") != cfg_hash:
        raise CheckpointError(f"{last_ckpt} belongs to a run with another config (hash {state.get('config_hash')}"
                              f" != {cfg_hash}); delete {checkpoint_dir} to start over or restore that config")
    return last_ckpt, state


def restore_training_state(state: dict[str, Any], model: nn.Module, objective: nn.Module,
                           optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler,
                           batch_sampler: IdentityBatchSampler) -> tuple[int, list[dict[str, float]]]:
    """Load an epoch checkpoint's state (all but the RNG); returns ``(first epoch to run, history)``."""
    model.load_state_dict(state["model"])
    objective.load_state_dict(state["objective"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    batch_sampler.load_state_dict(state["sampler"])
    return int(state["epoch"]) + 1, list(state["history"])


def epoch_state(epoch: int, cfg_hash: str, stage: str, model: nn.Module, objective: nn.Module,
                optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler,
                batch_sampler: IdentityBatchSampler, history: list[dict[str, float]],
                rng: dict[str, Any]) -> dict[str, Any]:
    """What an epoch checkpoint holds (everything :func:`restore_training_state` and the RNG need)."""
    return {
        "epoch": epoch, "config_hash": cfg_hash, "stage": stage,
        "model": model.state_dict(), "objective": objective.state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(), "sampler": batch_sampler.state_dict(),
        "rng": rng, "history": history,
    }


def final_state(cfg_hash: str, stage: str, model: nn.Module, objective: nn.Module,
                history: list[dict[str, float]], model_card: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What ``final.pt`` holds: the trained weights, the objective's state, the history and the model card."""
    state = {"config_hash": cfg_hash, "stage": stage, "model": model.state_dict(),
             "objective": objective.state_dict(), "history": history}
    if model_card is not None:
        state[MODEL_CARD_KEY] = dict(model_card)
    return state


def _train_epoch(model, objective, loader, optimizer, scheduler, scaler, config, settings, stage, epoch,
                 last_ckpt, bar, guard: LossGuard | None = None, *, rank: int = 0,
                 world_size: int = 1) -> dict[str, float]:
    """One epoch of steps; ``guard`` (None: NaN/inf only) stops a diverging loss before its step.

    uint8 batches are augmented on the device, seeded by (seed, epoch, global batch number): a data-parallel
    rank's i-th batch is batch ``i * world_size + rank`` of the single-process order."""
    model.train()
    augment = BatchAugmentation.from_config(config)
    selection = _feature_selection(model, optimizer, config, stage)
    sums: dict[str, float] = defaultdict(float)
    seen, started = 0, time.perf_counter()
    task = None
    if bar is not None:
        task = bar.add_task("train", total=len(loader), stage=stage, epoch=f"{epoch + 1}/{config.epochs}", metrics="")
    for batch_index, (images, labels, indices) in enumerate(loader):
        # A cancelled run stops here; the last epoch checkpoint stays the place a resume continues from.
        check_cancelled(f"stage {stage!r}, epoch {epoch + 1}, batch {batch_index + 1}")
        images = images.to(settings.device, non_blocking=settings.non_blocking)
        if images.dtype == torch.uint8:
            images = augment(images, epoch=epoch, batch=batch_index * world_size + rank)
        labels = labels.to(settings.device, non_blocking=settings.non_blocking)
        indices = indices.to(settings.device, non_blocking=settings.non_blocking)
        mix = None
        if config.mixup_alpha > 0:
            mix = mixup_params(images.shape[0], config.mixup_alpha, seed=config.seed, epoch=epoch,
                               batch=batch_index * world_size + rank, device=images.device)
            images = mix_images(images, mix)
        images = settings.to_device(images)
        with settings.autocast():
            output = model(images)
        out = objective.compute(output, labels, indices) if mix is None else mixup_loss(objective, output, labels,
                                                                                        indices, mix)
        if guard is not None:
            guard.check(float(out.loss.detach()), stage, epoch, batch_index,
                        {k: float(v) for k, v in out.terms.items()}, last_ckpt)
        elif not torch.isfinite(out.loss):
            raise NonFiniteLossError(stage, epoch, batch_index, {k: float(v) for k, v in out.terms.items()},
                                     last_ckpt)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(out.loss).backward()
        if config.grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        for weight, group in selection:
            prox_group_l21_(weight, group["lr"] * config.group_lasso_weight)
        scheduler.step()
        objective.after_step(output, labels, indices)
        n = images.shape[0]
        seen += n
        sums["loss"] += float(out.loss.detach()) * n
        sums["active_fraction"] += float(out.active_fraction) * n
        for name, value in {**out.terms, **out.stats}.items():
            sums[name] += float(value) * n
        if bar is not None:
            rate = seen / max(1e-9, time.perf_counter() - started)
            bar.update(task, advance=1, metrics=f"loss {sums['loss'] / seen:.3f} · {rate:.0f} img/s")
    if bar is not None:
        bar.remove_task(task)
    elapsed = time.perf_counter() - started
    stats = {k: v / max(1, seen) for k, v in sums.items()}
    stats.update({"images_per_s": seen / max(1e-9, elapsed), "seconds": elapsed,
                  "lr": optimizer.param_groups[-1]["lr"]})
    if selection:
        weights = [weight for weight, _ in selection]
        stats["group_lasso"] = config.group_lasso_weight * float(sum(group_l21_norm(w.detach()) for w in weights))
        stats["zero_feature_fraction"] = float(np.mean([zero_group_fraction(w) for w in weights]))
    return stats


def _feature_selection(model: nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig,
                       stage: str) -> list[tuple[Tensor, dict]]:
    """The feature-selection weights the group-lasso step acts on, each with its optimiser param group."""
    if config.group_lasso_weight == 0:
        return []
    inner = getattr(model, "module", model)  # DistributedDataParallel wraps the model
    if not hasattr(inner, "feature_selection_weights"):
        raise ValueError(f"stage {stage!r}: train.group_lasso_weight={config.group_lasso_weight} needs a model with "
                         f"feature-selection layers (jlml), but {type(inner).__name__} has none; set it to 0 or "
                         "use model: jlml")
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    return [(weight, group_of[id(weight)]) for weight in inner.feature_selection_weights().values()]


@torch.no_grad()
def _refresh_centres(model, objective, feature_dataset, config, settings, stage, indices=None) -> None:
    """Give the objective the features of ``feature_dataset`` (or of its ``indices``), without augmentation."""
    if feature_dataset is None:
        raise ValueError(f"stage {stage!r}: epoch-refreshed centres need feature_dataset (the training images)")
    model.eval()
    batches = sequential_batches(len(feature_dataset) if indices is None else indices, max(64, config.batch_size))
    loader = ImageBatches(feature_dataset, batches, num_workers=config.num_workers, pin_memory=settings.pin_memory,
                          persistent_workers=False, seed=config.seed)
    feats: dict[str, list[torch.Tensor]] = defaultdict(list)
    labels_all, indices_all = [], []
    for images, labels, indices in loader:
        check_cancelled(f"stage {stage!r}, centre refresh")
        images = to_model_input(images.to(settings.device, non_blocking=settings.non_blocking))
        with settings.autocast():
            out = model(settings.to_device(images))
        for name, o in (out.branches or {"": out}).items():
            feats[name].append(o.features.float())
        labels_all.append(labels.to(settings.device))
        indices_all.append(indices.to(settings.device))
    objective.refresh({k: torch.cat(v) for k, v in feats.items()}, torch.cat(labels_all), torch.cat(indices_all))
    model.train()


def finish_epoch(checkpoint_dir: Path, epoch: int, config: TrainConfig, stage: str, stats: dict[str, float],
                 on_epoch_end: Callable[[int, dict[str, float]], None] | None) -> None:
    """After an epoch's checkpoint is written: prune old ones, log the epoch, call the hook."""
    _prune_checkpoints(checkpoint_dir, epoch, config.keep_checkpoints)
    log.info("%s: epoch %d/%d %s", stage, epoch + 1, config.epochs, " ".join(f"{k}={v:.4g}" for k, v in stats.items()))
    if on_epoch_end is not None:
        on_epoch_end(epoch, stats)


def _prune_checkpoints(directory: Path, newest: int, keep: int) -> None:
    for epoch in range(newest - keep, -1, -1):
        path = checkpoint_path(directory, epoch)
        if not path.exists():
            break
        path.unlink()
