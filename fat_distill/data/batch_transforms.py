"""Augmentation and normalisation of whole uint8 image batches, on the device that trains.

Transforming images one at a time in Python costs more than a small model's
step; on a batch the same recipe is a handful of tensor operations, run on the
GPU when training runs there. The images arrive as uint8 at the model's input
size (decoded and resized once, see :func:`fat_distill.data.transforms.resize_image`
and :mod:`fat_distill.data.image_cache`), so only augmentation is left per epoch.

:class:`BatchAugmentation` applies Bag of Tricks' training recipe, the one
:func:`fat_distill.data.transforms.build_transforms` applies per sample after the
resize: horizontal flip, zero padding + random crop back to size, scaling to
[0, 1], per-channel normalisation, random erasing (value 0 after normalisation,
i.e. the mean colour; torchvision's area scale (0.02, 0.33), aspect ratio
(0.3, 3.3) and up to 10 tries). :func:`normalize_batch` is the evaluation path:
scaling and normalisation only, with the same operations as torchvision's
``ToDtype(float32, scale=True)`` + ``Normalize``, so its values are identical.

Random numbers come from a generator seeded by ``(seed, epoch, batch)``, never
from torch's global random state: an epoch's augmentations do not depend on
what ran before it, a resumed run draws exactly what the uninterrupted run drew,
and a data-parallel rank draws those of the global batch number it trains. They
are drawn on the CPU (a few numbers per image) so they are the same on every device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fat_distill.data.transforms import IMAGENET_MEAN, IMAGENET_STD

#: torchvision RandomErasing's defaults: erased area as a fraction of the image, aspect ratio, tries.
ERASE_SCALE = (0.02, 0.33)
ERASE_RATIO = (0.3, 3.3)
ERASE_TRIES = 10


def batch_generator(seed: int, epoch: int, batch: int) -> np.random.Generator:
    """The random generator of one batch's augmentations, seeded by ``(seed, epoch, batch)``.

    ``numpy.random.SeedSequence`` mixes the three numbers, so neighbouring batches
    and epochs get unrelated streams. Negative seeds are taken modulo 2**64.
    """
    if epoch < 0 or batch < 0:
        raise ValueError(f"epoch and batch must be >= 0, got epoch={epoch}, batch={batch}")
    return np.random.default_rng([int(seed) % 2**64, int(epoch), int(batch)])


def _channel_tensor(values: Sequence[float], device: torch.device) -> Tensor:
    return torch.as_tensor(list(values), dtype=torch.float32, device=device).view(1, -1, 1, 1)


def normalize_batch(images: Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """Scale a uint8 batch to [0, 1] and normalise each channel: ``(x / 255 − mean) / std``.

    The operations are torchvision's ``ToDtype(float32, scale=True)`` and
    ``Normalize`` in the same order, so each image equals the per-sample
    transform's output exactly.

    Args:
        images: shape (B, 3, H, W), uint8, on any device.

    Returns:
        shape (B, 3, H, W), float32, on the same device.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize_batch expects a uint8 image batch, got {images.dtype}")
    if images.ndim != 4 or images.shape[1] != len(mean) or len(mean) != len(std):
        raise ValueError(f"expected a (B, {len(mean)}, H, W) batch and {len(mean)} means and stds, got shape "
                         f"{tuple(images.shape)}, {len(mean)} means, {len(std)} stds")
    scaled = images.to(torch.float32).mul_(1.0 / 255)
    return scaled.sub_(_channel_tensor(mean, images.device)).div_(_channel_tensor(std, images.device))


