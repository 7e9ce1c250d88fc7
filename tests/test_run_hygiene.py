"""Small failures around runs: no temporary litter, damaged runs listed, every image mode drawn, no input
overwritten, and manifests checked for what breaks evaluation.

Each test reproduces what used to go wrong: one hidden ``.NAME.parquet.tmp-PID-…`` link per resume and
manifest; ``fat-distill runs`` crashing on one truncated run.json (``MarkupError``); ``inspect --pictures``
crashing on 16-bit PNGs; ``data corrupt X --out X`` overwriting the clean input; ``manifest validate``
calling a manifest "ok" whose test identities are train identities or whose images are missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fat_distill.cli import app
from fat_distill.data import decode_image_file
from fat_distill.evaluate.pictures import _TileMaker
from fat_distill.manifests import read_manifest, write_manifest
from fat_distill.pipeline.runs import RunPaths
from tests.helpers import write_identity_images

runner = CliRunner()


def test_publishing_a_manifest_already_in_place_leaves_no_temporary_link(tmp_path):
    source = tmp_path / "stages" / "m.parquet"
    source.parent.mkdir()
    source.write_bytes(b"PAR1 not really")
    paths = RunPaths("r", tmp_path / "run", tmp_path / "manifests")
    for _ in range(3):  # the first run, then two resumes
        paths.publish(source)
    assert sorted(p.name for p in paths.manifest_dir.iterdir()) == ["m.parquet"]
    assert (paths.manifest_dir / "m.parquet").samefile(source)


def test_runs_lists_a_damaged_run_and_the_others(tmp_path):
    good, damaged = tmp_path / "runs" / "good-1", tmp_path / "runs" / "bad-[red]2"
    good.mkdir(parents=True)
    damaged.mkdir(parents=True)
    (good / "run.json").write_text(json.dumps({"run_id": "good-1", "status": "completed", "created": "2024",
                                               "stages": {"data": {"state": "ran"}}}))
    (damaged / "run.json").write_text('{"run_id": "bad-2", "status": "runn')  # cut off
    result = runner.invoke(app, ["runs", "--runs-root", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert "good-1" in result.output and "completed" in result.output
    assert "bad-[red]2" in result.output and "damaged" in result.output
    listed = json.loads(runner.invoke(app, ["runs", "--runs-root", str(tmp_path / "runs"), "--json"]).output)
    assert {d["run_id"]: d["status"] for d in listed} == {"good-1": "completed", "bad-[red]2": "damaged"}


@pytest.mark.parametrize("mode", ["I;16 png", "I;16 tif", "P", "CMYK", "RGBA", "L", "LA"])
def test_every_image_mode_decodes_to_rgb_uint8_and_draws(tmp_path, mode):
    ramp = (np.arange(32 * 16).reshape(32, 16) * 120).astype(np.uint16)  # up to 61320 of 65535
    if mode.startswith("I;16"):
        image, suffix = Image.fromarray(ramp), "." + mode.split()[1]
    else:
        image = Image.fromarray((ramp // 257).astype(np.uint8)).convert(mode)
        suffix = ".jpg" if mode == "CMYK" else ".png"
    path = tmp_path / f"image{suffix}"
    image.save(path)
    decoded = decode_image_file(path)
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, 32, 16)
    if mode.startswith("I;16"):  # scaled, not clipped: the ramp's top is 61320 / 257 ≈ 239
        assert 230 <= int(decoded.max()) <= 240 and int(decoded.min()) == 0
    tile = _TileMaker(tmp_path, (64, 32)).picture("s", path.name)
    assert tile.mode == "RGB"


def dataset_manifest(tmp_path: Path, query_pids: list[int]) -> Path:
    frame = write_identity_images(tmp_path / "ds", identities=3, per_identity=2)
    query = write_identity_images(tmp_path / "ds", identities=max(query_pids), per_identity=1, split="query")
    query = query[query["pid"].isin(query_pids)]
    out = tmp_path / "dataset.parquet"
    write_manifest(pd.concat([frame, query], ignore_index=True), out, "dataset", stage="unit",
                   extra={"dataset_root": str(tmp_path / "ds")})
    return out


def test_data_corrupt_refuses_to_overwrite_its_input(tmp_path):
    manifest = dataset_manifest(tmp_path, [9])
    before = manifest.read_bytes()
    result = runner.invoke(app, ["data", "corrupt", str(manifest), "--rate", "0.2", "--kind", "flip",
                                 "--out", str(manifest)])
    assert result.exit_code == 2 and "is the input manifest" in result.output
    assert manifest.read_bytes() == before


def test_manifest_validate_reports_shared_identities_and_missing_images(tmp_path):
    disjoint = dataset_manifest(tmp_path / "a", [9])
    assert runner.invoke(app, ["manifest", "validate", str(disjoint)]).exit_code == 0

    shared = dataset_manifest(tmp_path / "b", [2, 3])
    result = runner.invoke(app, ["manifest", "validate", str(shared)])
    assert result.exit_code == 2
    assert "2 identities are in both train and query/gallery (pid 2, 3)" in " ".join(result.output.split())

    frame = read_manifest(disjoint)
    (tmp_path / "a" / "ds" / frame["path"].iloc[0]).unlink()
    result = runner.invoke(app, ["manifest", "validate", str(disjoint)])
    assert result.exit_code == 2 and "1 of 7 image file(s) are missing" in " ".join(result.output.split())
    assert frame["path"].iloc[0] in result.output
