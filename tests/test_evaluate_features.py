"""Feature extraction: flip-averaged, L2-normalised inference embeddings in dataset order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fat_distill.data.image_dataset import ManifestImageDataset
from fat_distill.data.transforms import build_transforms
from fat_distill.evaluate import extract_features, extract_manifest_features
from fat_distill.models import build_model

IMAGE_SIZE = (32, 16)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    network = build_model("small_cnn", num_classes=4)
    # A few training-mode passes give the BatchNorms non-trivial running statistics.
    with torch.no_grad():
        for _ in range(3):
            network(torch.randn(8, 3, *IMAGE_SIZE))
    return network


class _Images(Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], 0, index


def _expected(model: torch.nn.Module, images: torch.Tensor, flip: bool) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        embeddings = model.embed(images)
        if flip:
            embeddings = embeddings + model.embed(images.flip(3))
    model.train()
    return torch.nn.functional.normalize(embeddings, dim=1)


@pytest.mark.parametrize("flip", [True, False])
def test_flip_averaged_normalised_embeddings(model, flip):
    images = torch.randn(10, 3, *IMAGE_SIZE)
    loader = DataLoader(_Images(images), batch_size=4)
    model.train()
    features, indices = extract_features(model, loader, "cpu", flip=flip)
    assert features.shape == (10, model.embedding_dim) and features.dtype == torch.float32
    torch.testing.assert_close(features.norm(dim=1), torch.ones(10))
    torch.testing.assert_close(features, _expected(model, images, flip), atol=1e-5, rtol=1e-5)
    assert indices.tolist() == list(range(10))
    assert model.training  # the caller's mode is restored


def test_flip_changes_features_and_batch_size_does_not(model):
    images = torch.randn(6, 3, *IMAGE_SIZE)
    flipped, _ = extract_features(model, DataLoader(_Images(images), batch_size=6), "cpu", flip=True)
    plain, _ = extract_features(model, DataLoader(_Images(images), batch_size=6), "cpu", flip=False)
    assert not torch.allclose(flipped, plain, atol=1e-3)
    one_by_one, _ = extract_features(model, DataLoader(_Images(images), batch_size=1), "cpu")
    torch.testing.assert_close(one_by_one, flipped, atol=1e-5, rtol=1e-5)  # eval-mode BatchNorm


def test_plain_tensor_batches_are_numbered_in_loader_order(model):
    images = torch.randn(5, 3, *IMAGE_SIZE)
    features, indices = extract_features(model, [images[:3], images[3:]], "cpu")
    assert indices.tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(features, _expected(model, images, flip=True), atol=1e-5, rtol=1e-5)


def test_rejects_models_without_embed_and_empty_loaders(model):
    with pytest.raises(TypeError, match="has no embed"):
        extract_features(torch.nn.Linear(3, 3), [torch.randn(1, 3, 4, 4)], "cpu")
    with pytest.raises(ValueError, match="yielded no batches"):
        extract_features(model, [], "cpu")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        extract_features(model, [torch.randn(3, 8, 8)], "cpu")


def _write_frame(root: Path) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for number in range(7):
        relative = f"gallery/{number:04d}_c{number % 3 + 1}.png"
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (40, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / relative)
        rows.append({"sample_id": relative, "path": relative, "pid": number % 3, "camid": -1, "split": "gallery"})
    return pd.DataFrame(rows)


def test_manifest_features_follow_the_frame_row_order(model, tmp_path):
    frame = _write_frame(tmp_path)
    features = extract_manifest_features(model, frame, tmp_path, image_size=IMAGE_SIZE, batch_size=3, device="cpu")
    dataset = ManifestImageDataset(frame, tmp_path, transform=build_transforms(IMAGE_SIZE, train=False))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    torch.testing.assert_close(features, _expected(model, images, flip=True), atol=1e-5, rtol=1e-5)

    shuffled = frame.sample(frac=1.0, random_state=3).reset_index(drop=True)
    permuted = extract_manifest_features(model, shuffled, tmp_path, image_size=IMAGE_SIZE, batch_size=2, device="cpu")
    position = {sample_id: row for row, sample_id in enumerate(frame["sample_id"])}
    order = [position[sample_id] for sample_id in shuffled["sample_id"]]
    torch.testing.assert_close(permuted, features[order], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_autocast_features_close_to_float32(model):
    images = torch.randn(16, 3, *IMAGE_SIZE)
    expected = _expected(model, images, flip=True)
    cuda_model = build_model("small_cnn", num_classes=4)
    cuda_model.load_state_dict(model.state_dict())
    cuda_model.to("cuda")
    features, _ = extract_features(cuda_model, DataLoader(_Images(images), batch_size=8, pin_memory=True), "cuda")
    assert features.device.type == "cpu" and features.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(features, expected).min() > 0.99
