"""Atomic file writes: a file under its final name is always complete.

Everything the pipeline writes (manifests, checkpoints, images, plots, run state)
goes to a hidden temporary file in the destination folder, is flushed, and is
renamed over the destination. A crash or a kill leaves at most a ``.*.tmp-*`` file.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextmanager
def atomic_writer(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[BinaryIO]:
    """Open a temporary binary file next to ``path``; on success it replaces ``path``, on error it is removed.

    A full disk, a read-only folder or missing permissions raise
    :class:`fat_distill.disk.OutputError`, which names the path and the cause
    (torch reports a full disk only as ``unexpected pos …``).
    """
    from fat_distill.disk import output_error, write_failure

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(exc, path.parent, action="create the folder") from exc
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        explained = write_failure(exc, path)
        if explained is exc:
            raise
        raise explained from exc
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # on a read-only folder this fails too; the first error is the one to report
            pass


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object], *, fsync: bool = True) -> Path:
    """Call ``write(handle)`` on a temporary file and rename it to ``path``; returns ``path``."""
    with atomic_writer(path, fsync=fsync) as handle:
        write(handle)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> Path:
    return atomic_write(path, lambda handle: handle.write(data), fsync=fsync)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())
