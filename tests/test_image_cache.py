"""The decoded-image cache: written atomically, shared by stages, invalidated by content and size,
held on disk or in memory, and giving exactly the pixels, features and training of per-sample decoding."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fat_distill.data import CachePolicy, ImageDecodeError, ManifestImageDataset, decode_count, open_image_cache
from fat_distill.data.image_cache import CACHE_DIRNAME, cache_file, image_cache_key
from fat_distill.distill import TeacherConfig, make_soft_labels, run_teacher_round
from fat_distill.distill._common import predict_logits
from fat_distill.evaluate import extract_manifest_features
from fat_distill.manifests import write_manifest
from fat_distill.models import build_model
from fat_distill.pipeline import PipelineConfig
from fat_distill.train import TrainConfig, build_objective, build_train_data, device_settings, fit
from tests.helpers import write_identity_images

SIZE = (24, 12)


def images(tmp_path, identities=4, per_identity=3, seed=0, split="train"):
    root = tmp_path / "images"
    return root, write_identity_images(root, identities, per_identity, size=(32, 16), seed=seed, split=split)


def paths_and_ids(frame):
    return frame["path"].tolist(), frame["sample_id"].tolist()


def test_disk_cache_is_built_once_then_memory_mapped_without_decoding(tmp_path):
    root, frame = images(tmp_path)
    paths, ids = paths_and_ids(frame)
    policy = CachePolicy("disk", tmp_path / "cache")
    before = decode_count()
    cache = open_image_cache(root, paths, SIZE, policy, sample_ids=ids)
    assert decode_count() - before == len(paths)
    assert cache.mode == "disk" and isinstance(cache.images, np.memmap)
    assert cache.file == cache_file(tmp_path / "cache", cache.key, SIZE) and cache.file.is_file()
    assert cache.images.shape == (len(paths), 3, *SIZE) and cache.images.dtype == np.uint8
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")) == [cache.file.name]

    before = decode_count()
    again = open_image_cache(root, list(reversed(paths)), SIZE, policy)  # any order, same set: same file
    assert decode_count() == before
    assert again.file == cache.file and np.array_equal(again.images, cache.images)


def test_cached_and_decoded_datasets_give_identical_pixels(tmp_path):
    root, frame = images(tmp_path)
    cached = ManifestImageDataset(frame, root, image_size=SIZE,
                                  cache=open_image_cache(root, frame["path"].tolist(), SIZE,
                                                         CachePolicy("memory")))
    decoded = ManifestImageDataset(frame, root, image_size=SIZE)
    assert cached.cached and not decoded.cached
    for i in range(len(frame)):
        image, label, index = cached[i]
        expected, expected_label, _ = decoded[i]
        assert image.dtype == torch.uint8 and image.shape == (3, *SIZE)
        assert torch.equal(image, expected) and label == expected_label and index == i
    rows = [5, 0, 7, 7]
    assert torch.equal(cached.image_batch(rows), decoded.image_batch(rows))


def test_a_changed_image_or_size_gets_a_new_cache_file(tmp_path):
    root, frame = images(tmp_path)
    paths, _ = paths_and_ids(frame)
    policy = CachePolicy("disk", tmp_path / "cache")
    first = open_image_cache(root, paths, SIZE, policy)
    other_size = open_image_cache(root, paths, (16, 8), policy)
    assert other_size.file != first.file and other_size.images.shape[2:] == (16, 8)

    changed = root / paths[0]
    Image.fromarray(np.full((32, 16, 3), 255, np.uint8)).save(changed)  # new content, size and time
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert image_cache_key(root, sorted(paths), SIZE) != first.key
    before = decode_count()
    rebuilt = open_image_cache(root, paths, SIZE, policy)
    assert decode_count() - before == len(paths)
    assert rebuilt.file != first.file
    row = rebuilt.rows_of([paths[0]])[0]
    assert (rebuilt.images[row] == 255).all() and not (first.images[row] == 255).all()
    fewer = open_image_cache(root, paths[1:], SIZE, policy)
    assert fewer.key != rebuilt.key and len(fewer.paths) == len(paths) - 1


def test_memory_mode_writes_no_file_but_reads_an_existing_one(tmp_path):
    root, frame = images(tmp_path)
    paths, _ = paths_and_ids(frame)
    memory = open_image_cache(root, paths, SIZE, CachePolicy("memory", tmp_path / "cache"))
    assert memory.mode == "memory" and memory.file is None and not isinstance(memory.images, np.memmap)
    assert not (tmp_path / "cache").exists()

    disk = open_image_cache(root, paths, SIZE, CachePolicy("disk", tmp_path / "cache"))
    before = decode_count()
    loaded = open_image_cache(root, paths, SIZE, CachePolicy("memory", tmp_path / "cache"))
    assert decode_count() == before and loaded.file == disk.file and not isinstance(loaded.images, np.memmap)
    assert np.array_equal(loaded.images, memory.images)


def test_auto_uses_disk_with_a_folder_memory_without_and_nothing_over_budget(tmp_path):
    root, frame = images(tmp_path)
    paths, _ = paths_and_ids(frame)
    assert open_image_cache(root, paths, SIZE, CachePolicy("auto", tmp_path / "cache")).mode == "disk"
    assert open_image_cache(root, paths, SIZE, CachePolicy("auto")).mode == "memory"
    assert open_image_cache(root, paths, SIZE, CachePolicy("auto", tmp_path / "other", memory_budget_gb=0,
                                                           disk_budget_gb=0)) is None
    assert open_image_cache(root, paths, SIZE, CachePolicy("off", tmp_path / "cache")) is None
    with pytest.raises(ValueError, match="needs a cache directory"):
        open_image_cache(root, paths, SIZE, CachePolicy("disk"))
    with pytest.raises(ValueError, match="one of auto, memory, disk, off"):
        CachePolicy("ram")

    config = TrainConfig(image_size=SIZE, batch_p=2, batch_k=2, cache="auto", cache_memory_gb=0, cache_disk_gb=0)
    data = build_train_data(frame, root, config, cache_dir=tmp_path / "cache3")
    assert not data.dataset.cached and data.cache is None  # decoded per sample, by DataLoader workers


def test_a_bad_image_is_named_and_leaves_no_cache_file(tmp_path):
    root, frame = images(tmp_path)
    bad = frame["path"].iloc[-1]
    (root / bad).write_bytes((root / bad).read_bytes()[:60])  # truncated PNG
    with pytest.raises(ImageDecodeError, match=bad) as caught:
        open_image_cache(root, frame["path"].tolist(), SIZE, CachePolicy("disk", tmp_path / "cache"),
                         sample_ids=frame["sample_id"].tolist())
    assert caught.value.sample_id == frame["sample_id"].iloc[-1]
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []  # neither a partial .npy under the final name nor a temporary file
    with pytest.raises(ImageDecodeError, match=bad):
        build_train_data(frame, root, TrainConfig(image_size=SIZE, batch_p=2, batch_k=2, cache="memory"))


def test_an_unreadable_cache_file_is_rebuilt(tmp_path):
    root, frame = images(tmp_path)
    paths, _ = paths_and_ids(frame)
    policy = CachePolicy("disk", tmp_path / "cache")
    cache = open_image_cache(root, paths, SIZE, policy)
    expected = np.array(cache.images)
    cache.file.write_bytes(b"not an array")
    rebuilt = open_image_cache(root, paths, SIZE, policy)
    assert np.array_equal(rebuilt.images, expected)


def test_features_and_logits_are_identical_with_and_without_the_cache(tmp_path):
    root, frame = images(tmp_path, identities=3, per_identity=4)
    torch.manual_seed(0)
    model = build_model("small_cnn", 3, embedding_dim=8).eval()
    kwargs = dict(image_size=SIZE, batch_size=5, device="cpu")
    plain = extract_manifest_features(model, frame, root, num_workers=0, **kwargs)
    cached = extract_manifest_features(model, frame, root, cache=CachePolicy("disk", tmp_path / "cache"), **kwargs)
    assert torch.equal(plain, cached)

    settings = device_settings(torch.device("cpu"))
    with_cache = build_train_data(frame, root, TrainConfig(image_size=SIZE, batch_p=2, batch_k=2, cache="memory"))
    without = build_train_data(frame, root, TrainConfig(image_size=SIZE, batch_p=2, batch_k=2, cache="off",
                                                        num_workers=0))
    assert with_cache.dataset.cached and not without.dataset.cached
    assert np.array_equal(predict_logits(model, with_cache.feature_dataset, settings, batch_size=4),
                          predict_logits(model, without.feature_dataset, settings, batch_size=4, num_workers=0))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_training_is_identical_with_and_without_the_cache(tmp_path, num_workers):
    root, frame = images(tmp_path, identities=4, per_identity=4)
    weights = {}
    for mode in ("disk", "off"):
        config = TrainConfig(image_size=SIZE, epochs=2, batch_p=2, batch_k=2, lr=1e-3, pad=2, seed=1,
                             cache=mode, num_workers=num_workers if mode == "off" else "auto")
        data = build_train_data(frame, root, config, cache_dir=tmp_path / "cache")
        assert data.dataset.cached == (mode == "disk")
        torch.manual_seed(0)
        model = build_model("small_cnn", data.num_classes, embedding_dim=8)
        objective = build_objective("fat_hybrid", model=model, num_classes=data.num_classes,
                                    num_samples=len(data.dataset), image_size=SIZE, centre_update="epoch")
        fit(model, objective, data.dataset, data.batch_sampler, config=config,
            settings=device_settings(torch.device("cpu")), checkpoint_dir=tmp_path / f"ckpt-{mode}", stage=mode,
            feature_dataset=data.feature_dataset, progress=False)
        weights[mode] = model.state_dict()
    for name, value in weights["disk"].items():
        assert torch.equal(value, weights["off"][name]), name


@pytest.fixture
def dataset_manifest(tmp_path):
    root = tmp_path / "images"
    frame = pd.concat([write_identity_images(root, 4, 4, seed=0, split="train"),
                       write_identity_images(root, 4, 2, seed=1, split="query"),
                       write_identity_images(root, 4, 2, seed=2, split="gallery")], ignore_index=True)
    path = tmp_path / "manifests" / "dataset.parquet"
    write_manifest(frame, path, "dataset", stage="test", extra={"dataset_root": str(root)})
    return path


def test_a_second_stage_reads_the_first_stages_cache_without_decoding(dataset_manifest, tmp_path):
    config = TeacherConfig(rounds=1, train=TrainConfig(image_size=SIZE, embedding_dim=8, epochs=1, batch_p=2,
                                                       batch_k=2, warmup_epochs=0, pad=2))
    before = decode_count()
    round_manifest = run_teacher_round(dataset_manifest, None, config, 0, tmp_path / "teacher", "cpu")
    assert decode_count() - before == 16  # the train images, once
    cache_dir = dataset_manifest.parent / CACHE_DIRNAME
    assert len(list(cache_dir.glob("images-24x12-*.npy"))) == 1

    before = decode_count()
    make_soft_labels(dataset_manifest, tmp_path / "teacher" / "round-0" / "final.pt", round_manifest, config,
                     tmp_path / "soft.parquet", "cpu")
    assert decode_count() == before

    off = config.model_copy(update={"train": config.train.model_copy(update={"cache": "off", "num_workers": 0})})
    assert off.round_hash() == config.round_hash()  # cache settings change speed, not what a stage computes
    before = decode_count()
    make_soft_labels(dataset_manifest, tmp_path / "teacher" / "round-0" / "final.pt", round_manifest, off,
                     tmp_path / "soft_off.parquet", "cpu")
    assert decode_count() - before == 16


def test_cache_settings_are_left_out_of_config_hashes_and_a_pipeline_shares_one_folder(tmp_path):
    plain = PipelineConfig.model_validate({"run": {"manifests_root": str(tmp_path / "m")}})
    tuned = PipelineConfig.model_validate({"run": {"manifests_root": str(tmp_path / "m")},
                                           "student": {"train": {"cache": "memory", "num_workers": 3,
                                                                 "cache_dir": "/elsewhere"}}})
    assert plain.student.training_hash() == tuned.student.training_hash()
    shared = plain.with_shared_image_cache()
    expected = str((tmp_path / "m" / CACHE_DIRNAME).resolve())
    assert shared.teacher.train.cache_dir == expected and shared.student.train.cache_dir == expected
    assert shared.baseline_config("ce").train.cache_dir == expected
    assert tuned.with_shared_image_cache().student.train.cache_dir == "/elsewhere"
    assert shared.teacher.round_hash() == plain.teacher.round_hash()
