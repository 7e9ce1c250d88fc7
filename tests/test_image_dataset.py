"""Manifest image dataset (decoding, label mapping, bad files) and the ReID transforms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fat_distill.data.image_dataset import ImageDecodeError, ManifestImageDataset, build_label_map, decode_image_file
from fat_distill.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms

HEIGHT, WIDTH = 12, 6


def _pattern(seed: int) -> np.ndarray:
    """A (H, W, 3) uint8 image of smooth gradients (JPEG keeps them close to exact)."""
    rows = np.linspace(0, 1, HEIGHT)[:, None]
    cols = np.linspace(0, 1, WIDTH)[None, :]
    shape = (HEIGHT, WIDTH)
    channels = [40 + 150 * rows * cols + 20 * seed, np.broadcast_to(200 - 120 * rows, shape),
                np.broadcast_to(60 + 100 * cols, shape)]
    return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    (tmp_path / "cam1").mkdir()
    Image.fromarray(_pattern(0)).save(tmp_path / "cam1" / "0002_c1_0001.jpg", quality=95)
    Image.fromarray(_pattern(1)).save(tmp_path / "cam1" / "0005_c1_0002.png")
    Image.fromarray(_pattern(2)[:, :, 0], mode="L").save(tmp_path / "s1_1.pgm")
    Image.fromarray(_pattern(3)).save(tmp_path / "0009_c2_0003.bmp")
    return tmp_path


def _frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "sample_id": ["cam1/0002_c1_0001.jpg", "cam1/0005_c1_0002.png", "s1_1.pgm", "0009_c2_0003.bmp",
                          "cam1/0002_c1_0001.jpg#multi1"],
            "path": ["cam1/0002_c1_0001.jpg", "cam1/0005_c1_0002.png", "s1_1.pgm", "0009_c2_0003.bmp",
                     "cam1/0002_c1_0001.jpg"],
            "pid": np.array([2, 5, 1, 9, 5], dtype=np.int64),
            "camid": np.array([1, 1, -1, 2, 1], dtype=np.int64),
            "split": ["train"] * 5,
        }
    )


def test_decodes_jpeg_png_pgm_and_bmp_to_three_channel_uint8(image_root: Path) -> None:
    dataset = ManifestImageDataset(_frame(), image_root)
    images = [dataset[i][0] for i in range(len(dataset))]
    for image in images:
        assert image.dtype == torch.uint8 and image.shape == (3, HEIGHT, WIDTH)
    # PNG and BMP are lossless: exact pixels. JPEG: close.
    assert torch.equal(images[1], torch.from_numpy(_pattern(1)).permute(2, 0, 1))
    assert torch.equal(images[3], torch.from_numpy(_pattern(3)).permute(2, 0, 1))
    jpeg_error = (images[0].int() - torch.from_numpy(_pattern(0)).permute(2, 0, 1).int()).abs().float().mean()
    assert jpeg_error < 6
    # Greyscale PGM is replicated into three identical channels.
    grey = torch.from_numpy(_pattern(2)[:, :, 0])
    assert all(torch.equal(images[2][channel], grey) for channel in range(3))
    # A duplicated (multi-label) row reads the same file as its original.
    assert torch.equal(images[4], images[0])


def test_format_is_recognised_from_content_not_extension(image_root: Path) -> None:
    (image_root / "cam1" / "0005_c1_0002.png").rename(image_root / "mislabelled.jpg")
    image = decode_image_file(image_root / "mislabelled.jpg")
    assert torch.equal(image, torch.from_numpy(_pattern(1)).permute(2, 0, 1))


def test_labels_are_mapped_to_contiguous_indices_in_sorted_order(image_root: Path) -> None:
    dataset = ManifestImageDataset(_frame(), image_root)
    assert dataset.label_map == {1: 0, 2: 1, 5: 2, 9: 3}
    assert all(type(key) is int for key in dataset.label_map)
    assert dataset.num_classes == 4
    assert dataset.labels.tolist() == [1, 2, 0, 3, 2]
    assert [dataset[i][1:] for i in range(5)] == [(1, 0), (2, 1), (0, 2), (3, 3), (2, 4)]


def test_a_given_label_map_is_used_and_unknown_labels_are_named(image_root: Path) -> None:
    train_map = {1: 0, 2: 1, 5: 2, 9: 3, 11: 4}
    dataset = ManifestImageDataset(_frame(), image_root, label_map=train_map)
    assert dataset.label_map == train_map and dataset.num_classes == 5
    expected = r"2 rows.*not in label_map, first row 1 \(sample_id 'cam1/0005_c1_0002.png', label 5\)"
    with pytest.raises(ValueError, match=expected):
        ManifestImageDataset(_frame(), image_root, label_map={1: 0, 2: 1, 9: 2})


def test_other_label_columns_and_missing_columns(image_root: Path) -> None:
    frame = _frame().assign(true_pid=np.array([2, 2, 1, 9, 9], dtype=np.int64))
    dataset = ManifestImageDataset(frame, image_root, label_column="true_pid")
    assert dataset.label_map == {1: 0, 2: 1, 9: 2}
    assert dataset.labels.tolist() == [1, 1, 0, 2, 2]
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['true_pid'\]"):
        ManifestImageDataset(_frame(), image_root, label_column="true_pid")
    with_nan = frame.astype({"true_pid": "float64"})
    with_nan.loc[3, "true_pid"] = np.nan
    with pytest.raises(ValueError, match=r"missing at row 3 \(sample_id '0009_c2_0003.bmp'\)"):
        ManifestImageDataset(with_nan, image_root, label_column="true_pid")


@pytest.mark.parametrize(
    "damage, reason",
    [
        ("missing", "does not exist"),
        ("truncated_jpeg", "could not be decoded"),
        ("truncated_pgm", "could not be decoded"),
        ("text", "could not be decoded"),
        ("empty", "empty file"),
    ],
)
def test_bad_images_name_the_file_and_sample_id(image_root: Path, damage: str, reason: str) -> None:
    jpeg = image_root / "cam1" / "0002_c1_0001.jpg"
    pgm = image_root / "s1_1.pgm"
    if damage == "missing":
        jpeg.unlink()
    elif damage == "truncated_jpeg":
        jpeg.write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 2])
    elif damage == "truncated_pgm":
        pgm.write_bytes(pgm.read_bytes()[:-20])
    elif damage == "text":
        jpeg.write_text("not an image at all\n")
    else:
        jpeg.write_bytes(b"")
    broken_row = 2 if damage == "truncated_pgm" else 0
    dataset = ManifestImageDataset(_frame(), image_root)
    with pytest.raises(ImageDecodeError) as caught:
        dataset[broken_row]
    message = str(caught.value)
    broken = pgm if damage == "truncated_pgm" else jpeg
    assert str(broken) in message and reason in message
    assert f"sample_id '{_frame()['sample_id'][broken_row]}'" in message
    assert "fat-distill data index --verify --skip-bad" in message
    assert caught.value.path == str(broken)
    assert caught.value.sample_id == _frame()["sample_id"][broken_row]


def test_decode_errors_can_be_rebuilt_from_their_message(image_root: Path) -> None:
    # DataLoader workers send (type, message) to the main process, which re-raises
    # type(message); a constructor needing more arguments would turn the error into
    # a bare RuntimeError there.
    (image_root / "s1_1.pgm").unlink()
    with pytest.raises(ImageDecodeError) as caught:
        ManifestImageDataset(_frame(), image_root)[2]
    rebuilt = type(caught.value)(str(caught.value))
    assert isinstance(rebuilt, ImageDecodeError) and str(rebuilt) == str(caught.value)


def test_dataset_with_transforms_batches_through_a_dataloader(image_root: Path) -> None:
    dataset = ManifestImageDataset(_frame(), image_root, transform=build_transforms((16, 8), train=True))
    images, labels, indices = next(iter(DataLoader(dataset, batch_size=5)))
    assert images.shape == (5, 3, 16, 8) and images.dtype == torch.float32
    assert labels.tolist() == dataset.labels.tolist()
    assert indices.tolist() == [0, 1, 2, 3, 4]


def test_build_label_map_sorts_labels() -> None:
    assert build_label_map(np.array([30, 10, 20, 10])) == {10: 0, 20: 1, 30: 2}


def _uint8_image() -> torch.Tensor:
    return torch.from_numpy(_pattern(4)).permute(2, 0, 1).contiguous()


def test_eval_transform_is_resize_then_normalise() -> None:
    image = _uint8_image()
    out = build_transforms((24, 12), train=False)(image)
    assert out.shape == (3, 24, 12) and out.dtype == torch.float32
    resized = torch.nn.functional.interpolate(image[None].float() / 255, size=(24, 12), mode="bilinear",
                                              align_corners=False, antialias=True)[0]
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(out, (resized - mean) / std, atol=0.03, rtol=0)
    torch.testing.assert_close(out, build_transforms((24, 12), train=False)(image))


def test_train_transform_flips_pads_crops_and_erases() -> None:
    image = _uint8_image()
    evaluate = build_transforms((HEIGHT, WIDTH), train=False)
    always_flip = build_transforms((HEIGHT, WIDTH), train=True, flip_p=1.0, pad=0, random_erasing_p=0.0)
    torch.testing.assert_close(always_flip(image), evaluate(image).flip(-1))

    torch.manual_seed(0)
    padded = build_transforms((HEIGHT, WIDTH), train=True, flip_p=0.0, pad=4, random_erasing_p=0.0)
    outputs = [padded(image) for _ in range(20)]
    assert all(out.shape == (3, HEIGHT, WIDTH) for out in outputs)
    assert any(not torch.equal(out, outputs[0]) for out in outputs)  # the crop position varies
    # Pixels from the zero padding become the normalised value of black.
    black = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert any(torch.allclose(out[:, 0, 0], black) for out in outputs)

    erase = build_transforms((HEIGHT, WIDTH), train=True, flip_p=0.0, pad=0, random_erasing_p=1.0)
    erased = erase(image)
    assert (erased == 0).all(dim=0).any()  # a rectangle filled with the mean colour
    assert (evaluate(image) != 0).all()


def test_transform_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="size must be"):
        build_transforms((0, 64))
    with pytest.raises(ValueError, match="flip_p"):
        build_transforms((16, 8), flip_p=1.5)
    with pytest.raises(ValueError, match="pad"):
        build_transforms((16, 8), pad=-1)
