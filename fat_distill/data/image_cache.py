"""The decoded-image cache: every image of a set of rows decoded and resized once, kept as one uint8 array.

Decoding a JPEG and resizing it costs more than a small model's training step,
and every teacher round, soft-label pass, student and evaluation used to pay it
again for the same files. The cache decodes each image once per image size into
a ``(N, 3, H, W)`` uint8 array; afterwards a batch is one gather from that array
and the per-epoch work is only augmentation (:mod:`fat_distill.data.batch_transforms`).

Where and under which name (mode ``disk``):
    ``<directory>/images-<H>x<W>-<key>.npy``, a plain ``.npy`` file read
    memory-mapped, row ``i`` = the ``i``-th of the sorted distinct image paths.
    ``key`` (16 hex digits of SHA-256) covers the cache format, the torchvision
    version (its resize), the image size, the resolved dataset root, and each
    image's path, size in bytes and modification time (the content check
    make and rsync use). A changed, added or removed image, another image size
    or another root gives another key, hence a fresh file; a row order or label
    change (e.g. injected label noise) does not, so the teacher, the soft labels,
    the students and their evaluations of a dataset share one file per row set.
    The stages put ``directory`` beside the dataset manifest (``.image_cache/``);
    a pipeline run uses ``<run.manifests_root>/.image_cache/`` so runs share it
    too; ``train.cache_dir`` overrides both. Old files are not deleted
    automatically: remove the folder to reclaim the space.

How it is written:
    into a hidden temporary file beside the final name, renamed over it once
    complete (a kill leaves at most a ``.*.tmp-*`` file, never a partial array
    under the final name). A lock file serialises builders of the same file, so
    parallel stages decode it once and the others wait and read it.

Modes (``train.cache``):
    ``disk``: build the file if missing and memory-map it (the OS page cache
    keeps the hot part in memory; it works for arrays larger than RAM).
    ``memory``: hold the array in this process's memory; read an existing file
    when there is one, else decode without writing a file.
    ``auto``: ``disk`` when a directory is known and the array fits the disk
    budget and half the free disk space, else ``memory`` when it fits the memory
    budget and half the available memory, else no cache (images are decoded per
    sample by DataLoader workers, as before).
    ``off``: no cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torchvision
from numpy.lib.format import open_memmap

from fat_distill.atomic import temporary_sibling
from fat_distill.data.image_dataset import decode_image_file
from fat_distill.data.transforms import resize_image

log = logging.getLogger("fat_distill.data")

CacheMode = Literal["auto", "memory", "disk", "off"]
CACHE_MODES: tuple[str, ...] = ("auto", "memory", "disk", "off")
#: Name of the cache folder the stages use beside the dataset manifest, and a pipeline under its manifests root.
CACHE_DIRNAME = ".image_cache"
#: Part of every key: raise it when the decoding or the array layout changes.
CACHE_FORMAT = 1
GIB = 1024**3

try:  # POSIX: serialise builders of one file; elsewhere parallel builders both decode (still correct).
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


@dataclass(frozen=True)
class CachePolicy:
    """Whether and where to cache decoded images (see the module docstring for the modes).

    Args:
        mode: ``auto``, ``memory``, ``disk`` or ``off``.
        directory: folder of the ``.npy`` files; ``None``: no file (``auto`` can only use memory,
            ``disk`` is an error).
        memory_budget_gb: the largest array ``auto`` keeps in memory.
        disk_budget_gb: the largest array ``auto`` writes to disk.
    """

    mode: CacheMode = "auto"
    directory: Path | None = None
    memory_budget_gb: float = 8.0
    disk_budget_gb: float = 64.0

    def __post_init__(self) -> None:
        if self.mode not in CACHE_MODES:
            raise ValueError(f"image cache mode must be one of {', '.join(CACHE_MODES)}, got {self.mode!r}")
        if self.directory is not None and not isinstance(self.directory, Path):
            object.__setattr__(self, "directory", Path(self.directory))


@dataclass(frozen=True)
class ImageCache:
    """Decoded images of a set of paths at one size.

    Attributes:
        images: ``(N, 3, H, W)`` uint8; memory-mapped (mode ``disk``) or in memory.
        paths: the N sorted distinct paths (relative to the dataset root); row i is ``paths[i]``.
        image_size: ``(H, W)``.
        key: the content key (see the module docstring).
        file: the ``.npy`` file, or ``None`` for an array decoded into memory only.
        mode: ``disk`` or ``memory``, how it is held.
    """

    images: np.ndarray
    paths: tuple[str, ...]
    image_size: tuple[int, int]
    key: str
    file: Path | None
    mode: str

    def rows_of(self, paths: Sequence[str]) -> np.ndarray:
        """Row of each path in :attr:`images`, shape (len(paths),) int64.

        Raises:
            KeyError: a path is not in the cache (the first one is named).
        """
        row_of = {path: row for row, path in enumerate(self.paths)}
        try:
            return np.fromiter((row_of[path] for path in paths), dtype=np.int64, count=len(paths))
        except KeyError as error:
            raise KeyError(f"image {error.args[0]!r} is not in the decoded-image cache "
                           f"{self.file or '(in memory)'}; open the cache with every path the dataset reads") from None


def image_cache_key(root: str | os.PathLike, paths: Sequence[str], image_size: tuple[int, int]) -> str:
    """The content key of the decoded images of ``paths`` (sorted, distinct) at ``image_size``.

    Covers the cache format, torchvision's version, the size, the resolved root and
    every image's path, byte size and modification time (nanoseconds). Missing
    files are keyed as missing; decoding them then raises, naming the file.
    """
    root = Path(root)
    digest = hashlib.sha256()
    digest.update(f"fat-distill image cache {CACHE_FORMAT}|torchvision {torchvision.__version__}|"
                  f"{int(image_size[0])}x{int(image_size[1])}|{os.path.realpath(root)}\n".encode())
    for path in paths:
        try:
            stat = os.stat(root / path)
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\0missing\n".encode())
    return digest.hexdigest()[:16]


def cache_file(directory: str | os.PathLike, key: str, image_size: tuple[int, int]) -> Path:
    """Where the array of ``key`` lives in ``directory``."""
    return Path(directory) / f"images-{int(image_size[0])}x{int(image_size[1])}-{key}.npy"


def decode_into(out: np.ndarray, root: str | os.PathLike, paths: Sequence[str], image_size: tuple[int, int], *,
                sample_ids: Sequence[str] | None = None, workers: int | None = None,
                progress: bool = False) -> None:
    """Decode and resize ``paths`` (relative to ``root``) into ``out[i]``, in threads.

    Decoders and the resize release the GIL, so threads decode in parallel
    without worker processes. A Ctrl-C or a failure cancels the images not yet
    started (within one chunk per thread).

    Args:
        out: ``(len(paths), 3, H, W)`` uint8, e.g. a memory-mapped file.
        sample_ids: named with the path when an image fails (default: the path).
        workers: threads; default ``min(8, CPUs)``.
        progress: show a Rich progress bar.

    Raises:
        ImageDecodeError: an image is missing, truncated or not an image (the file and sample are named).
    """
    root = Path(root)
    size = (int(image_size[0]), int(image_size[1]))
    if workers is None:
        workers = min(8, _cpu_count())
    chunk = 64

    def decode_chunk(start: int) -> int:
        for i in range(start, min(start + chunk, len(paths))):
            image = decode_image_file(root / paths[i], sample_id=None if sample_ids is None else sample_ids[i])
            out[i] = resize_image(image, size).numpy()
        return min(chunk, len(paths) - start)

    starts = range(0, len(paths), chunk)
    with _progress(progress, len(paths), f"decoding {len(paths)} images at {size[0]}x{size[1]}") as advance:
        if workers <= 1:
            for start in starts:
                advance(decode_chunk(start))
            return
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="image-cache")
        try:
            for done in pool.map(decode_chunk, starts):
                advance(done)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def open_image_cache(root: str | os.PathLike, paths: Sequence[str], image_size: tuple[int, int],
                     policy: CachePolicy, *, sample_ids: Sequence[str] | None = None,
                     progress: bool = False) -> ImageCache | None:
    """The decoded images of ``paths`` at ``image_size``: read from the cache, or decoded once and cached.

    Args:
        root: the dataset root the paths are relative to.
        paths: the images (duplicates allowed, order free: the cache holds the sorted distinct paths).
        image_size: ``(height, width)``.
        policy: mode, directory and budgets.
        sample_ids: aligned with ``paths``; named when an image fails to decode.
        progress: show a Rich progress bar while decoding.

    Returns:
        the cache, or ``None`` when the policy (or ``auto``'s budgets) says the
        images are to be decoded per sample.

    Raises:
        ImageDecodeError: an image cannot be decoded (the file is named; no cache file is left).
        ValueError: mode ``disk`` without a directory.
    """
    if policy.mode == "off" or len(paths) == 0:
        return None
    size = (int(image_size[0]), int(image_size[1]))
    ids_by_path = dict(zip(paths, sample_ids)) if sample_ids is not None else {}
    distinct = sorted(set(paths))
    nbytes = len(distinct) * 3 * size[0] * size[1]
    key = image_cache_key(root, distinct, size)
    file = cache_file(policy.directory, key, size) if policy.directory is not None else None
    mode = _resolve_mode(policy, nbytes, file)
    if mode == "off":
        log.info("image cache: %d images at %dx%d need %.2f GiB, more than the budget (memory %.1f GiB, disk %.1f "
                 "GiB) allows; decoding per sample", len(distinct), size[0], size[1], nbytes / GIB,
                 policy.memory_budget_gb, policy.disk_budget_gb)
        return None
    ids = [ids_by_path.get(path) for path in distinct] if ids_by_path else None
    if mode == "disk":
        if file is None:
            raise ValueError("image cache mode 'disk' needs a cache directory (train.cache_dir)")
        images = _disk_array(file, root, distinct, size, ids, progress)
    elif file is not None and file.is_file():
        images = _load_file(file, len(distinct), size, mmap=False)
        if images is None:
            images = _decode_in_memory(root, distinct, size, ids, progress)
            file = None
    else:
        images = _decode_in_memory(root, distinct, size, ids, progress)
        file = None
    return ImageCache(images=images, paths=tuple(distinct), image_size=size, key=key, file=file, mode=mode)


def _resolve_mode(policy: CachePolicy, nbytes: int, file: Path | None) -> str:
    if policy.mode != "auto":
        return policy.mode
    if file is not None:
        if file.is_file() and nbytes <= policy.disk_budget_gb * GIB:
            return "disk"
        if nbytes <= policy.disk_budget_gb * GIB and nbytes <= _free_disk(file.parent) / 2:
            return "disk"
    if nbytes <= policy.memory_budget_gb * GIB and nbytes <= _available_memory() / 2:
        return "memory"
    return "off"


def _disk_array(file: Path, root, paths: list[str], size: tuple[int, int], sample_ids, progress: bool) -> np.ndarray:
    images = _load_file(file, len(paths), size, mmap=True)
    if images is not None:
        return images
    file.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(file):
        images = _load_file(file, len(paths), size, mmap=True)  # another process built it while we waited
        if images is not None:
            return images
        started = time.perf_counter()
        tmp = temporary_sibling(file)
        try:
            array = open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), 3, *size))
            decode_into(array, root, paths, size, sample_ids=sample_ids, progress=progress)
            array.flush()
            del array
            os.replace(tmp, file)
        finally:
            tmp.unlink(missing_ok=True)
        log.info("image cache: decoded %d images at %dx%d into %s (%.1f MiB) in %.1fs", len(paths), size[0], size[1],
                 file, file.stat().st_size / 2**20, time.perf_counter() - started)
    return _load_file(file, len(paths), size, mmap=True)


def _decode_in_memory(root, paths: list[str], size: tuple[int, int], sample_ids, progress: bool) -> np.ndarray:
    started = time.perf_counter()
    images = np.empty((len(paths), 3, *size), dtype=np.uint8)
    decode_into(images, root, paths, size, sample_ids=sample_ids, progress=progress)
    log.info("image cache: decoded %d images at %dx%d into memory (%.1f MiB) in %.1fs", len(paths), size[0], size[1],
             images.nbytes / 2**20, time.perf_counter() - started)
    return images


def _load_file(file: Path, count: int, size: tuple[int, int], *, mmap: bool) -> np.ndarray | None:
    """The array in ``file`` when it exists and has the expected shape and dtype (else None, with a warning)."""
    if not file.is_file():
        return None
    try:
        images = np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as error:
        log.warning("image cache: %s cannot be read (%s); decoding again", file, error)
        return None
    if images.dtype != np.uint8 or images.shape != (count, 3, *size):
        log.warning("image cache: %s holds a %s %s array, expected uint8 %s; decoding again", file, images.dtype,
                    images.shape, (count, 3, *size))
        return None
    return images


@contextlib.contextmanager
def _build_lock(file: Path) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    with open(file.with_name(f".{file.name}.lock"), "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _progress(show: bool, total: int, description: str) -> Iterator:
    if not show:
        yield lambda n: None
        return
    from rich.errors import LiveError
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   transient=True)
    try:
        bar.start()
    except LiveError:  # another live display (a training bar of a parallel stage) is showing
        yield lambda n: None
        return
    task = bar.add_task(description, total=total)
    try:
        yield lambda n: bar.advance(task, n)
    finally:
        bar.stop()


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _free_disk(directory: Path) -> float:
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return float(shutil.disk_usage(probe).free)
    except OSError:
        return 0.0


def _available_memory() -> float:
    """Bytes of memory available to new allocations (Linux MemAvailable; elsewhere free pages, else unlimited)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return float("inf")
