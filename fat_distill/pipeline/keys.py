"""Cache keys of stages: hash(input content hashes, the stage's config section, library version, code).

Two calls with the same key compute the same outputs, so a stage whose key is
unchanged is taken from cache. The components are kept next to the key, so
logs can say *why* a stage ran (which component changed since the last run).
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import fat_distill
from fat_distill.config_hash import config_hash
from fat_distill.manifests import ManifestError, read_manifest_meta

PACKAGE_ROOT = Path(fat_distill.__file__).resolve().parent

#: The library subpackages whose source each stage runs (a change there invalidates the stage).
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "data": ("data", "manifests", "pipeline/stages.py"),
    "noise": ("data", "manifests", "pipeline/stages.py"),
    "teacher_fold": ("data", "manifests", "models", "losses", "train", "distill"),
    "teacher_round": ("data", "manifests", "models", "losses", "train", "distill"),
    "soft_labels": ("data", "manifests", "models", "train", "distill"),
    "student": ("data", "manifests", "models", "losses", "train", "distill"),
    "cleanlab": ("data", "manifests", "models", "losses", "train", "distill"),
    "evaluate": ("data", "manifests", "models", "train", "distill", "evaluate"),
    "noise_report": ("manifests", "distill", "evaluate"),
    "label_audit": ("manifests", "distill", "evaluate"),
}


@lru_cache(maxsize=None)
def source_hash(parts: tuple[str, ...]) -> str:
    """SHA-256 (16 hex) of the .py files of the given subpackages/modules of fat_distill."""
    h = hashlib.sha256()
    for part in parts:
        target = PACKAGE_ROOT / part
        files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
        for path in files:
            h.update(str(path.relative_to(PACKAGE_ROOT)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def file_fingerprint(path: str | os.PathLike) -> str:
    """Content hash of an input: a manifest's recorded content hash, else the file's SHA-256."""
    path = Path(path)
    if path.suffix == ".parquet":
        try:
            meta = read_manifest_meta(path)
            if meta.content_hash:
                return meta.content_hash
        except ManifestError:
            pass
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def key_components(stage: str, inputs: dict[str, Any], config: Any, extra: dict[str, Any] | None = None) -> dict:
    """The parts of a stage's cache key, JSON-ready.

    Args:
        stage: a key of :data:`STAGE_CODE`.
        inputs: name → path (or list of paths, or None) of input manifests/checkpoints.
        config: the stage's config section (pydantic model or JSON-ready value).
        extra: small values that change what the stage computes (round, fold, method).
    """
    def fingerprint(value):
        if value is None:
            return None
        if isinstance(value, (list, tuple)):
            return [fingerprint(v) for v in value]
        return file_fingerprint(value)

    return {
        "stage": stage,
        "inputs": {name: fingerprint(value) for name, value in sorted(inputs.items())},
        "config": config_hash(config),
        "extra": extra or {},
        "version": fat_distill.__version__,
        "code": source_hash(STAGE_CODE[stage]),
    }


def stage_key(components: dict) -> str:
    return hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()[:24]


def why_changed(old: dict | None, new: dict) -> str:
    """A short reason a stage could not be taken from cache, comparing with the last known components."""
    if old is None:
        return "first run of this stage"
    reasons = []
    for name, value in new["inputs"].items():
        if old.get("inputs", {}).get(name) != value:
            reasons.append(f"input {name} changed")
    if old.get("config") != new["config"]:
        reasons.append("its config section changed")
    if old.get("extra") != new["extra"]:
        reasons.append("stage parameters changed")
    if old.get("version") != new["version"]:
        reasons.append("fat-distill version changed")
    if old.get("code") != new["code"]:
        reasons.append("library code changed")
    return ", ".join(reasons) or "no cached result (outputs missing or the earlier attempt failed)"
