"""`fat-distill manifest validate|inspect|diff` on real Parquet files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fat_distill.cli import app
from fat_distill.manifests import SCHEMAS, write_manifest
from tests.test_manifests import dataset_frame, teacher_frame

runner = CliRunner()


@pytest.fixture()
def manifests(tmp_path):
    ds = tmp_path / "ds.parquet"
    write_manifest(dataset_frame(), ds, "dataset", stage="unit")
    t0, t1 = tmp_path / "t0.parquet", tmp_path / "t1.parquet"
    a = teacher_frame(10)
    write_manifest(a, t0, "teacher_round", stage="unit")
    b = a.copy()
    b["confident"] = ~b["confident"]
    write_manifest(b, t1, "teacher_round", stage="unit")
    return ds, t0, t1


def test_validate_ok_and_invalid(manifests, tmp_path):
    ds, t0, _ = manifests
    result = runner.invoke(app, ["manifest", "validate", str(ds), str(t0)])
    assert result.exit_code == 0, result.output
    assert sum(line.startswith("ok ") for line in result.output.splitlines()) == 2
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(ds.read_bytes()[:100])
    result = runner.invoke(app, ["manifest", "validate", str(ds), str(bad)])
    assert result.exit_code == 2
    assert "bad.parquet" in result.output
    result = runner.invoke(app, ["manifest", "validate", "--schema", "soft_labels", str(ds)])
    assert result.exit_code == 2 and "expected 'soft_labels'" in result.output


def test_inspect_json_and_rich(manifests):
    ds, t0, _ = manifests
    result = runner.invoke(app, ["manifest", "inspect", str(ds), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["schema"] == "dataset" and summary["rows"] == 14
    assert summary["splits"]["train"]["identities"] == 4
    result = runner.invoke(app, ["manifest", "inspect", str(t0)])
    assert result.exit_code == 0, result.output
    assert "kept" in result.output and "confidence in the given label" in result.output


def test_diff_counts_flipped_flags(manifests):
    _, t0, t1 = manifests
    result = runner.invoke(app, ["manifest", "diff", str(t0), str(t1), "--json"])
    assert result.exit_code == 0, result.output
    diff = json.loads(result.output)
    assert diff["confident_flipped"]["count"] == 10
    assert diff["added"]["count"] == 0 and diff["removed"]["count"] == 0
    result = runner.invoke(app, ["manifest", "diff", str(t0), str(t1)])
    assert "lost confidence" in result.output


def test_missing_file_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["manifest", "inspect", str(tmp_path / "nope.parquet")])
    assert result.exit_code == 2
    assert "nope.parquet" in result.output and "no such file" in result.output


def test_console_script_help():
    exe = shutil.which("fat-distill", path=str(Path(sys.executable).parent))
    assert exe, "the fat-distill console script is not installed in this environment"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("data", "manifest"):
        assert command in out


def test_schema_readme_documents_every_column():
    readme = (Path(__file__).parents[1] / "data_manifests" / "README.md").read_text()
    for schema in SCHEMAS.values():
        assert f"## `{schema.name}`" in readme
        for col in schema.columns:
            assert f"| `{col.name}` |" in readme, (schema.name, col.name)
