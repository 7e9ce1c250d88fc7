"""`fat-distill data synth|index|corrupt` end to end on real files (synthetic and ORL faces)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fat_distill.cli import app
from fat_distill.manifests import read_manifest

runner = CliRunner()
ORL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "orl_faces"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "market"
    result = invoke("data", "synth", root, "--identities", 12, "--cameras", 3, "--images-per-identity", 4,
                    "--size", "64x32", "--distractors", 3, "--junk", 2, "--seed", 1)
    assert result.exit_code == 0, result.output
    return root


def test_synth_index_corrupt_inspect_diff(synth_root, tmp_path):
    clean = tmp_path / "clean.parquet"
    result = invoke("data", "index", synth_root, "--layout", "market1501", "--out", clean, "--verify")
    assert result.exit_code == 0, result.output
    frame = read_manifest(clean, "dataset")
    meta = frame.attrs["manifest"]
    assert meta.extra["dataset_root"] == str(synth_root.resolve()) and meta.stage == "data.index"
    assert set(frame["split"]) == {"train", "query", "gallery"}
    assert (frame.loc[frame["pid"] == 0, "split"] == "gallery").all()  # distractors in the gallery only
    assert not (frame["pid"] < 0).any()  # junk dropped
    train_ids = set(frame.loc[frame.split == "train", "pid"])
    test_ids = set(frame.loc[frame.split != "train", "pid"]) - {0}
    assert train_ids.isdisjoint(test_ids)

    noisy = tmp_path / "noisy.parquet"
    result = invoke("data", "corrupt", clean, "--rate", 0.25, "--kind", "flip", "--seed", 0, "--out", noisy)
    assert result.exit_code == 0, result.output
    nframe = read_manifest(noisy, "dataset")
    nmeta = nframe.attrs["manifest"]
    assert nmeta.parents[0]["content_hash"] == meta.content_hash
    train = nframe[nframe.split == "train"]
    assert abs((train.noise_kind != "clean").sum() - 0.25 * len(train)) <= train["true_pid"].nunique()
    assert (nframe.loc[nframe.split != "train", "noise_kind"] == "clean").all()

    result = invoke("manifest", "inspect", noisy, "--json")
    summary = json.loads(result.output)
    assert summary["noise"]["noisy_rows"] == int((train.noise_kind != "clean").sum())
    result = invoke("manifest", "diff", clean, noisy, "--json")
    assert json.loads(result.output)["labels_changed"]["count"] == int((train.noise_kind != "clean").sum())


def test_corrupt_mix_splits_the_noise_between_flip_pair_and_outlier(synth_root, tmp_path):
    clean = tmp_path / "clean.parquet"
    assert invoke("data", "index", synth_root, "--layout", "market1501", "--out", clean).exit_code == 0
    noisy = tmp_path / "mix.parquet"
    result = invoke("data", "corrupt", clean, "--rate", 0.5, "--kind", "mix", "--seed", 3, "--out", noisy)
    assert result.exit_code == 0, result.output
    frame = read_manifest(noisy, "dataset")
    train = frame[frame["split"] == "train"]
    counts = train["noise_kind"].value_counts()
    assert set(counts.index) == {"clean", "flip", "pair", "outlier"}
    noisy_rows = len(train) - counts["clean"]
    assert abs(noisy_rows - 0.5 * len(train)) <= train["true_pid"].nunique()
    kinds = [counts[k] for k in ("flip", "pair", "outlier")]
    assert max(kinds) - min(kinds) <= 1  # equal parts
    assert ((train["pid"] != train["true_pid"]) == (train["noise_kind"] != "clean")).all()
    # the images were readable: pair noise took look-alike identities by mean image, and says so
    assert frame.attrs["manifest"].extra["noise"] == {"rate": 0.5, "kind": "mix", "seed": 3, "pairing": "mean_image"}
    for kind in ("flip", "pair", "outlier"):
        assert kind in result.output


@pytest.mark.parametrize("args,message", [
    (["--rate", "1.0", "--kind", "flip"], "rate"),
    (["--rate", "0.2", "--kind", "swap"], "kind"),
])
def test_corrupt_rejects_bad_options_and_writes_nothing(synth_root, tmp_path, args, message):
    clean = tmp_path / "clean.parquet"
    assert invoke("data", "index", synth_root, "--layout", "market1501", "--out", clean).exit_code == 0
    out = tmp_path / "noisy.parquet"
    result = invoke("data", "corrupt", clean, *args, "--out", out)
    assert result.exit_code == 2 and message in result.output
    assert not out.exists()


def test_index_errors_are_clear_and_write_nothing(tmp_path, synth_root):
    out = tmp_path / "m.parquet"
    result = invoke("data", "index", tmp_path / "missing", "--layout", "market1501", "--out", out)
    assert result.exit_code == 2 and "does not exist" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke("data", "index", empty, "--layout", "folders", "--out", out)
    assert result.exit_code == 2 and "no images" in result.output
    # a truncated image: --verify fails naming it, --skip-bad leaves it out
    victim = sorted((synth_root / "query").iterdir())[0]
    broken = tmp_path / "broken"
    import shutil
    shutil.copytree(synth_root, broken)
    (broken / "query" / victim.name).write_bytes(victim.read_bytes()[:50])
    result = invoke("data", "index", broken, "--layout", "market1501", "--verify", "--out", out)
    assert result.exit_code == 2 and victim.name in result.output and "--skip-bad" in result.output
    assert not out.exists()
    result = invoke("data", "index", broken, "--layout", "market1501", "--verify", "--skip-bad", "--out", out)
    assert result.exit_code == 0, result.output
    assert f"query/{victim.name}" not in set(read_manifest(out)["sample_id"])


def test_synth_refuses_non_empty_folder(synth_root):
    result = invoke("data", "synth", synth_root, "--identities", 4)
    assert result.exit_code == 2 and str(synth_root) in result.output


@pytest.mark.skipif(not ORL.is_dir(), reason="ORL faces not found beside the checkout (../shared/data/orl_faces)")
def test_orl_faces_folders_layout(tmp_path):
    out = tmp_path / "orl.parquet"
    result = invoke("data", "index", ORL, "--layout", "folders", "--split-identities", 0.25, "--seed", 0,
                    "--verify", "--out", out)
    assert result.exit_code == 0, result.output
    frame = read_manifest(out)
    assert len(frame) == 400 and frame["pid"].nunique() == 40
    assert (frame.split == "query").sum() == 10
    assert (frame["camid"] == -1).all()
    noisy = tmp_path / "orl_noisy.parquet"
    result = invoke("data", "corrupt", out, "--rate", 0.2, "--kind", "pair", "--out", noisy)
    assert result.exit_code == 0, result.output
    assert (read_manifest(noisy).noise_kind == "pair").sum() == 60
