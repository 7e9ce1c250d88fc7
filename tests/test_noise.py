"""Label-noise injection: realised rates, ground truth and the kinds' invariants."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from fat_distill.data.noise import (
    CORRUPTION_KINDS,
    NOISE_KINDS,
    corrupt_labels,
    noise_summary,
    pair_partners,
)

BASE_COLUMNS = ["sample_id", "path", "pid", "camid", "split"]
RATES = (0.0, 0.2, 0.4, 0.9)
EPS = 1e-9


def make_frame(sizes: list[int], *, train_distractors: int = 0) -> pd.DataFrame:
    """Train identities 1..len(sizes) with the given image counts, plus query/gallery rows."""
    rows = []
    for pid, size in enumerate(sizes, start=1):
        for j in range(size):
            rel = f"train/{pid:04d}_c{j % 3}_{j:03d}.png"
            rows.append((rel, rel, pid, j % 3, "train"))
    for j in range(train_distractors):
        rel = f"train/0000_c0_{j:03d}.png"
        rows.append((rel, rel, 0, 0, "train"))
    for j in range(6):
        rel = f"query/{500 + j:04d}_c0.png"
        rows.append((rel, rel, 500 + j, 0, "query"))
        rel = f"gallery/{500 + j:04d}_c1.png"
        rows.append((rel, rel, 500 + j, 1, "gallery"))
        rel = f"gallery/0000_c{j % 2}_{j}.png"  # distractors live in the gallery
        rows.append((rel, rel, 0, j % 2, "gallery"))
    frame = pd.DataFrame(rows, columns=BASE_COLUMNS)
    return frame.astype({"pid": "int64", "camid": "int64"})


SIZES = [7, 3, 12, 1, 5, 9, 2, 6, 10, 4, 8, 5, 3, 11, 6, 2, 7, 9, 4, 6]


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return make_frame(SIZES, train_distractors=2)


def train_rows(out: pd.DataFrame) -> pd.DataFrame:
    return out[(out["split"] == "train") & (out["true_pid"] != 0)]


def check_rate_bounds(out: pd.DataFrame, rate: float, kind: str) -> None:
    """The documented realised-rate guarantees of each kind."""
    train = train_rows(out)
    noisy = train["noise_kind"] != "clean"
    n_ids = train["true_pid"].nunique()
    expected = rate * len(train)
    assert abs(noisy.sum() - expected) <= n_ids
    assert abs(noisy.sum() - expected) <= 0.5 + EPS  # the nearest integer
    if kind in ("flip", "pair", "multi"):
        group = train["true_pid"]  # per true identity (multi: its originals + duplicates)
    elif kind == "outlier":
        group = train["pid"]  # held-out identities are all-noisy; the bound holds per given label
    else:
        counts = train.loc[noisy, "noise_kind"].value_counts()
        assert counts.max() - counts.min() <= 1 if len(counts) else True
        return
    per_group = noisy.groupby(group).agg(["sum", "size"])
    assert (abs(per_group["sum"] - rate * per_group["size"]) <= 1 + EPS).all(), per_group


# --------------------------------------------------------------------------- every kind


@pytest.mark.parametrize("kind", CORRUPTION_KINDS)
@pytest.mark.parametrize("rate", RATES)
def test_realised_rate_is_within_bounds(frame: pd.DataFrame, kind: str, rate: float) -> None:
    out = corrupt_labels(frame, rate=rate, kind=kind, seed=3)
    check_rate_bounds(out, rate, kind)
    if rate == 0:
        assert (out["noise_kind"] == "clean").all()
        pd.testing.assert_frame_equal(out[BASE_COLUMNS], frame[BASE_COLUMNS])


@pytest.mark.parametrize("kind", CORRUPTION_KINDS)
def test_only_train_rows_change_and_truth_is_kept(frame: pd.DataFrame, kind: str) -> None:
    out = corrupt_labels(frame, rate=0.4, kind=kind, seed=5)
    for split in ("query", "gallery"):
        before = frame[frame["split"] == split].reset_index(drop=True)
        after = out[out["split"] == split].reset_index(drop=True)
        pd.testing.assert_frame_equal(after[BASE_COLUMNS], before)
        assert (after["true_pid"] == after["pid"]).all()
        assert (after["noise_kind"] == "clean").all()
    assert out["pid"].dtype == np.int64 and out["true_pid"].dtype == np.int64
    assert out["sample_id"].is_unique
    # true_pid is the original label of the image, for originals and duplicates alike
    original_pid = dict(zip(frame["path"], frame["pid"]))
    assert (out["true_pid"] == out["path"].map(original_pid)).all()
    # clean rows are exactly as given, noisy rows always carry a wrong label
    clean = out["noise_kind"] == "clean"
    assert (out.loc[clean, "pid"] == out.loc[clean, "true_pid"]).all()
    assert (out.loc[~clean, "pid"] != out.loc[~clean, "true_pid"]).all()
    assert set(out["noise_kind"]) <= {"clean", *NOISE_KINDS}
    # train distractors are never touched
    distractors = out[(out["split"] == "train") & (out["true_pid"] == 0)]
    assert len(distractors) == 2 and (distractors["pid"] == 0).all() and (distractors["noise_kind"] == "clean").all()


@pytest.mark.parametrize("kind", CORRUPTION_KINDS)
def test_deterministic_per_seed(frame: pd.DataFrame, kind: str) -> None:
    first = corrupt_labels(frame, rate=0.4, kind=kind, seed=11)
    pd.testing.assert_frame_equal(first, corrupt_labels(frame, rate=0.4, kind=kind, seed=11))
    other = corrupt_labels(frame, rate=0.4, kind=kind, seed=12)
    assert not first.equals(other)


def test_input_frame_is_not_modified(frame: pd.DataFrame) -> None:
    snapshot = frame.copy()
    corrupt_labels(frame, rate=0.4, kind="mix", mix_kinds=NOISE_KINDS, seed=0)
    pd.testing.assert_frame_equal(frame, snapshot)


# --------------------------------------------------------------------------- per kind


def test_flip_gives_a_wrong_training_identity(frame: pd.DataFrame) -> None:
    out = corrupt_labels(frame, rate=0.9, kind="flip", seed=0)
    flipped = out[out["noise_kind"] == "flip"]
    assert len(flipped) > 0
    assert (flipped["pid"] != flipped["true_pid"]).all()
    assert set(flipped["pid"]) <= set(range(1, len(SIZES) + 1))
    # uniform over wrong labels: with ~100 flips, most identities are hit
    assert flipped["pid"].nunique() >= len(SIZES) // 2


def test_pair_labels_are_the_partner_of_the_true_identity(frame: pd.DataFrame) -> None:
    partners = pair_partners(frame, seed=4)
    assert sorted(partners) == list(range(1, len(SIZES) + 1))
    assert all(partners[pid] != pid for pid in partners)
    out = corrupt_labels(frame, rate=0.4, kind="pair", seed=4)
    paired = out[out["noise_kind"] == "pair"]
    assert len(paired) > 0
    assert (paired["pid"] == paired["true_pid"].map(partners)).all()


def test_pair_derangement_swaps_two_identities() -> None:
    assert pair_partners(make_frame([3, 4]), seed=9) == {1: 2, 2: 1}


def test_pair_accepts_an_explicit_mapping(frame: pd.DataFrame) -> None:
    n = len(SIZES)
    mapping = {pid: pid % n + 1 for pid in range(1, n + 1)}
    out = corrupt_labels(frame, rate=0.4, kind="pair", pairing=mapping, seed=0)
    paired = out[out["noise_kind"] == "pair"]
    assert (paired["pid"] == paired["true_pid"].map(mapping)).all()


def write_lookalike_images(root, sizes: list[int]) -> pd.DataFrame:
    """Identities 1&2 reddish, 3&4 greenish, 5&6 bluish (with per-image jitter)."""
    base = {1: (200, 30, 30), 2: (190, 40, 35), 3: (30, 200, 30), 4: (40, 190, 45), 5: (30, 30, 200), 6: (35, 45, 185)}
    frame = make_frame(sizes)
    rng = np.random.default_rng(0)
    for rel, pid in zip(frame["path"], frame["pid"]):
        colour = np.array(base.get(int(pid), (128, 128, 128)), dtype=float)
        pixels = np.clip(colour + rng.normal(0, 10, size=(32, 16, 3)), 0, 255).astype(np.uint8)
        file = root / rel
        file.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(file)
    return frame


def test_pair_with_images_pairs_lookalikes(tmp_path) -> None:
    frame = write_lookalike_images(tmp_path, [4, 3, 5, 4, 3, 4])
    partners = pair_partners(frame, image_root=tmp_path)
    assert partners == {1: 2, 2: 1, 3: 4, 4: 3, 5: 6, 6: 5}
    out = corrupt_labels(frame, rate=0.4, kind="pair", image_root=tmp_path, seed=1)
    paired = out[out["noise_kind"] == "pair"]
    assert len(paired) == round(0.4 * 23)
    assert (paired["pid"] == paired["true_pid"].map(partners)).all()


def test_pair_with_a_missing_image_names_it(tmp_path) -> None:
    frame = write_lookalike_images(tmp_path, [2, 2, 2])
    missing = tmp_path / frame["path"].iloc[1]
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=frame["sample_id"].iloc[1]):
        corrupt_labels(frame, rate=0.5, kind="pair", image_root=tmp_path)


@pytest.mark.parametrize("rate", [0.2, 0.4, 0.9])
def test_outliers_come_from_held_out_identities(frame: pd.DataFrame, rate: float) -> None:
    out = corrupt_labels(frame, rate=rate, kind="outlier", seed=2)
    train = train_rows(out)
    outliers = train[train["noise_kind"] == "outlier"]
    kept = train[train["noise_kind"] == "clean"]
    original_train = frame[(frame["split"] == "train") & (frame["pid"] != 0)]
    held_out = set(original_train["pid"]) - set(kept["true_pid"])
    assert set(outliers["true_pid"]) <= held_out
    # outlier labels are kept identities; held-out pids are no train row's label any more
    assert set(outliers["pid"]) <= set(kept["pid"])
    assert not held_out & set(train["pid"])
    # surplus images of held-out identities were dropped (whole identities may go), nothing else was
    n_held_rows = int(original_train["pid"].isin(held_out).sum())
    assert len(train) == len(original_train) - n_held_rows + len(outliers)
    assert len(outliers) <= n_held_rows
    assert set(train["sample_id"]) <= set(original_train["sample_id"])


@pytest.mark.parametrize("rate", [0.2, 0.4, 0.9])
def test_multi_duplicates_an_image_under_another_identity(frame: pd.DataFrame, rate: float) -> None:
    out = corrupt_labels(frame, rate=rate, kind="multi", seed=6)
    dups = out[out["noise_kind"] == "multi"]
    assert len(dups) > 0 and out["sample_id"].is_unique
    originals = frame.set_index("sample_id")
    source_id = dups["sample_id"].str.replace(r"#multi\d+$", "", regex=True)
    assert dups["sample_id"].str.fullmatch(r".+#multi\d+").all()
    assert (dups["path"].to_numpy() == originals.loc[source_id, "path"].to_numpy()).all()
    assert (dups["true_pid"].to_numpy() == originals.loc[source_id, "pid"].to_numpy()).all()
    assert (dups["pid"] != dups["true_pid"]).all()
    # every original row stays, clean and unchanged
    kept = out[out["noise_kind"] != "multi"].reset_index(drop=True)
    pd.testing.assert_frame_equal(kept[BASE_COLUMNS], frame[BASE_COLUMNS])
    # an image duplicated several times carries distinct labels
    assert not dups.assign(src=source_id.to_numpy()).duplicated(["src", "pid"]).any()


def test_mix_splits_the_noise_equally_between_kinds(frame: pd.DataFrame) -> None:
    out = corrupt_labels(frame, rate=0.4, kind="mix", seed=0)
    counts = train_rows(out)["noise_kind"].value_counts()
    assert set(counts.index) == {"clean", "flip", "pair", "outlier"}
    per_kind = counts.drop("clean")
    assert per_kind.max() - per_kind.min() <= 1
    out4 = corrupt_labels(frame, rate=0.3, kind="mix", mix_kinds=("multi", "flip"), seed=0)
    per_kind4 = train_rows(out4)["noise_kind"].value_counts().drop("clean")
    assert set(per_kind4.index) == {"multi", "flip"} and per_kind4.max() - per_kind4.min() <= 1
    check_rate_bounds(out4, 0.3, "mix")


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 9), min_size=3, max_size=12),
    rate=st.floats(0.0, 0.6, exclude_max=True),
    kind=st.sampled_from(CORRUPTION_KINDS),
    seed=st.integers(0, 2**16),
)
def test_rate_bounds_property(sizes: list[int], rate: float, kind: str, seed: int) -> None:
    frame = make_frame(sizes)
    try:
        out = corrupt_labels(frame, rate=rate, kind=kind, seed=seed)
    except ValueError as error:  # only the documented "too high for this frame" refusals
        assert kind in ("outlier", "multi", "mix") and "rate" in str(error)
        return
    check_rate_bounds(out, rate, kind)


# --------------------------------------------------------------------------- summary


def test_noise_summary_counts_train_rows(frame: pd.DataFrame) -> None:
    out = corrupt_labels(frame, rate=0.4, kind="mix", mix_kinds=NOISE_KINDS, seed=0)
    summary = noise_summary(out)
    assert summary["noise_kind"].tolist() == ["clean", *NOISE_KINDS]
    train = out[out["split"] == "train"]
    expected = train["noise_kind"].value_counts()
    for kind, n, rate in summary.itertuples(index=False):
        assert n == expected.get(kind, 0)
        assert rate == pytest.approx(n / len(train))
    assert summary["rate"].sum() == pytest.approx(1.0)


def test_noise_summary_refuses_unknown_noise(frame: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="noise_kind"):
        noise_summary(frame)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan"), "0.2", True])
def test_rate_outside_range_is_refused(frame: pd.DataFrame, rate) -> None:
    with pytest.raises(ValueError, match=r"rate=.*\[0, 1\)"):
        corrupt_labels(frame, rate=rate, kind="flip")


def test_unknown_kind_lists_the_valid_kinds(frame: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="'bogus'.*'flip', 'pair', 'outlier', 'multi', 'mix'"):
        corrupt_labels(frame, rate=0.2, kind="bogus")
    with pytest.raises(ValueError, match="mix_kinds"):
        corrupt_labels(frame, rate=0.2, kind="mix", mix_kinds=("flip", "swap"))


def test_corrupting_twice_is_refused(frame: pd.DataFrame) -> None:
    once = corrupt_labels(frame, rate=0.2, kind="flip")
    with pytest.raises(ValueError, match="already contains .* noisy rows.*sample_id"):
        corrupt_labels(once, rate=0.2, kind="flip")
    relabelled = frame.assign(true_pid=frame["pid"])
    relabelled.loc[0, "pid"] = 2
    with pytest.raises(ValueError, match="pid differs from true_pid"):
        corrupt_labels(relabelled, rate=0.2, kind="flip")


def test_clean_frame_with_truth_columns_is_accepted(frame: pd.DataFrame) -> None:
    clean = corrupt_labels(frame, rate=0.0, kind="flip")
    out = corrupt_labels(clean, rate=0.2, kind="flip", seed=1)
    pd.testing.assert_frame_equal(out, corrupt_labels(frame, rate=0.2, kind="flip", seed=1))


def test_frames_without_enough_training_identities_are_refused(frame: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="no rows with split == 'train'"):
        corrupt_labels(frame[frame["split"] != "train"], rate=0.2, kind="flip")
    with pytest.raises(ValueError, match="at least 2 training identities"):
        corrupt_labels(make_frame([5]), rate=0.2, kind="flip")
    with pytest.raises(ValueError, match="missing columns \\['camid'\\]"):
        corrupt_labels(frame.drop(columns="camid"), rate=0.2, kind="flip")


def test_rates_too_high_for_the_frame_are_refused() -> None:
    small = make_frame([5, 5])
    with pytest.raises(ValueError, match="rate=0.9 is too high for outlier"):
        corrupt_labels(small, rate=0.9, kind="outlier")
    with pytest.raises(ValueError, match="multi noise at this rate needs 9 duplicates"):
        corrupt_labels(small, rate=0.9, kind="multi")


def test_bad_pairings_are_refused(frame: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="identity 1 is its own partner"):
        corrupt_labels(frame, rate=0.2, kind="pair", pairing={pid: pid for pid in range(1, 21)})
    with pytest.raises(ValueError, match="needs image_root"):
        corrupt_labels(frame, rate=0.2, kind="pair", pairing="mean_image")
    with pytest.raises(ValueError, match="no 'pair' noise"):
        corrupt_labels(frame, rate=0.2, kind="flip", pairing="derangement")
