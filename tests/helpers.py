"""Small real datasets for tests (tiny PNG images on disk and their dataset frames), and a full disk."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
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


REPO = Path(__file__).resolve().parents[1]
EFBIG = 27  # errno: "File too large", what a write past RLIMIT_FSIZE gets


def run_on_a_full_disk(prepare: str, write: str, limit_bytes: int) -> subprocess.CompletedProcess:
    """Run ``prepare`` and then ``write`` (Python source) in a child process where no file may grow past
    ``limit_bytes``: the write that crosses it fails with ``OSError(EFBIG)`` after the bytes before it
    reached the file, as on a full disk. The child prints ``errno <n>`` when ``write`` raised an OSError,
    ``wrote`` when it did not.
    """
    code = "\n".join([
        textwrap.dedent(prepare),
        "import resource, signal",
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing the process",
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_bytes}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))",
        "try:",
        textwrap.indent(textwrap.dedent(write).strip(), "    "),
        "except OSError as exc:",
        "    print('errno', exc.errno)",
        "else:",
        "    print('wrote')",
    ])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=REPO, check=False)
