"""Image-file checks: which files count as images, and whether one decodes.

Indexing a dataset only looks at file names; a truncated download or an HTML
error page saved as ``.jpg`` is then found only mid-epoch, inside a DataLoader
worker. :func:`check_image` decodes a file up front so such files can be listed
(and skipped) before any training starts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from PIL import Image

__all__ = ["IMAGE_SUFFIXES", "is_image_file", "check_image", "find_missing_files", "find_unreadable_images"]

#: File suffixes (lower case, with the dot) treated as images; matched case-insensitively.
IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".tif", ".tiff", ".webp"}
)


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` has an image suffix (see :data:`IMAGE_SUFFIXES`); the file is not opened."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_SUFFIXES


#: Bytes at the end of a file searched for the format's end marker by the quick check.
TAIL_BYTES = 1024


def _complete_tail(image: Image.Image, path: Path, size: int) -> bool:
    """Whether a file's last bytes hold its format's end marker (JPEG EOI, PNG IEND); True for other formats.

    In JPEG entropy-coded data every 0xFF byte is followed by 0x00 or a restart
    marker, so ``FF D9`` can only be the end-of-image marker: a file cut off
    mid-download lacks it.
    """
    marker = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND"}.get(image.format or "")
    if marker is None:
        return True
    with open(path, "rb") as handle:
        handle.seek(max(0, size - TAIL_BYTES))
        return marker in handle.read()


def check_image(path: str | os.PathLike[str], *, full: bool = True) -> str | None:
    """Say why one image file is unusable, if it is: a full decode, or a quick header-and-end check.

    ``Image.open`` alone only reads the header, so a file cut off mid-download
    passes it; ``load()`` decodes every pixel and fails on truncation. PIL's
    global ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left as it is (off by
    default), so truncated files are reported rather than silently padded.

    The quick check (``full=False``) reads the header (format, size) and the
    file's last kilobyte: a JPEG or PNG without its end marker there (a
    truncated file) is then decoded fully to decide, so the quick check
    reports only files a full decode rejects too, for a fraction of the reading.
    It misses damage in the middle of a file whose end survived.

    Args:
        path: the image file.
        full: decode every pixel (True) or check header and end (False).

    Returns:
        ``None`` when the file is usable, else a one-line reason such as
        ``"OSError: image file is truncated (3 bytes not processed)"`` or
        ``"missing: no such file"``.
    """
    path = Path(path)
    if not path.exists():
        return "missing: no such file"
    if not path.is_file():
        return "not a regular file"
    size = path.stat().st_size
    if size == 0:
        return "empty file (0 bytes)"
    try:
        with Image.open(path) as image:
            if image.width <= 0 or image.height <= 0:
                return f"empty image ({image.width}x{image.height} pixels)"
            if full or not _complete_tail(image, path, size):
                image.load()
    # Corrupt data can surface as almost any exception from a decoder plugin
    # (OSError, SyntaxError, struct.error, IndexError, DecompressionBombError…);
    # every one of them means "this file cannot be used", so all are reported.
    except Exception as error:  # noqa: BLE001
        message = str(error).strip().splitlines()
        return f"{type(error).__name__}: {message[0] if message else 'cannot decode'}"
    return None


def find_unreadable_images(
    root: str | os.PathLike[str],
    relative_paths: Sequence[str],
    *,
    workers: int | None = None,
    full: bool = True,
) -> list[tuple[str, str]]:
    """Run :func:`check_image` on many files and return the ones that fail.

    Decoding is mostly I/O plus C code that releases the GIL, so a thread pool
    speeds it up without the start-up cost of processes.

    Args:
        root: directory the paths are relative to.
        relative_paths: ``(N,)`` paths relative to ``root`` (POSIX separators).
        workers: threads to use; default ``min(8, os.cpu_count())``.
        full: decode every pixel (True) or the quick header-and-end check (see :func:`check_image`).

    Returns:
        ``(relative_path, reason)`` for each unreadable file, in input order.
    """
    root = Path(root)
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    full_paths = [root / relative_path for relative_path in relative_paths]
    check = partial(check_image, full=full)
    if workers <= 1 or len(full_paths) < 2:
        reasons = [check(path) for path in full_paths]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            reasons = list(pool.map(check, full_paths, chunksize=64))
    return [
        (relative_path, reason)
        for relative_path, reason in zip(relative_paths, reasons)
        if reason is not None
    ]


def find_missing_files(root: str | os.PathLike[str], relative_paths: Sequence[str]) -> list[int]:
    """Positions of the paths that name no regular file under ``root`` (one ``stat`` each, nothing decoded).

    The cheap check for a manifest whose images were moved, renamed or never
    copied; :func:`find_unreadable_images` also decodes every file. An absolute
    path is looked up as it is (``root / "/abs"`` is ``/abs``): whether it may
    be read at all is :func:`fat_distill.data.paths.check_sample_paths`' question.

    Args:
        root: directory the paths are relative to.
        relative_paths: ``(N,)`` paths relative to ``root``.

    Returns:
        The 0-based positions of missing files, in input order.
    """
    root = Path(root)
    return [row for row, relative_path in enumerate(relative_paths) if not (root / relative_path).is_file()]
