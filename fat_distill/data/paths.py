"""Sample paths must stay inside the dataset root.

A manifest's ``path`` column is relative to the dataset root recorded with it.
A manifest is a plain Parquet file that people share, edit with pandas and
concatenate, so a path can be absolute, climb out with ``..``, or name a
symlink that leads elsewhere. Reading such a file would train on (or, through
plots and ranked-result pictures, copy out) images nobody meant to include, so
every reader checks the paths first and names the offending row. Datasets
deliberately assembled from links to another disk pass ``allow_outside_root``
(``--allow-outside-root`` on the CLI, ``data.allow_outside_root`` in a pipeline
config).

Without a root (a manifest rewritten by another tool and not yet given one),
only what the path itself says can be checked: absolute paths and ``..``
escapes are still refused, symlinks cannot be followed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath

ALLOW_HINT = (
    "Keep every image under the dataset root (copy it in, or fix the path), or pass --allow-outside-root "
    "(data.allow_outside_root: true / allow_outside_root=True) if reading outside the root is deliberate."
)


class UnsafeSamplePathError(ValueError):
    """A sample path is absolute, climbs out of the dataset root with ``..``, or is a symlink that leaves it.

    Attributes:
        row: position of the first offending row (0-based), or ``None``.
        sample_id: its ``sample_id``, or ``None``.
        path: the offending ``path`` value.
        reason: what is wrong with it.
        count: how many rows are affected.
    """

    def __init__(self, message: str, *, row: int | None, sample_id: str | None, path: str, reason: str,
                 count: int) -> None:
        super().__init__(message)
        self.row = row
        self.sample_id = sample_id
        self.path = path
        self.reason = reason
        self.count = count


class _RootChecker:
    """Answers "does this relative path stay inside the root?" with few system calls.

    Folders are resolved once each (datasets hold thousands of files per
    folder); a file costs one ``lstat`` unless it is itself a symlink. With
    ``root=None`` only the path's own text is checked (absolute, ``..``).
    """

    def __init__(self, root: str | os.PathLike[str] | None) -> None:
        self.root = None if root is None else Path(root)
        self.real_root = None if root is None else os.path.realpath(self.root)
        self._folders: dict[str, str] = {}

    def _inside(self, real: str) -> bool:
        return real == self.real_root or real.startswith(self.real_root.rstrip(os.sep) + os.sep)

    def problem(self, path: str) -> str | None:
        """Why ``path`` is unsafe, or ``None`` when it stays inside the root."""
        if not path:
            return "is empty"
        if PurePosixPath(path).is_absolute() or PureWindowsPath(path).is_absolute() or path.startswith("\\"):
            return "is absolute; manifest paths must be relative to the dataset root"
        depth = 0
        for part in PurePosixPath(path.replace("\\", "/")).parts:
            depth += -1 if part == ".." else (0 if part == "." else 1)
            if depth < 0:
                return "uses '..' to climb out of the dataset root"
        if self.root is None:
            return None
        folder, name = os.path.split(path)
        real_folder = self._folders.get(folder)
        if real_folder is None:
            real_folder = self._folders[folder] = os.path.realpath(self.root / folder)
        if not self._inside(real_folder):
            return f"lies under a symlinked folder that leads outside the dataset root (to {real_folder})"
        full = os.path.join(real_folder, name)
        if os.path.islink(full):
            target = os.path.realpath(full)
            if not self._inside(target):
                return f"is a symlink that leads outside the dataset root (to {target})"
        return None


def find_paths_outside_root(paths: Sequence[str], root: str | os.PathLike[str] | None) -> list[tuple[int, str]]:
    """Rows whose path would be read from outside ``root``.

    Args:
        paths: sample paths, relative to ``root`` (POSIX separators).
        root: the dataset root; ``None`` when it is not known: then only absolute
            paths and ``..`` escapes are found (symlinks need the files).

    Returns:
        ``[(row, reason), ...]`` for every unsafe path, in row order; empty when all are safe.
        Missing files are not an error here (they are reported when images are read).
    """
    checker = _RootChecker(root)
    found = []
    for row, path in enumerate(paths):
        reason = checker.problem(str(path))
        if reason is not None:
            found.append((row, reason))
    return found


def check_sample_paths(
    paths: Sequence[str],
    root: str | os.PathLike[str] | None,
    *,
    sample_ids: Sequence[str] | None = None,
    allow_outside_root: bool = False,
    where: str = "",
) -> None:
    """Raise :class:`UnsafeSamplePathError` if any path leaves ``root`` (unless ``allow_outside_root``).

    Args:
        paths: sample paths, relative to ``root``.
        root: the dataset root, or ``None`` when it is not known (only absolute
            paths and ``..`` escapes are then refused).
        sample_ids: the rows' ``sample_id`` values, named in the error.
        allow_outside_root: skip the check (the caller reads outside the root on purpose).
        where: what is being read (a manifest file, a stage), put at the start of the message.
    """
    if allow_outside_root:
        return
    found = find_paths_outside_root(paths, root)
    if not found:
        return
    row, reason = found[0]
    path = str(paths[row])
    sample_id = str(sample_ids[row]) if sample_ids is not None else None
    prefix = f"{where}: " if where else ""
    named = f"row {row}" + (f" (sample_id {sample_id!r})" if sample_id is not None else "")
    more = f"; {len(found) - 1} more row(s) too, e.g. rows {[r for r, _ in found[1:4]]}" if len(found) > 1 else ""
    known = f"dataset root {str(root)!r}" if root is not None else "no dataset root known"
    raise UnsafeSamplePathError(
        f"{prefix}{named} has path {path!r}, which {reason} ({known}){more}. {ALLOW_HINT}",
        row=row, sample_id=sample_id, path=path, reason=reason, count=len(found),
    )
