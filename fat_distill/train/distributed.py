"""Data-parallel training: :func:`fit` on several devices with DistributedDataParallel.

One process per entry of ``TrainConfig.devices`` is spawned (start method
"spawn", so CUDA works in the workers), joined by NCCL when every device is a
GPU and by gloo otherwise, over ``127.0.0.1`` and a port chosen at run time.
Each rank builds its own data, model and objective from a picklable factory,
takes every ``world_size``-th P×K batch of the single-process epoch order
(:meth:`IdentityBatchSampler.shard`), and steps the optimiser on the gradient
averaged over all ranks' batches: the global batch is ``world_size × P × K``
and an epoch has ``1 / world_size`` as many steps. The learning rate is not
rescaled; raise ``lr`` yourself if you want the linear scaling rule.

Objective state that batches update (FAT's EMA centre banks) is kept identical
on every rank by all-gathering each step's features, labels and dataset indices
and applying every rank's batch to the bank in rank order, which is the global
batch order: the bank sees the same batches, in the same order, as in a
single-process run (one step later for the batches of ranks > 0). Banks
refreshed once per epoch get a full feature pass split across the ranks and
all-gathered, after rank 0's BatchNorm statistics are broadcast so every rank
embeds with the same model.

Rank 0 writes the epoch checkpoints and ``final.pt`` in :func:`fit`'s format
(plus ``rng_by_rank``, each rank's random state, so a resumed run continues
every rank's random stream); every rank resumes from the newest one.
Augmentations are seeded per (seed, epoch, global batch number), so each
batch gets the augmentation it gets in a single-process run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import socket
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.multiprocessing.spawn import ProcessExitedException, ProcessRaisedException
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from fat_distill.cancel import cancel_requested, check_cancelled
from fat_distill.config_hash import config_hash
from fat_distill.data.loading import ImageBatches
from fat_distill.data.sampler import IdentityBatchSampler
from fat_distill.losses import LossOutput
from fat_distill.models import EmbeddingOutput
from fat_distill.train.checkpoint import (
    FINAL_NAME,
    checkpoint_path,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from fat_distill.train.config import TrainConfig
from fat_distill.train.device import DeviceSettings, device_settings, resolve_device
from fat_distill.train.history import EpochRecorder, history_path, write_history
from fat_distill.train.model_card import store_model_card
from fat_distill.train.loop import (
    FitResult,
    NonFiniteLossError,
    _progress,
    finish_epoch,
    _refresh_centres,
    _train_epoch,
    build_optimizer,
    epoch_state,
    final_state,
    load_finished,
    load_resumable,
    lr_multiplier,
    restore_training_state,
)
from fat_distill.train.objectives import Objective
from fat_distill.train.record import record_fit

log = logging.getLogger("fat_distill.train")


@dataclass
class TrainingSetup:
    """What one rank trains, built inside its worker process by the setup factory.

    Attributes:
        model: an EmbeddingModel already on the rank's device.
        objective: its training objective (moved to the device by the loop).
        dataset: training images yielding ``(image, label, index)``.
        batch_sampler: the *unsharded* P×K sampler; each rank takes its share.
        feature_dataset: the training images for feature passes, normalised but not augmented (objectives
            with per-epoch centre refresh need it).
    """

    model: nn.Module
    objective: Objective
    dataset: Dataset
    batch_sampler: IdentityBatchSampler
    feature_dataset: Dataset | None = None


#: Builds a rank's :class:`TrainingSetup` for the rank's :class:`DeviceSettings`. It is pickled into the
#: spawned workers, so it must be a module-level function or a ``functools.partial`` of one with
#: picklable arguments (frames, arrays, configs), never a lambda or a closure over live models.
SetupFactory = Callable[[DeviceSettings], TrainingSetup]


class DistributedTrainingError(RuntimeError):
    """A training worker failed; the message names the stage, the rank and its device, with its traceback."""

    def __init__(self, stage: str, rank: int, world_size: int, device: str, detail: str):
        self.stage, self.rank, self.world_size, self.device = stage, rank, world_size, device
        super().__init__(f"stage {stage!r}: data-parallel rank {rank} of {world_size} (device {device}) failed; "
                         f"the other ranks were stopped. Re-running resumes from the last epoch checkpoint. "
                         f"Its error:\n{detail}")


class _StoppedByPeer(Exception):
    """Raised on the ranks whose loss was finite when another rank's was not."""

    def __init__(self, peer: int):
        super().__init__(f"stopped: rank {peer} had a non-finite loss")
        self.peer = peer


