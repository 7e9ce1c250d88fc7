"""Manifests edited outside fat-distill (pandas, Polars, DuckDB) come back in, with their images found under a root.

Every round trip here is real: the library writes the file back the way a user would, losing our
``fat_distill`` Parquet metadata and changing types on the way.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from fat_distill.cli import app
from fat_distill.data import UnsafeSamplePathError, index_dataset
from fat_distill.distill import load_dataset
from fat_distill.manifests import ManifestError, read_manifest, read_manifest_meta, write_manifest
from fat_distill.pipeline.config import DataSection
from fat_distill.pipeline.stages import data_stage
from tests.test_layouts import make_split_folders

runner = CliRunner()
DATASET_COLUMNS = ["sample_id", "path", "pid", "camid", "split", "identity"]


@pytest.fixture
def indexed(tmp_path):
    """A tiny ``train/ + test/`` folders dataset and its manifest, written by fat-distill."""
    root = make_split_folders(tmp_path / "faces", {
        "train": {f"p{i}": [1, 2, 1] for i in range(1, 5)},
        "test": {f"q{i}": [1, 2, 3] for i in range(1, 4)},
    })
    result = index_dataset(root, "folders", camera_regex=r"_c(\d+)_")
    manifest = tmp_path / "faces.parquet"
    write_manifest(result.frame, manifest, "dataset", stage="data.index",
                   extra={"dataset_root": str(root.resolve()), "layout": "folders"})
    return root, manifest


def _without_p2_pandas(manifest: Path, out: Path) -> Path:
    """Drop identity p2 in pandas, with the dtypes a pandas session typically ends up with."""
    frame = pd.read_parquet(manifest)
    frame = frame[frame["identity"] != "p2"]               # a non-contiguous index: __index_level_0__
    frame["split"] = frame["split"].astype("category")      # → dictionary
    frame["pid"] = frame["pid"].astype("Int64")             # → nullable integer, pandas metadata
    frame["camid"] = frame["camid"].astype("int32")
    frame.to_parquet(out)
    return out


def _without_p2_polars(manifest: Path, out: Path) -> Path:
    (pl.read_parquet(manifest)
     .filter(pl.col("identity") != "p2")
     .with_columns(pl.col("split").cast(pl.Categorical), pl.col("pid").cast(pl.Int32))
     .write_parquet(out))
    return out


def _without_p2_duckdb(manifest: Path, out: Path) -> Path:
    duckdb.sql(f"COPY (SELECT * FROM read_parquet('{manifest}') WHERE identity <> 'p2') "
               f"TO '{out}' (FORMAT parquet)")
    return out


EDITORS = {"pandas": _without_p2_pandas, "polars": _without_p2_polars, "duckdb": _without_p2_duckdb}


@pytest.mark.parametrize("library", list(EDITORS))
def test_a_manifest_filtered_and_written_back_reads_as_a_dataset_manifest(indexed, tmp_path, library):
    root, manifest = indexed
    edited = EDITORS[library](manifest, tmp_path / f"{library}.parquet")
    assert b"fat_distill" not in (pq.read_schema(edited).metadata or {})  # the library dropped our metadata

    with pytest.raises(ManifestError, match="no fat-distill metadata and no schema was given"):
        read_manifest(edited)
    frame = read_manifest(edited, "dataset")
    meta = frame.attrs["manifest"]
    assert list(frame.columns) == DATASET_COLUMNS  # no __index_level_0__
    assert isinstance(frame.index, pd.RangeIndex)
    assert str(frame["pid"].dtype) == "int64" and str(frame["camid"].dtype) == "int64"
    assert len(frame) == 21 - 3 and "p2" not in set(frame["identity"])
    assert (meta.stage, meta.extra, meta.rows) == ("external", {}, 18)
    original = read_manifest(manifest)
    kept = original[original["identity"] != "p2"].reset_index(drop=True)
    pd.testing.assert_frame_equal(frame, kept, check_dtype=False)
    # The content hash of what was read: equal rows give an equal hash, whichever library wrote them.
    expected = write_manifest(kept, tmp_path / "kept.parquet", "dataset", stage="t", sort=False).content_hash
    assert meta.content_hash == expected


@pytest.mark.parametrize("library", list(EDITORS))
def test_data_stage_takes_an_edited_manifest_with_data_root(indexed, tmp_path, library):
    root, manifest = indexed
    edited = EDITORS[library](manifest, tmp_path / f"{library}.parquet")

    with pytest.raises(ValueError, match=r"records no dataset root .*--set data\.root=DIR"):
        data_stage(DataSection(source="manifest", manifest=str(edited)), tmp_path / "run0")
    with pytest.raises(ValueError, match="records no dataset root"):
        load_dataset(edited)

    out = data_stage(DataSection(source="manifest", manifest=str(edited), root=str(root)), tmp_path / "run1")
    written = read_manifest(out["dataset"])
    meta = written.attrs["manifest"]
    assert meta.stage == "data.manifest" and len(written) == 18
    assert meta.extra["dataset_root"] == str(root.resolve())
    assert meta.parents[0]["path"] == str(edited)
    assert meta.parents[0]["content_hash"] == read_manifest(edited, "dataset").attrs["manifest"].content_hash
    assert list(written.columns) == DATASET_COLUMNS
    assert load_dataset(out["dataset"]).root == root.resolve()  # later stages find the images by themselves


def test_data_root_follows_a_moved_image_folder(indexed, tmp_path):
    root, manifest = indexed
    moved = tmp_path / "disk2" / "faces"
    moved.parent.mkdir()
    shutil.move(root, moved)

    with pytest.raises(ValueError, match=r"recorded dataset root .* is not a folder.*--set data\.root=DIR"):
        data_stage(DataSection(source="manifest", manifest=str(manifest)), tmp_path / "run0")
    out = data_stage(DataSection(source="manifest", manifest=str(manifest), root=str(moved)), tmp_path / "run1")
    assert read_manifest_meta(out["dataset"]).extra["dataset_root"] == str(moved.resolve())
    assert load_dataset(manifest, root=moved).root == moved


def test_data_root_rechecks_paths_and_files(indexed, tmp_path):
    root, manifest = indexed
    (tmp_path / "outside.png").write_bytes((root / read_manifest(manifest)["path"][0]).read_bytes())
    frame = pd.read_parquet(manifest)
    frame.loc[4, "path"] = "../outside.png"
    escaping = tmp_path / "escaping.parquet"
    frame.to_parquet(escaping)

    with pytest.raises(UnsafeSamplePathError, match=rf"row 4 \(sample_id {frame.loc[4, 'sample_id']!r}\).*'\.\.'"):
        data_stage(DataSection(source="manifest", manifest=str(escaping), root=str(root)), tmp_path / "run0")
    allowed = data_stage(DataSection(source="manifest", manifest=str(escaping), root=str(root),
                                     allow_outside_root=True), tmp_path / "run1")
    assert read_manifest_meta(allowed["dataset"]).extra["allow_outside_root"] is True

    # A root that is a folder but not the right one: every file is missing, which is said up front.
    with pytest.raises(ValueError, match=r"21 of 21 image file\(s\) are missing .*first row 0 .*data\.root"):
        data_stage(DataSection(source="manifest", manifest=str(manifest), root=str(tmp_path)), tmp_path / "run2")
    with pytest.raises(ValueError, match="is not a folder"):
        data_stage(DataSection(source="manifest", manifest=str(manifest), root=str(tmp_path / "nope")),
                   tmp_path / "run3")


def test_types_changed_by_other_tools_are_cast_and_bad_values_named(indexed, tmp_path):
    _, manifest = indexed
    frame = pd.read_parquet(manifest)

    floats = frame.assign(pid=frame["pid"].astype("float64"), camid=frame["camid"].astype("float32"))
    floats.to_parquet(tmp_path / "floats.parquet")  # what a NaN passing through pandas leaves behind
    back = read_manifest(tmp_path / "floats.parquet", "dataset")
    assert back["pid"].tolist() == frame["pid"].tolist() and str(back["pid"].dtype) == "int64"

    fractional = floats.copy()
    fractional.loc[3, "pid"] = 2.5
    fractional.to_parquet(tmp_path / "fractional.parquet")
    with pytest.raises(ManifestError, match=r"column 'pid', row 3: has type double, expected int64"):
        read_manifest(tmp_path / "fractional.parquet", "dataset")

    missing = frame.assign(pid=frame["pid"].astype("Int64"))
    missing.loc[5, "pid"] = pd.NA
    missing.to_parquet(tmp_path / "missing.parquet")
    with pytest.raises(ManifestError, match=r"column 'pid', row 5: missing value"):
        read_manifest(tmp_path / "missing.parquet", "dataset")

    unknown_split = frame.copy()
    unknown_split.loc[2, "split"] = "val"
    unknown_split.to_parquet(tmp_path / "val.parquet")
    with pytest.raises(ManifestError, match=r"column 'split', row 2: value 'val' not allowed"):
        read_manifest(tmp_path / "val.parquet", "dataset")


# --------------------------------------------------------------------------- manifest validate


def _output(result) -> str:
    return " ".join(result.output.split())


def test_validate_without_a_root_refuses_absolute_and_escaping_paths(indexed, tmp_path):
    _, manifest = indexed
    frame = pd.read_parquet(manifest)
    clean = tmp_path / "clean.parquet"
    frame.to_parquet(clean)
    for row, bad_path, reason in [(3, "/etc/passwd", "is absolute"), (6, "train/../../x.png", "'..'")]:
        edited = frame.copy()
        edited.loc[row, "path"] = bad_path
        path = tmp_path / f"bad{row}.parquet"
        edited.to_parquet(path)
        refused = runner.invoke(app, ["manifest", "validate", "--schema", "dataset", str(path)])
        output = _output(refused)
        assert refused.exit_code == 2, output
        assert f"row {row} (sample_id {frame.loc[row, 'sample_id']!r})" in output and reason in output
        assert "no dataset root known" in output
        allowed = runner.invoke(app, ["manifest", "validate", "--schema", "dataset", "--allow-outside-root",
                                      str(path)])
        assert allowed.exit_code == 0 and "permitted" in _output(allowed)

    ok = runner.invoke(app, ["manifest", "validate", "--schema", "dataset", str(clean)])
    output = _output(ok)
    assert ok.exit_code == 0, output
    assert "image files not checked: no dataset root is recorded (pass --root DIR)" in output


def test_validate_with_root_checks_every_file(indexed, tmp_path):
    root, manifest = indexed
    edited = _without_p2_pandas(manifest, tmp_path / "edited.parquet")
    ok = runner.invoke(app, ["manifest", "validate", "--schema", "dataset", "--root", str(root), str(edited)])
    assert ok.exit_code == 0, ok.output
    assert "all paths inside the dataset root; all 18 image files present" in _output(ok)

    first = read_manifest(edited, "dataset")["path"][1]
    (root / first).unlink()
    (root / read_manifest(edited, "dataset")["path"][7]).unlink()
    missing = runner.invoke(app, ["manifest", "validate", "--schema", "dataset", "--root", str(root), str(edited)])
    output = _output(missing)
    assert missing.exit_code == 2
    assert f"2 of 18 image file(s) are missing under the dataset root {str(root)!r}, first row 1" in output
    assert repr(first) in output

    # The same for a manifest that records its root: a missing image is an error, not "ok".
    recorded = runner.invoke(app, ["manifest", "validate", str(manifest)])
    assert recorded.exit_code == 2 and "2 of 21 image file(s) are missing" in _output(recorded)

    wrong = runner.invoke(app, ["manifest", "validate", "--root", str(tmp_path / "nope"), str(manifest)])
    assert wrong.exit_code == 2 and "is not a folder" in _output(wrong)
    escaping = pd.read_parquet(edited)
    escaping.loc[escaping.index[0], "path"] = "../faces.parquet"
    escaping.to_parquet(tmp_path / "escaping.parquet")
    refused = runner.invoke(app, ["manifest", "validate", "--schema", "dataset", "--root", str(root),
                                  str(tmp_path / "escaping.parquet")])
    assert refused.exit_code == 2 and "row 0" in _output(refused) and "'..'" in _output(refused)


# --------------------------------------------------------------------------- end to end


def test_cli_run_on_a_pandas_edited_manifest_of_a_moved_folder(tmp_path):
    """Index your own folders, drop an identity in pandas, move the images, run with --set data.root=NEW."""
    import yaml

    from tests.pipeline_configs import tiny_config

    root = make_split_folders(tmp_path / "faces", {
        "train": {f"p{i}": [1, 2, 1, 2] for i in range(1, 7)},
        "test": {f"q{i}": [1, 2, 3] for i in range(1, 5)},
    })
    manifest = tmp_path / "faces.parquet"
    indexed = runner.invoke(app, ["data", "index", str(root), "--layout", "folders", "--camera-regex",
                                  r"_c(\d+)_", "--out", str(manifest)])
    assert indexed.exit_code == 0, indexed.output
    edited = tmp_path / "edited.parquet"
    frame = pd.read_parquet(manifest)
    frame[frame["identity"] != "p6"].to_parquet(edited)
    moved = tmp_path / "moved"
    shutil.move(root, moved)

    config = tiny_config(tmp_path, data={"source": "manifest", "manifest": str(edited)},
                         teacher={"rounds": 1}, baselines=[])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    refused = runner.invoke(app, ["run", str(path), "--direct"])
    assert refused.exit_code != 0 and "--set data.root=DIR" in _output(refused)

    done = runner.invoke(app, ["run", str(path), "--direct", "--set", f"data.root={moved}"])
    assert done.exit_code == 0, done.output
    dataset = next((tmp_path / "manifests").rglob("dataset.parquet"))
    meta = read_manifest_meta(dataset)
    assert meta.extra["dataset_root"] == str(moved.resolve()) and meta.rows == len(frame) - 4
    metrics = next((tmp_path / "manifests").rglob("metrics_distilled.parquet"))
    assert np.isfinite(read_manifest(metrics)["value"].dropna()).all()
    # The edited file is an input of the data stage: editing it again changes the stage's cache key.
    run_json = json.loads(next((tmp_path / "runs").rglob("run.json")).read_text())
    digest = "sha256:" + hashlib.sha256(edited.read_bytes()).hexdigest()
    assert run_json["stages"]["data"]["components"]["inputs"] == {"manifest": digest}
