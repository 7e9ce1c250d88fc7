"""Plots: real PNG files written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fat_distill.atomic import temporary_sibling
from fat_distill.evaluate import evaluate_retrieval, plot_cmc, plot_confidence_histogram, plot_noise_pr_curve
from tests.helpers import EFBIG, run_on_a_full_disk


def _assert_png(path: Path, returned: Path) -> None:
    assert Path(returned) == path and path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert width >= 300 and height >= 200
    assert path.stat().st_size > 10_000
    assert colours is not None and len(colours) > 20  # something was drawn, not a blank canvas
    assert _temporary_files(path) == []  # no temp file left behind


def _temporary_files(path: Path) -> list[Path]:
    """The atomic writer's leftovers for ``path``: ``.{name}.tmp-{pid}-{hex}`` (see temporary_sibling)."""
    return sorted(path.parent.glob(f".{path.name}.tmp-*"))


def _noise_case(seed: int = 0):
    rng = np.random.default_rng(seed)
    is_noisy = rng.random(400) < 0.3
    confidence = np.clip(rng.normal(np.where(is_noisy, 0.35, 0.75), 0.15), 0, 1)
    return confidence, is_noisy


def test_cmc_plot(tmp_path):
    rng = np.random.default_rng(0)
    pids = rng.integers(1, 6, 60)
    features = torch.from_numpy(np.eye(8)[pids] + 0.6 * rng.normal(size=(60, 8)))
    cameras = np.arange(60) % 2
    results = {
        name: evaluate_retrieval(features[:20] * scale, features[20:], pids[:20], pids[20:], cameras[:20], cameras[20:],
                                 metric="euclidean")
        for name, scale in (("teacher", 1.0), ("student", 0.5))
    }
    path = tmp_path / "plots" / "cmc.png"  # the folder is created
    _assert_png(path, plot_cmc(results, path))
    with pytest.raises(ValueError, match="results is empty"):
        plot_cmc({}, tmp_path / "empty.png")


def test_confidence_histogram(tmp_path):
    confidence, is_noisy = _noise_case()
    path = tmp_path / "hist.png"
    _assert_png(path, plot_confidence_histogram(confidence, is_noisy, path, threshold=0.5))
    first_size = path.stat().st_size
    # Overwriting replaces the file in one step.
    _assert_png(path, plot_confidence_histogram(confidence, is_noisy, path))
    assert path.stat().st_size != first_size  # the threshold line is gone
    with pytest.raises(ValueError, match="equal length"):
        plot_confidence_histogram(confidence, is_noisy[:-1], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_noise_pr_curve(tmp_path):
    confidence, is_noisy = _noise_case(1)
    path = tmp_path / "pr.png"
    _assert_png(path, plot_noise_pr_curve(confidence, is_noisy, path))
    with pytest.raises(ValueError, match="no sample is noisy"):
        plot_noise_pr_curve(confidence, np.zeros_like(is_noisy), tmp_path / "none.png")


def test_temporary_file_pattern_matches_the_atomic_writers_names(tmp_path):
    path = tmp_path / "hist.png"
    tmp = temporary_sibling(path)
    tmp.write_bytes(b"partial")
    assert _temporary_files(path) == [tmp]


def test_a_plot_that_fails_mid_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    confidence, is_noisy = _noise_case()
    path = tmp_path / "hist.png"
    plot_confidence_histogram(confidence, is_noisy, path, threshold=0.5)
    before = path.read_bytes()
    np.savez(tmp_path / "case.npz", confidence=confidence, is_noisy=is_noisy)
    # the disk fills up after 4 KiB of the new PNG (the old one is larger, so only a partial write can fail)
    done = run_on_a_full_disk(
        prepare=f"""
            import numpy as np
            from fat_distill.evaluate import plot_confidence_histogram
            case = np.load({str(tmp_path / "case.npz")!r})
        """,
        write=f"plot_confidence_histogram(case['confidence'], case['is_noisy'], {str(path)!r})",
        limit_bytes=4096)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["errno", str(EFBIG)], done.stdout + done.stderr  # it failed while writing
    assert path.read_bytes() == before  # the final name still holds the complete old picture
    assert _temporary_files(path) == []
