"""How well a teacher round found the injected label noise, as a ``metrics`` manifest and plots."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from fat_distill.manifests import parent_ref, read_manifest, write_manifest

PathLike = str | os.PathLike


def has_ground_truth(dataset: pd.DataFrame) -> bool:
    """Whether every train row of a ``dataset`` manifest frame knows its true label (noise_kind or true_pid)."""
    train = dataset[dataset["split"] == "train"]
    return any(column in train.columns and train[column].notna().all() for column in ("noise_kind", "true_pid"))


def evaluate_noise_detection(
    dataset_manifest: PathLike,
    teacher_round_manifest: PathLike,
    out_path: PathLike,
    plots_dir: PathLike | None = None,
) -> Path:
    """Score a teacher round's ``confident`` flags and ``confidence`` against the ground truth.

    Joins the round's rows with the dataset's train rows on ``sample_id``; the
    truth is ``noise_kind != "clean"`` when the manifest has ``noise_kind``, else
    ``pid != true_pid`` (see :func:`fat_distill.evaluate.noise_detection_report`).
    The ``metrics`` manifest has stage ``noise_detection.round<r>``, ``step`` = r, and
    metrics ``<kind>.<name>`` for kind ``all`` and each noise kind present, name in
    precision, recall, f1, auroc, support (undefined values are null), plus
    ``all.confident_fraction`` and ``all.noise_rate``. ``plots_dir`` gets
    ``confidence_hist_round<r>.png`` and ``noise_pr_round<r>.png``.

    Args:
        dataset_manifest: the ``dataset`` manifest with ``true_pid`` and/or ``noise_kind``.
        teacher_round_manifest: a ``teacher_round`` manifest of that dataset.
        out_path: the ``metrics`` manifest to write.
        plots_dir: where to write the plots (None: no plots).

    Returns:
        ``out_path``.

    Raises:
        ValueError: the dataset manifest records no ground truth, or a scored sample is not in it.
    """
    from fat_distill.evaluate import noise_detection_report, plot_confidence_histogram, plot_noise_pr_curve

    dataset_manifest, teacher_round_manifest = Path(dataset_manifest), Path(teacher_round_manifest)
    dataset = read_manifest(dataset_manifest, "dataset")
    scored = read_manifest(teacher_round_manifest, "teacher_round")
    truth = dataset.set_index("sample_id")
    unknown = ~scored["sample_id"].isin(truth.index)
    if unknown.any():
        raise ValueError(f"{teacher_round_manifest}: {int(unknown.sum())} scored sample(s) are not in "
                         f"{dataset_manifest}, first {scored['sample_id'][unknown].iloc[0]!r}; "
                         "compare a round with the dataset it was made from")
    rows = truth.loc[scored["sample_id"]]
    has_kind = "noise_kind" in rows.columns and rows["noise_kind"].notna().all()
    has_truth = "true_pid" in rows.columns and rows["true_pid"].notna().all()
    if not (has_kind or has_truth):
        raise ValueError(f"{dataset_manifest}: noise detection needs the ground truth (noise_kind or true_pid on "
                         "every scored row); use a manifest made by `fat-distill data corrupt`")
    confidence = scored["confidence"].to_numpy(dtype=np.float64)
    confident = scored["confident"].to_numpy(dtype=bool)
    if has_kind:
        report = noise_detection_report(confidence, confident, noise_kind=rows["noise_kind"].to_numpy())
        is_noisy = rows["noise_kind"].to_numpy() != "clean"
    else:
        pid, true_pid = rows["pid"].to_numpy(), rows["true_pid"].to_numpy()
        report = noise_detection_report(confidence, confident, pid=pid, true_pid=true_pid)
        is_noisy = pid != true_pid

    round_number = int(scored["round"].iloc[0]) if len(scored) else 0
    stage = f"noise_detection.round{round_number}"
    records = [(f"{kind}.{name}", _value(report.loc[kind, name])) for kind in report.index for name in report.columns]
    records += [("all.confident_fraction", float(confident.mean()) if len(confident) else None),
                ("all.noise_rate", float(is_noisy.mean()) if len(is_noisy) else None)]
    metrics = pd.DataFrame({"stage": stage, "metric": [m for m, _ in records], "value": [v for _, v in records],
                            "step": round_number})
    out_path = Path(out_path)
    round_meta = scored.attrs["manifest"]
    write_manifest(metrics, out_path, "metrics", stage=stage, config_hash=round_meta.config_hash,
                   parents=[parent_ref(dataset_manifest), parent_ref(teacher_round_manifest)])
    if plots_dir is not None:
        plots_dir = Path(plots_dir)
        plot_confidence_histogram(confidence, is_noisy, plots_dir / f"confidence_hist_round{round_number}.png",
                                  threshold=round_meta.extra.get("confidence_cut"))
        if is_noisy.any():
            plot_noise_pr_curve(confidence, is_noisy, plots_dir / f"noise_pr_round{round_number}.png")
    return out_path


def _value(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value
