"""Dataset layouts → ``dataset`` table: each layout's rules and each error."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fat_distill.data.images import IMAGE_SUFFIXES, check_image, is_image_file
from fat_distill.data.layouts import (
    DatasetLayoutError,
    DatasetRootError,
    DuplicateSampleIdError,
    MissingListFilesError,
    MissingSplitFoldersError,
    UnparsedNamesError,
    UnreadableImageError,
    choose_queries,
    index_dataset,
)

ORL_ROOT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "orl_faces"
DATASET_COLUMNS = ["sample_id", "path", "pid", "camid", "split"]


def write_image(path: Path, seed: int = 0, size: tuple[int, int] = (8, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if path.suffix.lower() == ".pgm":
        image = image.convert("L")
    image.save(path, format={".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower()))
    return path


def write_truncated_jpeg(path: Path) -> Path:
    write_image(path, size=(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def make_market(root: Path) -> Path:
    """A tiny Market-1501 tree with junk, distractors, a stray file and an odd name."""
    for name in ["0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg", "0007_c3s3_015162_04.jpg",
                 "0000_c1s1_000000_00.jpg",   # distractor in train: dropped
                 "readme.jpg"]:              # unparsable
        write_image(root / "bounding_box_train" / name)
    (root / "bounding_box_train" / "Thumbs.db").write_bytes(b"\0")
    for name in ["0002_c5s1_000401_00.jpg", "0007_c6s3_015000_00.jpg"]:
        write_image(root / "query" / name)
    for name in ["0002_c4s1_000500_00.jpg", "0007_c1s3_015100_00.jpg",
                 "0000_c6s1_000100_00.jpg",   # distractor: kept in gallery
                 "-1_c1s1_000200_00.jpg",     # junk: dropped
                 "0009_c2s1_000300_00.JPG"]:  # upper-case suffix still an image
        write_image(root / "bounding_box_test" / name)
    return root


def make_msmt(root: Path, train_dir: str = "train", test_dir: str = "test") -> Path:
    """A tiny MSMT17 tree: pids start at 0 in both train and test lists."""
    lists = {
        "list_train.txt": [("0000/0000_000_01_0303morning_0015_0.jpg", 0),
                           ("0001/0001_003_07_0303morning_0034_1.jpg", 1)],
        "list_val.txt": [("0001/0001_004_12_0303noon_0100_0.jpg", 1)],
        "list_query.txt": [("0000/0000_010_05_0303afternoon_0200_0.jpg", 0)],
        "list_gallery.txt": [("0000/0000_011_15_0303afternoon_0300_0.jpg", 0),
                             ("0003/0003_012_02_0303afternoon_0400_0.jpg", 3)],
    }
    for list_name, entries in lists.items():
        image_dir = train_dir if list_name in ("list_train.txt", "list_val.txt") else test_dir
        for relpath, _ in entries:
            write_image(root / image_dir / relpath)
        (root / list_name).write_text("".join(f"{p} {pid}\n" for p, pid in entries))
    return root


def make_identity_folders(root: Path, counts: dict[str, int], suffix: str = ".png") -> Path:
    for identity, count in counts.items():
        for index in range(count):
            write_image(root / identity / f"{identity}_c{index % 3 + 1}_{index:03d}{suffix}", index)
    return root


# --------------------------------------------------------------------------- images


def test_check_image_reports_each_kind_of_bad_file(tmp_path):
    good = write_image(tmp_path / "good.jpg")
    truncated = write_truncated_jpeg(tmp_path / "truncated.jpg")
    text = tmp_path / "page.jpg"
    text.write_text("<html>404 not found</html>")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")

    assert check_image(good) is None
    assert "truncated" in check_image(truncated)
    assert "cannot identify image file" in check_image(text)
    assert check_image(empty) == "empty file (0 bytes)"
    assert check_image(tmp_path / "absent.jpg") == "missing: no such file"
    assert check_image(tmp_path) == "not a regular file"


def test_image_suffixes_are_matched_case_insensitively():
    assert {".jpg", ".png", ".pgm", ".webp"} <= IMAGE_SUFFIXES
    assert is_image_file("a/B.JPG") and is_image_file("x.Tiff")
    assert not is_image_file("Thumbs.db") and not is_image_file("list_train.txt")


# --------------------------------------------------------------------------- market / duke


def test_market_rules_splits_junk_and_distractors(tmp_path):
    result = index_dataset(make_market(tmp_path), "market1501")
    frame = result.frame

    assert list(frame.columns) == DATASET_COLUMNS
    assert str(frame["pid"].dtype) == "int64" and str(frame["camid"].dtype) == "int64"
    assert (frame["sample_id"] == frame["path"]).all()
    # Sorted by split (train, query, gallery) then sample_id.
    assert list(frame["split"]) == ["train"] * 3 + ["query"] * 2 + ["gallery"] * 4
    for split in ("train", "query", "gallery"):
        ids = list(frame.loc[frame["split"] == split, "sample_id"])
        assert ids == sorted(ids)

    by_id = frame.set_index("sample_id")
    assert by_id.loc["bounding_box_train/0007_c3s3_015162_04.jpg", ["pid", "camid"]].tolist() == [7, 3]
    assert by_id.loc["query/0007_c6s3_015000_00.jpg", "camid"] == 6  # 1-based, as in the name
    assert by_id.loc["bounding_box_test/0009_c2s1_000300_00.JPG", "pid"] == 9
    # pid 0 only in the gallery; pid -1 nowhere.
    assert set(frame.loc[frame["pid"] == 0, "split"]) == {"gallery"}
    assert -1 not in set(frame["pid"])
    assert result.unparsed == ["bounding_box_train/readme.jpg"]
    assert result.bad_images == []
    joined = " ".join(result.warnings)
    assert "1 junk" in joined and "1 distractor" in joined and "Thumbs.db" in joined


def test_market_tree_nested_one_level_is_found(tmp_path):
    make_market(tmp_path / "Market-1501-v15.09.15")
    frame = index_dataset(tmp_path, "market1501").frame
    assert len(frame) == 9
    assert frame["path"].str.startswith("Market-1501-v15.09.15/").all()
    assert "Market-1501-v15.09.15/query/0002_c5s1_000401_00.jpg" in set(frame["sample_id"])


def test_dukemtmc_uses_the_same_rules_with_eight_cameras(tmp_path):
    root = tmp_path / "DukeMTMC-reID"
    write_image(root / "bounding_box_train" / "0001_c2_f0046182.jpg")
    write_image(root / "query" / "0005_c8_f0045000.jpg")
    write_image(root / "bounding_box_test" / "0005_c7_f0040000.jpg")
    write_image(root / "bounding_box_test" / "0000_c1_f0010000.jpg")
    frame = index_dataset(root, "dukemtmc").frame
    assert frame[["pid", "camid", "split"]].values.tolist() == [
        [1, 2, "train"], [5, 8, "query"], [0, 1, "gallery"], [5, 7, "gallery"]]


def test_missing_split_folders_names_expected_and_found_and_suggests_folders(tmp_path):
    make_identity_folders(tmp_path, {"alice": 2, "bob": 2})
    (tmp_path / "query").mkdir()
    with pytest.raises(MissingSplitFoldersError) as caught:
        index_dataset(tmp_path, "market1501")
    message = str(caught.value)
    assert str(tmp_path) in message
    assert "bounding_box_train, query, bounding_box_test" in message
    assert "found query;" in message
    assert "--layout folders" in message


def test_missing_split_folders_without_identity_hint(tmp_path):
    write_image(tmp_path / "images" / "deep" / "a.jpg")
    with pytest.raises(MissingSplitFoldersError) as caught:
        index_dataset(tmp_path, "dukemtmc")
    assert "found none of them" in str(caught.value)
    assert "--layout folders" not in str(caught.value)


def test_root_errors_missing_file_and_empty(tmp_path):
    with pytest.raises(DatasetRootError, match="does not exist"):
        index_dataset(tmp_path / "nope", "market1501")
    a_file = tmp_path / "market.zip"
    a_file.write_bytes(b"PK")
    with pytest.raises(DatasetRootError, match="not a directory"):
        index_dataset(a_file, "market1501")
    empty = tmp_path / "empty"
    (empty / "notes").mkdir(parents=True)
    (empty / "notes" / "readme.txt").write_text("no images here")
    for layout in ("market1501", "msmt17", "folders"):
        with pytest.raises(DatasetRootError, match="no images"):
            index_dataset(empty, layout)
    # Split folders present but empty also means no images.
    for folder in ("bounding_box_train", "query", "bounding_box_test"):
        (tmp_path / "market" / folder).mkdir(parents=True)
    with pytest.raises(DatasetRootError, match="no images"):
        index_dataset(tmp_path / "market", "market1501")


def test_strict_raises_with_count_and_first_five(tmp_path):
    make_market(tmp_path)
    for index in range(6):
        write_image(tmp_path / "query" / f"crop_{index}.png")
    with pytest.raises(UnparsedNamesError) as caught:
        index_dataset(tmp_path, "market1501", strict=True)
    message = str(caught.value)
    assert "7 image name(s)" in message and "(+2 more)" in message and "--strict" in message
    assert len(caught.value.unparsed) == 7
    # Without strict the same names are only listed.
    assert len(index_dataset(tmp_path, "market1501").unparsed) == 7


# --------------------------------------------------------------------------- verify


def test_verify_raises_on_truncated_and_fake_images(tmp_path):
    make_market(tmp_path)
    write_truncated_jpeg(tmp_path / "bounding_box_test" / "0011_c1s1_000001_00.jpg")
    (tmp_path / "query" / "0011_c2s1_000002_00.jpg").write_text("not a jpeg")

    # Names alone are fine, so without verify both are indexed.
    assert len(index_dataset(tmp_path, "market1501").frame) == 11
    with pytest.raises(UnreadableImageError) as caught:
        index_dataset(tmp_path, "market1501", verify=True)
    message = str(caught.value)
    assert "2 image(s)" in message and "--skip-bad" in message
    assert {path for path, _ in caught.value.bad_images} == {
        "bounding_box_test/0011_c1s1_000001_00.jpg", "query/0011_c2s1_000002_00.jpg"}


def test_verify_with_skip_bad_drops_and_lists_reasons(tmp_path):
    make_market(tmp_path)
    write_truncated_jpeg(tmp_path / "bounding_box_test" / "0011_c1s1_000001_00.jpg")
    (tmp_path / "query" / "0011_c2s1_000002_00.jpg").write_text("not a jpeg")
    result = index_dataset(tmp_path, "market1501", verify=True, skip_bad=True)
    reasons = dict(result.bad_images)
    assert "truncated" in reasons["bounding_box_test/0011_c1s1_000001_00.jpg"]
    assert "cannot identify" in reasons["query/0011_c2s1_000002_00.jpg"]
    assert len(result.frame) == 9
    assert not set(reasons) & set(result.frame["sample_id"])
    assert any("2 missing/unreadable" in warning for warning in result.warnings)


# --------------------------------------------------------------------------- msmt17


def test_msmt17_lists_cameras_and_disjoint_positive_pids(tmp_path):
    frame = index_dataset(make_msmt(tmp_path), "msmt17").frame
    assert list(frame.columns) == DATASET_COLUMNS + ["identity"]
    by_id = frame.set_index("sample_id")
    assert by_id.loc["train/0000/0000_000_01_0303morning_0015_0.jpg", ["pid", "camid", "split"]].tolist() == [1, 1, "train"]
    # list_val joins train, same identity numbering as list_train.
    assert by_id.loc["train/0001/0001_004_12_0303noon_0100_0.jpg", ["pid", "camid", "split"]].tolist() == [2, 12, "train"]
    # Test pid 0 is a real person: shifted past the train pids, never 0.
    assert by_id.loc["test/0000/0000_010_05_0303afternoon_0200_0.jpg", ["pid", "camid", "split", "identity"]].tolist() == [3, 5, "query", "test/0"]
    assert by_id.loc["test/0003/0003_012_02_0303afternoon_0400_0.jpg", "pid"] == 6
    assert (frame["pid"] > 0).all()
    assert not set(frame.loc[frame["split"] == "train", "pid"]) & set(frame.loc[frame["split"] != "train", "pid"])
    assert frame["split"].value_counts().to_dict() == {"train": 3, "gallery": 2, "query": 1}


def test_msmt17_v2_folders_nested_under_root(tmp_path):
    make_msmt(tmp_path / "MSMT17_V2", "mask_train_v2", "mask_test_v2")
    frame = index_dataset(tmp_path, "msmt17").frame
    assert len(frame) == 6
    assert frame.loc[frame["split"] == "train", "path"].str.startswith("MSMT17_V2/mask_train_v2/").all()
    assert frame.loc[frame["split"] != "train", "path"].str.startswith("MSMT17_V2/mask_test_v2/").all()


def test_msmt17_missing_list_files(tmp_path):
    make_msmt(tmp_path)
    (tmp_path / "list_gallery.txt").unlink()
    with pytest.raises(MissingListFilesError, match="list_gallery.txt"):
        index_dataset(tmp_path, "msmt17")
    for name in ("list_train.txt", "list_val.txt", "list_query.txt"):
        (tmp_path / name).unlink()
    with pytest.raises(MissingListFilesError) as caught:
        index_dataset(tmp_path, "msmt17")
    assert "list_train.txt, list_val.txt, list_query.txt, list_gallery.txt" in str(caught.value)


def test_msmt17_bad_lines_duplicates_and_missing_images(tmp_path):
    make_msmt(tmp_path)
    query_list = tmp_path / "list_query.txt"
    original = query_list.read_text()

    query_list.write_text(original + "0004/0004_001_03_x.jpg four\n")
    with pytest.raises(DatasetLayoutError, match=r"list_query.txt, line 2"):
        index_dataset(tmp_path, "msmt17")

    query_list.write_text(original + original)
    with pytest.raises(DuplicateSampleIdError, match=r"list_query.txt:1, list_query.txt:2"):
        index_dataset(tmp_path, "msmt17")

    query_list.write_text(original + "0004/0004_001_03_0303noon_0001_0.jpg 4\nbadname.jpg 4\n")
    with pytest.raises(UnreadableImageError, match="listed in list_query.txt line 2"):
        index_dataset(tmp_path, "msmt17")
    result = index_dataset(tmp_path, "msmt17", skip_bad=True)
    assert [path for path, _ in result.bad_images] == ["test/0004/0004_001_03_0303noon_0001_0.jpg"]
    assert result.unparsed == ["test/badname.jpg"]  # no third "_" field: no camera
    assert len(result.frame) == 6


# --------------------------------------------------------------------------- folders


def test_folders_natural_pid_order_identity_and_unknown_camera(tmp_path):
    make_identity_folders(tmp_path, {"s10": 2, "s2": 1, "s1": 3})
    (tmp_path / ".cache").mkdir()
    write_image(tmp_path / ".cache" / "thumb.png")      # hidden: ignored
    write_image(tmp_path / "s1" / "extra" / "far.png")   # nested: still identity s1
    (tmp_path / "s3").mkdir()                            # empty folder: no pid
    write_image(tmp_path / "loose.png")                  # no identity folder

    result = index_dataset(tmp_path, "folders")
    frame = result.frame
    assert list(frame.columns) == DATASET_COLUMNS + ["identity"]
    assert frame.groupby("identity")["pid"].first().to_dict() == {"s1": 1, "s2": 2, "s10": 3}
    assert (frame["camid"] == -1).all() and (frame["split"] == "train").all()
    assert "s1/extra/far.png" in set(frame["sample_id"])
    assert len(frame) == 7
    assert result.unparsed == ["loose.png"]
    assert any("s3" in warning for warning in result.warnings)


def test_folders_camera_regex_and_unmatched_names(tmp_path):
    make_identity_folders(tmp_path, {"a": 3, "b": 3})
    write_image(tmp_path / "b" / "nocam.png")
    result = index_dataset(tmp_path, "folders", camera_regex=r"_c(\d+)_")
    assert sorted(result.frame["camid"].unique().tolist()) == [1, 2, 3]
    assert result.unparsed == ["b/nocam.png"]
    with pytest.raises(UnparsedNamesError, match="b/nocam.png"):
        index_dataset(tmp_path, "folders", camera_regex=r"_c(\d+)_", strict=True)
    with pytest.raises(DatasetLayoutError, match="exactly one"):
        index_dataset(tmp_path, "folders", camera_regex=r"_c\d+_")
    with pytest.raises(DatasetLayoutError, match="not a valid regular expression"):
        index_dataset(tmp_path, "folders", camera_regex=r"_c(\d+")


def test_folders_split_identities_is_disjoint_and_deterministic(tmp_path):
    make_identity_folders(tmp_path, {f"id{i:02d}": 4 for i in range(20)} | {"solo": 1})
    first = index_dataset(tmp_path, "folders", split_identities=0.25, seed=3)
    again = index_dataset(tmp_path, "folders", split_identities=0.25, seed=3)
    other = index_dataset(tmp_path, "folders", split_identities=0.25, seed=4)
    frame = first.frame
    assert frame.equals(again.frame)
    def test_ids(result):
        return set(result.frame.loc[result.frame["split"] != "train", "sample_id"])

    assert test_ids(first) != test_ids(other)

    train_ids = set(frame.loc[frame["split"] == "train", "pid"])
    test_frame = frame[frame["split"] != "train"]
    assert not train_ids & set(test_frame["pid"])
    assert test_frame["pid"].nunique() == round(0.25 * 21)
    queries = test_frame[test_frame["split"] == "query"]
    assert queries["pid"].is_unique
    for pid, group in test_frame.groupby("pid"):
        size = len(frame[frame["pid"] == pid])
        assert (group["split"] == "query").sum() == (1 if size > 1 else 0)
        assert (group["split"] == "gallery").sum() == size - (1 if size > 1 else 0)


def test_folders_single_image_test_identity_stays_in_gallery_with_warning(tmp_path):
    make_identity_folders(tmp_path, {"one": 1, "two": 1})
    result = index_dataset(tmp_path, "folders", split_identities=0.5, seed=0)
    assert sorted(result.frame["split"]) == ["gallery", "train"]
    assert any("single image" in warning for warning in result.warnings)


def test_folders_symlink_loop_terminates(tmp_path):
    make_identity_folders(tmp_path, {"a": 2})
    try:
        os.symlink(tmp_path / "a", tmp_path / "a" / "again", target_is_directory=True)
    except OSError:
        pytest.skip("symlinks not supported here")
    frame = index_dataset(tmp_path, "folders").frame
    assert len(frame) == 2


def test_argument_errors(tmp_path):
    make_identity_folders(tmp_path, {"a": 2, "b": 2})
    with pytest.raises(DatasetLayoutError, match="unknown layout 'market'"):
        index_dataset(tmp_path, "market")
    with pytest.raises(DatasetLayoutError, match="--layout folders only"):
        index_dataset(tmp_path, "market1501", split_identities=0.5)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(DatasetLayoutError, match="strictly between 0 and 1"):
            index_dataset(tmp_path, "folders", split_identities=bad)


# --------------------------------------------------------------------------- folders with split folders


def make_split_folders(root: Path, parts: dict[str, dict[str, list[int]]]) -> Path:
    """``root/<part>/<identity>/<identity>_c<cam>_<n>.png`` for each camera number listed per identity."""
    for part, identities in parts.items():
        for identity, cameras in identities.items():
            for index, camera in enumerate(cameras):
                write_image(root / part / identity / f"{identity}_c{camera}_{index:03d}.png", index)
    return root


def test_folders_train_test_splits_test_identities_by_camera(tmp_path):
    make_split_folders(tmp_path, {
        "train": {"alice": [1, 2], "bob": [1, 1, 2]},
        "test": {"bob": [3, 3],                      # also a train identity: same pid, and a warning
                 "carol": [1, 1, 2, 2, 3],           # three cameras: one query each
                 "dave": [2],                        # a single image: gallery only
                 "erin": [4, 4, 4]},                 # one camera only: no cross-camera match, gallery only
    })
    result = index_dataset(tmp_path, "folders", camera_regex=r"_c(\d+)_", seed=1)
    frame = result.frame
    assert result.structure == "train_test"
    assert "train_test" in result.describe_structure() and "ROOT/test/<identity>" in result.describe_structure()
    assert set(frame["identity"]) == {"alice", "bob", "carol", "dave", "erin"}  # no identity named train/test
    assert frame.groupby("identity")["pid"].nunique().eq(1).all()  # one pid per name across train and test
    assert frame.groupby("identity")["pid"].first().to_dict() == {"alice": 1, "bob": 2, "carol": 3, "dave": 4,
                                                                   "erin": 5}
    assert set(frame.loc[frame["path"].str.startswith("train/"), "split"]) == {"train"}
    test = frame[frame["path"].str.startswith("test/")]
    assert set(test["split"]) <= {"query", "gallery"}
    queries = test[test["split"] == "query"]
    assert queries.groupby("identity")["camid"].apply(sorted).to_dict() == {"carol": [1, 2, 3]}
    # Every query keeps a gallery image of its identity from another camera (or an unknown one).
    gallery = test[test["split"] == "gallery"]
    for query in queries.itertuples():
        matches = gallery[(gallery["pid"] == query.pid) & (gallery["camid"] != query.camid)]
        assert len(matches), query.sample_id
    assert set(test.loc[test["identity"].isin(["bob", "dave", "erin"]), "split"]) == {"gallery"}
    joined = " ".join(result.warnings)
    assert "1 test identit(ies) have a single image" in joined and "dave" in joined
    assert "2 test identit(ies) were seen by one camera only" in joined and "bob, erin" in joined
    assert "both train and test" in joined and "bob" in joined

    assert frame.equals(index_dataset(tmp_path, "folders", camera_regex=r"_c(\d+)_", seed=1).frame)
    def query_ids(seed):
        drawn = index_dataset(tmp_path, "folders", camera_regex=r"_c(\d+)_", seed=seed).frame
        return tuple(drawn.loc[drawn["split"] == "query", "sample_id"])

    draws = {query_ids(seed) for seed in range(8)}
    assert len(draws) > 1  # the seed picks which image of a camera is the query


def test_folders_train_test_without_cameras_takes_one_query_per_identity(tmp_path):
    make_split_folders(tmp_path, {"train": {"a": [1, 2], "b": [1, 2]},
                                  "test": {"c": [1, 2, 3], "d": [1, 1], "e": [5]}})
    frame = index_dataset(tmp_path, "folders").frame
    test = frame[frame["split"] != "train"]
    assert test.groupby("identity")["split"].apply(lambda s: int((s == "query").sum())).to_dict() == {
        "c": 1, "d": 1, "e": 0}
    assert (frame["camid"] == -1).all()


def test_folders_train_query_gallery_keeps_the_given_splits(tmp_path):
    make_split_folders(tmp_path, {"Train": {"p1": [1, 2], "p2": [1]},
                                  "query": {"p10": [1], "p11": [2]},
                                  "gallery": {"p10": [2, 3], "p11": [1], "p12": [4]}})
    result = index_dataset(tmp_path, "folders")
    frame = result.frame
    assert result.structure == "train_query_gallery"
    by_part = frame.assign(part=frame["path"].str.split("/").str[0]).groupby("part")["split"].unique()
    assert {part: list(splits) for part, splits in by_part.items()} == {
        "Train": ["train"], "query": ["query"], "gallery": ["gallery"]}
    assert frame.groupby("identity")["pid"].first().to_dict() == {"p1": 1, "p2": 2, "p10": 3, "p11": 4, "p12": 5}
    assert frame.loc[frame["identity"] == "p10", "pid"].nunique() == 1

    evaluation_only = tmp_path / "eval"
    make_split_folders(evaluation_only, {"query": {"x": [1]}, "gallery": {"x": [2], "y": [1]}, "notes": {}})
    (evaluation_only / "notes").mkdir()  # a folder without images next to the splits is ignored
    result = index_dataset(evaluation_only, "folders")
    assert result.structure == "query_gallery" and set(result.frame["split"]) == {"query", "gallery"}


def test_folders_train_folder_alone_is_the_identities_folder(tmp_path):
    make_split_folders(tmp_path, {"train": {f"id{i}": [1, 2, 3] for i in range(6)}})
    result = index_dataset(tmp_path, "folders", split_identities=0.5, seed=0)
    assert result.structure == "train"
    assert (result.frame["path"].str.startswith("train/")).all()
    assert result.frame.groupby("split")["identity"].nunique().to_dict() == {"train": 3, "query": 3, "gallery": 3}
    assert index_dataset(tmp_path / "train", "folders").structure == "identities"


@pytest.mark.parametrize(
    ("parts", "hint"),
    [
        ({"test": {"a": [1, 2]}}, "A test/ folder alone has no train identities"),
        ({"train": {"a": [1, 2]}, "val": {"b": [1, 2]}}, "Merge the validation identities into train/"),
        ({"training": {"a": [1, 2]}, "testing": {"b": [1, 2]}}, "Rename training/ to train/"),
        ({"train": {"a": [1, 2]}, "test": {"b": [1, 2]}, "query": {"b": [3]}}, "Rearrange the folders"),
        ({"bounding_box_train": {"a": [1]}, "bounding_box_test": {"b": [1]}}, "use --layout market1501"),
    ],
)
def test_folders_refuses_split_folders_it_does_not_understand(tmp_path, parts, hint):
    make_split_folders(tmp_path, parts)
    with pytest.raises(DatasetLayoutError) as caught:
        index_dataset(tmp_path, "folders")
    message = str(caught.value)
    assert str(tmp_path) in message and "does not understand" in message and hint in message


def test_folders_refuses_split_folders_next_to_identity_folders(tmp_path):
    make_identity_folders(tmp_path, {"alice": 2, "bob": 2})
    make_split_folders(tmp_path, {"test": {"carol": [1, 2]}})
    with pytest.raises(DatasetLayoutError, match=r"mixes split folder\(s\) test/ with 2 other image folder\(s\) "
                                                 r"\(alice, bob\).*ROOT/train/<identity>/"):
        index_dataset(tmp_path, "folders")


def test_folders_split_identities_is_refused_when_test_folders_exist(tmp_path):
    make_split_folders(tmp_path, {"train": {"a": [1, 2]}, "test": {"b": [1, 2]}})
    with pytest.raises(DatasetLayoutError, match="already has them .*train_test.*Drop --split-identities"):
        index_dataset(tmp_path, "folders", split_identities=0.5)


def test_other_layouts_report_no_folders_structure(tmp_path):
    assert index_dataset(make_market(tmp_path), "market1501").structure is None


@pytest.mark.parametrize("seed", range(20))
def test_choose_queries_one_per_camera_and_each_keeps_a_cross_camera_match(seed):
    rng = np.random.default_rng(seed)
    cameras = rng.integers(1, 4, size=int(rng.integers(1, 7))).tolist()
    if seed % 5 == 0:
        cameras = [-1] * len(cameras)
    images = [(f"img{index}", camid) for index, camid in enumerate(cameras)]
    queries = choose_queries(images, np.random.default_rng(0))
    camid_of = dict(images)
    query_cameras = [camid_of[path] for path in queries]
    assert len(set(query_cameras)) == len(query_cameras)  # at most one per camera
    gallery = [camid for path, camid in images if path not in queries]
    for camid in query_cameras:
        assert any(camid == -1 or other != camid for other in gallery)
    # Maximal: no left-out camera could have had a query too (brute force over the gallery's cameras).
    for camid in set(gallery) - set(query_cameras):
        left = list(gallery)
        left.remove(camid)
        assert not all(any(q == -1 or other != q for other in left) for q in [*query_cameras, camid])


def test_cli_data_index_prints_and_records_the_folders_structure(tmp_path):
    from typer.testing import CliRunner

    from fat_distill.cli import app
    from fat_distill.manifests import read_manifest

    make_split_folders(tmp_path / "faces", {"train": {"a": [1, 2]}, "test": {"b": [1, 2], "c": [1, 2]}})
    out = tmp_path / "faces.parquet"
    result = CliRunner().invoke(app, ["data", "index", str(tmp_path / "faces"), "--layout", "folders",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "detected folders structure 'train_test'" in result.output
    meta = read_manifest(out).attrs["manifest"]
    assert meta.extra["folders_structure"] == "train_test" and meta.extra["layout"] == "folders"

    make_split_folders(tmp_path / "bad", {"train": {"a": [1, 2]}, "val": {"b": [1, 2]}})
    refused = CliRunner().invoke(app, ["data", "index", str(tmp_path / "bad"), "--layout", "folders",
                                       "--out", str(tmp_path / "bad.parquet")])
    assert refused.exit_code == 2 and "does not understand" in refused.output
    assert not (tmp_path / "bad.parquet").exists()


# --------------------------------------------------------------------------- real data


def test_orl_faces_folders_layout():
    if not ORL_ROOT.is_dir():
        pytest.skip(f"ORL faces not found at {ORL_ROOT}")
    result = index_dataset(ORL_ROOT, "folders", split_identities=0.25, seed=0, verify=True)
    frame = result.frame
    assert len(frame) == 400 and frame["pid"].nunique() == 40
    assert result.unparsed == [] and result.bad_images == []
    # Natural order: folder sK gets pid K.
    assert (frame["identity"] == "s" + frame["pid"].astype(str)).all()
    assert frame["split"].value_counts().to_dict() == {"train": 300, "gallery": 90, "query": 10}
    assert frame["path"].str.endswith(".pgm").all()
