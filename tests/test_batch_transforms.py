"""Batch augmentation and normalisation: the per-sample recipe, applied to whole uint8 batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from fat_distill.data import BatchAugmentation, build_transforms, normalize_batch, to_model_input
from fat_distill.data.batch_transforms import AugmentationParams, batch_generator
from fat_distill.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def random_batch(batch=8, height=12, width=10, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (batch, 3, height, width), dtype=np.uint8))


def per_sample(image, flip, offset, erase, pad):
    """The per-sample torchvision recipe of build_transforms(train=True) after the resize, with given choices."""
    height, width = image.shape[-2:]
    if flip:
        image = TF.horizontal_flip(image)
    if pad:
        image = TF.crop(TF.pad(image, [pad], fill=0), int(offset[0]), int(offset[1]), height, width)
    image = TF.normalize(TF.to_dtype(image, torch.float32, scale=True), list(IMAGENET_MEAN), list(IMAGENET_STD))
    top, left, h, w = (int(v) for v in erase)
    if h:
        image = TF.erase(image, top, left, h, w, torch.tensor(0.0))
    return image


def test_normalisation_equals_the_per_sample_eval_transform_exactly():
    images = random_batch(height=16, width=8)
    eval_transform = build_transforms((16, 8), train=False)  # no resize: the images have that size already
    batch = normalize_batch(images)
    assert batch.dtype == torch.float32 and batch.shape == images.shape
    for i in range(len(images)):
        assert torch.equal(batch[i], eval_transform(images[i]))
    assert to_model_input(images).equal(batch)
    assert to_model_input(batch) is batch  # float batches were transformed per sample already
    with pytest.raises(TypeError, match="uint8"):
        normalize_batch(batch)


def test_augmentation_equals_the_per_sample_recipe_for_the_same_random_choices():
    images = random_batch(batch=16)
    augment = BatchAugmentation(flip_p=0.5, pad=3, random_erasing_p=0.5, seed=7)
    params = augment.params(16, 12, 10, epoch=2, batch=5)
    # The draw covers every case at least once: flipped and not, erased and not, several offsets.
    assert params.flip.any() and not params.flip.all()
    assert (params.erase[:, 2] > 0).any() and (params.erase[:, 2] == 0).any()
    out = augment.apply(images, params)
    assert out.dtype == torch.float32 and out.shape == images.shape
    for i in range(16):
        expected = per_sample(images[i], params.flip[i], params.offset[i], params.erase[i], pad=3)
        assert torch.equal(out[i], expected), f"image {i} (flip {params.flip[i]}, offset {params.offset[i]})"
    assert torch.equal(augment(images, epoch=2, batch=5), out)


def test_a_flipped_known_pattern_is_mirrored_and_a_crop_shifts_it():
    ramp = torch.arange(10, dtype=torch.uint8).mul(20).expand(1, 3, 4, 10).contiguous()  # columns 0, 20, …, 180
    flip_only = BatchAugmentation(flip_p=1.0, pad=0, random_erasing_p=0.0)
    assert torch.equal(flip_only(ramp, epoch=0, batch=0), normalize_batch(ramp.flip(3)))
    keep = BatchAugmentation(flip_p=0.0, pad=0, random_erasing_p=0.0)
    assert torch.equal(keep(ramp, epoch=0, batch=0), normalize_batch(ramp))

    crop = BatchAugmentation(flip_p=0.0, pad=2, random_erasing_p=0.0)
    # offset (2, 2) is the centre of the padded image: no shift; (0, 4) moves 2 rows down and 2 columns left.
    centre = AugmentationParams(flip=np.array([False]), offset=np.array([[2, 2]]), erase=np.zeros((1, 4), np.int64))
    assert torch.equal(crop.apply(ramp, centre), normalize_batch(ramp))
    shifted = crop.apply(ramp, AugmentationParams(flip=np.array([False]), offset=np.array([[0, 4]]),
                                                  erase=np.zeros((1, 4), np.int64)))
    expected = torch.zeros_like(ramp)
    expected[:, :, 2:, :8] = ramp[:, :, :2, 2:]
    assert torch.equal(shifted, normalize_batch(expected))


def test_erasing_zeroes_one_rectangle_inside_the_image_and_nothing_else():
    images = random_batch(batch=64, height=32, width=16)
    augment = BatchAugmentation(flip_p=0.0, pad=0, random_erasing_p=1.0, seed=3)
    params = augment.params(64, 32, 16, epoch=0, batch=0)
    top, left, h, w = params.erase.T
    assert (h > 0).all() and (h < 32).all() and (w < 16).all()
    assert (top >= 0).all() and (top + h <= 32).all() and (left >= 0).all() and (left + w <= 16).all()
    area = h * w / (32 * 16)
    assert ((area > 0.01) & (area < 0.34)).all()  # torchvision's scale (0.02, 0.33), up to rounding
    out = augment.apply(images, params)
    plain = normalize_batch(images)
    for i in range(64):
        inside = torch.zeros(32, 16, dtype=torch.bool)
        inside[top[i]:top[i] + h[i], left[i]:left[i] + w[i]] = True
        assert (out[i][:, inside] == 0).all()
        assert torch.equal(out[i][:, ~inside], plain[i][:, ~inside])
    never = BatchAugmentation(flip_p=0.0, pad=0, random_erasing_p=0.0)
    assert (never.params(64, 32, 16, epoch=0, batch=0).erase[:, 2] == 0).all()


def test_random_choices_depend_only_on_seed_epoch_and_batch():
    images = random_batch()
    augment = BatchAugmentation(seed=11)
    first = augment(images, epoch=3, batch=4)
    assert torch.equal(first, BatchAugmentation(seed=11)(images, epoch=3, batch=4))  # a fresh object, same draw
    torch.manual_seed(123)  # the global random state plays no part
    assert torch.equal(first, augment(images, epoch=3, batch=4))
    for other in (dict(epoch=3, batch=5), dict(epoch=4, batch=4)):
        assert not torch.equal(first, augment(images, **other))
    assert not torch.equal(first, BatchAugmentation(seed=12)(images, epoch=3, batch=4))
    assert np.array_equal(batch_generator(-1, 0, 0).random(3), batch_generator(2**64 - 1, 0, 0).random(3))
    with pytest.raises(ValueError, match="epoch and batch"):
        batch_generator(0, -1, 0)


def test_flip_probability_and_offsets_are_spread_as_configured():
    augment = BatchAugmentation(flip_p=0.25, pad=4, random_erasing_p=0.5, seed=0)
    draws = [augment.params(64, 32, 16, epoch=0, batch=b) for b in range(50)]
    flips = np.concatenate([d.flip for d in draws])
    offsets = np.concatenate([d.offset for d in draws])
    erased = np.concatenate([d.erase[:, 2] > 0 for d in draws])
    assert abs(flips.mean() - 0.25) < 0.03
    assert abs(erased.mean() - 0.5) < 0.04
    assert offsets.min() == 0 and offsets.max() == 8 and set(np.unique(offsets)) == set(range(9))


def test_rejects_bad_input_and_settings():
    with pytest.raises(TypeError, match="uint8"):
        BatchAugmentation()(torch.zeros(2, 3, 4, 4), epoch=0, batch=0)
    with pytest.raises(ValueError, match="flip_p"):
        BatchAugmentation(flip_p=1.5)
    with pytest.raises(ValueError, match="pad"):
        BatchAugmentation(pad=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_match_the_cpu():
    images = random_batch(batch=32, height=32, width=16)
    augment = BatchAugmentation(seed=5)
    on_cpu = augment(images, epoch=1, batch=2)
    on_gpu = augment(images.cuda(), epoch=1, batch=2)
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=1e-6)
