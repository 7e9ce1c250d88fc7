"""Retrieval features: a model's inference embeddings, flip-averaged and L2-normalised."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor, nn
from fat_distill.cancel import check_cancelled
from fat_distill.data.batch_transforms import to_model_input
from fat_distill.data.image_cache import CachePolicy, open_image_cache
from fat_distill.data.image_dataset import ManifestImageDataset
from fat_distill.data.loading import ImageBatches, sequential_batches

logger = logging.getLogger(__name__)


def _autocast_dtype() -> torch.dtype:
    # bf16 keeps float32's range (no overflow in un-normalised embeddings) where
    # the GPU has it; older GPUs get fp16.
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _split_batch(batch: Tensor | tuple | list, batch_start: int) -> tuple[Tensor, Tensor]:
    """Images and dataset indices of one loader batch.

    A batch is either an image tensor (rows numbered in loader order) or a
    sequence ``(images, labels, indices, …)`` as :class:`ManifestImageDataset` yields.
    """
    if isinstance(batch, Tensor):
        images = batch
        indices = torch.arange(batch_start, batch_start + len(images))
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        images = batch[0]
        if len(batch) >= 3:
            indices = torch.as_tensor(batch[2], dtype=torch.int64).reshape(-1)
        else:
            indices = torch.arange(batch_start, batch_start + len(images))
    else:
        raise TypeError(
            "each loader batch must be an image tensor or a (images, labels, indices) sequence as "
            f"ManifestImageDataset yields, got {type(batch).__name__}"
        )
    if images.ndim != 4:
        raise ValueError(f"expected a (B, 3, H, W) image batch, got shape {tuple(images.shape)}")
    if len(indices) != len(images):
        raise ValueError(f"a batch has {len(images)} images but {len(indices)} indices")
    return images, indices.cpu()


def extract_features(
    model: nn.Module,
    loader: Iterable,
    device: str | torch.device,
    *,
    flip: bool = True,
    amp: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Embed every image a loader yields, for retrieval.

    The model runs in eval mode without autograd (its training mode is restored
    afterwards). Each image's embedding is ``model.embed`` (the BNNeck feature),
    averaged with the embedding of its horizontal flip when ``flip`` is set
    (Bag of Tricks' and the FAT authors' test-time recipe), then L2-normalised.
    On CUDA, batches are copied with ``non_blocking=True`` (pair with a pinned
    memory loader) and the forward pass runs under autocast.

    Args:
        model: has ``embed(images) -> (B, D)``, e.g. any
            :class:`fat_distill.models.EmbeddingModel`; already on ``device``.
        loader: yields image tensors (B, 3, H, W) or ``(images, labels,
            indices)`` tuples as :class:`ManifestImageDataset` does; uint8
            images are normalised on ``device``
            (:func:`~fat_distill.data.batch_transforms.normalize_batch`), float
            images are taken as already normalised.
        device: where the model runs.
        flip: also embed the horizontally flipped image and average.
        amp: autocast the forward pass (bf16 where supported, else fp16);
            ``None`` = on for CUDA, off elsewhere. The CPU path is always float32.

    Returns:
        ``(features, indices)``: features shape (N, D), float32, unit L2 norm,
        on the CPU; indices shape (N,), int64, each row's dataset index (the
        loader's position when batches carry no indices).

    Raises:
        TypeError: the model has no ``embed`` method or a batch has an unknown form.
        ValueError: the loader yields nothing.
    """
    if not callable(getattr(model, "embed", None)):
        raise TypeError(
            f"{type(model).__name__} has no embed(images) method; pass a fat_distill.models.EmbeddingModel"
        )
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    use_amp = on_cuda if amp is None else bool(amp)
    if use_amp and not on_cuda:
        logger.warning("extract_features: amp=True is only used on CUDA; running float32 on %s", device)
        use_amp = False
    autocast = torch.autocast("cuda", dtype=_autocast_dtype()) if use_amp else nullcontext()

    was_training = model.training
    model.eval()
    feature_batches: list[Tensor] = []
    index_batches: list[Tensor] = []
    seen = 0
    try:
        with torch.inference_mode():
            for batch in loader:
                check_cancelled(f"feature extraction after {seen} image(s)")
                images, indices = _split_batch(batch, seen)
                seen += len(images)
                images = to_model_input(images.to(device, non_blocking=on_cuda))
                with autocast:
                    embeddings = model.embed(images).float()
                    if flip:
                        embeddings = embeddings + model.embed(torch.flip(images, dims=[3])).float()
                # Summing before normalising is averaging: the mean's direction.
                features = torch.nn.functional.normalize(embeddings, dim=1)
                feature_batches.append(features.to("cpu", non_blocking=on_cuda))
                index_batches.append(indices)
    finally:
        model.train(was_training)
    if not feature_batches:
        raise ValueError("extract_features: the loader yielded no batches; is the dataset empty?")
    if on_cuda:
        torch.cuda.synchronize(device)  # the non_blocking copies to the CPU must land before use
    return torch.cat(feature_batches), torch.cat(index_batches)


def extract_manifest_features(
    model: nn.Module,
    frame: pd.DataFrame,
    root: str | Path,
    *,
    image_size: tuple[int, int],
    batch_size: int,
    device: str | torch.device,
    num_workers: int | str = "auto",
    flip: bool = True,
    allow_outside_root: bool = False,
    cache: CachePolicy | None = None,
) -> Tensor:
    """Features of the images listed in a ``dataset`` manifest frame, in the frame's row order.

    Reads the images resized to ``image_size`` as uint8 (from the decoded-image
    cache when ``cache`` allows, else decoded per sample), normalises each batch
    on ``device`` and calls :func:`extract_features`. The resize and the
    normalisation are those of ``build_transforms(image_size, train=False)``, so
    the features are the same with and without the cache.

    Args:
        model: as in :func:`extract_features`; already on ``device``.
        frame: rows with ``sample_id``, ``path`` and ``pid``, e.g. the query rows.
        root: the dataset root the ``path`` column is relative to.
        image_size: (height, width) the model expects, e.g. (256, 128).
        batch_size: images per forward pass (twice that with ``flip``).
        device: where the model runs.
        num_workers: DataLoader worker processes decoding uncached images (``"auto"``: from the machine).
        flip: average with the horizontally flipped image.
        allow_outside_root: permit paths that leave ``root`` (see :mod:`fat_distill.data.paths`).
        cache: decoded-image cache policy (:mod:`fat_distill.data.image_cache`); ``None``: decode per sample.

    Returns:
        shape (len(frame), D), float32, unit L2 norm, on the CPU; row i is ``frame.iloc[i]``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(frame) == 0:
        raise ValueError("extract_manifest_features: the frame has no rows")
    device = torch.device(device)
    dataset = ManifestImageDataset(frame, root, allow_outside_root=allow_outside_root, image_size=tuple(image_size))
    if cache is not None:
        images = open_image_cache(root, dataset.paths, dataset.image_size, cache, sample_ids=dataset.sample_ids)
        if images is not None:
            dataset.attach_cache(images)
    loader = ImageBatches(dataset, sequential_batches(len(dataset), batch_size), num_workers=num_workers,
                          pin_memory=device.type == "cuda", persistent_workers=False)
    features, indices = extract_features(model, loader, device, flip=flip)
    ordered = torch.empty_like(features)
    ordered[indices] = features
    return ordered
