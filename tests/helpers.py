"""Small real datasets for tests: tiny PNG images on disk and their dataset frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def write_identity_images(root: Path, identities: int = 6, per_identity: int = 6, size=(32, 16),
                          seed: int = 0, split: str = "train") -> pd.DataFrame:
    """Write ``identities × per_identity`` PNGs whose colour and stripe pattern depend on the identity.

    Returns the dataset frame (sample_id, path, pid, camid, split) with paths relative to ``root``.
    """
    rng = np.random.default_rng(seed)
    h, w = size
    rows = []
    for pid in range(1, identities + 1):
        base = np.array([(pid * 53) % 256, (pid * 101) % 256, (pid * 197) % 256], dtype=float)
        period = 2 + pid % 4
        for j in range(per_identity):
            img = np.tile(base, (h, w, 1))
            img[(np.arange(h) // period) % 2 == 0] *= 0.5
            img += rng.normal(0, 20, img.shape)
            rel = f"{split}/{pid:04d}_c{j % 3 + 1}_{j:03d}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / rel)
            rows.append({"sample_id": rel, "path": rel, "pid": pid, "camid": j % 3 + 1, "split": split})
    return pd.DataFrame(rows)
