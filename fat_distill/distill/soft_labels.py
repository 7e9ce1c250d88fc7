"""Soft labels from the final teacher: softmax at temperature T, kept sparse as top-k (pid, prob) pairs.

The ``soft_labels`` manifest stores O(N·k) numbers instead of the teacher's
O(N·C) probabilities; the student's soft cross-entropy renormalises the top-k
mass (see :class:`fat_distill.losses.SoftTargetCrossEntropy`), so a small k
loses only the tail.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fat_distill.data.image_dataset import build_label_map
from fat_distill.distill._common import (
    align_to_rows,
    label_map_inverse,
    load_dataset,
    load_model,
    predict_logits,
    stage_settings,
    train_rows,
)
from fat_distill.distill.config import TeacherConfig
from fat_distill.manifests import ManifestError, parent_ref, read_manifest, write_manifest
from fat_distill.train import build_train_data

log = logging.getLogger("fat_distill.distill")

PathLike = str | os.PathLike


def soft_labels_from_logits(
    logits: np.ndarray | torch.Tensor,
    label_map: Mapping[Hashable, int],
    *,
    temperature: float = 1.0,
    top_k: int = 5,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k identities and probabilities of ``softmax(logits / T)``, sorted by probability.

    Args:
        logits: ``(N, C)`` classifier outputs (before the softmax). The temperature
            divides the logits: T > 1 spreads mass onto the runner-up identities
            (more "dark knowledge", softer targets), T < 1 sharpens towards the arg-max,
            T = 1 is the teacher's own probabilities.
        label_map: ``{pid: class index}`` of the teacher's classifier (C entries).
        temperature: T > 0.
        top_k: k >= 1; clipped to C. The kept probabilities sum to at most 1 (the
            tail mass beyond k is dropped).

    Returns:
        ``(ids, probs)``: ``(N, k)`` int32 pids and ``(N, k)`` float32 probabilities,
        each row sorted by descending probability (ties: lower class index first).

    Raises:
        ValueError: wrong shapes, a label map that does not cover 0..C−1, T <= 0,
            k < 1, or non-finite logits.
    """
    logits = torch.as_tensor(logits).detach().cpu().double()
    if logits.dim() != 2:
        raise ValueError(f"soft labels: logits must be (N, C), got shape {tuple(logits.shape)}")
    n, c = logits.shape
    if len(label_map) != c or sorted(label_map.values()) != list(range(c)):
        raise ValueError(f"soft labels: label_map must map {c} labels onto class indices 0..{c - 1} (the logits' "
                         f"columns), got {len(label_map)} entries")
    if temperature <= 0:
        raise ValueError(f"soft labels: temperature must be > 0, got {temperature}")
    if top_k < 1:
        raise ValueError(f"soft labels: top_k must be >= 1, got {top_k}")
    if not torch.isfinite(logits).all():
        row = int((~torch.isfinite(logits)).any(dim=1).nonzero()[0])
        raise ValueError(f"soft labels: logits are NaN or infinite in row {row}; the teacher diverged")
    k = min(top_k, c)
    probs = torch.softmax(logits / temperature, dim=1).numpy()
    # Stable sort of −p: equal probabilities keep class-index order, so the output is deterministic.
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    top_probs = np.take_along_axis(probs, order, axis=1)
    to_pid = label_map_inverse(label_map)
    return to_pid[order].astype(np.int32), top_probs.astype(np.float32)


