"""A torch Dataset of images listed in a manifest DataFrame, with contiguous class indices."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image

from fat_distill.data.paths import check_sample_paths
from fat_distill.data.transforms import resize_image

if TYPE_CHECKING:
    from fat_distill.data.image_cache import ImageCache

REPAIR_HINT = "run `fat-distill data index --verify --skip-bad` to find and drop unreadable images"

# Leading bytes of the formats torchvision decodes natively (libjpeg-turbo,
# libpng, libwebp, giflib: faster than PIL and no PIL → numpy copy).
_TORCHVISION_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a")


class ImageDecodeError(RuntimeError):
    """An image file is missing, truncated, or not an image.

    Takes a single message argument so DataLoader workers can re-raise it in
    the main process with its type intact; ``path`` and ``sample_id`` are
    attributes for programmatic handling.
    """

    def __init__(self, message: str, *, path: str | None = None, sample_id: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.sample_id = sample_id


_decodes = 0
_decodes_lock = threading.Lock()


def decode_count() -> int:
    """How many image files :func:`decode_image_file` has decoded in this process so far.

    DataLoader worker processes count in their own process, not here. Tests use
    it to check that a stage reading the decoded-image cache decodes nothing.
    """
    return _decodes


def _decoded_natively(data: bytes) -> bool:
    return data.startswith(_TORCHVISION_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def decode_image_file(path: str | Path, *, sample_id: str | None = None, hint: str = REPAIR_HINT) -> Tensor:
    """Read an image file as a (3, H, W) uint8 RGB tensor.

    JPEG, PNG, GIF and WEBP are decoded by ``torchvision.io.decode_image``; other
    formats (PGM, BMP, TIFF …) by PIL. The format is recognised from the file's
    content, not its extension. Greyscale and palette images are expanded to RGB,
    alpha is dropped, CMYK is converted, and 16-bit images are scaled to 8 bits.

    Args:
        path: the image file.
        sample_id: named in the error message if decoding fails.
        hint: what the error message tells the user to do (default: re-index with ``--verify --skip-bad``).

    Returns:
        shape (3, H, W), dtype uint8.

    Raises:
        ImageDecodeError: the file is missing, unreadable, truncated or not an image.
    """
    global _decodes
    with _decodes_lock:
        _decodes += 1
    where = f"image {str(path)!r}" + (f" (sample_id {sample_id!r})" if sample_id is not None else "")
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        reason = "does not exist" if isinstance(error, FileNotFoundError) else f"cannot be read ({error})"
        raise ImageDecodeError(f"{where} {reason}; {hint}", path=str(path), sample_id=sample_id) from error
    if not data:
        raise ImageDecodeError(f"{where} is an empty file; {hint}", path=str(path), sample_id=sample_id)
    try:
        if _decoded_natively(data):
            image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            if image.dtype != torch.uint8:  # a 16-bit PNG decodes to uint16: 0..65535 → 0..255
                image = (image.to(torch.int32) * 255 + 32767).div(65535, rounding_mode="floor").to(torch.uint8)
        else:
            with Image.open(io.BytesIO(data)) as opened:
                # convert() forces a full decode, so truncation fails here, not later.
                if opened.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grey: convert() would clip
                    grey = np.asarray(opened, dtype=np.float64) * (255.0 / 65535.0)
                    array = np.repeat(np.clip(np.rint(grey), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
                else:
                    array = np.asarray(opened.convert("RGB"))
            image = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
    except Exception as error:  # noqa: BLE001 - decoders raise RuntimeError, OSError, ValueError, SyntaxError …
        raise ImageDecodeError(
            f"{where} could not be decoded ({type(error).__name__}: {str(error).strip()[:200]}); {hint}",
            path=str(path),
            sample_id=sample_id,
        ) from error
    return image


def build_label_map(labels: pd.Series | np.ndarray) -> dict[Hashable, int]:
    """Map each distinct label to a contiguous index 0..C−1 in sorted label order.

    Args:
        labels: shape (N,), the label of each sample.

    Returns:
        ``{label: index}`` with plain Python keys (ints for integer labels).
    """
    # .tolist() gives plain Python scalars, so keys hash and print like manifest values.
    unique = sorted(pd.unique(pd.Series(labels)).tolist())
    return {label: index for index, label in enumerate(unique)}


class ManifestImageDataset(Dataset):
    """Images listed in a manifest DataFrame, labelled with contiguous class indices.

    ``dataset[i]`` returns ``(image, label_index, i)``: the image (a (3, H, W)
    uint8 tensor, resized to ``image_size`` when given, then passed through
    ``transform`` when given), the index of row i's label in :attr:`label_map`,
    and i itself, so losses and confidence scores can be written back to the
    manifest row (``frame.iloc[i]``).

    Training and evaluation read uint8 images at the model's ``image_size`` and
    normalise (and augment) whole batches on the device
    (:mod:`fat_distill.data.batch_transforms`). With a decoded-image ``cache``
    (:func:`fat_distill.data.image_cache.open_image_cache`) the images come from
    its array instead of being decoded again; :meth:`image_batch` then gathers a
    whole batch in one copy. Both ways give the same pixels (one resize function,
    :func:`fat_distill.data.transforms.resize_image`).

    Args:
        frame: rows with at least ``sample_id``, ``path`` (relative to ``root``,
            POSIX) and ``label_column``; e.g. the ``train`` rows of a ``dataset``
            manifest. Row order is kept.
        root: directory the ``path`` column is relative to.
        transform: applied to the (3, H, W) uint8 tensor; see
            :func:`fat_distill.data.transforms.build_transforms`.
        label_column: column holding the labels (``"pid"``, or ``"true_pid"`` to
            train on the ground truth).
        label_map: ``{label: index}``; pass the training set's map to give
            another split the same class indices. ``None`` builds it from the
            sorted distinct labels of ``frame``.
        allow_outside_root: read paths that are absolute, climb out with ``..``
            or are symlinks leaving ``root`` (rejected by default, see
            :mod:`fat_distill.data.paths`).
        image_size: ``(height, width)`` every decoded image is resized to;
            ``None`` keeps the decoded size (then ``cache`` must be ``None``).
        cache: decoded images of (at least) these rows' paths at ``image_size``.

    Raises:
        ValueError: a required column is missing, a label is missing (NaN), or a
            label is not in the given ``label_map`` (the first such row is named).
        UnsafeSamplePathError: a path leaves ``root`` (the first such row is named).
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        root: str | Path,
        *,
        transform: Callable[[Tensor], Tensor] | None = None,
        label_column: str = "pid",
        label_map: Mapping[Hashable, int] | None = None,
        allow_outside_root: bool = False,
        image_size: tuple[int, int] | None = None,
        cache: ImageCache | None = None,
    ) -> None:
        missing = [column for column in ("sample_id", "path", label_column) if column not in frame.columns]
        if missing:
            raise ValueError(
                f"ManifestImageDataset: the frame lacks column(s) {missing}; it has {list(frame.columns)}"
            )
        labels = frame[label_column]
        if labels.isna().any():
            row = int(np.flatnonzero(labels.isna().to_numpy())[0])
            raise ValueError(
                f"ManifestImageDataset: {label_column!r} is missing at row {row} "
                f"(sample_id {frame['sample_id'].iloc[row]!r}); drop or label that row"
            )
        self.root = Path(root)
        self.transform = transform
        self.label_column = label_column
        self.sample_ids: list[str] = frame["sample_id"].astype(str).tolist()
        self.paths: list[str] = frame["path"].astype(str).tolist()
        check_sample_paths(self.paths, self.root, sample_ids=self.sample_ids, allow_outside_root=allow_outside_root,
                           where="ManifestImageDataset")
        self.label_map: dict[Hashable, int] = (
            build_label_map(labels) if label_map is None else dict(label_map)
        )
        raw_labels = labels.tolist()  # plain Python scalars, hashing like the map's keys
        unknown = [row for row, label in enumerate(raw_labels) if label not in self.label_map]
        if unknown:
            row = unknown[0]
            raise ValueError(
                f"ManifestImageDataset: {len(unknown)} rows have a {label_column!r} not in label_map, first row {row} "
                f"(sample_id {self.sample_ids[row]!r}, label {raw_labels[row]!r}); "
                "build the map from a frame that contains every label, or filter those rows out"
            )
        self.labels = np.array([self.label_map[label] for label in raw_labels], dtype=np.int64)
        self.image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
        self.cache: ImageCache | None = None
        self.cache_rows: np.ndarray | None = None
        if cache is not None:
            self.attach_cache(cache)

    def attach_cache(self, cache: ImageCache) -> None:
        """Read images from ``cache`` from now on (it must hold every path of this dataset at ``image_size``)."""
        if self.image_size != cache.image_size:
            raise ValueError(f"ManifestImageDataset: the image cache holds {cache.image_size} images but "
                             f"image_size is {self.image_size}; open the cache at the dataset's image_size")
        self.cache_rows = cache.rows_of(self.paths)
        self.cache = cache

    @property
    def cached(self) -> bool:
        """Whether images come from a decoded-image cache (no decoding per sample)."""
        return self.cache is not None

    @property
    def num_classes(self) -> int:
        """Size of :attr:`label_map` (classifier outputs)."""
        return len(self.label_map)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        """Returns ``(image, label_index, index)``; see the class docstring."""
        if self.cache is not None:
            image = torch.from_numpy(np.array(self.cache.images[self.cache_rows[index]]))
        else:
            image = decode_image_file(self.root / self.paths[index], sample_id=self.sample_ids[index])
            if self.image_size is not None:
                image = resize_image(image, self.image_size)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index]), index

    def image_batch(self, indices: Sequence[int] | np.ndarray) -> Tensor:
        """The images of ``indices`` as one ``(B, 3, H, W)`` tensor (``transform`` is not applied).

        From the cache this is a single gather; otherwise each image is decoded
        and resized here, in this process (use a DataLoader with workers for that).
        """
        indices = np.asarray(indices, dtype=np.int64)
        if self.cache is not None:
            return torch.from_numpy(np.take(self.cache.images, self.cache_rows[indices], axis=0))
        images = []
        for index in indices.tolist():
            image = decode_image_file(self.root / self.paths[index], sample_id=self.sample_ids[index])
            images.append(image if self.image_size is None else resize_image(image, self.image_size))
        return torch.stack(images)
