"""Stable hashes of stage configurations (part of each stage's cache key and provenance)."""

from __future__ import annotations

import hashlib
import json
from typing import Any


#: ``model_dump(context={HASH_CONTEXT_KEY: True})`` asks a config for the fields its hash covers; a model
#: may leave out settings that do not change results (TrainConfig's input-pipeline settings).
HASH_CONTEXT_KEY = "config_hash"


def hashed_fields(config: Any, **dump_options: Any) -> dict[str, Any]:
    """``config.model_dump(mode="json", **dump_options)`` as hashed: without settings that do not change results."""
    return config.model_dump(mode="json", context={HASH_CONTEXT_KEY: True}, **dump_options)


def config_hash(config: Any) -> str:
    """SHA-256 (first 16 hex digits) of a JSON-serialisable config, independent of key order.

    Pydantic models are hashed through :func:`hashed_fields`.
    """
    if hasattr(config, "model_dump"):
        config = hashed_fields(config)
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
