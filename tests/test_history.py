"""History you can read: every training stage writes history.parquet each epoch (complete after a resume), and
TensorBoard scalars when asked."""

from __future__ import annotations

import sys

import pandas as pd
import pytest
import torch

from fat_distill.models import build_model
from fat_distill.train import TrainConfig, build_objective, build_train_data, device_settings, fit, read_history
from tests.helpers import write_identity_images
from tests.pipeline_configs import tiny_config

CPU = device_settings(torch.device("cpu"))
TRAIN = dict(image_size=(32, 16), epochs=3, batch_p=3, batch_k=2, lr=1e-3, warmup_epochs=0.5, pad=2, seed=3)


class Interrupt(Exception):
    pass


def stop_after_first(epoch, stats):
    if epoch == 0:
        raise Interrupt


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    return root, write_identity_images(root, identities=6, per_identity=6)


def train(images, checkpoint_dir, objective="ce_triplet", **kwargs):
    root, frame = images
    config = TrainConfig(**TRAIN)
    data = build_train_data(frame, root, config)
    torch.manual_seed(config.seed)
    model = build_model("small_cnn", data.num_classes, embedding_dim=16)
    loss = build_objective(objective, model=model, num_classes=data.num_classes, num_samples=len(data.dataset),
                           image_size=config.image_size)
    return fit(model, loss, data.dataset, data.batch_sampler, config=config, settings=CPU,
               checkpoint_dir=checkpoint_dir, stage="unit", feature_dataset=data.feature_dataset, progress=False,
               **kwargs)


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_fit_writes_one_history_row_per_epoch_with_every_statistic(images, tmp_path):
    result = train(images, tmp_path / "ckpt")
    history = read_history(tmp_path / "ckpt")
    assert history["epoch"].tolist() == [1, 2, 3]
    assert {"loss", "active_fraction", "lr", "images_per_s", "seconds"} <= set(history.columns)
    assert set(history.columns) == {"epoch", *result.history[0]}  # every term and statistic fit() recorded
    assert history["loss"].tolist() == pytest.approx([h["loss"] for h in result.history])
    assert not list((tmp_path / "ckpt").glob(".*tmp*")), "no temporary file is left behind"


def test_a_killed_and_resumed_fit_ends_with_the_complete_history_and_tensorboard_scalars(images, tmp_path):
    pytest.importorskip("tensorboard")
    straight = read_history(train(images, tmp_path / "straight").final_checkpoint.parent)

    with pytest.raises(Interrupt):
        train(images, tmp_path / "resumed", on_epoch_end=stop_after_first, tensorboard_dir=tmp_path / "tb")
    assert read_history(tmp_path / "resumed")["epoch"].tolist() == [1]
    result = train(images, tmp_path / "resumed", tensorboard_dir=tmp_path / "tb")
    assert result.resumed_from_epoch == 1
    resumed = read_history(tmp_path / "resumed")
    assert resumed["epoch"].tolist() == [1, 2, 3]
    # Resume gives the same weights, so the same losses, epoch by epoch (only the timings differ).
    pd.testing.assert_frame_equal(resumed.drop(columns=["seconds", "images_per_s"]),
                                  straight.drop(columns=["seconds", "images_per_s"]))

    logged = scalars(tmp_path / "tb" / "unit")  # two event files: before and after the kill
    assert [step for step, _ in logged["train/loss"]] == [1, 2, 3]
    assert [value for _, value in logged["train/loss"]] == pytest.approx(resumed["loss"].tolist())
    assert {f"train/{c}" for c in resumed.columns if c != "epoch"} <= set(logged)


def test_history_lagging_its_checkpoint_is_completed_on_resume(images, tmp_path):
    with pytest.raises(Interrupt):
        train(images, tmp_path / "ckpt", on_epoch_end=stop_after_first)
    (tmp_path / "ckpt" / "history.parquet").unlink()  # killed after the checkpoint, before the history file
    train(images, tmp_path / "ckpt")
    assert read_history(tmp_path / "ckpt")["epoch"].tolist() == [1, 2, 3]


def test_a_run_with_tensorboard_logs_every_training_stage(tmp_path):
    pytest.importorskip("tensorboard")
    from fat_distill.pipeline import PipelineConfig, run_direct, validate_config

    config = validate_config(PipelineConfig, tiny_config(
        tmp_path, run={**tiny_config(tmp_path)["run"], "tensorboard": True},
        teacher={"rounds": 1, "scoring": "oof", "folds": 2}, baselines=["ce"]))
    run_id, _ = run_direct(config)
    run_dir = tmp_path / "runs" / run_id
    stages = {"teacher.round0.fold0", "teacher.round0.fold1", "student.distilled", "student.ce"}
    assert {p.name for p in (run_dir / "tensorboard").iterdir()} == stages
    for stage in stages:
        assert [step for step, _ in scalars(run_dir / "tensorboard" / stage)["train/loss"]] == [1]
    for folder in ("teacher/round-0/fold-0", "teacher/round-0/fold-1", "student/distilled", "student/ce"):
        assert read_history(run_dir / "stages" / folder)["epoch"].tolist() == [1]


def test_tensorboard_asked_for_but_not_installed_fails_before_any_stage(tmp_path, monkeypatch):
    from fat_distill.pipeline import PipelineConfig, load_run_json, run_direct, validate_config

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what an environment without the package sees
    config = validate_config(PipelineConfig, tiny_config(tmp_path, run={**tiny_config(tmp_path)["run"],
                                                                         "tensorboard": True}))
    with pytest.raises(RuntimeError, match=r"run.tensorboard is on, but the tensorboard package is not installed.*"
                                           r"fat-distill\[tensorboard\]"):
        run_direct(config)
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir() and not p.is_symlink()]
    assert load_run_json(run_dir)["stages"] == {}
