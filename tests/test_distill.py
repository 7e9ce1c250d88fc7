"""The distillation stages end to end on a tiny noisy image set: teacher rounds (in-sample and
out-of-fold), resume and skip, soft labels, every student method, evaluation and noise reports."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from fat_distill.data import corrupt_labels
from fat_distill.distill import (
    STUDENT_METHODS,
    StudentConfig,
    TeacherConfig,
    evaluate_noise_detection,
    evaluate_student,
    fold_train_mask,
    keep_identities_in_every_fold,
    make_soft_labels,
    run_teacher,
    run_teacher_fold,
    run_teacher_round,
    student_training_rows,
    train_student,
)
from fat_distill.distill._common import (
    STAGE_MARKER,
    load_model,
    load_weights,
    new_model,
    predict_logits,
    stage_settings,
)
from fat_distill.manifests import file_content_hash, read_manifest, read_manifest_meta, write_manifest
from fat_distill.train import (
    CheckpointError,
    TrainConfig,
    build_train_data,
    load_checkpoint,
    recording_fits,
    summarise_fits,
)
from tests.helpers import write_identity_images

IDENTITIES = 6


def tiny_train(**overrides) -> TrainConfig:
    base = dict(image_size=(32, 16), embedding_dim=16, epochs=1, batch_p=3, batch_k=2, lr=3e-3,
                warmup_epochs=0, pad=2, seed=0, keep_checkpoints=1)
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A noisy dataset manifest (20% flip noise on 6×6 train images) with query and gallery splits."""
    root = tmp_path_factory.mktemp("images")
    frame = pd.concat([
        write_identity_images(root, IDENTITIES, 6, seed=0, split="train"),
        write_identity_images(root, IDENTITIES, 2, seed=1, split="query"),
        write_identity_images(root, IDENTITIES, 3, seed=2, split="gallery"),
    ], ignore_index=True)
    noisy = corrupt_labels(frame, rate=0.2, kind="flip", seed=0)
    path = root / "noisy.parquet"
    write_manifest(noisy, path, "dataset", stage="test", extra={"dataset_root": str(root)})
    clean_path = root / "no_truth.parquet"
    write_manifest(frame, clean_path, "dataset", stage="test", extra={"dataset_root": str(root)})
    return {"root": root, "manifest": path, "no_truth": clean_path, "frame": read_manifest(path, "dataset")}


