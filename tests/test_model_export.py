"""A trained model leaving the tool: model cards in final.pt, load_student, embed_images, export and embed commands.

One tiny direct pipeline run (a `folder` Market-1501 dataset, small_cnn, baseline ce_triplet) is shared by
every test; equality with the pipeline's own evaluation features is checked to 1e-5.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from typer.testing import CliRunner

import fat_distill
from fat_distill.data import decode_image_file
from fat_distill.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fat_distill.export import export_torchscript, load_torchscript, read_onnx_card
from fat_distill.inference import (
    CARD_METADATA_KEY,
    embed_images,
    find_images,
    load_student,
    read_embeddings_card,
    resolve_checkpoint,
)
from fat_distill.train import ModelCardError, load_checkpoint, read_model_card, save_checkpoint
from fat_distill.train.model_card import MODEL_CARD_KEY
from tests.pipeline_configs import tiny_config

runner = CliRunner()


def invoke(*args):
    from fat_distill.cli import app

    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished direct run on a synthetic Market-1501 folder: students `distilled` and `ce_triplet`."""
    from fat_distill.data.synth import generate_synthetic_reid
    from fat_distill.pipeline import PipelineConfig, run_direct, validate_config

    root = tmp_path_factory.mktemp("model_export")
    dataset = root / "ds"
    generate_synthetic_reid(dataset, identities=12, cameras=3, images_per_identity=4, size=(32, 16), seed=5,
                            distractors=2, junk=1)
    config = validate_config(PipelineConfig, tiny_config(
        root, data={"source": "folder", "root": str(dataset), "layout": "market1501"}, teacher={"rounds": 1},
        baselines=["ce_triplet"]))
    run_id, _ = run_direct(config)
    return {"root": root, "runs": root / "runs", "run_id": run_id, "dataset": dataset, "config": config,
            "manifest": root / "manifests" / run_id / "dataset_noisy.parquet"}


def checkpoint_of(trained, method: str) -> Path:
    return trained["runs"] / trained["run_id"] / "stages" / "student" / method / "final.pt"


def resized_batch(paths: list[Path], size: tuple[int, int]) -> torch.Tensor:
    """What an exported model expects: RGB resized with antialiasing, as float in [0, 1]."""
    prepare = v2.Compose([v2.Resize(size, antialias=True), v2.ToDtype(torch.float32, scale=True)])
    return torch.stack([prepare(decode_image_file(p)) for p in paths])


def no_leftovers(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if ".tmp-" in p.name] if folder.is_dir() else True


# --------------------------------------------------------------------------- model cards

def test_every_final_checkpoint_describes_its_model(trained):
    from fat_distill.distill import load_dataset

    frame = load_dataset(trained["manifest"]).frame
    train_pids = sorted(int(p) for p in frame.loc[(frame["split"] == "train") & (frame["pid"] > 0), "pid"].unique())
    for method in ("distilled", "ce_triplet"):
        card = read_model_card(checkpoint_of(trained, method))  # torch.load(weights_only=True) underneath
        assert (card.kind, card.method, card.stage) == ("student", method, f"student.{method}")
        assert (card.model, card.embedding_dim, card.last_stride) == ("small_cnn", 256, 1)
        assert card.image_size == (32, 16) and card.mean == IMAGENET_MEAN and card.std == IMAGENET_STD
        assert list(card.class_pids) == train_pids and card.num_classes == len(train_pids)
        assert card.flip_test is True and card.distance == "cosine"
        assert card.fat_distill_version == fat_distill.__version__
    teacher = read_model_card(trained["runs"] / trained["run_id"] / "stages" / "teacher" / "round-0" / "final.pt")
    assert (teacher.kind, teacher.method, teacher.flip_test) == ("teacher", "teacher", False)
    assert list(teacher.class_pids) == train_pids