def to_model_input(images: Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """A loader batch as the model takes it: uint8 batches are normalised, float batches pass unchanged
    (they were transformed per sample, e.g. by :func:`~fat_distill.data.transforms.build_transforms`)."""
    return normalize_batch(images, mean, std) if images.dtype == torch.uint8 else images


@dataclass(frozen=True)
class AugmentationParams:
    """One batch's random choices (numpy arrays; B = batch size).

    Attributes:
        flip: (B,) bool, mirror the image horizontally.
        offset: (B, 2) int64, (top, left) of the crop window in the padded image, each in ``[0, 2·pad]``.
        erase: (B, 4) int64, (top, left, height, width) of the erased rectangle; height 0 = nothing erased.
    """

    flip: np.ndarray
    offset: np.ndarray
    erase: np.ndarray


@dataclass(frozen=True)
class BatchAugmentation:
    """Bag of Tricks' training augmentation applied to a whole uint8 batch; see the module docstring.

    Args:
        flip_p: probability of a horizontal flip.
        pad: zero padding (pixels, each side) before the random crop back to size; 0 disables both.
        random_erasing_p: probability of erasing one random rectangle.
        seed: base seed; batch ``b`` of epoch ``e`` draws from :func:`batch_generator` ``(seed, e, b)``.
        mean / std: per-channel normalisation after scaling to [0, 1].
    """

    flip_p: float = 0.5
    pad: int = 10
    random_erasing_p: float = 0.5
    seed: int = 0
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    _constants: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, probability in (("flip_p", self.flip_p), ("random_erasing_p", self.random_erasing_p)):
            if not 0.0 <= probability <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {probability}")
        if self.pad < 0:
            raise ValueError(f"pad must be >= 0 pixels, got {self.pad}")

    @classmethod
    def from_config(cls, config) -> BatchAugmentation:
        """The augmentation a :class:`fat_distill.train.TrainConfig` describes (flip_p, pad, random_erasing_p, seed)."""
        return cls(flip_p=config.flip_p, pad=config.resolved().pad, random_erasing_p=config.random_erasing_p,
                   seed=config.seed)

    def params(self, batch_size: int, height: int, width: int, *, epoch: int, batch: int) -> AugmentationParams:
        """The random choices for batch ``batch`` of epoch ``epoch``.

        One draw of ``(batch_size, 26)`` uniforms, whatever the probabilities: flip,
        two crop offsets, erase-or-not, 10 tries of erased area and of aspect ratio
        (torchvision ``RandomErasing.make_params``, vectorised: the first try that
        fits inside the image wins, none fitting erases nothing) and the erased
        rectangle's position.
        """
        u = batch_generator(self.seed, epoch, batch).random((batch_size, 6 + 2 * ERASE_TRIES))
        flip = u[:, 0] < self.flip_p
        offset = np.floor(u[:, 1:3] * (2 * self.pad + 1)).astype(np.int64)
        apply = u[:, 3] < self.random_erasing_p
        tries = slice(6, 6 + ERASE_TRIES), slice(6 + ERASE_TRIES, 6 + 2 * ERASE_TRIES)
        area = height * width * (ERASE_SCALE[0] + (ERASE_SCALE[1] - ERASE_SCALE[0]) * u[:, tries[0]])
        low, high = math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])
        ratio = np.exp(low + (high - low) * u[:, tries[1]])
        h = np.round(np.sqrt(area * ratio)).astype(np.int64)
        w = np.round(np.sqrt(area / ratio)).astype(np.int64)
        fits = (h < height) & (w < width)
        first, rows = fits.argmax(axis=1), np.arange(batch_size)
        erase = apply & fits.any(axis=1)
        h, w = np.where(erase, h[rows, first], 0), np.where(erase, w[rows, first], 0)
        top = np.floor(u[:, 4] * (height - h + 1)).astype(np.int64)
        left = np.floor(u[:, 5] * (width - w + 1)).astype(np.int64)
        return AugmentationParams(flip=flip, offset=offset, erase=np.stack([top, left, h, w], axis=1))

    def __call__(self, images: Tensor, *, epoch: int, batch: int) -> Tensor:
        """Augment and normalise ``images`` ((B, 3, H, W) uint8, any device) → float32 on the same device."""
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise TypeError(f"BatchAugmentation expects a (B, 3, H, W) uint8 batch, got {images.dtype} "
                            f"{tuple(images.shape)}")
        return self.apply(images, self.params(images.shape[0], images.shape[2], images.shape[3],
                                              epoch=epoch, batch=batch))

    def apply(self, images: Tensor, params: AugmentationParams) -> Tensor:
        """Apply given random choices (see :meth:`params`) to a uint8 batch → float32, normalised."""
        if self.pad > 0 or bool(params.flip.any()):
            images = self._flip_and_crop(images, params.flip, params.offset)
        out = self._normalize(images)
        # Erasing after normalisation with 0 fills with the mean colour (as build_transforms does);
        # one slice per erased image costs less than a (B, H, W) mask.
        for row in np.flatnonzero(params.erase[:, 2]).tolist():
            top, left, h, w = params.erase[row].tolist()
            out[row, :, top:top + h, left:left + w] = 0.0
        return out

    def _normalize(self, images: Tensor) -> Tensor:
        key = ("channels", str(images.device))
        if key not in self._constants:
            self._constants[key] = (_channel_tensor(self.mean, images.device), _channel_tensor(self.std, images.device))
        mean, std = self._constants[key]
        return images.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)

    def _flip_and_crop(self, images: Tensor, flip: np.ndarray, offset: np.ndarray) -> Tensor:
        # One gather does both. The padding is symmetric, so flipping then padding is padding then
        # flipping: output pixel (r, c) of image b is padded pixel (top_b + r, left_b + c), or
        # (top_b + r, W + 2·pad − 1 − left_b − c) when b is flipped. In flat padded coordinates that
        # is a per-image base plus one of two fixed grids.
        batch_size, channels, height, width = images.shape
        device, pad = images.device, self.pad
        padded_width = width + 2 * pad
        straight, mirrored = self._grids(height, width, device)
        base = offset[:, 0] * padded_width + np.where(flip, -offset[:, 1], offset[:, 1])
        index = torch.where(torch.from_numpy(flip).to(device).unsqueeze(1), mirrored, straight)
        index = index.add_(torch.from_numpy(base).to(device).unsqueeze(1))
        padded = F.pad(images, (pad, pad, pad, pad)) if pad > 0 else images
        flat = padded.reshape(batch_size, channels, -1)
        return torch.gather(flat, 2, index.unsqueeze(1).expand(batch_size, channels, height * width)).view(
            batch_size, channels, height, width)

    def _grids(self, height: int, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
        key = ("grids", height, width, str(device))
        if key not in self._constants:
            padded_width = width + 2 * self.pad
            rows = torch.arange(height, device=device).view(height, 1) * padded_width
            cols = torch.arange(width, device=device).view(1, width)
            self._constants[key] = ((rows + cols).view(1, -1), (rows + padded_width - 1 - cols).view(1, -1))
        return self._constants[key]
