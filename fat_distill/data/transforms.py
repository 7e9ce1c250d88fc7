"""Image transforms for ReID training and evaluation (torchvision.transforms.v2).

The training recipe is Bag of Tricks' (Luo et al. 2019): resize, random
horizontal flip, zero-pad + random crop back to size, normalise, random erasing.

Training and evaluation resize each image once with :func:`resize_image` (when
it is decoded, or when the decoded-image cache is built) and apply everything
else to whole uint8 batches on the device (:mod:`fat_distill.data.batch_transforms`).
:func:`build_transforms` is the same recipe per sample, for code that wants a
single transformed image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize a (3, H, W) uint8 image to ``size`` = (height, width), bilinear with antialiasing.

    The one resize of every input path: per-sample decoding, the decoded-image
    cache and :func:`build_transforms` (``v2.Resize(size, antialias=True)`` calls
    this same function), so features do not depend on whether the cache is used.

    Returns:
        shape (3, height, width), uint8 (the input itself when it already has that size).
    """
    return TF.resize(image, [int(size[0]), int(size[1])], antialias=True)


def build_transforms(
    size: tuple[int, int] = (256, 128),
    train: bool = True,
    *,
    flip_p: float = 0.5,
    pad: int = 10,
    random_erasing_p: float = 0.5,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """Transforms from a (3, H, W) uint8 image tensor to a normalised (3, h, w) float32 tensor.

    Args:
        size: output (height, width); ReID uses tall images, e.g. (256, 128) or (384, 128).
        train: ``True`` adds the augmentations; ``False`` is resize + normalise only.
        flip_p: probability of a horizontal flip (train only).
        pad: pixels of zero padding on each side before the random crop back to
            ``size`` (train only); 0 disables pad + crop.
        random_erasing_p: probability of erasing a random rectangle (train only),
            which simulates occlusion.
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel standard deviation divided by.

    Returns:
        a ``v2.Compose`` to pass as the dataset's ``transform``.
    """
    if len(size) != 2 or not all(isinstance(side, int) and side > 0 for side in size):
        raise ValueError(f"size must be (height, width) with positive ints, got {size!r}")
    for name, probability in (("flip_p", flip_p), ("random_erasing_p", random_erasing_p)):
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1], got {probability}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0 pixels, got {pad}")
    if len(mean) != 3 or len(std) != 3 or any(value <= 0 for value in std):
        raise ValueError(f"mean and std need 3 values each and std must be positive, got mean={mean}, std={std}")

    size = (int(size[0]), int(size[1]))
    steps: list[v2.Transform] = [v2.Resize(size, antialias=True)]
    if train:
        if flip_p > 0:
            steps.append(v2.RandomHorizontalFlip(p=flip_p))
        if pad > 0:
            steps += [v2.Pad(pad, fill=0), v2.RandomCrop(size)]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
    if train and random_erasing_p > 0:
        # Erasing after normalisation with value 0 fills with the dataset mean
        # colour, the least informative value, as in Bag of Tricks.
        steps.append(v2.RandomErasing(p=random_erasing_p, value=0))
    return v2.Compose(steps)
