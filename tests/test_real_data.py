"""Data without ground truth, as a user brings it: runs complete, the label audit replaces the noise report,
and the cleaned labels leave the tool as a file (``fat-distill labels export``)."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from fat_distill.cli import app
from fat_distill.data.synth import generate_synthetic_reid
from fat_distill.distill import apply_actions, audit_identities, cleaned_labels, propose_actions
from fat_distill.manifests import read_manifest, read_manifest_meta
from fat_distill.pipeline import PipelineConfig, load_run_json, run_direct, validate_config
from tests.pipeline_configs import tiny_config

runner = CliRunner()


# --------------------------------------------------------------------------- the rule, over plain arrays

def test_propose_actions_follows_the_documented_rule_row_by_row():
    rng = np.random.default_rng(0)
    n = 400
    flagged = rng.random(n) < 0.4
    given = rng.integers(1, 6, n)
    suggested = np.where(rng.random(n) < 0.5, given, rng.integers(1, 6, n))
    prob = rng.random(n)
    actions = propose_actions(flagged, given, suggested, prob, min_prob=0.6)
    for f, g, s, p, a in zip(flagged, given, suggested, prob, actions):
        expected = "keep" if not f else ("relabel" if s != g and p >= 0.6 else "drop")
        assert a == expected
    assert {"keep", "relabel", "drop"} == set(actions)


def test_propose_actions_refuses_mismatched_lengths_and_bad_probability():
    with pytest.raises(ValueError, match="one length"):
        propose_actions(np.ones(3, bool), np.ones(3), np.ones(2), np.ones(3))
    with pytest.raises(ValueError, match="min_prob"):
        propose_actions(np.ones(3, bool), np.ones(3), np.ones(3), np.ones(3), min_prob=1.5)


def _dataset_and_round():
    dataset = pd.DataFrame({
        "sample_id": [f"s{i}" for i in range(8)], "path": [f"s{i}.png" for i in range(8)],
        "pid": [1, 1, 1, 2, 2, 2, 0, 3], "camid": 1,
        "split": ["train"] * 7 + ["query"],
    })
    scored = pd.DataFrame({
        "sample_id": [f"s{i}" for i in range(6)], "round": 0, "given_label": [1, 1, 1, 2, 2, 2],
        "pred_label": [1, 2, 2, 2, 1, 2], "confidence": [0.9, 0.1, 0.2, 0.8, 0.05, 0.7],
        "max_prob": [0.9, 0.8, 0.3, 0.8, 0.7, 0.7], "entropy": 0.5,
        "confident": [True, False, False, True, False, True],
    })
    return dataset, scored


def test_cleaned_labels_and_identity_audit_by_hand():
    dataset, scored = _dataset_and_round()
    cleaned = cleaned_labels(dataset, scored, min_prob=0.5)
    # the distractor (pid 0) and the query row are not train samples the teacher scored
    assert cleaned["sample_id"].tolist() == [f"s{i}" for i in range(6)]
    assert cleaned["action"].tolist() == ["keep", "relabel", "drop", "keep", "relabel", "keep"]
    assert cleaned["flagged"].tolist() == [False, True, True, False, True, False]

    audit = audit_identities(cleaned).set_index("pid")
    assert audit.loc[1, ["rows", "flagged", "relabel", "drop"]].tolist() == [3, 2, 1, 1]
    assert audit.loc[1, "flagged_fraction"] == pytest.approx(2 / 3)
    assert audit.loc[1, "top_suggested_pid"] == 2 and audit.loc[1, "top_suggested_rows"] == 2
    assert audit.loc[2, ["rows", "flagged", "relabel", "drop"]].tolist() == [3, 1, 1, 0]
    assert audit.loc[2, "top_suggested_pid"] == 1

    applied = apply_actions(cleaned)
    assert applied["sample_id"].tolist() == ["s0", "s1", "s3", "s4", "s5"]
    assert applied["pid"].tolist() == [1, 2, 2, 1, 2]
    assert applied["given_pid"].tolist() == [1, 1, 2, 2, 2]


def test_cleaned_labels_refuses_a_round_of_another_dataset():
    dataset, scored = _dataset_and_round()
    with pytest.raises(ValueError, match="not train rows"):
        cleaned_labels(dataset.iloc[:3], scored)


# --------------------------------------------------------------------------- whole runs without ground truth

def _market_folder(tmp_path):
    root = tmp_path / "market"
    generate_synthetic_reid(root, identities=16, cameras=3, images_per_identity=5, size=(32, 16), seed=0,
                            distractors=2, junk=1)
    return root


def _folders_dataset(tmp_path, identities=10, per_identity=5):
    """ROOT/<name>/<image>: a user's own folder of identities, with made-up names and no cameras."""
    root = tmp_path / "faces"
    rng = np.random.default_rng(0)
    for pid in range(1, identities + 1):
        colour = np.array([(pid * 53) % 256, (pid * 101) % 256, (pid * 197) % 256], dtype=float)
        folder = root / f"person_{chr(96 + pid)}"
        folder.mkdir(parents=True)
        for j in range(per_identity):
            img = np.tile(colour, (32, 16, 1)) + rng.normal(0, 20, (32, 16, 3))
            img[(np.arange(32) // (2 + pid % 4)) % 2 == 0] *= 0.5
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"img{j}.png")
    return root


def _no_truth_config(tmp_path, data):
    return validate_config(PipelineConfig, tiny_config(tmp_path, data=data, noise={"enabled": False},
                                                       baselines=["ce_triplet"]))


def _assert_completed_without_truth(config, run_id, summary):
    run_json = load_run_json(f"{config.run.runs_root}/{run_id}")
    assert run_json["status"] == "completed"
    assert "noise_report" not in run_json["stages"] and run_json["stages"]["label_audit"]["state"] in ("ran", "cached")
    assert set(summary["retrieval"]) == {"distilled", "ce_triplet"}
    assert all(np.isfinite(m["mAP"]) for m in summary["retrieval"].values())
    assert summary["noise_detection"] == {}
    audit = summary["label_audit"]
    manifests = f"{config.run.manifests_root}/{run_id}"
    train = read_manifest(f"{manifests}/dataset_noisy.parquet")
    train = train[(train["split"] == "train") & (train["pid"] > 0)]
    assert "true_pid" not in train.columns
    final = read_manifest(f"{manifests}/teacher_round_{audit['round']}.parquet")
    assert audit["rows"] == len(train) == len(final)
    assert audit["flagged"] == int((~final["confident"]).sum())
    assert audit["keep"] + audit["relabel"] + audit["drop"] == audit["rows"]
    assert audit["estimated_noise_rate"] == pytest.approx(audit["flagged"] / audit["rows"])
    metrics = read_manifest(f"{manifests}/metrics.parquet")
    assert {f"label_audit.round{r}" for r in range(audit["round"] + 1)} <= set(metrics["stage"])
    identities = read_manifest(f"{manifests}/label_audit_identities.parquet", "identity_audit")
    assert identities["rows"].sum() == len(train) and identities["flagged"].sum() == audit["flagged"]
    assert os.path.exists(f"{config.run.runs_root}/{run_id}/plots/label_confidence_round{audit['round']}.png")
    return run_json


@pytest.mark.slow
def test_market_folder_without_truth_completes_through_prefect(tmp_path):
    from flows.pipeline import run_pipeline

    config = _no_truth_config(tmp_path, {"source": "folder", "root": str(_market_folder(tmp_path)),
                                         "layout": "market1501"})
    run_id, summary = run_pipeline(config)
    _assert_completed_without_truth(config, run_id, summary)

    result = runner.invoke(app, ["inspect", run_id, "--runs-root", config.run.runs_root, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["status"] == "completed" and "distilled" in report["metrics"]["retrieval"]


@pytest.mark.slow
def test_folders_dataset_without_truth_completes_direct(tmp_path):
    config = _no_truth_config(tmp_path, {"source": "folder", "root": str(_folders_dataset(tmp_path)),
                                         "layout": "folders", "split_identities": 0.3})
    run_id, summary = run_direct(config)
    _assert_completed_without_truth(config, run_id, summary)
    identities = read_manifest(f"{config.run.manifests_root}/{run_id}/label_audit_identities.parquet")
    assert identities["identity"].str.startswith("person_").all()


def test_oracle_without_truth_fails_before_any_training(tmp_path):
    config = validate_config(PipelineConfig, tiny_config(
        tmp_path, data={"source": "folder", "root": str(_market_folder(tmp_path)), "layout": "market1501"},
        noise={"enabled": False}, baselines=["oracle"]))
    with pytest.raises(ValueError, match="oracle trains on the true labels"):
        run_direct(config, "no-oracle")
    run_json = load_run_json(f"{config.run.runs_root}/no-oracle")
    assert not any(name.startswith("teacher") for name in run_json["stages"])


# --------------------------------------------------------------------------- labels export

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("labels")
    config = _no_truth_config(tmp_path, {"source": "folder", "root": str(_market_folder(tmp_path)),
                                         "layout": "market1501"})
    run_id, _ = run_direct(config, "labels-run")
    return config, run_id


def _export(config, *args):
    return runner.invoke(app, ["labels", "export", *args, "--runs-root", config.run.runs_root])


def test_labels_export_writes_a_dataset_manifest_of_the_train_rows(finished_run, tmp_path):
    config, run_id = finished_run
    out = tmp_path / "labels.parquet"
    result = _export(config, run_id, "--out", str(out))
    assert result.exit_code == 0, result.output
    labels = pd.read_parquet(out)  # plain pandas, no fat_distill
    manifests = f"{config.run.manifests_root}/{run_id}"
    dataset = read_manifest(f"{manifests}/dataset_noisy.parquet")
    final = read_manifest(f"{manifests}/teacher_round_1.parquet").set_index("sample_id")
    train = dataset[(dataset["split"] == "train") & (dataset["pid"] > 0)]
    assert sorted(labels["sample_id"]) == sorted(train["sample_id"])
    assert {"sample_id", "path", "pid", "flagged", "confidence", "suggested_pid", "suggested_prob",
            "action"} <= set(labels.columns)
    row = final.loc[labels["sample_id"]]
    assert (labels["flagged"].to_numpy() == ~row["confident"].to_numpy()).all()
    assert (labels["suggested_pid"].to_numpy() == row["pred_label"].to_numpy()).all()
    meta = read_manifest_meta(out)
    assert meta.schema == "dataset" and meta.extra["dataset_root"] == dataset.attrs["manifest"].extra["dataset_root"]
    assert meta.extra["labels_export"]["round"] == 1
    check = runner.invoke(app, ["manifest", "validate", str(out)])
    assert check.exit_code == 0 and "all paths inside the dataset root" in check.output


def test_labels_export_apply_include_test_and_csv(finished_run, tmp_path):
    config, run_id = finished_run
    plain = tmp_path / "plain.parquet"
    assert _export(config, run_id, "--out", str(plain), "--min-prob", "0").exit_code == 0
    labels = pd.read_parquet(plain)
    out = tmp_path / "applied.csv"
    result = _export(config, run_id, "--out", str(out), "--min-prob", "0", "--apply", "--include-test")
    assert result.exit_code == 0, result.output
    applied = pd.read_csv(out)
    train = applied[applied["split"] == "train"].set_index("sample_id")
    assert set(train.index) == set(labels.loc[labels["action"] != "drop", "sample_id"])
    relabelled = labels[labels["action"] == "relabel"].set_index("sample_id")
    assert (train.loc[relabelled.index, "pid"] == relabelled["suggested_pid"]).all()
    assert (train.loc[relabelled.index, "given_pid"] == relabelled["pid"]).all()
    assert {"query", "gallery"} <= set(applied["split"])
    round0 = tmp_path / "r0.parquet"
    assert _export(config, run_id, "--out", str(round0), "--round", "0").exit_code == 0
    assert read_manifest_meta(round0).extra["labels_export"]["round"] == 0


@pytest.mark.parametrize("args,message", [
    (["no-such-run"], "no run 'no-such-run'"),
    (["{run}", "--round", "7"], "has no teacher round 7"),
])
def test_labels_export_bad_input_is_one_message_and_exit_2(finished_run, tmp_path, args, message):
    config, run_id = finished_run
    out = tmp_path / "labels.parquet"
    result = _export(config, *[a.format(run=run_id) for a in args], "--out", str(out))
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_labels_export_refuses_an_unknown_format_and_an_unwritable_folder(finished_run, tmp_path):
    config, run_id = finished_run
    result = _export(config, run_id, "--out", str(tmp_path / "labels.txt"))
    assert result.exit_code == 2 and "write .parquet or .csv" in result.output
    # a path under a regular file cannot be written, even by root
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    result = _export(config, run_id, "--out", str(blocker / "labels.parquet"))
    assert result.exit_code == 2 and "Traceback" not in result.output and "not-a-folder" in result.output
    assert blocker.read_text() == ""


# --------------------------------------------------------------------------- the whole journey

@pytest.mark.slow
def test_a_users_journey_from_noisy_folder_to_embeddings_of_new_images(tmp_path):
    """Folder without truth → run → labels export → drop flagged rows in pandas → run on the edited manifest →
    TorchScript export → embed new images: the same embeddings as the library's own feature extraction."""
    import pyarrow.parquet as pq
    import torch
    import yaml

    from fat_distill.export import load_torchscript
    from fat_distill.inference import embed_images, load_student

    root = _folders_dataset(tmp_path, identities=10, per_identity=5)
    new_photos = tmp_path / "new_photos"
    new_photos.mkdir()
    for image in sorted(root.glob("person_a/*.png"))[:2] + sorted(root.glob("person_e/*.png"))[:1]:
        (new_photos / f"{image.parent.name}_{image.name}").write_bytes(image.read_bytes())
    config = tiny_config(tmp_path, data={"source": "folder", "root": str(root), "layout": "folders",
                                         "split_identities": 0.3},
                         noise={"enabled": False}, baselines=["ce_triplet"])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    runs = config["run"]["runs_root"]

    def cli(*args):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result

    cli("run", tmp_path / "c.yaml", "--direct")
    first = os.readlink(tmp_path / "runs" / "latest")
    cli("labels", "export", "latest", "--include-test", "--out", tmp_path / "labels.parquet", "--runs-root", runs)
    labels = pd.read_parquet(tmp_path / "labels.parquet")
    kept = labels[labels["flagged"] != True]  # noqa: E712 - test rows have no flag (null): kept
    assert 0 < (labels["flagged"] == True).sum() < len(labels)  # noqa: E712
    kept.to_parquet(tmp_path / "clean.parquet")  # pandas: the fat_distill metadata is gone

    cli("run", tmp_path / "c.yaml", "--direct", "--set", "data.source=manifest",
        "--set", f"data.manifest={tmp_path / 'clean.parquet'}", "--set", f"data.root={root}")
    second = os.readlink(tmp_path / "runs" / "latest")
    assert second != first
    dataset = read_manifest(f"{config['run']['manifests_root']}/{second}/dataset_noisy.parquet")
    assert set(dataset["sample_id"]) == set(kept["sample_id"])
    assert load_run_json(f"{runs}/{second}")["status"] == "completed"

    cli("export", "latest", "--format", "torchscript", "--out", tmp_path / "model.pt", "--runs-root", runs)
    cli("embed", "latest", "--folder", new_photos, "--out", tmp_path / "features.parquet", "--runs-root", runs)
    table = pq.read_table(tmp_path / "features.parquet")
    embedded = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    assert embedded.shape[0] == 3
    np.testing.assert_allclose(np.linalg.norm(embedded, axis=1), 1.0, atol=1e-5)

    # the evaluation's own feature extraction, with the image size and flip test of the run's saved config
    from fat_distill.evaluate import extract_manifest_features

    model = load_student(second, "distilled", runs)
    student_cfg = PipelineConfig.model_validate(yaml.safe_load((tmp_path / "runs" / second / "config.yaml")
                                                               .read_text())).student
    ids = table.column("sample_id").to_pylist()
    frame = pd.DataFrame({"sample_id": ids, "path": ids, "pid": 1, "camid": -1, "split": "query"})
    library = extract_manifest_features(model, frame, new_photos, image_size=tuple(student_cfg.train.image_size),
                                        batch_size=8, device="cpu", flip=student_cfg.flip_test)
    np.testing.assert_allclose(embedded, library.numpy(), atol=1e-5)
    np.testing.assert_allclose(embed_images(model, [new_photos / i for i in ids]).numpy(), library.numpy(), atol=1e-5)
    scripted, card = load_torchscript(tmp_path / "model.pt")
    h, w = card.image_size
    assert tuple(scripted(torch.rand(2, 3, h, w)).shape) == (2, card.embedding_dim)
