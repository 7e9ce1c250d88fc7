"""What the teacher thinks of the given labels, without ground truth: flags, suggestions, proposed actions.

A user with a real noisy dataset has no ``true_pid`` to score the teacher against.
This module turns the teacher rounds' own output into what such a user needs:

- :func:`propose_actions` — the rule from (flagged, given, suggested, probability) to
  keep / relabel / drop, over plain arrays;
- :func:`cleaned_labels` — one row per train sample: the given label, the flag, the
  confidence, the teacher's suggestion and the proposed action (a ``dataset`` manifest
  frame, so it can be read back by ``data.source: manifest``);
- :func:`audit_identities` — per identity: rows, flagged, estimated noise rate, the
  identity the teacher most often suggests instead;
- :func:`audit_labels` — all of the above for a run's teacher rounds, written as
  manifests and plots (the pipeline's ``label_audit`` stage).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fat_distill.distill._common import DISTRACTOR_PID
from fat_distill.manifests import parent_ref, read_manifest, write_manifest

PathLike = str | os.PathLike

#: Default of ``min_prob``: a flagged row is relabelled only if the teacher gives its suggestion at least this.
RELABEL_MIN_PROB = 0.5


def propose_actions(flagged: np.ndarray, given: np.ndarray, suggested: np.ndarray, suggested_prob: np.ndarray,
                    min_prob: float = RELABEL_MIN_PROB) -> np.ndarray:
    """The proposed action for each sample, by one documented rule.

    - ``keep``: the teacher trusts the given label (not flagged);
    - ``relabel``: flagged, the teacher's most probable identity differs from the given
      label, and the teacher gives it probability ≥ ``min_prob``;
    - ``drop``: flagged otherwise — the teacher distrusts the given label but is not
      sure enough of another (an outlier, a look-alike pair, or an image of nobody).

    Args:
        flagged: ``(N,)`` bool, True where the teacher does not trust the given label.
        given: ``(N,)`` given labels.
        suggested: ``(N,)`` the teacher's arg-max labels (same label space as ``given``).
        suggested_prob: ``(N,)`` the teacher's probability of ``suggested``.
        min_prob: probability a suggestion needs before a relabel is proposed, in [0, 1].

    Returns:
        ``(N,)`` object array of ``"keep"``, ``"relabel"`` or ``"drop"``.
    """
    if not 0.0 <= min_prob <= 1.0:
        raise ValueError(f"min_prob must be in [0, 1], got {min_prob}")
    flagged = np.asarray(flagged, dtype=bool)
    given, suggested = np.asarray(given), np.asarray(suggested)
    suggested_prob = np.asarray(suggested_prob, dtype=np.float64)
    if not (flagged.shape == given.shape == suggested.shape == suggested_prob.shape) or flagged.ndim != 1:
        raise ValueError("flagged, given, suggested and suggested_prob must be 1-D arrays of one length, got "
                         f"{flagged.shape}, {given.shape}, {suggested.shape}, {suggested_prob.shape}")
    relabel = flagged & (suggested != given) & (suggested_prob >= min_prob)
    actions = np.full(len(flagged), "keep", dtype=object)
    actions[flagged] = "drop"
    actions[relabel] = "relabel"
    return actions


def cleaned_labels(dataset: pd.DataFrame, teacher_round: pd.DataFrame,
                   min_prob: float = RELABEL_MIN_PROB) -> pd.DataFrame:
    """One row per scored train sample: the dataset's columns plus the teacher's view of its label.

    Args:
        dataset: a ``dataset`` manifest frame (the one the teacher was trained on).
        teacher_round: a ``teacher_round`` manifest frame of that dataset.
        min_prob: see :func:`propose_actions`.

    Returns:
        The scored train rows of ``dataset`` (every column kept) with ``flagged``,
        ``confidence``, ``suggested_pid``, ``suggested_prob`` and ``action``, in the
        dataset's row order: a valid ``dataset`` manifest frame.

    Raises:
        ValueError: the round scored samples that are not train rows of ``dataset``.
    """
    scored = teacher_round.set_index("sample_id")
    train = dataset[(dataset["split"] == "train") & (dataset["pid"] != DISTRACTOR_PID)]
    unknown = ~scored.index.isin(train["sample_id"])
    if unknown.any():
        raise ValueError(f"the teacher round scored {int(unknown.sum())} sample(s) that are not train rows of the "
                         f"dataset, first {scored.index[unknown][0]!r}; pair a round with the dataset it was made from")
    rows = train[train["sample_id"].isin(scored.index)].copy()
    view = scored.loc[rows["sample_id"]]
    flagged = ~view["confident"].to_numpy(dtype=bool)
    rows["flagged"] = flagged
    rows["confidence"] = view["confidence"].to_numpy(dtype=np.float32)
    rows["suggested_pid"] = view["pred_label"].to_numpy(dtype=np.int64)
    rows["suggested_prob"] = view["max_prob"].to_numpy(dtype=np.float32)
    rows["action"] = propose_actions(flagged, rows["pid"].to_numpy(), rows["suggested_pid"].to_numpy(),
                                     rows["suggested_prob"].to_numpy(), min_prob)
    return rows.reset_index(drop=True)


def apply_actions(cleaned: pd.DataFrame) -> pd.DataFrame:
    """The dataset a user trains on next: ``drop`` rows removed, ``relabel`` rows given ``suggested_pid``.

    The label each row came with stays in ``given_pid``.
    """
    kept = cleaned[cleaned["action"] != "drop"].copy()
    kept["given_pid"] = kept["pid"].astype(np.int64)
    relabel = (kept["action"] == "relabel").to_numpy()
    kept.loc[relabel, "pid"] = kept.loc[relabel, "suggested_pid"]
    kept["pid"] = kept["pid"].astype(np.int64)
    return kept.reset_index(drop=True)


def audit_identities(cleaned: pd.DataFrame) -> pd.DataFrame:
    """Per given identity: rows, flagged rows, estimated noise rate, proposed relabels/drops, top suggestion.

    Args:
        cleaned: the frame of :func:`cleaned_labels`.

    Returns:
        An ``identity_audit`` manifest frame, one row per pid, noisiest identities first.
    """
    groups = cleaned.groupby("pid", sort=True)
    out = pd.DataFrame({
        "rows": groups.size(),
        "flagged": groups["flagged"].sum(),
        "relabel": groups["action"].apply(lambda a: int((a == "relabel").sum())),
        "drop": groups["action"].apply(lambda a: int((a == "drop").sum())),
    })
    out["flagged_fraction"] = out["flagged"] / out["rows"]
    flagged = cleaned[cleaned["flagged"] & (cleaned["suggested_pid"] != cleaned["pid"])]
    top = flagged.groupby("pid")["suggested_pid"].agg(lambda s: s.value_counts().sort_index().idxmax())
    top_rows = flagged.groupby("pid")["suggested_pid"].agg(lambda s: int(s.value_counts().max()))
    out["top_suggested_pid"] = top.reindex(out.index).astype("Int64")
    out["top_suggested_rows"] = top_rows.reindex(out.index).fillna(0).astype(np.int64)
    if "identity" in cleaned.columns:
        out["identity"] = groups["identity"].first()
    out = out.reset_index().astype({"rows": np.int64, "flagged": np.int64, "relabel": np.int64, "drop": np.int64})
    return out.sort_values(["flagged_fraction", "pid"], ascending=[False, True]).reset_index(drop=True)


def round_audit(cleaned: pd.DataFrame) -> dict[str, float]:
    """Scalar summary of one round's :func:`cleaned_labels`: counts, estimated noise rate, agreement."""
    n = len(cleaned)
    flagged = cleaned["flagged"].to_numpy(dtype=bool)
    actions = cleaned["action"].to_numpy()
    return {
        "rows": float(n),
        "flagged": float(flagged.sum()),
        "estimated_noise_rate": float(flagged.mean()) if n else float("nan"),
        "keep": float((actions == "keep").sum()),
        "relabel": float((actions == "relabel").sum()),
        "drop": float((actions == "drop").sum()),
        "agree_with_given": float((cleaned["suggested_pid"] == cleaned["pid"]).mean()) if n else float("nan"),
        "mean_confidence": float(cleaned["confidence"].mean()) if n else float("nan"),
    }