@pytest.fixture(scope="module")
def teacher(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    config = TeacherConfig(train=tiny_train(), rounds=2, rule="gmm", tolerance=0.0)
    result = run_teacher(data["manifest"], config, out, "cpu")
    return {"out": out, "config": config, "result": result}


def test_teacher_rounds_write_valid_manifests(data, teacher):
    result, out = teacher["result"], teacher["out"]
    assert [p.name for p in result.round_manifests] == ["teacher_round_0.parquet", "teacher_round_1.parquet"]
    train = data["frame"][data["frame"]["split"] == "train"].set_index("sample_id")
    rounds = [read_manifest(p, "teacher_round") for p in result.round_manifests]
    for r, frame in enumerate(rounds):
        assert len(frame) == len(train) and set(frame["sample_id"]) == set(train.index)
        assert (frame["round"] == r).all()
        np.testing.assert_array_equal(frame["given_label"], train.loc[frame["sample_id"], "pid"])
        assert set(frame["pred_label"]) <= set(train["pid"])  # pids, not class indices
        assert frame["confident"].any() and "fold" not in frame.columns
        assert ((frame["confidence"] >= 0) & (frame["confidence"] <= 1)).all()
        # every identity keeps min_confident_per_identity samples
        assert (frame[frame["confident"]].groupby("given_label").size() >= 2).all()
        assert len(frame.groupby("given_label")) == IDENTITIES
    meta1 = read_manifest_meta(result.round_manifests[1])
    assert meta1.stage == "teacher.round1" and meta1.config_hash == teacher["config"].round_hash()
    assert [p["content_hash"] for p in meta1.parents] == [
        read_manifest_meta(data["manifest"]).content_hash, read_manifest_meta(result.round_manifests[0]).content_hash]
    # round 1 trained on the samples confident after round 0, and the change is recorded
    marker = json.loads((out / "round-1" / STAGE_MARKER).read_text())
    assert marker["train_rows"] == int(rounds[0]["confident"].sum())
    flipped = (rounds[0].set_index("sample_id")["confident"] != rounds[1].set_index("sample_id")["confident"]).mean()
    assert result.changes == [pytest.approx(flipped)] and meta1.extra["change"] == pytest.approx(flipped)
    assert result.checkpoints == [out / "round-1" / "final.pt"] and result.checkpoints[0].exists()


def test_teacher_resumes_and_skips_finished_rounds(data, teacher):
    result, out, config = teacher["result"], teacher["out"], teacher["config"]
    hashes = [file_content_hash(p) for p in result.round_manifests]
    stamps = [p.stat().st_mtime_ns for p in result.round_manifests + result.checkpoints]
    again = run_teacher(data["manifest"], config, out, "cpu")
    assert [file_content_hash(p) for p in again.round_manifests] == hashes
    assert [p.stat().st_mtime_ns for p in again.round_manifests + again.checkpoints] == stamps  # no work done

    # a run killed after round 1's last epoch checkpoint: the rerun resumes from it to the same result
    last_round = result.round_manifests[1]
    last_round.unlink()
    (out / "round-1" / "final.pt").unlink()
    assert list((out / "round-1").glob("epoch-*.pt"))
    with recording_fits() as fits:
        run_teacher_round(data["manifest"], result.round_manifests[0], config, 1, out, "cpu")
    assert file_content_hash(last_round) == hashes[1]
    # it continued after its only epoch (trained none again), it did not start over
    assert summarise_fits(fits) == {"resumed_from_epoch": 1, "ran_epochs": 0}
    with recording_fits() as fits:  # finished rounds train nothing, so they report nothing
        run_teacher(data["manifest"], config, out, "cpu")
    assert fits == [] and summarise_fits(fits) == {}

    # another configuration in the same folder is an error, not a silent reuse
    with pytest.raises(CheckpointError, match="another configuration"):
        run_teacher(data["manifest"], config.model_copy(update={"rule": "threshold"}), out, "cpu")


def test_a_round_continues_from_a_previous_round_kept_in_another_folder(data, teacher, tmp_path):
    """A round taken from another run's cache keeps its weights in that run's folder: the next round, run in a new
    folder, continues from them (through the previous manifest) and computes what it would have beside them."""
    import shutil

    config = teacher["config"].model_copy(update={"rounds": 3})
    assert config.retrain == "continue"
    previous = teacher["result"].round_manifests[1]
    elsewhere = run_teacher_round(data["manifest"], previous, config, 2, tmp_path / "new_run", "cpu")
    assert not (tmp_path / "new_run" / "round-1").exists()
    beside = tmp_path / "same_run"
    shutil.copytree(teacher["out"], beside)
    alongside = run_teacher_round(data["manifest"], beside / previous.name, config, 2, beside, "cpu")
    assert read_manifest(elsewhere, "teacher_round").equals(read_manifest(alongside, "teacher_round"))


def test_more_rounds_reuse_finished_ones_and_stop_when_the_set_settles(data, teacher):
    # rounds and tolerance do not change what a round computes: rounds 0 and 1 are reused, not retrained
    config = teacher["config"].model_copy(update={"rounds": 5, "tolerance": 1.0})
    stamps = [p.stat().st_mtime_ns for p in teacher["result"].round_manifests]
    result = run_teacher(data["manifest"], config, teacher["out"], "cpu")
    assert result.stopped_early and len(result.round_manifests) == 2 and len(result.changes) == 1
    assert [p.stat().st_mtime_ns for p in result.round_manifests] == stamps
    assert not (teacher["out"] / "round-2").exists()


@pytest.mark.parametrize("retrain", ["fresh", "continue"])
def test_retrain_fresh_or_continue_picks_the_starting_weights(data, teacher, tmp_path, retrain):
    # round 1 trains with a vanishing learning rate, so its final weights are its starting weights
    out = tmp_path / retrain
    shutil.copytree(teacher["out"] / "round-0", out / "round-0")
    round0 = teacher["result"].round_manifests[0]
    config = TeacherConfig(train=tiny_train(lr=1e-12), rounds=2, retrain=retrain)
    run_teacher_round(data["manifest"], round0, config, 1, out, "cpu")
    after = load_checkpoint(out / "round-1" / "final.pt")["model"]
    before = load_checkpoint(out / "round-0" / "final.pt")["model"]
    init = new_model(config.train, IDENTITIES, stage_settings("cpu", config.train)).state_dict()
    start = before if retrain == "continue" else init
    other = init if retrain == "continue" else before
    weights = [k for k, v in after.items() if v.is_floating_point() and "running" not in k]
    assert all(torch.allclose(after[k], start[k], atol=1e-6) for k in weights)
    assert not all(torch.allclose(after[k], other[k], atol=1e-6) for k in weights)
    if retrain == "continue":
        # the weights are neither beside the new folder nor where the previous round's manifest records them
        moved = tmp_path / "moved" / round0.name
        write_manifest(read_manifest(round0, "teacher_round"), moved, "teacher_round", stage="teacher.round0",
                       extra={"round": 0, "checkpoints": [str(tmp_path / "gone" / "final.pt")]})
        with pytest.raises(FileNotFoundError, match="run round 0 first"):
            run_teacher_round(data["manifest"], moved, config, 1, tmp_path / "empty", "cpu")


def test_oracle_rows_use_true_labels_without_multi_duplicates():
    frame = pd.DataFrame({
        "sample_id": ["a.png", "b.png", "c.png", "a.png#multi1", "q.png"],
        "path": ["a.png", "b.png", "c.png", "a.png", "q.png"],
        "pid": [1, 1, 2, 2, 1], "camid": [1, 2, 1, 1, 1],
        "split": ["train", "train", "train", "train", "query"],
        "true_pid": [1, 2, 2, 1, 1], "noise_kind": ["clean", "flip", "clean", "multi", "clean"],
    })
    rows, column = student_training_rows(frame, StudentConfig(method="oracle"))
    assert column == "true_pid" and rows["sample_id"].tolist() == ["a.png", "b.png", "c.png"]
    assert rows["true_pid"].tolist() == [1, 2, 2]
    rows, column = student_training_rows(frame, StudentConfig(method="ce"))
    assert column == "pid" and len(rows) == 4


def test_out_of_fold_scores_come_from_the_model_that_held_the_sample_out(data, tmp_path):
    config = TeacherConfig(train=tiny_train(), rounds=1, rule="threshold", threshold=0.3, scoring="oof", folds=2)
    # folds are independent: train fold 1 on its own first, as a parallel worker would
    fold1 = run_teacher_fold(data["manifest"], None, config, 0, 1, tmp_path, "cpu")
    stamp = fold1.stat().st_mtime_ns
    result = run_teacher(data["manifest"], config, tmp_path, "cpu")
    assert fold1.stat().st_mtime_ns == stamp  # the round found fold 1 done
    frame = read_manifest(result.final_round_manifest, "teacher_round")
    assert set(frame["fold"]) == {0, 1} and frame["fold"].notna().all()
    assert result.checkpoints == [tmp_path / "round-0" / f"fold-{k}" / "final.pt" for k in range(2)]

    train = data["frame"][data["frame"]["split"] == "train"].reset_index(drop=True)
    order = frame.set_index("sample_id").loc[train["sample_id"]]
    folds = order["fold"].to_numpy()
    label_map = {pid: i for i, pid in enumerate(sorted(train["pid"].unique()))}
    labels = np.array([label_map[p] for p in train["pid"]])
    settings = stage_settings("cpu", config.train)
    dataset = build_train_data(train, data["root"], config.train, label_map=label_map).feature_dataset
    for k, checkpoint in enumerate(result.checkpoints):
        held_out = folds == k
        # by construction the fold model never sampled its held-out rows ...
        assert not fold_train_mask(np.ones(len(train), bool), folds, k)[held_out].any()
        marker = json.loads((checkpoint.parent / STAGE_MARKER).read_text())
        assert marker["fold"] == k and marker["train_rows"] == int((~held_out).sum())
        # ... and the held-out rows' scores are exactly that model's p(given label)
        model = load_weights(new_model(config.train, len(label_map), settings), checkpoint, settings.device)
        probs = torch.softmax(torch.from_numpy(predict_logits(model, dataset, settings)).double(), 1).numpy()
        p_given = probs[np.arange(len(train)), labels]
        np.testing.assert_allclose(order["confidence"].to_numpy()[held_out], p_given[held_out], atol=1e-5)
        assert not np.allclose(order["confidence"].to_numpy()[~held_out], p_given[~held_out], atol=1e-5)

    soft_path = make_soft_labels(data["manifest"], result.checkpoints, result.final_round_manifest, config,
                                 tmp_path / "soft.parquet", "cpu")
    soft = read_manifest(soft_path, "soft_labels").set_index("sample_id").loc[train["sample_id"]]
    # each row labelled by its own fold's model: top-1 equals the oof arg-max
    np.testing.assert_array_equal([ids[0] for ids in soft["topk_ids"]], order["pred_label"])


@pytest.fixture(scope="module")
def soft_labels(data, teacher, tmp_path_factory):
    config = teacher["config"].model_copy(update={"temperature": 2.0, "top_k": 3})
    out = tmp_path_factory.mktemp("soft") / "soft_labels.parquet"
    return make_soft_labels(data["manifest"], teacher["result"].checkpoints, teacher["result"].final_round_manifest,
                            config, out, "cpu")


def test_soft_labels_manifest_is_valid_and_consistent(data, teacher, soft_labels):
    soft = read_manifest(soft_labels, "soft_labels")
    final = read_manifest(teacher["result"].final_round_manifest, "teacher_round").set_index("sample_id")
    train = data["frame"][data["frame"]["split"] == "train"].set_index("sample_id")
    assert len(soft) == len(train)
    soft = soft.set_index("sample_id")
    np.testing.assert_array_equal(soft["given_label"], train.loc[soft.index, "pid"])
    np.testing.assert_array_equal(soft["confident"], final.loc[soft.index, "confident"])
    for ids, probs, pred in zip(soft["topk_ids"], soft["topk_probs"], final.loc[soft.index, "pred_label"]):
        assert len(ids) == 3 and set(ids) <= set(train["pid"]) and len(set(ids)) == 3
        assert ids[0] == pred  # same model, same arg-max
        assert (np.diff(probs) <= 0).all() and probs.sum() <= 1 + 1e-6
    meta = read_manifest_meta(soft_labels)
    assert meta.extra["temperature"] == 2.0 and meta.stage == "teacher.soft_labels"


def test_soft_labels_from_all_rounds_average_every_rounds_model(data, teacher, tmp_path):
    result = teacher["result"]
    config = teacher["config"].model_copy(update={"temperature": 2.0, "top_k": 4, "soft_label_models": "all_rounds"})
    # soft_label_models does not change what a round computes: the finished rounds are reused
    assert config.round_hash() == teacher["config"].round_hash()
    assert config.soft_labels_hash() != teacher["config"].soft_labels_hash()
    rounds = [[teacher["out"] / f"round-{r}" / "final.pt"] for r in range(len(result.round_manifests))]
    path = make_soft_labels(data["manifest"], rounds, result.final_round_manifest, config, tmp_path / "soft.parquet",
                            "cpu")
    soft = read_manifest(path, "soft_labels")
    train = data["frame"][data["frame"]["split"] == "train"].set_index("sample_id").loc[soft["sample_id"]]
    label_map = {pid: c for c, pid in enumerate(sorted(train["pid"].unique()))}
    settings = stage_settings("cpu", config.train)
    built = build_train_data(train.reset_index(), data["root"], config.train, label_map=label_map)
    mean = np.zeros((len(train), len(label_map)))
    for (checkpoint,) in rounds:  # each round's model predicts every row; the soft label is the probability mean
        model = load_model(config.train, len(label_map), checkpoint, settings)
        logits = predict_logits(model, built.feature_dataset, settings)
        mean += torch.softmax(torch.as_tensor(logits, dtype=torch.float64) / 2.0, dim=1).numpy() / len(rounds)
    pids = np.array(sorted(label_map))
    for i, (ids, probs) in enumerate(zip(soft["topk_ids"], soft["topk_probs"])):
        order = np.argsort(-mean[i], kind="stable")[:4]
        np.testing.assert_array_equal(ids, pids[order])
        np.testing.assert_allclose(probs, mean[i][order], atol=1e-5)
    meta = read_manifest_meta(path)
    assert meta.extra["ensemble"] == [[str(c) for c in r] for r in rounds]
    with pytest.raises(ValueError, match="as many fold checkpoints"):
        make_soft_labels(data["manifest"], [rounds[0], rounds[0] * 2], result.final_round_manifest, config,
                         tmp_path / "bad.parquet", "cpu")


# filtered and cleanlab need a row-filter manifest from a teacher or cleanlab stage: tests/test_peer_baselines.py
@pytest.mark.parametrize("method", [m for m in STUDENT_METHODS if m not in ("filtered", "cleanlab")])
def test_each_student_method_trains_and_evaluates(data, soft_labels, tmp_path, method):
    config = StudentConfig(train=tiny_train(epochs=2), method=method)
    result = train_student(data["manifest"], config, tmp_path / "ckpt", "cpu",
                           soft_labels_manifest=soft_labels if method == "distilled" else None)
    assert result.checkpoint.exists() and len(result.history) == 2 and result.method == method
    assert all(np.isfinite(h["loss"]) for h in result.history)
    if method == "oracle":
        assert set(result.label_map) == set(data["frame"]["true_pid"][data["frame"]["split"] == "train"])
    metrics_path = evaluate_student(data["manifest"], result.checkpoint, config, tmp_path / "metrics.parquet", "cpu",
                                    plots_dir=tmp_path / "plots")
    metrics = read_manifest(metrics_path, "metrics").set_index("metric")["value"]
    assert (read_manifest(metrics_path, "metrics")["stage"] == f"student.{method}").all()
    for name in ("rank1", "rank5", "rank10", "mAP", "mINP"):
        assert 0.0 <= metrics[name] <= 1.0
    assert metrics["rank1"] <= metrics["rank5"] <= metrics["rank10"]
    assert metrics["num_queries"] == IDENTITIES * 2
    assert (tmp_path / "plots" / f"cmc_{method}.png").stat().st_size > 0


def test_distilled_student_with_the_batch_hard_metric_term_trains_on_soft_targets(data, soft_labels, tmp_path):
    config = StudentConfig(train=tiny_train(epochs=2), method="distilled", metric_term="batch_hard",
                           flagged_rows="relabel", given_label_weight=1.0, soft_smoothing=0.1)
    assert config.objective == "ce_triplet"
    assert config.training_hash() != config.model_copy(update={"metric_term": "fat"}).training_hash()
    result = train_student(data["manifest"], config, tmp_path / "ckpt", "cpu", soft_labels_manifest=soft_labels)
    terms = {k for h in result.history for k in h}
    assert "metric" in terms and all(np.isfinite(h["loss"]) for h in result.history)
    metrics_path = evaluate_student(data["manifest"], result.checkpoint, config, tmp_path / "metrics.parquet", "cpu")
    assert 0.0 <= read_manifest(metrics_path, "metrics").set_index("metric")["value"]["mAP"] <= 1.0


def test_student_resumes_and_refuses_mismatched_inputs(data, soft_labels, tmp_path):
    config = StudentConfig(train=tiny_train(), method="distilled", label_source="teacher")
    first = train_student(data["manifest"], config, tmp_path, "cpu", soft_labels_manifest=soft_labels)
    stamp = first.checkpoint.stat().st_mtime_ns
    again = train_student(data["manifest"], config, tmp_path, "cpu", soft_labels_manifest=soft_labels)
    assert again.checkpoint.stat().st_mtime_ns == stamp and again.history == first.history
    # evaluation-only settings do not make the checkpoint another configuration's
    train_student(data["manifest"], config.model_copy(update={"flip_test": False}), tmp_path, "cpu",
                  soft_labels_manifest=soft_labels)
    with pytest.raises(CheckpointError, match="another configuration"):
        train_student(data["manifest"], config.model_copy(update={"method": "ce"}), tmp_path, "cpu")
    with pytest.raises(ValueError, match="soft_labels_manifest"):
        train_student(data["manifest"], config, tmp_path / "x", "cpu")


def test_student_killed_after_an_epoch_continues_from_it(data, soft_labels, tmp_path):
    config = StudentConfig(train=tiny_train(epochs=2, keep_checkpoints=2), method="distilled")
    with recording_fits() as fits:
        first = train_student(data["manifest"], config, tmp_path, "cpu", soft_labels_manifest=soft_labels)
    assert summarise_fits(fits) == {"resumed_from_epoch": 0, "ran_epochs": 2}  # a fresh start trains every epoch
    weights = load_checkpoint(first.checkpoint)["model"]
    # what a kill during epoch 2 leaves: the checkpoint of epoch 1, nothing later
    (tmp_path / "final.pt").unlink()
    (tmp_path / "epoch-0001.pt").unlink()
    assert [p.name for p in tmp_path.glob("epoch-*.pt")] == ["epoch-0000.pt"]
    with recording_fits() as fits:
        again = train_student(data["manifest"], config, tmp_path, "cpu", soft_labels_manifest=soft_labels)
    assert summarise_fits(fits) == {"resumed_from_epoch": 1, "ran_epochs": 1}  # one epoch, not both again
    timing = {"seconds", "images_per_s"}
    assert [{k: v for k, v in h.items() if k not in timing} for h in again.history] == [
        {k: v for k, v in h.items() if k not in timing} for h in first.history]
    resumed = load_checkpoint(again.checkpoint)["model"]
    assert all(torch.equal(resumed[k], weights[k]) for k in weights)


def test_oracle_refuses_a_manifest_without_true_labels(data, tmp_path):
    with pytest.raises(ValueError, match="oracle trains on the true labels.*no true_pid column"):
        train_student(data["no_truth"], StudentConfig(train=tiny_train(), method="oracle"), tmp_path, "cpu")


def test_noise_detection_report(data, teacher, tmp_path):
    path = evaluate_noise_detection(data["manifest"], teacher["result"].round_manifests[0],
                                    tmp_path / "noise.parquet", plots_dir=tmp_path)
    metrics = read_manifest(path, "metrics")
    assert (metrics["stage"] == "noise_detection.round0").all() and (metrics["step"] == 0).all()
    values = metrics.set_index("metric")["value"]
    train = data["frame"][data["frame"]["split"] == "train"]
    assert values["all.support"] == (train["noise_kind"] != "clean").sum() == values["flip.support"]
    assert values["all.noise_rate"] == pytest.approx((train["noise_kind"] != "clean").mean())
    rounds = read_manifest(teacher["result"].round_manifests[0], "teacher_round")
    assert values["all.confident_fraction"] == pytest.approx(rounds["confident"].mean())
    assert 0.0 <= values["all.auroc"] <= 1.0
    assert pd.isna(values["flip.precision"])  # undefined per kind: stored as null, not 0
    assert (tmp_path / "confidence_hist_round0.png").exists() and (tmp_path / "noise_pr_round0.png").exists()
    with pytest.raises(ValueError, match="ground truth"):
        evaluate_noise_detection(data["no_truth"], teacher["result"].round_manifests[0], tmp_path / "x.parquet")


def test_every_fold_model_keeps_every_identity():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    folds = np.array([0, 0, 1, 1, 0, 0, 1, 1, 0, 0])
    confidence = np.array([0.9, 0.8, 0.2, 0.3, 0.9, 0.1, 0.6, 0.7, 0.1, 0.2])
    # identity 0: confident rows only in fold 0 -> fold 0's model would never see it;
    # identity 1: confident in both folds -> nothing to do;
    # identity 2: all rows in fold 0 -> fold 0's model cannot see it whatever we do, fold 1's can.
    confident = np.array([True, True, False, False, True, False, True, False, False, False])
    kept = keep_identities_in_every_fold(confident, labels, folds, confidence)
    assert np.flatnonzero(kept & ~confident).tolist() == [3, 9]  # the most confident row outside the fold
    for k in (0, 1):
        train = fold_train_mask(kept, folds, k)
        has_rows_outside = {int(label) for label in labels[folds != k]}
        assert {int(label) for label in labels[train]} == has_rows_outside
    assert keep_identities_in_every_fold(kept, labels, folds, confidence).tolist() == kept.tolist()


def test_out_of_fold_round_keeps_every_identity_in_every_fold(data, tmp_path):
    # A strict threshold leaves few confident rows, yet the next round's fold models see every identity.
    config = TeacherConfig(train=tiny_train(), rounds=1, rule="threshold", threshold=0.99, scoring="oof", folds=2,
                           min_confident_per_identity=1)
    result = run_teacher(data["manifest"], config, tmp_path, "cpu")
    frame = read_manifest(result.final_round_manifest, "teacher_round")
    for k in (0, 1):
        train = fold_train_mask(frame["confident"].to_numpy(bool), frame["fold"].to_numpy(), k)
        assert set(frame["given_label"][train]) == set(frame["given_label"][frame["fold"] != k])
    assert read_manifest_meta(result.final_round_manifest).extra["kept_for_folds"] > 0  # 6 here: the guard acted
