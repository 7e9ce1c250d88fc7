"""Tests for the synthetic Market-1501-layout generator (fat_distill.data.synth)."""

from __future__ import annotations

import dataclasses
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fat_distill.data.synth import NuisanceConfig, SynthSummary, generate_synthetic_reid

MARKET_NAME = re.compile(r"^([-\d]+)_c(\d)s1_(\d{6})_00\.jpg$")
FOLDERS = ("bounding_box_train", "query", "bounding_box_test")
SMALL = dict(identities=8, cameras=4, images_per_identity=6, size=(64, 32), distractors=3, junk=2)


def parse_tree(root: Path) -> dict[str, list[tuple[int, int, Path]]]:
    """(pid, camid, path) of every image per folder, parsed with the Market-1501 regex."""
    parsed: dict[str, list[tuple[int, int, Path]]] = {}
    for folder in FOLDERS:
        rows = []
        for path in sorted((root / folder).iterdir()):
            match = MARKET_NAME.match(path.name)
            assert match, f"{path.name} does not follow the Market-1501 naming"
            assert re.search(r"([-\d]+)_c(\d)", path.name).groups() == match.groups()[:2]
            rows.append((int(match.group(1)), int(match.group(2)), path))
        parsed[folder] = rows
    return parsed


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> tuple[Path, SynthSummary]:
    root = tmp_path_factory.mktemp("synth") / "market"
    return root, generate_synthetic_reid(root, seed=3, **SMALL)


def test_layout_names_and_splits(small_dataset):
    root, summary = small_dataset
    tree = parse_tree(root)
    train_pids = {pid for pid, _, _ in tree["bounding_box_train"]}
    query_pids = {pid for pid, _, _ in tree["query"]}
    gallery = tree["bounding_box_test"]
    gallery_id_pids = {pid for pid, _, _ in gallery if pid > 0}

    assert all(1 <= cam <= SMALL["cameras"] for rows in tree.values() for _, cam, _ in rows)
    assert train_pids.isdisjoint(gallery_id_pids | query_pids)
    assert query_pids == gallery_id_pids
    assert train_pids | gallery_id_pids == set(range(1, SMALL["identities"] + 1))
    assert len(train_pids) == SMALL["identities"] // 2
    assert 0 not in train_pids | query_pids and -1 not in train_pids | query_pids
    # Market-style evaluation drops same-camera gallery matches: every query must keep one.
    for pid, cam, _ in tree["query"]:
        assert any(g_pid == pid and g_cam != cam for g_pid, g_cam, _ in gallery), (pid, cam)
    # At most one query per (identity, camera).
    query_keys = [(pid, cam) for pid, cam, _ in tree["query"]]
    assert len(query_keys) == len(set(query_keys))
    # The write-then-rename leaves no temporary files behind.
    assert not [p for p in root.rglob(".*")]


def test_counts_match_summary_json_and_csv(small_dataset):
    root, summary = small_dataset
    tree = parse_tree(root)
    gallery_pids = [pid for pid, _, _ in tree["bounding_box_test"]]

    assert summary.train_images == len(tree["bounding_box_train"])
    assert summary.query_images == len(tree["query"])
    assert summary.gallery_images == len(tree["bounding_box_test"])
    assert summary.distractor_images == gallery_pids.count(0) == SMALL["distractors"]
    assert summary.junk_images == gallery_pids.count(-1) == SMALL["junk"]
    assert summary.total_images == SMALL["identities"] * SMALL["images_per_identity"] + 3 + 2
    assert (summary.train_identities, summary.test_identities) == (4, 4)

    record = json.loads((root / "synth.json").read_text())
    assert record["counts"] == summary.counts()
    assert record["parameters"]["seed"] == 3
    assert record["parameters"]["size"] == [64, 32]
    assert NuisanceConfig(**record["parameters"]["nuisance"]) == NuisanceConfig()

    identities = pd.read_csv(root / "identities.csv")
    assert sorted(identities["pid"]) == list(range(1, SMALL["identities"] + 1))
    assert (identities["images"] == SMALL["images_per_identity"]).all()
    train_pids = {pid for pid, _, _ in tree["bounding_box_train"]}
    assert set(identities.loc[identities["split"] == "train", "pid"]) == train_pids
    for column in ("upper_colour", "lower_colour", "upper_pattern", "body_height", "bag", "bag_side", "skin_tone"):
        assert column in identities.columns
    # Cameras listed per identity are exactly the cameras its images were taken by.
    cams_of = defaultdict(set)
    for rows in tree.values():
        for pid, cam, _ in rows:
            cams_of[pid].add(cam)
    for pid, cams in zip(identities["pid"], identities["cameras"]):
        assert {int(c) for c in str(cams).split(";")} == cams_of[pid]
        assert len(cams_of[pid]) >= 2