def test_a_checkpoint_without_card_is_refused_and_gets_one_without_retraining(trained, tmp_path):
    from fat_distill.distill import train_student

    folder = tmp_path / "ce_triplet"
    shutil.copytree(checkpoint_of(trained, "ce_triplet").parent, folder)
    state = load_checkpoint(folder / "final.pt")
    card = state.pop(MODEL_CARD_KEY)
    save_checkpoint(folder / "final.pt", state)
    with pytest.raises(ModelCardError, match="has no model card.*resume"):
        load_student(folder / "final.pt")

    config = trained["config"].baseline_config("ce_triplet")
    result = train_student(trained["manifest"], config, folder, "cpu")
    healed = load_checkpoint(folder / "final.pt")
    assert healed[MODEL_CARD_KEY] == card and healed["history"] == state["history"]
    assert all(torch.equal(healed["model"][k], v) for k, v in state["model"].items())
    assert len(result.history) == config.train.epochs and not list(folder.glob("epoch-*.pt"))[1:]
    stamp = (folder / "final.pt").stat().st_mtime_ns
    train_student(trained["manifest"], config, folder, "cpu")
    assert (folder / "final.pt").stat().st_mtime_ns == stamp  # an up-to-date card is not rewritten
    # an evaluation-only setting changed since training: the card follows, the weights stay
    train_student(trained["manifest"], config.model_copy(update={"flip_test": False}), folder, "cpu")
    assert read_model_card(folder / "final.pt").flip_test is False
    assert torch.equal(load_checkpoint(folder / "final.pt")["model"]["head.bottleneck.weight"],
                       state["model"]["head.bottleneck.weight"])


# --------------------------------------------------------------------------- load_student and embed_images

def test_load_student_accepts_a_run_id_prefix_a_run_folder_or_a_checkpoint(trained):
    runs, run_id = trained["runs"], trained["run_id"]
    expected = checkpoint_of(trained, "ce_triplet")
    assert resolve_checkpoint(run_id, "ce_triplet", runs) == expected
    assert resolve_checkpoint(run_id[:-3], "ce_triplet", runs) == expected
    assert resolve_checkpoint(runs / run_id, "ce_triplet") == expected
    assert resolve_checkpoint(expected) == expected
    assert resolve_checkpoint(expected.parent) == expected
    model = fat_distill.load_student(run_id, method="ce_triplet", runs_root=runs)
    assert not model.training and model.model_card.method == "ce_triplet" and model.checkpoint == expected
    with pytest.raises(FileNotFoundError, match=r"no trained 'oracle' model; it has: ce_triplet, distilled"):
        load_student(run_id, method="oracle", runs_root=runs)


def test_a_stage_taken_from_cache_is_found_in_the_run_that_trained_it(trained):
    """Prefect's cache records the outputs of the run that computed a stage, relative to where it ran."""
    import json

    from fat_distill.pipeline.runs import RUN_FILE

    runs, run_id = trained["runs"], trained["run_id"]
    later = runs / f"{run_id}-later"
    shutil.copytree(runs / run_id, later, ignore=shutil.ignore_patterns("*.pt"))
    state = json.loads((later / RUN_FILE).read_text())
    # relative to where the pipeline ran, as with the default runs_root "runs"
    recorded = Path("runs") / run_id / "stages" / "student" / "ce_triplet" / "final.pt"
    state["stages"]["student.ce_triplet"].update(state="cached", outputs={"checkpoint": str(recorded)})
    state["stages"]["student.distilled"] = {"state": "failed", "error": "killed"}
    (later / RUN_FILE).write_text(json.dumps(state))
    assert resolve_checkpoint(later, "ce_triplet") == runs.parent / recorded
    with pytest.raises(FileNotFoundError, match=r"has no trained 'distilled' model; it has: ce_triplet\."):
        resolve_checkpoint(later, "distilled")


@pytest.mark.parametrize("method", ["distilled", "ce_triplet"])
def test_embed_images_equals_the_evaluation_features(trained, method):
    from fat_distill.distill import load_dataset, student_features

    dataset = load_dataset(trained["manifest"])
    query = dataset.frame[dataset.frame["split"] == "query"].reset_index(drop=True)
    config = trained["config"].student if method == "distilled" else trained["config"].baseline_config(method)
    expected = student_features(dataset, checkpoint_of(trained, method), config, {"query": query}, "cpu")["query"]

    model = load_student(trained["run_id"], method, trained["runs"])
    got = embed_images(model, [dataset.root / p for p in query["path"]], batch_size=5)
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(len(got)), atol=1e-5, rtol=0)


