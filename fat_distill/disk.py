"""Disk and permission failures in words a user can act on: which path, what happened, what to do.

A full disk surfaces from torch as ``unexpected pos 608512 vs 608408`` and from
Python as ``[Errno 28]`` without the folder; a read-only folder as a bare
``[Errno 30]``. :func:`describe_os_error` names the path, the cause and the free
space; :class:`OutputError` carries that message through the stages so the CLI
can print it and tell the user that the run resumes once the cause is fixed.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

__all__ = ["OutputError", "describe_os_error", "free_bytes", "output_error", "write_failure"]

_MB = 1024 * 1024
#: Below this much free space, a write that failed without saying why is taken for a full disk.
FULL_DISK_BYTES = 16 * _MB
# How torch.save reports a failed write (no errno): "unexpected pos 608512 vs 608408",
# "PytorchStreamWriter failed writing file data/0: file write failed".
_TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed", "failed writing file")


class OutputError(OSError):
    """Writing an output failed for a reason outside the program (full disk, read-only folder, permissions).

    The message names the path and the cause; ``path`` and ``errno`` are attributes.
    Nothing partial is left under a final name, so the run resumes once the cause is fixed.
    """

    def __init__(self, message: str, path: str | os.PathLike, code: int | None):
        super().__init__(code, message)
        self.message = message
        self.path = str(path)

    def __str__(self) -> str:
        return self.message


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes on the filesystem holding ``path`` (its nearest existing parent); None if unknown."""
    existing = Path(path).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        return shutil.disk_usage(existing).free
    except OSError:
        return None


def describe_os_error(exc: OSError, path: str | os.PathLike, *, action: str = "write") -> str:
    """One line: what could not be done to which path, and why, e.g. ``no space left on device …``."""
    path = Path(path)
    code = exc.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        free = free_bytes(path)
        left = f"{free / _MB:.1f} MB free" if free is not None else "free space unknown"
        cause = "no space left on device" if code == errno.ENOSPC else "disk quota exceeded"
        return f"{cause}: could not {action} {path} ({left}); free some space, then resume"
    if code == errno.EROFS:
        return f"folder is read-only: could not {action} {path} (a read-only file system); choose a writable folder"
    if code in (errno.EACCES, errno.EPERM):
        return (f"permission denied: could not {action} {path}; make the folder writable for this user "
                "(e.g. chmod u+w) or choose another folder")
    reason = exc.strerror or str(exc)
    return f"could not {action} {path}: {reason}"


def output_error(exc: OSError, path: str | os.PathLike, *, action: str = "write") -> OSError:
    """An :class:`OutputError` for a disk or permission failure; other OS errors are returned as they are."""
    if isinstance(exc, OutputError):
        return exc
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
        return OutputError(describe_os_error(exc, path, action=action), path, exc.errno)
    return exc


def write_failure(exc: BaseException, path: str | os.PathLike) -> BaseException:
    """The error to raise for a failed write of ``path``: an :class:`OutputError` when the cause is the disk
    or the folder's permissions, else ``exc`` itself.

    Errors without an errno (torch's ``unexpected pos``, some pyarrow I/O errors) count
    as a full disk when less than ``FULL_DISK_BYTES`` are free.
    """
    if isinstance(exc, OutputError):
        return exc
    if isinstance(exc, OSError) and exc.errno is not None:
        return output_error(exc, path)
    unexplained_os = isinstance(exc, OSError)
    torch_write = isinstance(exc, RuntimeError) and any(text in str(exc) for text in _TORCH_WRITE_FAILURES)
    if unexplained_os or torch_write:
        free = free_bytes(Path(path).parent)
        if free is not None and free < FULL_DISK_BYTES:
            return OutputError(describe_os_error(OSError(errno.ENOSPC, "No space left on device"), path), path,
                               errno.ENOSPC)
    return exc
