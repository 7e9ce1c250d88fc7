"""Everything checkable is checked before the first stage: images, weights, devices, sizes, folders, disk.

Before, a truncated train JPEG under the default noise (``mix``, whose mean-image
pairing opens every image) ended the run with a bare ``OSError: Truncated File
Read``; a bad query image, a missing weights file or a CUDA device on a CPU
machine surfaced only when their stage started, after hours of training.
"""

from __future__ import annotations

import errno
import io
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from fat_distill.cli import app
from fat_distill.data import corrupt_labels, generate_synthetic_reid, index_dataset
from fat_distill.data.images import check_image, find_unreadable_images
from fat_distill.data.layouts import UnreadableImageError
from fat_distill.disk import describe_os_error
from fat_distill.pipeline import PipelineConfig, load_config
from fat_distill.pipeline.overrides import ConfigError
from fat_distill.pipeline.preflight import BadImagesError, PreflightError, preflight
from tests.pipeline_configs import TRAIN, tiny_config

runner = CliRunner()


def jpeg_bytes(seed: int = 0, size=(32, 16)) -> bytes:
    rng = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=rng) * 255).to(torch.uint8).numpy()
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


@pytest.fixture(scope="module")
def market(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("market") / "ds"
    generate_synthetic_reid(root, identities=12, cameras=3, images_per_identity=4, size=(64, 32), seed=0,
                            distractors=2, junk=1)
    return root


def damaged_copy(market: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """A copy of ``market`` with a truncated train JPEG, an empty query file and a text file named .jpg."""
    root = tmp_path / "ds"
    subprocess.run(["cp", "-r", str(market), str(root)], check=True)
    train = sorted((root / "bounding_box_train").glob("*.jpg"))[0]
    query = sorted((root / "query").glob("*.jpg"))[0]
    gallery = sorted((root / "bounding_box_test").glob("*.jpg"))[-1]
    train.write_bytes(train.read_bytes()[:300])
    query.write_bytes(b"")
    gallery.write_text("<html>404 Not Found</html>")
    return root, [p.name for p in (train, query, gallery)]


def folder_config(tmp_path: Path, root: Path, **sections) -> Path:
    config = tiny_config(tmp_path, data={"source": "folder", "root": str(root), "layout": "market1501"},
                         noise={"rate": 0.2, "kind": "mix"}, teacher={"rounds": 1, "train": dict(TRAIN)},
                         baselines=[], **sections)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_quick_check_finds_what_a_full_decode_finds_in_damaged_files(tmp_path):
    good = jpeg_bytes()
    files = {"good.jpg": good, "truncated.jpg": good[: len(good) // 2], "head_only.jpg": good[:300],
             "empty.jpg": b"", "html.jpg": b"<html>404</html>",
             # Bytes after the end marker (some cameras append data): decodes fine, so it is not reported.
             "trailing.jpg": good + b"\0" * 4096}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    png = tmp_path / "good.png"
    Image.open(io.BytesIO(good)).save(png)
    png_cut = tmp_path / "cut.png"
    png_cut.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    names = [*files, "good.png", "cut.png", "missing.jpg"]
    quick = dict(find_unreadable_images(tmp_path, names, full=False))
    full = dict(find_unreadable_images(tmp_path, names, full=True))
    assert set(quick) == set(full) == {"truncated.jpg", "head_only.jpg", "empty.jpg", "html.jpg", "cut.png",
                                       "missing.jpg"}
    assert "truncated" in quick["truncated.jpg"].lower() and quick["empty.jpg"] == "empty file (0 bytes)"
    assert check_image(tmp_path / "trailing.jpg", full=False) is None


def test_run_with_bad_images_stops_before_any_stage_naming_each_file(market, tmp_path):
    root, bad = damaged_copy(market, tmp_path)
    result = runner.invoke(app, ["run", str(folder_config(tmp_path, root)), "--direct"])
    assert result.exit_code == 2, result.output
    for name in bad:
        assert name in result.output
    assert "--skip-bad" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no run was started


def test_skip_bad_leaves_the_bad_images_out_and_the_run_completes(market, tmp_path):
    root, bad = damaged_copy(market, tmp_path)
    result = runner.invoke(app, ["run", str(folder_config(tmp_path, root)), "--direct", "--skip-bad"])
    assert result.exit_code == 0, result.output
    dataset = next((tmp_path / "manifests").glob("*/dataset.parquet"))
    from fat_distill.manifests import read_manifest

    frame = read_manifest(dataset, "dataset")
    assert not any(Path(p).name in bad for p in frame["path"])
    assert frame.attrs["manifest"].extra["bad_images"] == len(bad)


def test_mean_image_pairing_names_an_undecodable_image(market, tmp_path):
    """The noise stage's own message, for an image damaged after the check (or a library call without one)."""
    root, bad = damaged_copy(market, tmp_path)
    frame = index_dataset(root, "market1501").frame
    with pytest.raises(UnreadableImageError) as err:
        corrupt_labels(frame, rate=0.2, kind="mix", seed=0, image_root=root, pairing="mean_image")
    assert bad[0] in str(err.value) and "--skip-bad" in str(err.value)


def test_preflight_lists_weights_devices_and_unwritable_folders_together(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    devices = ["cpu"] if torch.cuda.is_available() else ["cuda:0"]
    config = load_config(PipelineConfig, None, [
        f"run.runs_root={blocker / 'runs'}", f"run.manifests_root={tmp_path / 'manifests'}",
        f"run.devices={devices}", f"student.train.weights={tmp_path / 'missing.pt'}",
        "student.train.model=resnet18", "data.synth.identities=8"])
    with pytest.raises(PreflightError) as err:
        preflight(config)
    message = str(err.value)
    assert "student.train: model 'resnet18' with weights" in message and "missing.pt" in message
    assert str(blocker / "runs") in message
    if not torch.cuda.is_available():
        assert "run.devices" in message and "CUDA is not available" in message
    assert len(err.value.problems) == (3 if not torch.cuda.is_available() else 2)


def test_image_size_zero_is_refused_when_the_config_is_read():
    with pytest.raises(ConfigError, match="image_size"):
        load_config(PipelineConfig, None, ["teacher.train.image_size=[0, 32]"])


def test_bad_images_error_shows_ten_and_counts_the_rest(tmp_path):
    bad = [(f"train/{i:03d}.jpg", "empty file (0 bytes)") for i in range(25)]
    message = str(BadImagesError(bad, tmp_path, 100, full=False))
    assert "train/009.jpg" in message and "train/010.jpg" not in message and "15 more" in message


def test_disk_and_permission_errors_say_what_happened(tmp_path):
    assert "no space left on device" in describe_os_error(OSError(errno.ENOSPC, "x"), tmp_path / "f.pt")
    assert "MB free" in describe_os_error(OSError(errno.ENOSPC, "x"), tmp_path / "f.pt")
    assert "folder is read-only" in describe_os_error(OSError(errno.EROFS, "x"), tmp_path)
    assert "permission denied" in describe_os_error(OSError(errno.EACCES, "x"), tmp_path)