def test_images_decode_at_requested_size(small_dataset):
    root, _ = small_dataset
    for path in root.rglob("*.jpg"):
        with Image.open(path) as image:
            assert image.format == "JPEG"
            assert image.mode == "RGB"
            assert image.size == (32, 64)  # PIL reports (width, height)


def test_same_seed_same_bytes_different_seed_differs(tmp_path, small_dataset):
    root, _ = small_dataset
    again = tmp_path / "again"
    generate_synthetic_reid(again, seed=3, **SMALL)
    assert tree_bytes(again) == tree_bytes(root)

    other = tmp_path / "other"
    generate_synthetic_reid(other, seed=4, **SMALL)
    first, second = tree_bytes(root), tree_bytes(other)
    shared = set(first) & set(second) - {"synth.json"}
    assert set(first) != set(second) or any(first[name] != second[name] for name in shared)
    assert (root / "identities.csv").read_bytes() != (other / "identities.csv").read_bytes()


def test_output_does_not_depend_on_workers(tmp_path):
    kwargs = dict(identities=4, cameras=3, images_per_identity=4, size=(48, 24), distractors=1, junk=1, seed=9)
    generate_synthetic_reid(tmp_path / "one", workers=1, **kwargs)
    generate_synthetic_reid(tmp_path / "two", workers=2, **kwargs)
    assert tree_bytes(tmp_path / "one") == tree_bytes(tmp_path / "two")


def test_non_empty_out_dir_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "busy"
    (out / "bounding_box_train").mkdir(parents=True)
    stale = out / "bounding_box_train" / "0999_c1s1_000001_00.jpg"
    stale.write_bytes(b"old run")
    kwargs = dict(identities=2, cameras=2, images_per_identity=2, size=(32, 16), distractors=0, junk=0)

    with pytest.raises(FileExistsError, match=re.escape(str(out))):
        generate_synthetic_reid(out, **kwargs)
    assert stale.read_bytes() == b"old run"

    summary = generate_synthetic_reid(out, overwrite=True, **kwargs)
    assert not stale.exists()
    assert sum(1 for _ in out.rglob("*.jpg")) == summary.total_images == 4

    # An empty existing folder is fine without overwrite.
    (tmp_path / "empty").mkdir()
    assert generate_synthetic_reid(tmp_path / "empty", **kwargs).total_images == 4


def test_invalid_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="cameras=10"):
        generate_synthetic_reid(tmp_path / "a", cameras=10)
    with pytest.raises(ValueError, match="flip_probability"):
        NuisanceConfig(flip_probability=1.5)
    with pytest.raises(ValueError, match="jpeg_quality"):
        NuisanceConfig(jpeg_quality=(90, 50))
    assert not (tmp_path / "a").exists()


def load_by_identity(root: Path, folders=FOLDERS) -> dict[tuple[int, int], list[np.ndarray]]:
    """Decoded float images keyed by (pid, camid), identities only."""
    images = defaultdict(list)
    for folder in folders:
        for path in sorted((root / folder).glob("*.jpg")):
            pid, cam = (int(x) for x in MARKET_NAME.match(path.name).groups()[:2])
            if pid > 0:
                images[(pid, cam)].append(np.asarray(Image.open(path), np.float32))
    return images


def test_nuisance_is_what_makes_views_differ(tmp_path):
    kwargs = dict(identities=6, cameras=2, images_per_identity=6, size=(64, 32), distractors=0, junk=0, seed=1)
    clean = load_by_identity(generate_synthetic_reid(tmp_path / "off", nuisance=NuisanceConfig.off(), **kwargs).out_dir)
    noisy = load_by_identity(generate_synthetic_reid(tmp_path / "on", **kwargs).out_dir)

    # Without nuisance, one identity seen by one camera gives the same picture every time...
    for views in clean.values():
        assert all(np.array_equal(views[0], other) for other in views[1:])
    # ...with the default nuisance every picture differs from the others.
    for views in noisy.values():
        stack = np.stack(views)
        assert stack.std(axis=0).mean() > 5.0
        assert all(not np.array_equal(views[0], other) for other in views[1:])