def is_data_parallel(config: TrainConfig) -> bool:
    """Whether ``config.devices`` asks for data-parallel training (two or more entries)."""
    return len(config.devices) >= 2


def fit_distributed(
    setup: SetupFactory,
    *,
    config: TrainConfig,
    checkpoint_dir: str | Path,
    stage: str,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = False,
    timeout_s: float = 1800.0,
    tensorboard_dir: str | Path | None = None,
    model_card: Mapping[str, Any] | None = None,
) -> FitResult:
    """:func:`fit` with one DistributedDataParallel process per entry of ``config.devices``.

    Checkpoints, resume and ``final.pt`` behave as in :func:`fit` and share its
    file format, so :func:`load_checkpoint` and everything downstream read them
    the same way. A finished run (``final.pt`` of this config) returns without
    starting any process.

    Args:
        setup: builds each rank's model, objective, dataset and sampler (see
            :data:`SetupFactory`); called once in every worker.
        config: the stage's TrainConfig; ``config.devices`` (two or more) picks the
            devices, and the backend: NCCL for all-CUDA, gloo for CPU. CPU ranks
            use ``cores / world_size`` threads each.
        checkpoint_dir: where checkpoints go.
        stage: name used in logs and error messages.
        on_epoch_end: called on rank 0 with ``(epoch, stats)`` after each epoch's
            checkpoint; pickled into the worker like ``setup``.
        progress: show a Rich progress bar for rank 0.
        timeout_s: how long a rank waits for the others in a collective before failing.
        tensorboard_dir: rank 0 also logs each epoch's statistics under ``tensorboard_dir/<stage>``.
        model_card: stored in ``final.pt``, as in :func:`fit`.

    Returns:
        :class:`FitResult`; ``history`` holds per-epoch statistics over all ranks
        (means weighted by images, ``images_per_s`` of all ranks together) and
        ``extra`` holds ``world_size``, ``backend`` and ``state_digests`` (one
        SHA-256 of the parameters and objective state per rank; equal when the
        ranks stayed in sync).

    Raises:
        NonFiniteLossError: a rank's loss became NaN/inf (every rank stops at that
            step; the message is the rank's, with a note naming it).
        DistributedTrainingError: a worker raised or died; names its rank and device
            and carries its traceback.
        CheckpointError: the checkpoint directory holds a run of another config.
        ValueError: fewer than two devices, or a CUDA device that does not exist.
    """
    config = config.resolved()  # unset lr/epochs/warm-up take the regime's defaults (no-op when resolved)
    devices = list(config.devices)
    world_size = len(devices)
    if world_size < 2:
        raise ValueError(f"stage {stage!r}: fit_distributed needs two or more config.devices, got {devices}; "
                         "use fit for single-device training")
    for name in devices:
        resolve_device(name)  # a missing GPU fails here, not inside a worker
    backend = "nccl" if all(name.startswith("cuda") for name in devices) else "gloo"
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    cfg_hash = config_hash(config)
    finished = load_finished(checkpoint_dir, cfg_hash, "cpu")
    if finished is not None:
        if model_card is not None and store_model_card(checkpoint_dir / FINAL_NAME, finished, model_card):
            log.info("%s: updated the model card in %s", stage, checkpoint_dir / FINAL_NAME)
        log.info("%s: already trained (%s)", stage, checkpoint_dir / FINAL_NAME)
        if not history_path(checkpoint_dir).exists():  # trained before histories were written
            write_history(checkpoint_dir, list(finished.get("history", [])))
        return FitResult(history=list(finished.get("history", [])), final_checkpoint=checkpoint_dir / FINAL_NAME,
                         resumed_from_epoch=config.epochs, ran_epochs=0,
                         extra={"world_size": world_size, "backend": backend})
    load_resumable(checkpoint_dir, cfg_hash, "cpu")  # another config's checkpoint: refused here, in the caller

    port = _free_port()
    log.info("%s: data-parallel training on %s (%s, 127.0.0.1:%d)", stage, ", ".join(devices), backend, port)
    with TemporaryDirectory(prefix="fat-distill-ddp-") as outcome_dir:
        try:
            context = mp.start_processes(
                _worker,
                args=(world_size, port, backend, setup, config, checkpoint_dir, stage, on_epoch_end, progress,
                      timeout_s, outcome_dir, tensorboard_dir, model_card),
                nprocs=world_size, join=False, start_method="spawn")
        except (pickle.PicklingError, AttributeError, TypeError) as exc:
            raise TypeError(f"stage {stage!r}: the setup factory and on_epoch_end are sent to spawned workers and "
                            f"must be picklable: a module-level function or a functools.partial of one with "
                            f"picklable arguments, not a lambda, a closure or a live model ({exc})") from exc
        try:
            while not context.join(timeout=0.5):
                if cancel_requested():  # the ranks' epoch checkpoints stay; a resume continues from them
                    _stop_workers(context)
                    check_cancelled(f"stage {stage!r} (data-parallel on {', '.join(devices)})")
        except (ProcessRaisedException, ProcessExitedException) as exc:
            if cancel_requested():  # a terminal's Ctrl-C reached the ranks too
                _stop_workers(context)
                check_cancelled(f"stage {stage!r} (data-parallel on {', '.join(devices)})")
            outcomes = _read_outcomes(outcome_dir, world_size)
            raise _worker_failure(exc, outcomes, stage, devices) from None
        outcomes = _read_outcomes(outcome_dir, world_size)

    nonfinite = [o for o in outcomes if o and o["status"] == "nonfinite"]
    if nonfinite:
        first = nonfinite[0]
        last = first["last_checkpoint"]
        err = NonFiniteLossError(first["stage"], first["epoch"], first["batch"], first["terms"],
                                 Path(last) if last and Path(last).exists() else None)
        err.add_note(f"raised on data-parallel rank {first['rank']} of {world_size} "
                     f"(device {devices[first['rank']]}); every rank stopped at that step")
        raise err
    done = outcomes[0]
    if not done or done["status"] != "done":
        raise DistributedTrainingError(stage, 0, world_size, devices[0],
                                       f"it exited without reporting a result ({done})")
    # The workers' own log records stay in their processes; the epoch lines are repeated here.
    for epoch, stats in enumerate(done["history"][done["resumed_from_epoch"]:], start=done["resumed_from_epoch"]):
        log.info("%s: epoch %d/%d %s", stage, epoch + 1, config.epochs,
                 " ".join(f"{k}={v:.4g}" for k, v in stats.items()))
    return record_fit(FitResult(
        history=done["history"], final_checkpoint=Path(done["final_checkpoint"]),
        resumed_from_epoch=done["resumed_from_epoch"], ran_epochs=done["ran_epochs"],
        extra={"world_size": world_size, "backend": backend, "state_digests": done["state_digests"]}))


