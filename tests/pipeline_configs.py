"""Tiny pipeline configs for tests: seconds per stage on the CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TRAIN = {"image_size": [32, 16], "batch_p": 4, "batch_k": 2, "pad": 2, "epochs": 1, "random_erasing_p": 0.0}


def tiny_config(root: Path, **sections: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "run": {"name": "t", "runs_root": str(root / "runs"), "manifests_root": str(root / "manifests"),
                "progress": False, "devices": ["cpu"]},
        "data": {"synth": {"identities": 16, "cameras": 3, "images_per_identity": 5, "size": [32, 16],
                           "distractors": 2, "junk": 1, "seed": 0}},
        "noise": {"rate": 0.2, "kind": "flip"},
        "teacher": {"rounds": 2, "tolerance": 0.0, "train": dict(TRAIN)},
        "student": {"train": dict(TRAIN)},
        "baselines": ["ce"],
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def own_data_config(root: Path, seed: int = 11) -> dict[str, Any]:
    """The tiny config on its own synthetic data: Prefect's cache is shared by the test session, and
    tests/test_flows.py expects its first tiny run to compute every stage."""
    config = tiny_config(root)
    return tiny_config(root, data={"synth": {**config["data"]["synth"], "seed": seed}})
