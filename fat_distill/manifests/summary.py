"""Summaries and differences of manifests, as plain JSON-ready dicts.

The CLI renders these with Rich (or prints them as JSON with ``--json``); they
are also what notebooks and flows use to report on a manifest.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from fat_distill.manifests.io import ManifestMeta
from fat_distill.manifests.schemas import get_schema

HISTOGRAM_BINS = 10


def _int_stats(values: pd.Series) -> dict[str, float]:
    if values.empty:
        return {"min": 0, "median": 0.0, "max": 0}
    return {"min": int(values.min()), "median": float(values.median()), "max": int(values.max())}


def _histogram(values: np.ndarray, lo: float = 0.0, hi: float = 1.0) -> dict[str, list]:
    counts, edges = np.histogram(values, bins=HISTOGRAM_BINS, range=(lo, hi))
    return {"edges": [round(float(e), 4) for e in edges], "counts": [int(c) for c in counts]}


def summarise_dataset(frame: pd.DataFrame) -> dict[str, Any]:
    out: dict[str, Any] = {}
    splits = {}
    for split, part in frame.groupby("split", sort=True):
        per_id = part.groupby("pid").size()
        splits[str(split)] = {
            "rows": int(len(part)),
            "identities": int(part["pid"].nunique()),
            "distractor_rows": int((part["pid"] == 0).sum()),
            "images_per_identity": _int_stats(per_id),
        }
    out["splits"] = splits
    out["cameras"] = {str(int(c)): int(n) for c, n in frame.groupby("camid").size().items()}
    if "true_pid" in frame.columns and frame["true_pid"].notna().any():
        train = frame[frame["split"] == "train"]
        kinds = train["noise_kind"].fillna("clean") if "noise_kind" in train else None
        noisy = (train["pid"] != train["true_pid"]) if kinds is None else (kinds != "clean")
        out["noise"] = {
            "train_rows": int(len(train)),
            "noisy_rows": int(noisy.sum()),
            "noise_rate": float(noisy.mean()) if len(train) else 0.0,
            "by_kind": {str(k): int(n) for k, n in kinds.value_counts().sort_index().items()} if kinds is not None else {},
        }
    return out


def summarise_teacher_round(frame: pd.DataFrame) -> dict[str, Any]:
    conf = frame["confident"].astype(bool)
    out: dict[str, Any] = {
        "rounds": sorted(int(r) for r in frame["round"].unique()),
        "kept": int(conf.sum()),
        "dropped": int((~conf).sum()),
        "kept_fraction": float(conf.mean()) if len(frame) else 0.0,
        "agree_with_given": float((frame["pred_label"] == frame["given_label"]).mean()) if len(frame) else 0.0,
        "confidence_histogram": _histogram(frame["confidence"].to_numpy(dtype=float)),
    }
    return out


def summarise_soft_labels(frame: pd.DataFrame) -> dict[str, Any]:
    conf = frame["confident"].astype(bool)
    top1_prob = np.array([p[0] if len(p) else 0.0 for p in frame["topk_probs"]], dtype=float)
    top1_id = np.array([i[0] if len(i) else -1 for i in frame["topk_ids"]])
    ks = [len(i) for i in frame["topk_ids"]]
    return {
        "k": int(max(ks)) if ks else 0,
        "confident": int(conf.sum()),
        "not_confident": int((~conf).sum()),
        "top1_equals_given": float((top1_id == frame["given_label"].to_numpy()).mean()) if len(frame) else 0.0,
        "top1_prob_histogram": _histogram(top1_prob),
    }


def summarise_metrics(frame: pd.DataFrame) -> dict[str, Any]:
    rows = frame.to_dict(orient="records")
    return {"metrics": [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()} for r in rows]}


_SUMMARISERS = {
    "dataset": summarise_dataset,
    "teacher_round": summarise_teacher_round,
    "soft_labels": summarise_soft_labels,
    "metrics": summarise_metrics,
}


def summarise_manifest(frame: pd.DataFrame, meta: ManifestMeta) -> dict[str, Any]:
    """A JSON-ready summary of a manifest: provenance plus schema-specific statistics."""
    summary: dict[str, Any] = {
        "schema": meta.schema,
        "version": meta.version,
        "stage": meta.stage,
        "rows": int(len(frame)),
        "columns": list(frame.columns),
        "content_hash": meta.content_hash,
        "config_hash": meta.config_hash,
        "parents": meta.parents,
        "extra": meta.extra,
    }
    summary.update(_SUMMARISERS[meta.schema](frame))
    return summary


def _label_of(frame: pd.DataFrame, schema_name: str) -> pd.Series:
    if schema_name == "soft_labels":
        return pd.Series([int(i[0]) if len(i) else -1 for i in frame["topk_ids"]], index=frame.index)
    return frame[get_schema(schema_name).label_column]


def diff_manifests(a: pd.DataFrame, meta_a: ManifestMeta, b: pd.DataFrame, meta_b: ManifestMeta,
                   *, examples: int = 5) -> dict[str, Any]:
    """Row-level differences between two manifests keyed by ``sample_id``.

    Reports rows added and removed, labels changed (dataset: ``pid``; teacher_round:
    ``pred_label``; soft_labels: the top-1 id) and ``confident`` flags flipped, each with
    a count and the first few sample_ids. Manifests of different schemas can be
    compared when both have ``sample_id``; labels are then compared by each one's label column.
    """
    if "sample_id" not in a.columns or "sample_id" not in b.columns:
        raise ValueError("diff needs manifests keyed by sample_id (metrics manifests have no row key)")
    ia, ib = a.set_index("sample_id"), b.set_index("sample_id")
    added = ib.index.difference(ia.index)
    removed = ia.index.difference(ib.index)
    common = ia.index.intersection(ib.index)
    label_a = _label_of(a, meta_a.schema).set_axis(a["sample_id"]).loc[common]
    label_b = _label_of(b, meta_b.schema).set_axis(b["sample_id"]).loc[common]
    changed = common[(label_a.to_numpy() != label_b.to_numpy())]
    out: dict[str, Any] = {
        "a": {"schema": meta_a.schema, "rows": int(len(a)), "content_hash": meta_a.content_hash},
        "b": {"schema": meta_b.schema, "rows": int(len(b)), "content_hash": meta_b.content_hash},
        "identical": meta_a.content_hash is not None and meta_a.content_hash == meta_b.content_hash,
        "common_rows": int(len(common)),
        "added": {"count": int(len(added)), "examples": [str(s) for s in added[:examples]]},
        "removed": {"count": int(len(removed)), "examples": [str(s) for s in removed[:examples]]},
        "labels_changed": {
            "count": int(len(changed)),
            "examples": [
                {"sample_id": str(s), "a": int(label_a.loc[s]), "b": int(label_b.loc[s])} for s in changed[:examples]
            ],
        },
    }
    if "confident" in a.columns and "confident" in b.columns:
        ca = ia.loc[common, "confident"].astype(bool).to_numpy()
        cb = ib.loc[common, "confident"].astype(bool).to_numpy()
        became_conf = common[~ca & cb]
        lost_conf = common[ca & ~cb]
        out["confident_flipped"] = {
            "count": int(len(became_conf) + len(lost_conf)),
            "to_confident": {"count": int(len(became_conf)), "examples": [str(s) for s in became_conf[:examples]]},
            "to_not_confident": {"count": int(len(lost_conf)), "examples": [str(s) for s in lost_conf[:examples]]},
        }
    return out
