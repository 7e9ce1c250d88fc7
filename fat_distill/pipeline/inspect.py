"""What `fat-distill inspect` shows: a run's config, stages, manifests, metrics, plots and teacher rounds.

Reads only the run folder and its manifests (no Prefect server, no torch).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fat_distill.manifests import ManifestError, read_manifest, read_manifest_meta
from fat_distill.pipeline.runs import CONFIG_FILE, effective_status, load_run_json

ROUND_FILE = re.compile(r"teacher_round_(\d+)\.parquet$")


def inspect_run(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    data = load_run_json(run_dir) or {}
    manifest_dir = Path(data.get("manifest_dir", ""))
    report: dict[str, Any] = {
        "run_id": data.get("run_id", run_dir.name),
        "status": effective_status(data) if data else "unknown",
        "error": data.get("error"),
        "run_dir": str(run_dir),
        "manifest_dir": str(manifest_dir),
        "config_path": str(run_dir / CONFIG_FILE),
        "config": (run_dir / CONFIG_FILE).read_text() if (run_dir / CONFIG_FILE).exists() else None,
        "stages": data.get("stages", {}),
        "metrics": data.get("metrics"),
        "manifests": [],
        "plots": sorted(str(p) for p in (run_dir / "plots").glob("*.png")),
        "teacher_rounds": [],
    }
    files = sorted(manifest_dir.glob("*.parquet")) if manifest_dir.is_dir() else []
    for path in files:
        try:
            meta = read_manifest_meta(path)
            report["manifests"].append({"file": str(path), "schema": meta.schema, "stage": meta.stage,
                                        "rows": meta.rows, "content_hash": meta.content_hash})
        except ManifestError as exc:
            report["manifests"].append({"file": str(path), "schema": "?", "stage": f"unreadable: {exc}", "rows": 0})
    truth = None
    noisy = manifest_dir / "dataset_noisy.parquet"
    if noisy.exists():
        frame = read_manifest(noisy, "dataset")
        if "noise_kind" in frame.columns:
            truth = frame.set_index("sample_id")["noise_kind"].fillna("clean") != "clean"
    for path in sorted(files, key=lambda p: int(m.group(1)) if (m := ROUND_FILE.search(p.name)) else -1):
        if not ROUND_FILE.search(path.name):
            continue
        frame = read_manifest(path, "teacher_round")
        meta = frame.attrs["manifest"]
        conf = frame["confident"].astype(bool).to_numpy()
        entry = {"round": int(frame["round"].iloc[0]) if len(frame) else None, "kept": int(conf.sum()),
                 "dropped": int((~conf).sum()), "change": meta.extra.get("change"),
                 "train_accuracy": meta.extra.get("train_accuracy"), "warning": meta.extra.get("warning")}
        if truth is not None:
            is_noisy = truth.reindex(frame["sample_id"]).fillna(False).to_numpy(dtype=bool)
            entry.update(noisy=int(is_noisy.sum()), noisy_dropped=int((is_noisy & ~conf).sum()),
                         clean=int((~is_noisy).sum()), clean_kept=int((~is_noisy & conf).sum()))
        report["teacher_rounds"].append(entry)
    return report


def describe_label_audit(audit: dict[str, Any]) -> str:
    """One line of the summary's ``label_audit``: what the final teacher round flagged and proposes."""
    if not audit or audit.get("rows") is None:
        return "n/a"
    rate = audit.get("estimated_noise_rate")
    return (f"round {audit['round']}: {int(audit['flagged']):,} of {int(audit['rows']):,} train rows flagged "
            f"(estimated noise rate {'n/a' if rate is None else f'{100 * rate:.1f}%'}); proposed: "
            f"keep {int(audit['keep']):,}, relabel {int(audit['relabel']):,}, drop {int(audit['drop']):,}")