def test_flip_mirrors_the_person(tmp_path):
    kwargs = dict(identities=10, cameras=2, images_per_identity=2, size=(64, 32), distractors=0, junk=0, seed=5)
    straight = generate_synthetic_reid(tmp_path / "straight", nuisance=NuisanceConfig.off(), **kwargs).out_dir
    flipped = generate_synthetic_reid(
        tmp_path / "flipped", nuisance=dataclasses.replace(NuisanceConfig.off(), flip_probability=1.0), **kwargs
    ).out_dir
    identities = pd.read_csv(straight / "identities.csv", keep_default_na=False)
    asymmetric = set(identities.loc[identities["bag"].isin(["shoulder_bag", "handbag"]), "pid"])
    assert asymmetric, "seed 5 should give at least one identity with a one-sided bag"

    checked = 0
    for relpath in tree_bytes(straight):
        match = MARKET_NAME.match(Path(relpath).name)
        if not match or int(match.group(1)) not in asymmetric:
            continue
        a = np.asarray(Image.open(straight / relpath), np.float32)
        b = np.asarray(Image.open(flipped / relpath), np.float32)
        mirrored_gap = np.abs(b - a[:, ::-1]).mean()
        unmirrored_gap = np.abs(b - a).mean()
        # JPEG blocks do not mirror exactly, hence a tolerance rather than equality.
        assert mirrored_gap < 1.5 and mirrored_gap < 0.5 * unmirrored_gap, (relpath, mirrored_gap, unmirrored_gap)
        checked += 1
    assert checked > 0


def test_identities_are_separable_but_not_trivially(tmp_path):
    summary = generate_synthetic_reid(
        tmp_path / "sep", identities=24, cameras=4, images_per_identity=6, size=(64, 32),
        distractors=0, junk=0, seed=2,
    )
    images = load_by_identity(summary.out_dir)
    pids, cams, means = [], [], []
    for (pid, cam), views in images.items():
        for image in views:
            pids.append(pid)
            cams.append(cam)
            means.append(image[16:48, 8:24].mean(axis=(0, 1)))  # centre of the frame: mostly the person
    pids, cams, means = np.array(pids), np.array(cams), np.stack(means)
    dist = np.linalg.norm(means[:, None] - means[None], axis=-1)
    same = pids[:, None] == pids[None]
    off_diagonal = ~np.eye(len(pids), dtype=bool)

    # Appearance carries identity: same-identity mean colours are closer on average...
    assert dist[same & off_diagonal].mean() < 0.8 * dist[~same].mean()
    # ...but not so close that a colour average solves cross-camera retrieval.
    cross_cam = cams[:, None] != cams[None]
    nearest = np.where(off_diagonal & cross_cam, dist, np.inf).argmin(axis=1)
    rank1 = (pids[nearest] == pids).mean()
    assert 1.0 / 24 < rank1 < 0.8
    # And every identity's own images vary.
    for pid in np.unique(pids):
        assert means[pids == pid].std(axis=0).max() > 1.0


def test_lookalikes_change_only_a_few_attributes(tmp_path):
    summary = generate_synthetic_reid(
        tmp_path / "twins", identities=12, cameras=2, images_per_identity=2, size=(32, 16),
        distractors=0, junk=0, lookalike_fraction=1.0,
    )
    table = pd.read_csv(summary.out_dir / "identities.csv", keep_default_na=False).set_index("pid")
    bookkeeping = {"split", "images", "cameras", "lookalike_of"}
    appearance = [c for c in table.columns if c not in bookkeeping and not c.endswith("_rgb")]
    assert table.loc[1, "lookalike_of"] == 0  # the first identity has nobody to copy
    for pid in range(2, 13):
        base = table.loc[pid, "lookalike_of"]
        assert 1 <= base < pid
        changed = [c for c in appearance if table.loc[pid, c] != table.loc[base, c]]
        assert 1 <= len(changed) <= 6, (pid, changed)