def soft_labels_from_probs(
    probs: np.ndarray | torch.Tensor,
    label_map: Mapping[Hashable, int],
    *,
    temperature: float = 1.0,
    top_k: int = 5,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`soft_labels_from_logits` for probabilities: ``softmax(log p / T)``.

    ``log p`` differs from the logits by a per-row constant, which the softmax
    ignores, so this gives exactly the soft labels of the logits. Zero
    probabilities stay zero.

    Args:
        probs: ``(N, C)`` class probabilities (rows sum to 1).
        label_map, temperature, top_k: as in :func:`soft_labels_from_logits`.
    """
    probs = torch.as_tensor(probs).detach().cpu().double()
    if probs.dim() != 2:
        raise ValueError(f"soft labels: probs must be (N, C), got shape {tuple(probs.shape)}")
    if not torch.isfinite(probs).all() or (probs < 0).any():
        raise ValueError("soft labels: probs must be finite and non-negative; pass softmax(logits)")
    # A very negative finite number instead of log 0 = −inf keeps the softmax finite; exp of it is exactly 0.
    log_p = torch.log(probs).clamp_min(-1e300)
    return soft_labels_from_logits(log_p, label_map, temperature=temperature, top_k=top_k)


def soft_targets_for(
    soft_labels: pd.DataFrame,
    sample_ids: Sequence[str],
    label_map: Mapping[Hashable, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(N, k)`` class-index targets ``build_objective(soft_ids=, soft_probs=)`` wants.

    Args:
        soft_labels: a ``soft_labels`` manifest frame (``sample_id``, ``topk_ids`` pids, ``topk_probs``).
        sample_ids: ``(N,)`` the training rows, in dataset order.
        label_map: ``{pid: class index}`` of the model being trained.

    Returns:
        ``(ids, probs)``: ``(N, k)`` int64 class indices (−1 = padding: a pid not in
        ``label_map``, or a row with fewer than k entries) and ``(N, k)`` float32
        probabilities (0 at padding); k is the longest row's length.

    Raises:
        ValueError: a sample has no soft label, or none of a sample's top-k pids is in ``label_map``.
    """
    indexed = soft_labels.set_index("sample_id")
    sample_ids = [str(s) for s in sample_ids]
    missing = [s for s in sample_ids if s not in indexed.index]
    if missing:
        raise ValueError(f"soft labels: {len(missing)} training sample(s) have no soft label, first {missing[0]!r}; "
                         "make the soft labels from the same dataset manifest")
    rows = indexed.loc[sample_ids]
    id_lists = [np.asarray(v, dtype=np.int64) for v in rows["topk_ids"]]
    prob_lists = [np.asarray(v, dtype=np.float32) for v in rows["topk_probs"]]
    k = max((len(v) for v in id_lists), default=0)
    ids = np.full((len(sample_ids), k), -1, dtype=np.int64)
    probs = np.zeros((len(sample_ids), k), dtype=np.float32)
    for i, (pids, p) in enumerate(zip(id_lists, prob_lists)):
        mapped = np.array([label_map.get(int(pid), -1) for pid in pids], dtype=np.int64)
        ids[i, : len(mapped)] = mapped
        probs[i, : len(mapped)] = np.where(mapped >= 0, p, 0.0)
    empty = ~(probs > 0).any(axis=1)
    if empty.any():
        row = int(np.flatnonzero(empty)[0])
        raise ValueError(f"soft labels: sample {sample_ids[row]!r} has no soft-label identity with positive "
                         "probability among the student's identities; the soft labels were made for another "
                         "label set")
    return torch.from_numpy(ids), torch.from_numpy(probs)


def make_soft_labels(
    dataset_manifest: PathLike,
    teacher_checkpoints: PathLike | Sequence[PathLike] | Sequence[Sequence[PathLike]],
    final_round_manifest: PathLike,
    config: TeacherConfig,
    out_path: PathLike,
    device: str | torch.device | None = "auto",
) -> Path:
    """Predict the train rows with the final teacher and write the ``soft_labels`` manifest.

    Args:
        dataset_manifest: the ``dataset`` manifest the teacher was trained on.
        teacher_checkpoints: the final round's ``final.pt``; for out-of-fold
            scoring the K fold checkpoints in fold order (``TeacherResult.checkpoints``):
            each row is then labelled by the fold model that did not train on it.
            A list of such lists (one per round, ``soft_label_models: all_rounds``) is
            an ensemble: the soft labels are the mean of the rounds' ``softmax(logits / T)``.
        final_round_manifest: ``teacher_round_{r}.parquet`` of that round; gives the
            ``confident`` flag (and ``fold`` for oof).
        config: the teacher's settings (model, image size, T, k).
        out_path: the ``soft_labels`` manifest to write.
        device: ``"auto"``, ``"cpu"`` or ``"cuda:N"``.

    Returns:
        ``out_path``.
    """
    out_path, final_round_manifest = Path(out_path), Path(final_round_manifest)
    members = _ensemble_members(teacher_checkpoints)
    dataset = load_dataset(dataset_manifest)
    train = train_rows(dataset.frame, "soft labels")
    label_map = build_label_map(train["pid"])
    round_frame = read_manifest(final_round_manifest, "teacher_round")
    confident = align_to_rows(round_frame, train, "confident", final_round_manifest).astype(bool)

    settings = stage_settings(device, config.train)
    data = build_train_data(train, dataset.root, config.train, label_map=label_map,
                            allow_outside_root=dataset.allow_outside_root, cache_dir=dataset.image_cache_dir)

    def member_logits(checkpoints: list[Path]) -> np.ndarray:
        logits = np.zeros((len(train), len(label_map)), dtype=np.float32)
        if len(checkpoints) == 1:
            groups = [(checkpoints[0], np.arange(len(train)))]
        else:
            if "fold" not in round_frame.columns or round_frame["fold"].isna().any():
                raise ManifestError(final_round_manifest, f"has no fold of every row, but {len(checkpoints)} fold "
                                                          "checkpoints were given", column="fold")
            folds = align_to_rows(round_frame, train, "fold", final_round_manifest).astype(np.int64)
            if folds.max() >= len(checkpoints):
                raise ValueError(f"make_soft_labels: {final_round_manifest} uses fold {int(folds.max())} but only "
                                 f"{len(checkpoints)} checkpoints were given")
            groups = [(ckpt, np.flatnonzero(folds == k)) for k, ckpt in enumerate(checkpoints)]
        for checkpoint, rows in groups:
            if not len(rows):
                continue
            model = load_model(config.train, len(label_map), checkpoint, settings)
            logits[rows] = predict_logits(model, data.feature_dataset, settings, indices=rows,
                                          batch_size=max(64, config.train.batch_size),
                                          num_workers=config.train.num_workers)
        return logits

    if len(members) == 1:
        ids, probs = soft_labels_from_logits(member_logits(members[0]), label_map, temperature=config.temperature,
                                             top_k=config.top_k)
    else:
        ids, probs = soft_labels_from_probs(ensemble_probabilities([member_logits(m) for m in members],
                                                                   temperature=config.temperature),
                                            label_map, top_k=config.top_k)
    frame = pd.DataFrame({
        "sample_id": train["sample_id"].astype(str).to_numpy(),
        "given_label": train["pid"].to_numpy(dtype=np.int64),
        "topk_ids": list(ids),
        "topk_probs": list(probs),
        "confident": confident,
    })
    write_manifest(frame, out_path, "soft_labels", stage="teacher.soft_labels", config_hash=config.soft_labels_hash(),
                   parents=[parent_ref(dataset.path), parent_ref(final_round_manifest)],
                   extra={"temperature": config.temperature, "top_k": int(ids.shape[1]),
                          "checkpoints": [str(p) for p in members[-1]],
                          "ensemble": [[str(p) for p in m] for m in members] if len(members) > 1 else None})
    log.info("soft labels: %d samples, top-%d at T=%g from %s, %d confident -> %s", len(frame), ids.shape[1],
             config.temperature, f"the mean of {len(members)} rounds' models" if len(members) > 1
             else "the final round's model(s)", int(confident.sum()), out_path)
    return out_path


def ensemble_probabilities(member_logits: Sequence[np.ndarray | torch.Tensor], *,
                           temperature: float = 1.0) -> np.ndarray:
    """The mean over ensemble members of ``softmax(logits / T)``: ``(N, C)`` float64 probabilities.

    Averaging probabilities (not logits) keeps each member's confidence: a member that
    is unsure spreads its vote instead of cancelling a confident one. Over the teacher's
    rounds this is a temporal ensemble: early rounds, trained briefly on all rows, have
    not memorised the noisy labels that later rounds may fit.

    Args:
        member_logits: one ``(N, C)`` array per member, rows and columns aligned.
        temperature: T > 0, applied to every member before the mean.
    """
    if not member_logits:
        raise ValueError("ensemble_probabilities: no member")
    if temperature <= 0:
        raise ValueError(f"ensemble_probabilities: temperature must be > 0, got {temperature}")
    stacked = [torch.as_tensor(m).detach().cpu().double() for m in member_logits]
    shapes = {tuple(m.shape) for m in stacked}
    if len(shapes) != 1 or stacked[0].dim() != 2:
        raise ValueError(f"ensemble_probabilities: members must all be (N, C), got shapes {sorted(shapes)}")
    for i, m in enumerate(stacked):
        if not torch.isfinite(m).all():
            row = int((~torch.isfinite(m)).any(dim=1).nonzero()[0])
            raise ValueError(f"ensemble_probabilities: member {i}'s logits are NaN or infinite in row {row}; "
                             "that teacher model diverged")
    return torch.stack([torch.softmax(m / temperature, dim=1) for m in stacked]).mean(dim=0).numpy()


def _ensemble_members(checkpoints: PathLike | Sequence[PathLike] | Sequence[Sequence[PathLike]]) -> list[list[Path]]:
    """``[[round's checkpoints], ...]`` from one path, one round's list, or a list of rounds' lists."""
    if isinstance(checkpoints, (str, os.PathLike)):
        members = [[Path(checkpoints)]]
    elif checkpoints and all(isinstance(c, (str, os.PathLike)) for c in checkpoints):
        members = [[Path(c) for c in checkpoints]]
    else:
        members = [[Path(c) for c in m] for m in checkpoints]
    if not members or not all(members):
        raise ValueError("make_soft_labels: no teacher checkpoint given")
    sizes = {len(m) for m in members}
    if len(sizes) != 1:
        raise ValueError(f"make_soft_labels: every ensemble member needs as many fold checkpoints, got {sorted(sizes)}")
    return members
