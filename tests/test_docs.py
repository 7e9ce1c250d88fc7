"""Docs that run: every bash, Python and YAML block of README.md and data_manifests/README.md is executed.

The blocks run in README order in one folder that holds what the README's user has: ``faces/`` (their own
images, ``train/<identity>/`` + ``test/<identity>/``) and ``new_photos/``. ``<run_id>`` is filled in with the
newest run's id. A block that fails, or prints a traceback, fails the test with the README line it starts on.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from fat_distill.pipeline import PipelineConfig, validate_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

#: Lines not run here, each with the reason and where it is tested instead. Each must still be in the README,
#: so this list cannot go stale.
NOT_RUN = {
    "make demo   # creates .venv, installs, runs the whole pipeline on built-in synthetic data (embedded Prefect)":
        "the whole demo takes minutes; tests/test_cli_pipeline.py runs `fat-distill demo` with tiny overrides",
    "make test   # creates .venv if needed, runs the test suite": "it is the command that runs this test",
    "fat-distill demo --set student.train.epochs=40             # the built-in demo config, with any override":
        "the whole demo takes minutes; tests/test_cli_pipeline.py runs `fat-distill demo` with tiny overrides",
}
#: Sections whose blocks need what a test machine lacks (a Docker engine); what they do is tested elsewhere.
SECTIONS_NOT_RUN = {
    "Run on a cluster": "needs a Docker engine; tests/test_cluster.py runs the same steps on PostgreSQL without it",
}


@dataclass
class Block:
    file: str
    line: int
    section: str
    language: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line} ({self.section})"


def code_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a markdown file with the heading they sit under."""
    blocks, section, fence = [], "", None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if fence is None and line.startswith("#"):
            section = line.lstrip("#").strip()
        if line.startswith("```"):
            if fence is None:
                fence = (number, line[3:].strip(), [])
            else:
                start, language, lines = fence
                blocks.append(Block(path.name, start, section, language, "\n".join(lines) + "\n"))
                fence = None
        elif fence is not None:
            fence[2].append(line)
    return blocks


DOCS = [ROOT / "README.md", ROOT / "data_manifests" / "README.md"]
BLOCKS = [b for doc in DOCS for b in code_blocks(doc)]


def _write_identity(folder: Path, pid: int, count: int, rng: np.random.Generator) -> None:
    folder.mkdir(parents=True)
    colour = np.array([(pid * 53) % 256, (pid * 101) % 256, (pid * 197) % 256], dtype=float)
    for j in range(count):
        img = np.tile(colour, (32, 16, 1)) + rng.normal(0, 18, (32, 16, 3))
        img[(np.arange(32) // (2 + pid % 4)) % 2 == 0] *= 0.5
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{folder.name}_{j}.jpg")


def make_user_folder(root: Path) -> None:
    """What the README's user has: their own identity folders and some new photos."""
    rng = np.random.default_rng(0)
    for pid in range(1, 9):
        _write_identity(root / "faces" / "train" / f"person_{pid:02d}", pid, 6, rng)
    for pid in range(9, 13):
        _write_identity(root / "faces" / "test" / f"person_{pid:02d}", pid, 5, rng)
    for i, pid in enumerate((2, 5, 11)):
        _write_identity(root / "new_photos" / f"shot{i}", pid, 1, rng)


def newest_run(root: Path) -> str:
    return os.readlink(root / "runs" / "latest")


def fill_in(code: str, root: Path) -> str:
    if "<run_id>" in code:
        code = code.replace("<run_id>", newest_run(root))
    return code


def without_lines_not_run(code: str) -> str:
    return "\n".join(line for line in code.splitlines() if line.strip() not in NOT_RUN) + "\n"


def test_the_lines_not_run_are_still_in_the_readme():
    lines = {line.strip() for b in BLOCKS for line in b.code.splitlines()}
    assert set(NOT_RUN) <= lines, set(NOT_RUN) - lines
    assert {b.section for b in BLOCKS} >= set(SECTIONS_NOT_RUN)


def test_every_block_has_a_language_the_test_knows():
    unknown = [b.where for b in BLOCKS if b.language not in ("bash", "python", "yaml", "")]
    assert not unknown


def test_the_readme_blocks_run_in_order(tmp_path):
    make_user_folder(tmp_path)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "MPLBACKEND": "Agg",
           "PREFECT_HOME": str(tmp_path / ".prefect"), "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_API_URL", None)
    ran = 0
    for block in BLOCKS:
        if block.section in SECTIONS_NOT_RUN or block.language == "":
            continue  # plain blocks are diagrams and folder trees
        code = fill_in(without_lines_not_run(block.code), tmp_path)
        if block.language == "yaml":
            validate_config(PipelineConfig, yaml.safe_load(code), block.where)
            ran += 1
            continue
        command = ["bash", "-euo", "pipefail", "-c", code] if block.language == "bash" else [
            sys.executable, "-c", code]
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{block.where} failed (exit {result.returncode}):\n{code}\n{output[-4000:]}"
        assert "Traceback" not in output, f"{block.where} printed a traceback:\n{output[-4000:]}"
        ran += 1
    assert ran >= 8

    # what the README says the user leaves with, written where it says
    assert (tmp_path / "labels.parquet").exists() and (tmp_path / "clean.parquet").exists()
    assert (tmp_path / "faces_model.pt").exists() and (tmp_path / "features.parquet").exists()
    assert re.match(r"faces-", newest_run(tmp_path)) or newest_run(tmp_path).startswith("faces")
