"""Manifest path safety: absolute paths, '..' escapes and symlinks leaving the dataset root are refused."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from fat_distill.cli import app
from fat_distill.data import (
    ManifestImageDataset,
    UnsafeSamplePathError,
    check_sample_paths,
    corrupt_labels,
    find_missing_files,
    find_paths_outside_root,
    index_dataset,
)
from fat_distill.distill import load_dataset
from fat_distill.manifests import read_manifest, write_manifest
from fat_distill.pipeline.config import DataSection
from fat_distill.pipeline.stages import data_stage, noise_stage
from fat_distill.pipeline.config import NoiseSection
from tests.helpers import write_identity_images

runner = CliRunner()


def _symlink(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(target, link, target_is_directory=target.is_dir())
    except (OSError, NotImplementedError):
        pytest.skip("symlinks are not supported here")


@pytest.fixture
def tree(tmp_path):
    """A dataset root with images, plus images outside it and links of every kind."""
    root = tmp_path / "root"
    frame = write_identity_images(root, identities=3, per_identity=2)
    outside = tmp_path / "outside"
    write_identity_images(outside, identities=1, per_identity=2, split="elsewhere")
    _symlink(outside / "elsewhere", root / "linked_folder")  # a folder link leaving the root
    _symlink(outside / "elsewhere" / "0001_c1_000.png", root / "train" / "linked_file.png")
    _symlink(root / "train" / "0001_c1_000.png", root / "train" / "inside_link.png")  # stays inside
    return root, outside, frame


def test_safe_paths_pass(tree):
    root, _, frame = tree
    paths = [*frame["path"], "train/inside_link.png", "train/../train/0001_c1_000.png", "./train/0002_c1_000.png"]
    assert find_paths_outside_root(paths, root) == []
    check_sample_paths(paths, root)  # no error


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/etc/passwd", "is absolute"),
        ("C:/data/x.png", "is absolute"),
        ("../outside/elsewhere/0001_c1_000.png", "uses '..' to climb out"),
        ("train/../../outside/elsewhere/0001_c1_000.png", "uses '..' to climb out"),
        ("train/linked_file.png", "is a symlink that leads outside"),
        ("linked_folder/0001_c1_000.png", "symlinked folder that leads outside"),
        ("", "is empty"),
    ],
)
def test_each_unsafe_path_is_named_with_its_row(tree, path, reason):
    root, _, frame = tree
    paths = [*frame["path"], path]
    ids = [*frame["sample_id"], "the-bad-one"]
    assert [row for row, _ in find_paths_outside_root(paths, root)] == [len(frame)]
    with pytest.raises(UnsafeSamplePathError) as info:
        check_sample_paths(paths, root, sample_ids=ids, where="my.parquet")
    error = info.value
    assert (error.row, error.sample_id, error.path, error.count) == (len(frame), "the-bad-one", path, 1)
    message = str(error)
    assert message.startswith("my.parquet: row 6 (sample_id 'the-bad-one')")
    assert reason in message and "--allow-outside-root" in message
    check_sample_paths(paths, root, sample_ids=ids, allow_outside_root=True)  # deliberate: allowed


def test_without_a_root_only_the_path_text_is_checked(tree):
    _, _, frame = tree
    # Links cannot be followed without a root, so a linked path passes; what the text says cannot.
    check_sample_paths([*frame["path"], "train/linked_file.png", "a/../b.png"], None)
    for path, reason in [("/etc/passwd", "is absolute"), ("../b.png", "uses '..' to climb out"), ("", "is empty")]:
        assert [row for row, _ in find_paths_outside_root(["ok.png", path], None)] == [1]
        with pytest.raises(UnsafeSamplePathError, match=rf"row 1 \(sample_id 'bad'\).*{reason}.*no dataset root known"):
            check_sample_paths(["ok.png", path], None, sample_ids=["ok", "bad"])
        check_sample_paths(["ok.png", path], None, allow_outside_root=True)


def test_find_missing_files_names_rows_without_a_regular_file(tree):
    root, _, frame = tree
    paths = [*frame["path"], "train/absent.png", "train", "train/inside_link.png", "train/linked_file.png"]
    assert find_missing_files(root, paths) == [len(frame), len(frame) + 1]


def test_error_counts_every_bad_row(tree):
    root, _, _ = tree
    with pytest.raises(UnsafeSamplePathError, match=r"row 0 .*2 more row\(s\) too, e.g. rows \[1, 2\]") as info:
        check_sample_paths(["/a.png", "../b.png", "linked_folder/0001_c1_000.png"], root)
    assert info.value.count == 3


def test_image_dataset_refuses_then_reads_when_allowed(tree):
    root, _, frame = tree
    bad = pd.concat([frame, pd.DataFrame([{"sample_id": "x", "path": "train/linked_file.png", "pid": 1,
                                          "camid": 1, "split": "train"}])], ignore_index=True)
    with pytest.raises(UnsafeSamplePathError, match="ManifestImageDataset: row 6 .*'x'"):
        ManifestImageDataset(bad, root)
    dataset = ManifestImageDataset(bad, root, allow_outside_root=True)
    image, _, index = dataset[6]
    assert index == 6 and image.shape[0] == 3


def _dataset_manifest(tmp_path: Path, frame: pd.DataFrame, root: Path, **extra) -> Path:
    out = tmp_path / "manifests" / "dataset.parquet"
    write_manifest(frame, out, "dataset", stage="test", extra={"dataset_root": str(root), **extra})
    return out


def test_load_dataset_names_manifest_and_row_and_honours_recorded_permission(tree, tmp_path):
    root, outside, frame = tree
    absolute = str((outside / "elsewhere" / "0001_c1_001.png").resolve())
    bad = frame.copy()
    bad.loc[3, "path"] = absolute
    path = _dataset_manifest(tmp_path, bad, root)
    with pytest.raises(UnsafeSamplePathError) as info:
        load_dataset(path)
    assert str(path) in str(info.value) and "row 3" in str(info.value) and bad.loc[3, "sample_id"] in str(info.value)
    assert load_dataset(path, allow_outside_root=True).allow_outside_root
    granted = _dataset_manifest(tmp_path / "granted", bad, root, allow_outside_root=True)
    assert load_dataset(granted).allow_outside_root  # recorded when it was indexed with --allow-outside-root
    with pytest.raises(UnsafeSamplePathError):
        load_dataset(granted, allow_outside_root=False)  # an explicit answer wins


def test_index_refuses_symlinks_leaving_the_root(tmp_path):
    real = tmp_path / "real"
    write_identity_images(real, identities=3, per_identity=2, split="x")
    root = tmp_path / "folders"
    (root / "0001").mkdir(parents=True)
    (root / "0001" / "a.png").write_bytes((real / "x" / "0001_c1_000.png").read_bytes())
    (root / "0001" / "b.png").write_bytes((real / "x" / "0001_c2_001.png").read_bytes())
    _symlink(real / "x", root / "0002")  # an identity folder linked from another disk
    with pytest.raises(UnsafeSamplePathError, match=r"indexing .*'0002/0001_c1_000.png'.*symlinked folder"):
        index_dataset(root, "folders")
    result = index_dataset(root, "folders", allow_outside_root=True)
    assert (result.frame["path"].str.startswith("0002/")).sum() == 6


def test_cli_index_records_permission_and_validate_checks_paths(tmp_path):
    real = tmp_path / "real"
    write_identity_images(real, identities=2, per_identity=2, split="x")
    root = tmp_path / "folders"
    (root / "0001").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        (root / "0001" / name).write_bytes((real / "x" / "0001_c1_000.png").read_bytes())
    _symlink(real / "x", root / "0002")
    out = tmp_path / "ds.parquet"

    refused = runner.invoke(app, ["data", "index", str(root), "--layout", "folders", "--out", str(out)])
    assert refused.exit_code == 2 and "--allow-outside-root" in refused.output and not out.exists()

    granted = runner.invoke(app, ["data", "index", str(root), "--layout", "folders", "--out", str(out),
                                  "--allow-outside-root"])
    assert granted.exit_code == 0, granted.output
    assert read_manifest(out).attrs["manifest"].extra["allow_outside_root"] is True
    ok = runner.invoke(app, ["manifest", "validate", str(out)])
    assert ok.exit_code == 0 and "permitted (recorded in the manifest)" in ok.output

    # A manifest edited by hand: one row now points at an absolute path.
    frame = read_manifest(out)
    frame.loc[1, "path"] = str(real / "x" / "0001_c1_000.png")
    edited = tmp_path / "edited.parquet"
    write_manifest(frame, edited, "dataset", stage="edit", extra={"dataset_root": str(root)})
    invalid = runner.invoke(app, ["manifest", "validate", str(edited)])
    assert invalid.exit_code == 2
    output = " ".join(invalid.output.split())
    assert "row 1" in output and "is absolute" in output
    allowed = runner.invoke(app, ["manifest", "validate", str(edited), "--allow-outside-root"])
    assert allowed.exit_code == 0 and "permitted" in allowed.output


def test_mean_image_pairing_does_not_read_outside_the_root(tree):
    root, _, frame = tree
    bad = frame.copy()
    bad.loc[0, "path"] = "train/linked_file.png"
    with pytest.raises(UnsafeSamplePathError, match="mean_image pairing"):
        corrupt_labels(bad, rate=0.4, kind="pair", image_root=root, pairing="mean_image")
    noisy = corrupt_labels(bad, rate=0.4, kind="pair", image_root=root, pairing="mean_image",
                           allow_outside_root=True)
    assert (noisy["noise_kind"] == "pair").any()


def test_pipeline_data_stage_decides_by_its_own_config(tree, tmp_path):
    root, _, frame = tree
    bad = frame.copy()
    bad.loc[2, "path"] = "linked_folder/0001_c1_000.png"
    given = _dataset_manifest(tmp_path, bad, root, allow_outside_root=True)  # permission from someone else
    with pytest.raises(UnsafeSamplePathError, match="row 2"):
        data_stage(DataSection(source="manifest", manifest=str(given)), tmp_path / "run1")

    out = data_stage(DataSection(source="manifest", manifest=str(given), allow_outside_root=True), tmp_path / "run2")
    assert read_manifest(out["dataset"]).attrs["manifest"].extra["allow_outside_root"] is True
    noisy = noise_stage(out["dataset"], NoiseSection(rate=0.3, kind="flip"), tmp_path / "run2")
    assert load_dataset(noisy["dataset"]).allow_outside_root  # the permission travels with the run's manifests


def test_cli_run_refuses_a_linked_dataset_until_allowed(tmp_path):
    """End to end: a Market-style tree whose split folders are links to another disk."""
    import yaml

    from fat_distill.data import generate_synthetic_reid
    from tests.pipeline_configs import tiny_config

    real = tmp_path / "disk2" / "market"
    generate_synthetic_reid(real, identities=8, cameras=2, images_per_identity=4, size=(32, 16), seed=0,
                            distractors=0, junk=0)
    linked = tmp_path / "linked"
    for split in ("bounding_box_train", "query", "bounding_box_test"):
        _symlink(real / split, linked / split)
    config = tiny_config(tmp_path, data={"source": "folder", "root": str(linked), "layout": "market1501"},
                         teacher={"rounds": 1}, baselines=[])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))

    refused = runner.invoke(app, ["run", str(path), "--direct"])
    output = " ".join(refused.output.split())
    assert refused.exit_code == 2
    assert "symlinked folder that leads outside the dataset root" in output and "--allow-outside-root" in output

    done = runner.invoke(app, ["run", str(path), "--direct", "--allow-outside-root"])
    assert done.exit_code == 0, done.output
    metrics = list((tmp_path / "manifests").rglob("metrics_distilled.parquet"))
    assert len(metrics) == 1 and len(read_manifest(metrics[0])) > 0
