"""Stable hashes of stage configurations (part of each stage's cache key and provenance)."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def config_hash(config: Any) -> str:
    """SHA-256 (first 16 hex digits) of a JSON-serialisable config, independent of key order.

    Pydantic models are hashed through ``model_dump(mode="json")``.
    """
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