def test_find_images_searches_recursively_for_image_suffixes(tmp_path):
    pixel = Image.new("RGB", (4, 8), (10, 20, 30))
    for name in ("b.jpg", "a/c.PNG", "a/deep/d.webp", "e.bmp", "f.jpeg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        pixel.save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    assert [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)] == [
        "a/c.PNG", "a/deep/d.webp", "b.jpg", "e.bmp", "f.jpeg"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no image"):
        find_images(tmp_path / "empty")


# --------------------------------------------------------------------------- export

def test_torchscript_export_matches_the_checkpoint_and_carries_the_card(trained, tmp_path):
    model = load_student(trained["run_id"], "ce_triplet", trained["runs"])
    files = find_images(trained["dataset"] / "query")[:3]  # a batch size other than the trace's 2
    out = export_torchscript(model, tmp_path / "model.pt")
    scripted, card = load_torchscript(out)
    assert card == model.model_card and no_leftovers(tmp_path)
    with torch.no_grad():
        exported = scripted(resized_batch(files, card.image_size))
    torch.testing.assert_close(exported, embed_images(model, files), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_onnx_export_matches_the_checkpoint_through_onnxruntime(trained, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="the onnx extra (pip install 'fat-distill[onnx]') is not installed")
    pytest.importorskip("onnxscript", reason="the onnx extra (pip install 'fat-distill[onnx]') is not installed")
    out = tmp_path / "model.onnx"
    result = invoke("export", trained["run_id"], "--format", "onnx", "--out", out, "--runs-root", trained["runs"])
    assert result.exit_code == 0, result.output
    model = load_student(trained["run_id"], "distilled", trained["runs"])
    assert read_onnx_card(out) == model.model_card and no_leftovers(tmp_path)
    files = find_images(trained["dataset"] / "query")[:5]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (exported,) = session.run(["embeddings"], {"images": resized_batch(files, (32, 16)).numpy()})
    np.testing.assert_allclose(exported, embed_images(model, files).numpy(), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- the CLI

# Both commands in a fresh interpreter (this one imported flows in conftest): they must not need Prefect.
CLI_SCRIPT = """
import sys
from fat_distill.cli import app
for command in sys.argv[1:]:
    app(command.split("|"), standalone_mode=False)
print("imported:", sorted({m.split(".")[0] for m in sys.modules} & {"flows", "prefect"}))
"""


@pytest.mark.slow
def test_cli_export_torchscript_and_embed_a_folder_without_prefect(trained, tmp_path):
    run_id, runs = trained["run_id"], str(trained["runs"])
    model_file = tmp_path / "model.pt"
    query = trained["dataset"] / "query"
    feats = tmp_path / "out" / "feats.parquet"
    export = ["export", run_id, "--format", "torchscript", "--out", str(model_file), "--runs-root", runs]
    embed = ["embed", run_id, "--folder", str(query), "--out", str(feats), "--runs-root", runs, "--batch-size", "4"]
    done = subprocess.run([sys.executable, "-c", CLI_SCRIPT, "|".join(export), "|".join(embed)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, done.stderr
    assert "imported: []" in done.stdout and "(B, 3, 32, 16) float RGB in [0, 1]" in done.stdout
    assert load_torchscript(model_file)[1].method == "distilled"
    table = pq.read_table(feats)
    jpgs = sorted(p.name for p in query.glob("*.jpg"))
    assert table.num_rows == len(jpgs) and sorted(table.column("sample_id").to_pylist()) == jpgs
    assert str(table.schema.field("embedding").type) == "list<element: float>"
    assert read_embeddings_card(feats) == load_torchscript(model_file)[1]
    embeddings = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    model = load_student(run_id, "distilled", runs)
    expected = embed_images(model, [Path(p) for p in table.column("path").to_pylist()])
    np.testing.assert_allclose(embeddings, expected.numpy(), atol=1e-6, rtol=0)
    assert CARD_METADATA_KEY.encode() in table.schema.metadata


def test_cli_embed_a_dataset_manifest_keeps_its_sample_ids(trained, tmp_path):
    from fat_distill.manifests import read_manifest

    feats = tmp_path / "feats.parquet"
    result = invoke("embed", trained["run_id"], "--manifest", trained["manifest"], "--method", "ce_triplet",
                    "--out", feats, "--runs-root", trained["runs"])
    assert result.exit_code == 0, result.output
    table = pq.read_table(feats)
    assert table.column("sample_id").to_pylist() == read_manifest(trained["manifest"])["sample_id"].tolist()
    assert read_embeddings_card(feats).method == "ce_triplet"


def test_cli_embed_a_manifest_written_back_by_pandas_with_its_root(trained, tmp_path):
    import pandas as pd

    edited = tmp_path / "edited.parquet"
    pd.read_parquet(trained["manifest"]).head(5).to_parquet(edited)  # pandas keeps no dataset root
    feats = tmp_path / "feats.parquet"
    result = invoke("embed", trained["run_id"], "--manifest", edited, "--out", feats, "--runs-root", trained["runs"])
    assert result.exit_code == 2 and "data.root" in result.output and not feats.exists()
    result = invoke("embed", trained["run_id"], "--manifest", edited, "--root", trained["dataset"], "--out", feats,
                    "--runs-root", trained["runs"])
    assert result.exit_code == 0, result.output
    assert pq.read_table(feats).num_rows == 5


@pytest.fixture()
def bad(trained, tmp_path):
    """Bad inputs: a folder without images, a file where a folder should be, a checkpoint without card,
    a folder with a truncated image."""
    empty = tmp_path / "no_images"
    empty.mkdir()
    (empty / "readme.txt").write_text("nothing to see")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    old = tmp_path / "old" / "final.pt"
    old.parent.mkdir()
    state = load_checkpoint(checkpoint_of(trained, "distilled"))
    del state[MODEL_CARD_KEY]
    save_checkpoint(old, state)
    broken = tmp_path / "broken"
    shutil.copytree(trained["dataset"] / "query", broken)
    victim = sorted(broken.glob("*.jpg"))[1]
    victim.write_bytes(victim.read_bytes()[:40])
    return {"empty": empty, "unwritable": blocker / "sub" / "result.out", "old": old, "broken": broken,
            "victim": victim}


def assert_refused(args, message, out: Path, runs: Path) -> None:
    result = invoke(*args, "--out", out, "--runs-root", runs)
    assert result.exit_code == 2, (args, result.output)
    assert message in result.output, (args, result.output)
    assert result.output.count("error:") == 1 and "Traceback" not in result.output
    assert not out.exists() and no_leftovers(out.parent)


def test_embed_bad_input_gives_one_clear_message_exit_2_and_no_file(trained, bad, tmp_path):
    run_id, runs, query = trained["run_id"], trained["runs"], trained["dataset"] / "query"
    out = tmp_path / "feats.parquet"
    cases = [
        (["nope-123", "--folder", query], "no run 'nope-123'", out),
        ([run_id, "--folder", query, "--method", "oracle"],
         f"run {run_id} has no trained 'oracle' model; it has: ce_triplet, distilled", out),
        ([run_id, "--folder", bad["empty"]], "holds no image", out),
        ([run_id, "--folder", query], "cannot write", bad["unwritable"]),
        ([bad["old"], "--folder", query], "has no model card", out),
        ([run_id, "--folder", bad["broken"]], f"{bad['victim']}", out),
        ([run_id], "give exactly one of --folder DIR or --manifest FILE", out),
    ]
    for args, message, target in cases:
        assert_refused(["embed", *args], message, target, runs)


def test_export_bad_input_gives_one_clear_message_exit_2_and_no_file(trained, bad, tmp_path):
    run_id, runs = trained["run_id"], trained["runs"]
    out = tmp_path / "model.pt"
    cases = [
        (["nope-123"], "no run 'nope-123'", out),
        ([run_id, "--method", "oracle"], f"run {run_id} has no trained 'oracle' model; it has: ce_triplet, distilled",
         out),
        ([run_id], "cannot write", bad["unwritable"]),
        ([bad["old"]], "has no model card", out),
        ([tmp_path / "missing.pt"], "does not exist", out),
    ]
    for args, message, target in cases:
        assert_refused(["export", *args, "--format", "torchscript"], message, target, runs)