def _stop_workers(context: Any) -> None:
    """Terminate every rank of a cancelled data-parallel stage and wait for them."""
    for process in context.processes:
        if process.is_alive():
            process.terminate()
    for process in context.processes:
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
            process.join()


def _free_port() -> int:
    # The OS picks a free port; another program could take it before rank 0 binds it, which is
    # rare enough on one machine to surface as an error rather than be retried.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _read_outcomes(outcome_dir: str, world_size: int) -> list[dict[str, Any] | None]:
    outcomes: list[dict[str, Any] | None] = []
    for rank in range(world_size):
        path = Path(outcome_dir) / f"rank-{rank}.json"
        outcomes.append(json.loads(path.read_text()) if path.exists() else None)
    return outcomes


def _worker_failure(exc: Exception, outcomes: list[dict[str, Any] | None], stage: str,
                    devices: list[str]) -> DistributedTrainingError:
    # When one rank fails, the others fail too (a peer closed the connection) or are terminated;
    # the rank that recorded its error first is the cause, whichever the join noticed first.
    errors = sorted((o["time"], rank, o) for rank, o in enumerate(outcomes) if o and o["status"] == "error")
    if errors:
        _, rank, outcome = errors[0]
        return DistributedTrainingError(stage, rank, len(devices), devices[rank], outcome["traceback"])
    rank = getattr(exc, "error_index", 0)
    return DistributedTrainingError(stage, rank, len(devices), devices[rank], str(exc))


