"""The training loop: it learns, checkpoints, resumes to identical weights, and stops on NaN."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fat_distill.models import build_model
from fat_distill.train import (
    CheckpointError,
    LossDivergedError,
    NonFiniteLossError,
    TrainConfig,
    build_objective,
    build_train_data,
    device_settings,
    fit,
    load_checkpoint,
    resolve_device,
)
from tests.helpers import write_identity_images

CPU = device_settings(torch.device("cpu"))


def small_config(**overrides) -> TrainConfig:
    base = dict(image_size=(32, 16), epochs=3, batch_p=3, batch_k=2, lr=1e-3, warmup_epochs=0.5, pad=2, seed=3)
    base.update(overrides)
    return TrainConfig(**base)


def run(tmp_path, frame, config, objective_name="ce", ckpt="ckpt", **kwargs):
    data = build_train_data(frame, tmp_path, config)
    torch.manual_seed(config.seed)
    model = build_model("small_cnn", data.num_classes, embedding_dim=16)
    objective = build_objective(objective_name, model=model, num_classes=data.num_classes,
                                num_samples=len(data.dataset), image_size=config.image_size,
                                centre_update=kwargs.pop("centre_update", "ema"))
    result = fit(model, objective, data.dataset, data.batch_sampler, config=config, settings=CPU,
                 checkpoint_dir=tmp_path / ckpt, stage="unit", feature_dataset=data.feature_dataset,
                 progress=False, **kwargs)
    return model, result


@pytest.fixture(scope="module")
def image_frame(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    return root, write_identity_images(root, identities=6, per_identity=6)


@pytest.mark.parametrize("objective", ["ce", "ce_triplet", "fat_hybrid"])
def test_fit_lowers_the_loss_and_writes_checkpoints(image_frame, objective):
    root, frame = image_frame
    config = small_config(epochs=4, lr=3e-3)
    out = root / f"run_{objective}"
    _, result = run(out.parent, frame, config, objective, ckpt=out.name)
    # The hybrid's FAT term starts near 0 (no centres yet, then centres of an untrained model) and grows
    # while the centres separate, so its cross-entropy term is the one that must fall within 4 epochs.
    term = "ce" if objective == "fat_hybrid" else "loss"
    losses = [h[term] for h in result.history]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert all(math.isfinite(h["loss"]) for h in result.history)
    assert result.final_checkpoint.exists()
    state = load_checkpoint(result.final_checkpoint)  # weights_only=True
    assert "model" in state and state["stage"] == "unit"
    # keep_checkpoints=2: only the two newest epoch files remain
    assert sorted(p.name for p in out.glob("epoch-*.pt")) == ["epoch-0002.pt", "epoch-0003.pt"]
    if objective != "ce":
        assert all(0.0 <= h["active_fraction"] <= 1.0 for h in result.history)


@pytest.mark.parametrize("objective,centre_update", [("ce_triplet", "ema"), ("fat_hybrid", "epoch")])
def test_interrupted_run_resumes_to_identical_weights(image_frame, objective, centre_update):
    root, frame = image_frame
    config = small_config(epochs=3)
    straight, _ = run(root, frame, config, objective, ckpt=f"straight_{objective}", centre_update=centre_update)

    class Interrupt(Exception):
        pass

    def stop_after_first(epoch, stats):
        if epoch == 0:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(root, frame, config, objective, ckpt=f"resumed_{objective}", centre_update=centre_update,
            on_epoch_end=stop_after_first)
    resumed, result = run(root, frame, config, objective, ckpt=f"resumed_{objective}", centre_update=centre_update)
    assert result.resumed_from_epoch == 1 and result.ran_epochs == 2
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # a finished stage is not trained again
    again, result = run(root, frame, config, objective, ckpt=f"resumed_{objective}", centre_update=centre_update)
    assert result.ran_epochs == 0
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), again.state_dict().values()))


def test_changed_config_is_not_resumed_silently(image_frame):
    root, frame = image_frame
    run(root, frame, small_config(epochs=1), ckpt="cfg")
    with pytest.raises(CheckpointError, match="another config"):
        run(root, frame, small_config(epochs=1, lr=5e-3), ckpt="cfg")


def test_nan_loss_names_stage_epoch_batch_and_checkpoint(image_frame):
    root, frame = image_frame
    config = small_config(epochs=3, lr=1e30, optimizer="sgd", warmup_epochs=0, momentum=0.0)
    with pytest.raises(NonFiniteLossError) as err:
        run(root, frame, config, ckpt="nan")
    msg = str(err.value)
    assert "stage 'unit'" in msg and "epoch" in msg and "batch" in msg
    assert err.value.last_checkpoint is None or err.value.last_checkpoint.exists()


def test_diverging_loss_stops_the_stage_before_it_reaches_nan(image_frame):
    """lr 1e6 with Adam: the loss reaches 1e12 without ever being NaN; it used to train on to the end."""
    root, frame = image_frame
    config = small_config(epochs=3, lr=1e6, optimizer="adam", warmup_epochs=0)
    with pytest.raises(LossDivergedError) as err:
        run(root, frame, config, ckpt="diverge")
    assert str(err.value).startswith("diverging loss") and "in stage 'unit', epoch 1, batch 2" in str(err.value)
    assert err.value.loss > 1e3 * max(err.value.reference, 1.0)
    assert not (root / "diverge" / "final.pt").exists()


def test_divergence_reference_survives_a_resume(image_frame):
    """After a resume, the guard compares with the first batch of the first attempt, kept in the checkpoint."""
    root, frame = image_frame
    run(root, frame, small_config(epochs=1, lr=3e-3), ckpt="ref")
    state = load_checkpoint(root / "ref" / "epoch-0000.pt")
    assert state["loss_reference"] > 0


def test_resolve_device():
    assert resolve_device("auto").type in ("cpu", "cuda")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_cuda_settings_pick_amp_and_channels_last():
    # A torch.device("cuda") object needs no GPU: these are the choices a CUDA stage would run with.
    for device in (torch.device("cuda"), torch.device("cuda", 1)):
        s = device_settings(device)
        expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        assert s.device == device and s.amp_dtype == expected
        assert s.channels_last and s.pin_memory and s.non_blocking
    off = device_settings(torch.device("cuda"), amp=False, channels_last=False)
    assert off.amp_dtype is None and not off.channels_last and off.pin_memory  # overrides win, copies stay pinned


def test_cpu_settings_are_plain_float32_unless_amp_is_forced():
    s = device_settings(torch.device("cpu"))
    assert s.amp_dtype is None and not s.channels_last and not s.pin_memory and not s.non_blocking
    forced = device_settings(torch.device("cpu"), amp=True)
    assert forced.amp_dtype == torch.bfloat16


def test_cpu_thread_setting_applies_and_keeps_the_current_one_by_default():
    from fat_distill.train import set_cpu_threads

    before = torch.get_num_threads()
    try:
        assert set_cpu_threads(1) == 1 == torch.get_num_threads()
        assert set_cpu_threads(None) == 1  # None leaves it alone
        with pytest.raises(ValueError, match="threads must be >= 1"):
            set_cpu_threads(0)
    finally:
        torch.set_num_threads(before)


def test_a_dataset_with_fewer_identities_than_batch_p_trains_with_all_of_them():
    from fat_distill.train.data import batch_identities

    labels = np.repeat(np.arange(5), 4)
    assert batch_identities(labels, 16) == 5
    assert batch_identities(labels, 4) == 4
    mask = labels < 3
    assert batch_identities(labels, 16, mask) == 3
    assert batch_identities(np.zeros(4, dtype=int), 16) == 16  # one identity: the sampler's own error says why