def audit_labels(dataset_manifest: PathLike, round_manifests: Sequence[PathLike], out_dir: PathLike,
                 plots_dir: PathLike | None = None, min_prob: float = RELABEL_MIN_PROB) -> dict[str, str]:
    """Audit the given labels with the teacher's rounds; needs no ground truth.

    Writes into ``out_dir``:

    - ``metrics_label_audit.parquet`` (``metrics``): per round r, stage
      ``label_audit.round<r>``, step r, metrics rows, flagged, estimated_noise_rate,
      keep, relabel, drop, agree_with_given, mean_confidence;
    - ``label_audit_identities.parquet`` (``identity_audit``): per identity, from the
      final round.

    and into ``plots_dir`` (if given) ``label_confidence_round<r>.png`` of the final round:
    the confidence of kept vs flagged rows.

    Args:
        dataset_manifest: the ``dataset`` manifest the teacher was trained on.
        round_manifests: its ``teacher_round`` manifests, round 0 first.
        out_dir: folder for the two manifests.
        plots_dir: folder for the plot (None: no plot).
        min_prob: see :func:`propose_actions`.

    Returns:
        ``{"metrics": path, "identities": path, "plot": path or ""}``.
    """
    from fat_distill.evaluate import plot_confidence_flags

    if not round_manifests:
        raise ValueError("audit_labels needs at least one teacher_round manifest")
    dataset = read_manifest(dataset_manifest, "dataset")
    out_dir = Path(out_dir)
    records = []
    final = final_meta = None
    for path in round_manifests:
        scored = read_manifest(path, "teacher_round")
        round_number = int(scored["round"].iloc[0]) if len(scored) else 0
        final, final_meta = cleaned_labels(dataset, scored, min_prob), scored.attrs["manifest"]
        records += [(f"label_audit.round{round_number}", name, value, round_number)
                    for name, value in round_audit(final).items()]
    parents = [parent_ref(dataset_manifest), *(parent_ref(p) for p in round_manifests)]
    metrics = pd.DataFrame(records, columns=["stage", "metric", "value", "step"])
    metrics_path = out_dir / "metrics_label_audit.parquet"
    write_manifest(metrics, metrics_path, "metrics", stage="label_audit", parents=parents,
                   extra={"min_prob": min_prob})
    identities_path = out_dir / "label_audit_identities.parquet"
    write_manifest(audit_identities(final), identities_path, "identity_audit", stage="label_audit",
                   parents=parents, extra={"min_prob": min_prob})
    plot = ""
    if plots_dir is not None and len(final):
        plot = str(plot_confidence_flags(final["confidence"].to_numpy(), final["flagged"].to_numpy(),
                                         Path(plots_dir) / f"label_confidence_round{round_number}.png",
                                         threshold=final_meta.extra.get("confidence_cut")))
    return {"metrics": str(metrics_path), "identities": str(identities_path), "plot": plot}