def _write_outcome(outcome_dir: str, rank: int, outcome: dict[str, Any]) -> None:
    path = Path(outcome_dir) / f"rank-{rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(outcome))
    os.replace(tmp, path)


def _worker(rank: int, world_size: int, port: int, backend: str, setup: SetupFactory, config: TrainConfig,
            checkpoint_dir: Path, stage: str, on_epoch_end: Callable | None, progress: bool, timeout_s: float,
            outcome_dir: str, tensorboard_dir: str | Path | None = None,
            model_card: Mapping[str, Any] | None = None) -> None:
    try:
        device = torch.device(config.devices[rank])
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            # Ranks sharing the CPU would otherwise each start one thread per core and thrash.
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            torch.set_num_threads(max(1, cores // world_size))
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
        settings = device_settings(device, amp=config.amp, channels_last=config.channels_last)
        try:
            outcome = _fit_rank(rank, world_size, setup(settings), config, settings, checkpoint_dir, stage,
                                on_epoch_end, progress, tensorboard_dir, model_card)
        except NonFiniteLossError as err:
            outcome = {"status": "nonfinite", "rank": rank, "stage": err.stage, "epoch": err.epoch,
                       "batch": err.batch, "terms": err.terms,
                       "last_checkpoint": str(err.last_checkpoint) if err.last_checkpoint else None}
        except _StoppedByPeer as stop:
            outcome = {"status": "stopped", "by": stop.peer}
        dist.destroy_process_group()
    except BaseException:
        # No destroy_process_group here: with a peer gone it could block; the process ends anyway.
        _write_outcome(outcome_dir, rank, {"status": "error", "time": time.time(), "traceback": traceback.format_exc()})
        raise
    _write_outcome(outcome_dir, rank, outcome)


def _fit_rank(rank: int, world_size: int, parts: TrainingSetup, config: TrainConfig, settings: DeviceSettings,
              checkpoint_dir: Path, stage: str, on_epoch_end: Callable | None, progress: bool,
              tensorboard_dir: str | Path | None = None,
              model_card: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One rank's share of :func:`fit`; mirrors it step for step, using its pieces."""
    model, objective, device = parts.model, parts.objective, settings.device
    objective.to(device)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    cfg_hash = config_hash(config)
    # Rank 0 draws the random numbers a single-process run would (dropout …); the others their own streams.
    torch.manual_seed(config.seed + rank)
    optimizer = build_optimizer(model, objective, config)
    batches = parts.batch_sampler.shard(rank, world_size)
    steps_per_epoch = len(batches)
    if steps_per_epoch == 0:
        raise ValueError(f"stage {stage!r}: an epoch has {parts.batch_sampler.sampler.num_batches()} P×K batch(es), "
                         f"fewer than the {world_size} devices; use fewer devices or a smaller batch_p")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(config, steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=settings.amp_dtype == torch.float16)

    start_epoch, history = 0, []
    last_ckpt, state = load_resumable(checkpoint_dir, cfg_hash, device)
    if state is not None:
        start_epoch, history = restore_training_state(state, model, objective, optimizer, scheduler, scaler, batches)
        by_rank = state.get("rng_by_rank")
        set_rng_state(by_rank[rank] if by_rank is not None and len(by_rank) == world_size else state["rng"])
        if rank == 0:
            log.info("%s: resuming after epoch %d from %s", stage, start_epoch, last_ckpt)

    ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    synced = SyncedObjective(objective, stage=stage, rank=rank, world_size=world_size)
    loader = ImageBatches(parts.dataset, batches, num_workers=config.num_workers, pin_memory=settings.pin_memory,
                          seed=config.seed)
    feature_share = None
    if objective.needs_feature_pass:
        if parts.feature_dataset is None:
            raise ValueError(f"stage {stage!r}: epoch-refreshed centres need TrainingSetup.feature_dataset")
        feature_share = range(rank, len(parts.feature_dataset), world_size)
    recorder = EpochRecorder(checkpoint_dir, stage, tensorboard_dir) if rank == 0 else None
    if recorder is not None:
        recorder.resume(history)
    bar = _progress(None) if progress and rank == 0 else None
    if bar is not None:
        bar.start()
    try:
        for epoch in range(start_epoch, config.epochs):
            batches.set_epoch(epoch)
            synced.start_epoch(epoch, last_ckpt)
            if feature_share is not None:
                _broadcast_buffers(model)
                _refresh_centres(model, synced, parts.feature_dataset, config, settings, stage, indices=feature_share)
            images = sum(len(b) for b in batches)
            stats = _train_epoch(ddp_model, synced, loader, optimizer, scheduler, scaler, config, settings, stage,
                                 epoch, last_ckpt, bar, rank=rank, world_size=world_size)
            stats = _merge_stats(stats, images, world_size)
            rngs = [None] * world_size
            dist.all_gather_object(rngs, rng_state())
            history.append(stats)
            last_ckpt = checkpoint_path(checkpoint_dir, epoch)
            if rank == 0:
                state = epoch_state(epoch, cfg_hash, stage, model, objective, optimizer, scheduler, scaler, batches,
                                    history, rngs[0])
                state["rng_by_rank"] = rngs
                save_checkpoint(last_ckpt, state)
                recorder.epoch_done(history)
                finish_epoch(checkpoint_dir, epoch, config, stage, stats, on_epoch_end)
    finally:
        loader.close()
        if bar is not None:
            bar.stop()
        if recorder is not None:
            recorder.close()
    digests = [None] * world_size
    dist.all_gather_object(digests, state_digest(model, objective))
    final_path = checkpoint_dir / FINAL_NAME
    if rank == 0:
        if len(set(digests)) > 1:
            log.warning("%s: the ranks' weights or centre banks differ at the end of training (%s); rank 0's "
                        "are saved", stage, digests)
        save_checkpoint(final_path, final_state(cfg_hash, stage, model, objective, history, model_card))
        log.info("%s: trained %d epoch(s) on %d devices, weights in %s", stage, config.epochs - start_epoch,
                 world_size, final_path)
    dist.barrier()  # final.pt exists before any rank reports success
    return {"status": "done", "history": history, "final_checkpoint": str(final_path),
            "resumed_from_epoch": start_epoch, "ran_epochs": config.epochs - start_epoch, "state_digests": digests}


class SyncedObjective:
    """An objective as seen by one data-parallel rank: the same losses, with batch state kept in sync.

    - :meth:`compute` also agrees with the other ranks on whether every loss is
      finite: a non-finite loss anywhere stops every rank at the same step (a rank
      that went on alone would wait forever in the gradient all-reduce).
    - :meth:`after_step` all-gathers every rank's features, labels and indices and
      hands them to the wrapped objective one rank's batch at a time, in rank order.
    - :meth:`refresh` all-gathers the ranks' shares of a full feature pass.

    The wrapped objective (``.objective``) is what checkpoints save.
    """

    def __init__(self, objective: Objective, *, stage: str, rank: int, world_size: int) -> None:
        self.objective, self.stage, self.rank, self.world_size = objective, stage, rank, world_size
        self.needs_feature_pass = objective.needs_feature_pass
        self._gathers = type(objective).after_step is not Objective.after_step
        self._epoch, self._step, self._last_ckpt = 0, 0, None

    def start_epoch(self, epoch: int, last_checkpoint: Path | None) -> None:
        self._epoch, self._step, self._last_ckpt = epoch, 0, last_checkpoint

    def compute(self, output: EmbeddingOutput, labels: Tensor, indices: Tensor) -> LossOutput:
        out = self.objective.compute(output, labels, indices)
        flags = torch.zeros(self.world_size, device=out.loss.device)
        flags[self.rank] = float(not torch.isfinite(out.loss.detach()))
        dist.all_reduce(flags)
        step, self._step = self._step, self._step + 1
        bad = torch.nonzero(flags).flatten().tolist()
        if bad:
            if self.rank in bad:
                # The batch number in the single-process epoch order (the sampler gives rank r batch r, r+w, ...).
                raise NonFiniteLossError(self.stage, self._epoch, step * self.world_size + self.rank,
                                         {k: float(v) for k, v in out.terms.items()}, self._last_ckpt)
            raise _StoppedByPeer(bad[0])
        return out

    @torch.no_grad()
    def after_step(self, output: EmbeddingOutput, labels: Tensor, indices: Tensor) -> None:
        if not self._gathers:
            return
        names = list(output.branches)
        parts = [output, *(output.branches[n] for n in names)]
        tensors = [t.float() for p in parts for t in (p.features, p.bn_features)]
        # One float and one integer all-gather per step, whatever the number of branches.
        floats = torch.cat(tensors, dim=1)
        ints = torch.stack([labels.long(), indices.long()], dim=1)
        for float_rows, int_rows in zip(_all_gather_rows(floats, self.world_size),
                                        _all_gather_rows(ints, self.world_size), strict=True):
            pieces = iter(float_rows.split([t.shape[1] for t in tensors], dim=1))
            outs = [EmbeddingOutput(features=next(pieces), bn_features=next(pieces), logits=None) for _ in parts]
            gathered = outs[0]
            gathered.branches = dict(zip(names, outs[1:], strict=True))
            self.objective.after_step(gathered, int_rows[:, 0], int_rows[:, 1])

    @torch.no_grad()
    def refresh(self, features: dict[str, Tensor], labels: Tensor, indices: Tensor) -> None:
        gathered = {name: torch.cat(_all_gather_rows(f.float(), self.world_size)) for name, f in features.items()}
        ints = torch.cat(_all_gather_rows(torch.stack([labels.long(), indices.long()], dim=1), self.world_size))
        self.objective.refresh(gathered, ints[:, 0], ints[:, 1])


def _all_gather_rows(tensor: Tensor, world_size: int) -> list[Tensor]:
    """Every rank's ``tensor`` (shape ``(n_r, ...)``, ``n_r`` may differ per rank), as a list by rank."""
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    chunks = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(chunks, padded.contiguous())
    return [chunk[:size] for chunk, size in zip(chunks, sizes, strict=True)]


@torch.no_grad()
def _broadcast_buffers(model: nn.Module) -> None:
    # DDP broadcasts buffers at each training forward; a feature pass bypasses the wrapper.
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def _merge_stats(stats: dict[str, float], images: int, world_size: int) -> dict[str, float]:
    """One rank's epoch statistics → all ranks': means weighted by images, throughput of all ranks together."""
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, (stats, images))
    total = sum(n for _, n in gathered)
    merged = {k: sum(s[k] * n for s, n in gathered) / max(1, total) for k in stats}
    seconds = max(s["seconds"] for s, _ in gathered)
    merged.update({"images_per_s": total / max(1e-9, seconds), "seconds": seconds, "lr": stats["lr"]})
    return merged


def state_digest(model: nn.Module, objective: nn.Module) -> str:
    """SHA-256 of the model's parameters and the objective's state (centres, per-sample tables).

    Data-parallel ranks must agree on it; BatchNorm running statistics are left
    out because DDP only makes them equal at the next forward (rank 0's win).
    """
    digest = hashlib.sha256()
    tensors = [*model.named_parameters(), *objective.state_dict().items()]
    for name, tensor in tensors:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
