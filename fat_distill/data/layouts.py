"""Dataset layouts on disk → the in-memory ``dataset`` table (one row per image).

Supported layouts (``layout=`` argument of :func:`index_dataset`):

``market1501``, ``dukemtmc``
    ``bounding_box_train/`` → train, ``query/`` → query, ``bounding_box_test/``
    → gallery, directly under the root or inside exactly one subfolder (e.g.
    ``Market-1501-v15.09.15/``). File names follow ``<pid>_c<cam>…``, parsed
    with torchreid's ``([-\\d]+)_c(\\d)``. pid −1 (junk) is dropped; pid 0
    (distractor) is kept in the gallery only. ``camid`` keeps the dataset's own
    1-based numbering (Market c1–c6, Duke c1–c8); torchreid subtracts 1, we
    do not, so camids read the same as the file names.
``msmt17``
    ``list_train.txt`` + ``list_val.txt`` → train, ``list_query.txt`` → query,
    ``list_gallery.txt`` → gallery, lines ``<relpath> <pid>``, images under
    ``train/`` + ``test/`` (MSMT17_V1) or ``mask_train_v2/`` +
    ``mask_test_v2/`` (V2); the root may also be the folder holding one such
    version folder. ``camid`` is the file name's third ``_`` field, 1-based as
    written (torchreid subtracts 1). MSMT17 numbers train and test identities
    separately, both from 0; since pid 0 means "distractor" in our tables and
    train/test identities must not collide, pids are shifted: train pid =
    listed + 1, test pid = listed + 1 + (largest listed train pid + 1). The
    original label is kept in column ``identity`` (``"train/5"``, ``"test/5"``).
``folders``
    One folder per identity (images may sit in subfolders of it), in one of
    the structures of :data:`FOLDERS_STRUCTURES`, detected from the folder
    names directly under the root (``train``, ``test``, ``query``,
    ``gallery``, matched case-insensitively):

    - ``ROOT/<identity>/<image>`` (``identities``) or ``ROOT/train/<identity>/…``
      (``train``): everything is train unless ``split_identities`` holds out a
      seeded fraction of identities as test identities;
    - ``ROOT/train/<identity>/…`` + ``ROOT/test/<identity>/…`` (``train_test``):
      each test identity's images are split into query and gallery by
      :func:`choose_queries` (one query per camera, Market-1501 style; one per
      identity when cameras are unknown; none for a single image), seeded by
      ``seed``;
    - ``ROOT/train/…`` + ``ROOT/query/…`` + ``ROOT/gallery/…``
      (``train_query_gallery``; without train/: ``query_gallery``): splits as given.

    Any other set of split-named folders (``test/`` alone, ``train/`` +
    ``val/``, …), or split folders next to identity folders, is refused rather
    than read as identities named "train" and "test". Identities get pids
    1..N in natural sort order of their folder names (``s2`` before ``s10``),
    one pid per name across splits; the name is kept in column ``identity``.
    camid comes from ``camera_regex`` (one group, applied to the file name) or
    is −1 (unknown).

``sample_id`` and ``path`` are the image's path relative to the root given to
:func:`index_dataset`, with POSIX separators.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from fat_distill.data.images import find_unreadable_images, is_image_file
from fat_distill.data.paths import check_sample_paths

__all__ = [
    "FOLDERS_STRUCTURES",
    "LAYOUTS",
    "SPLITS",
    "choose_queries",
    "IndexResult",
    "index_dataset",
    "DatasetLayoutError",
    "DatasetRootError",
    "MissingSplitFoldersError",
    "MissingListFilesError",
    "DuplicateSampleIdError",
    "UnparsedNamesError",
    "UnreadableImageError",
]

LAYOUTS: tuple[str, ...] = ("market1501", "dukemtmc", "msmt17", "folders")
#: Split values, in the order rows are sorted.
SPLITS: tuple[str, ...] = ("train", "query", "gallery")

MARKET_SPLIT_FOLDERS: dict[str, str] = {
    "bounding_box_train": "train",
    "query": "query",
    "bounding_box_test": "gallery",
}
#: torchreid's / fast-reid's Market-1501 and DukeMTMC-reID file-name pattern.
MARKET_NAME_PATTERN = re.compile(r"([-\d]+)_c(\d)")
MARKET_JUNK_PID = -1
DISTRACTOR_PID = 0

MSMT_LIST_FILES: dict[str, str] = {
    "list_train.txt": "train",
    "list_val.txt": "train",
    "list_query.txt": "query",
    "list_gallery.txt": "gallery",
}
#: Image folder holding each list's relative paths: (MSMT17_V1 name, MSMT17_V2 name).
MSMT_IMAGE_FOLDERS: dict[str, tuple[str, ...]] = {
    "train": ("train", "mask_train_v2"),
    "test": ("test", "mask_test_v2"),
}

#: The ``folders`` structures :func:`index_dataset` understands, by the name it reports them under.
FOLDERS_STRUCTURES: dict[str, str] = {
    "identities": "ROOT/<identity>/<image>, all train unless split_identities holds identities out",
    "train": "ROOT/train/<identity>/<image>, all train unless split_identities holds identities out",
    "train_test": "ROOT/train/<identity>/... + ROOT/test/<identity>/..., test images split into query/gallery",
    "train_query_gallery": "ROOT/train/<identity>/... + ROOT/query/<identity>/... + ROOT/gallery/<identity>/...",
    "query_gallery": "ROOT/query/<identity>/... + ROOT/gallery/<identity>/... (no train split)",
}
_FOLDERS_STRUCTURE_OF_PARTS: dict[frozenset[str], str] = {
    frozenset({"train"}): "train",
    frozenset({"train", "test"}): "train_test",
    frozenset({"train", "query", "gallery"}): "train_query_gallery",
    frozenset({"query", "gallery"}): "query_gallery",
}
#: Folder names (lower case) that name a split, not an identity, directly under a ``folders`` root.
SPLIT_FOLDER_NAMES: frozenset[str] = frozenset({
    "train", "training", "test", "testing", "query", "gallery", "val", "valid", "validation",
    "bounding_box_train", "bounding_box_test",
})
UNKNOWN_CAMERA = -1

_SHOWN = 5  # how many example paths an error or warning message lists

log = logging.getLogger("fat_distill.data")


class DatasetLayoutError(ValueError):
    """The dataset on disk does not match the layout asked for."""


class DatasetRootError(DatasetLayoutError):
    """The dataset root is missing, not a directory, or holds no images."""


class MissingSplitFoldersError(DatasetLayoutError):
    """A Market/Duke root lacks ``bounding_box_train``, ``query`` or ``bounding_box_test``."""


class MissingListFilesError(DatasetLayoutError):
    """An MSMT17 root lacks its ``list_*.txt`` files."""


class DuplicateSampleIdError(DatasetLayoutError):
    """Two rows would share one ``sample_id``."""


class UnparsedNamesError(DatasetLayoutError):
    """``strict=True`` and some image names did not match the layout's naming rule."""

    def __init__(self, message: str, unparsed: list[str]):
        super().__init__(message)
        self.unparsed = unparsed


class UnreadableImageError(DatasetLayoutError):
    """Some indexed images are missing or cannot be decoded and ``skip_bad`` is False."""

    def __init__(self, message: str, bad_images: list[tuple[str, str]]):
        super().__init__(message)
        self.bad_images = bad_images


@dataclass
class IndexResult:
    """What :func:`index_dataset` found.

    Attributes:
        frame: the ``dataset`` table: ``sample_id``, ``path``, ``pid`` (int64),
            ``camid`` (int64), ``split``, plus ``identity`` (str) for the
            ``folders`` and ``msmt17`` layouts; sorted by split (train, query,
            gallery) then ``sample_id``.
        unparsed: image paths (relative to the root) left out because their
            names did not fit the layout.
        bad_images: ``(relative path, reason)`` for images left out as
            missing or undecodable (only with ``skip_bad=True``).
        warnings: human-readable notes on everything else that was dropped or
            guessed; the caller decides how to show them.
        structure: ``folders`` only: which of :data:`FOLDERS_STRUCTURES` the
            root has (``None`` for the other layouts).
    """

    frame: pd.DataFrame
    unparsed: list[str] = field(default_factory=list)
    bad_images: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    structure: str | None = None

    def describe_structure(self) -> str | None:
        """One line naming the detected ``folders`` structure, or ``None`` for the other layouts."""
        if self.structure is None:
            return None
        return f"folders structure {self.structure!r}: {FOLDERS_STRUCTURES[self.structure]}"


def index_dataset(
    root: str | os.PathLike[str],
    layout: str,
    *,
    camera_regex: str | None = None,
    split_identities: float | None = None,
    seed: int = 0,
    strict: bool = False,
    verify: bool = False,
    skip_bad: bool = False,
    allow_outside_root: bool = False,
) -> IndexResult:
    """Index the images under ``root`` into the ``dataset`` table.

    Args:
        root: dataset root directory.
        layout: one of :data:`LAYOUTS` (see the module docstring for each rule).
        camera_regex: ``folders`` only. A regular expression with exactly one
            group, searched in each file name; the group is the integer camid.
            Files it does not match are listed in ``unparsed``. Default: camid −1.
        split_identities: ``folders`` only, structures without test folders
            (``identities``, ``train``). Fraction ``f`` (0 < f < 1) of
            identities held out as test identities, whose images are split
            into query and gallery by :func:`choose_queries`. Default: all train.
        seed: seed for the ``split_identities`` draw and for the query/gallery
            split of ``test/`` identities; same seed and same files give the
            same split.
        strict: raise :class:`UnparsedNamesError` instead of leaving
            unparsable names out.
        verify: decode every indexed image (slow: reads every file) and treat
            undecodable ones as bad.
        skip_bad: drop missing/undecodable images and list them in
            ``bad_images`` instead of raising :class:`UnreadableImageError`.
        allow_outside_root: index images reached through symlinks that lead
            outside ``root`` (a dataset assembled from links to another disk).
            By default they are refused, because every reader of the manifest
            refuses them too (see :mod:`fat_distill.data.paths`); the caller
            records the permission with the manifest.

    Returns:
        An :class:`IndexResult`.

    Raises:
        DatasetRootError: root missing, not a directory, or without images.
        MissingSplitFoldersError: Market/Duke split folders not found.
        MissingListFilesError: MSMT17 list files not found.
        DuplicateSampleIdError: the same relative path indexed twice.
        UnparsedNamesError: with ``strict=True``, some names not parsable.
        UnreadableImageError: bad images found and ``skip_bad`` is False.
        DatasetLayoutError: bad arguments, a ``folders`` root whose split
            folders it does not understand, or other layout mismatches.
        UnsafeSamplePathError: a symlink leads outside ``root`` and ``allow_outside_root`` is False.
    """
    if layout not in LAYOUTS:
        raise DatasetLayoutError(
            f"unknown layout {layout!r}; choose one of: {', '.join(LAYOUTS)}."
        )
    if layout != "folders" and (camera_regex is not None or split_identities is not None):
        raise DatasetLayoutError(
            f"camera_regex and split_identities apply to --layout folders only; layout "
            f"{layout!r} reads cameras from the file names and splits from its own "
            f"folders/lists. Drop those options or use --layout folders."
        )
    camera_pattern = _compile_camera_regex(camera_regex) if camera_regex is not None else None
    if split_identities is not None and not 0.0 < split_identities < 1.0:
        raise DatasetLayoutError(
            f"split_identities must be a fraction strictly between 0 and 1 (the share of "
            f"identities held out for query/gallery), got {split_identities!r}."
        )
    root = _checked_root(root)

    unparsed: list[str] = []
    bad_images: list[tuple[str, str]] = []
    warnings: list[str] = []
    structure: str | None = None
    if layout in ("market1501", "dukemtmc"):
        rows = _index_market(root, layout, unparsed, warnings)
    elif layout == "msmt17":
        rows = _index_msmt17(root, bad_images, unparsed, warnings)
    else:
        rows, structure = _index_folders(root, camera_pattern, split_identities, seed, unparsed, warnings)

    if not rows and not unparsed and not bad_images:
        raise DatasetRootError(
            f"no images found under {root} for layout {layout!r} (image suffixes: "
            f".jpg .jpeg .png .bmp .pgm .ppm .tif .tiff .webp). Check the path."
        )
    _check_unique_sample_ids(rows, root)
    check_sample_paths([row["path"] for row in rows], root, sample_ids=[row["sample_id"] for row in rows],
                       allow_outside_root=allow_outside_root, where=f"indexing {root}")
    unparsed.sort()
    if unparsed:
        message = (
            f"{len(unparsed)} image name(s) under {root} do not fit layout {layout!r} "
            f"and were left out, e.g. {_examples(unparsed)}"
        )
        if strict:
            raise UnparsedNamesError(
                message + ". Rename or remove them, or drop --strict to skip them.", unparsed
            )
        warnings.append(message)

    if verify:
        already_bad = {path for path, _ in bad_images}
        bad_images += find_unreadable_images(
            root, [row["path"] for row in rows if row["path"] not in already_bad]
        )
    if bad_images:
        if not skip_bad:
            shown = "; ".join(f"{path}: {reason}" for path, reason in bad_images[:_SHOWN])
            raise UnreadableImageError(
                f"{len(bad_images)} image(s) under {root} are missing or unreadable, e.g. "
                f"{shown}. Replace them, or re-run with --skip-bad (skip_bad=True) to "
                f"leave them out of the dataset.",
                bad_images,
            )
        dropped = {path for path, _ in bad_images}
        rows = [row for row in rows if row["path"] not in dropped]
        warnings.append(
            f"left out {len(bad_images)} missing/unreadable image(s), e.g. "
            f"{_examples([path for path, _ in bad_images])}"
        )

    if not rows:
        raise DatasetLayoutError(
            f"nothing left to index under {root} for layout {layout!r}: "
            f"{len(unparsed)} name(s) unparsable, {len(bad_images)} image(s) bad. "
            f"Is this the right --layout?"
        )
    return IndexResult(
        frame=_rows_to_frame(rows),
        unparsed=unparsed,
        bad_images=bad_images,
        warnings=warnings,
        structure=structure,
    )


# --------------------------------------------------------------------------- helpers


def _examples(paths: list[str]) -> str:
    shown = ", ".join(paths[:_SHOWN])
    return shown + (f" (+{len(paths) - _SHOWN} more)" if len(paths) > _SHOWN else "")


def _checked_root(root: str | os.PathLike[str]) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise DatasetRootError(
            f"dataset root {path} does not exist. Check the path (it must be the folder "
            f"that holds the dataset, e.g. the one with bounding_box_train/ for Market-1501)."
        )
    if not path.is_dir():
        raise DatasetRootError(
            f"dataset root {path} is a file, not a directory. Pass the folder the "
            f"dataset was extracted into (unpack archives first)."
        )
    return path


def _visible_subfolders(folder: Path) -> list[Path]:
    return sorted(
        (child for child in folder.iterdir() if child.is_dir() and not child.name.startswith(".")),
        key=lambda child: child.name,
    )


def _contains_image(folder: Path) -> bool:
    """Whether any image exists below ``folder``; stops at the first one found."""
    for _, _, filenames in os.walk(folder, followlinks=False):
        if any(is_image_file(name) for name in filenames):
            return True
    return False


def _list_folder(folder: Path) -> tuple[list[str], list[str]]:
    """Image file names directly in ``folder`` and the other (non-hidden) entries, both sorted."""
    images: list[str] = []
    others: list[str] = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_file() and is_image_file(entry.name):
                images.append(entry.name)
            else:
                others.append(entry.name + ("/" if entry.is_dir() else ""))
    return sorted(images), sorted(others)


def _join(*parts: str) -> str:
    return "/".join(part for part in parts if part)


def _row(path: str, pid: int, camid: int, split: str, **extra: str) -> dict:
    return {"sample_id": path, "path": path, "pid": pid, "camid": camid, "split": split, **extra}


def _check_unique_sample_ids(rows: list[dict], root: Path) -> None:
    counts = Counter(row["sample_id"] for row in rows)
    duplicated = [sample_id for sample_id, count in counts.items() if count > 1]
    if not duplicated:
        return
    origins: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        if counts[row["sample_id"]] > 1 and "origin" in row:
            origins[row["sample_id"]].append(row["origin"])
    shown = "; ".join(
        sample_id + (f" (from {', '.join(origins[sample_id])})" if origins[sample_id] else "")
        for sample_id in duplicated[:_SHOWN]
    )
    raise DuplicateSampleIdError(
        f"{len(duplicated)} sample_id(s) occur more than once under {root}: {shown}. "
        f"Each image must be listed once: remove the repeated entries (or the second copy "
        f"of a nested/symlinked tree)."
    )


def _rows_to_frame(rows: list[dict]) -> pd.DataFrame:
    columns = ["sample_id", "path", "pid", "camid", "split"]
    if "identity" in rows[0]:
        columns.append("identity")
    frame = pd.DataFrame([{column: row[column] for column in columns} for row in rows])
    frame["pid"] = frame["pid"].astype("int64")
    frame["camid"] = frame["camid"].astype("int64")
    split_rank = frame["split"].map({split: rank for rank, split in enumerate(SPLITS)})
    order = np.lexsort((frame["sample_id"].to_numpy(), split_rank.to_numpy()))
    return frame.iloc[order].reset_index(drop=True)


# --------------------------------------------------------------------------- Market / Duke


def _market_base(root: Path, layout: str) -> Path:
    """The folder holding the three split folders: ``root`` itself or its one subfolder that does."""
    expected = list(MARKET_SPLIT_FOLDERS)

    def has_splits(folder: Path) -> bool:
        return all((folder / name).is_dir() for name in expected)

    if has_splits(root):
        return root
    subfolders = _visible_subfolders(root)
    nested = [folder for folder in subfolders if has_splits(folder)]
    if len(nested) == 1:
        return nested[0]
    if len(nested) > 1:
        raise MissingSplitFoldersError(
            f"{root} holds several {layout} trees ({', '.join(f.name for f in nested)}); "
            f"pass the one you mean as the root."
        )
    if not _contains_image(root):
        raise DatasetRootError(f"no images found under {root}. Check the path.")
    found = [name for name in expected if (root / name).is_dir()]
    names = [folder.name for folder in subfolders]
    message = (
        f"{root} is not a {layout} root: expected folders {', '.join(expected)} (directly "
        f"or inside one subfolder such as Market-1501-v15.09.15/), found "
        f"{', '.join(found) if found else 'none of them'}; its subfolders are: "
        f"{_examples(names) if names else '(none)'}."
    )
    if _looks_like_identity_folders(subfolders):
        message += " It looks like one folder per identity: use --layout folders."
    raise MissingSplitFoldersError(message)


def _looks_like_identity_folders(subfolders: list[Path]) -> bool:
    """Most subfolders (of the first 20) hold images directly: the ``folders`` layout."""
    sample = [f for f in subfolders if f.name not in MARKET_SPLIT_FOLDERS][:20]
    if len(sample) < 2:
        return False
    with_images = sum(bool(_list_folder(folder)[0]) for folder in sample)
    return with_images * 2 >= len(sample)


def _index_market(root: Path, layout: str, unparsed: list[str], warnings: list[str]) -> list[dict]:
    base = _market_base(root, layout)
    prefix = base.relative_to(root).as_posix() if base != root else ""
    if prefix:
        warnings.append(f"using the {layout} tree nested in {prefix}/")
    rows: list[dict] = []
    junk: list[str] = []
    distractors_dropped: list[str] = []
    ignored: list[str] = []
    for folder, split in MARKET_SPLIT_FOLDERS.items():
        names, others = _list_folder(base / folder)
        ignored += [_join(prefix, folder, other) for other in others]
        for name in names:
            path = _join(prefix, folder, name)
            match = MARKET_NAME_PATTERN.search(name)
            try:
                pid = int(match.group(1)) if match else None
            except ValueError:  # e.g. "1-2_c3": the character class admits inner dashes
                pid = None
            if pid is None or pid < MARKET_JUNK_PID:
                unparsed.append(path)
                continue
            if pid == MARKET_JUNK_PID:
                junk.append(path)
                continue
            # Distractors (pid 0) only make sense as gallery clutter; in train they
            # would form one huge bogus identity, in query they have no true match.
            if pid == DISTRACTOR_PID and split != "gallery":
                distractors_dropped.append(path)
                continue
            rows.append(_row(path, pid, int(match.group(2)), split))
    if junk:
        warnings.append(f"dropped {len(junk)} junk image(s) (pid -1), as torchreid does")
    if distractors_dropped:
        warnings.append(
            f"dropped {len(distractors_dropped)} distractor image(s) (pid 0) outside the "
            f"gallery, e.g. {_examples(distractors_dropped)}"
        )
    if ignored:
        warnings.append(
            f"ignored {len(ignored)} non-image entr(ies) in the split folders, e.g. "
            f"{_examples(ignored)}"
        )
    return rows


# --------------------------------------------------------------------------- MSMT17


def _msmt_base(root: Path) -> Path:
    """``root`` or its one subfolder (``MSMT17_V1``/``MSMT17_V2``) holding the list files."""
    if any((root / name).is_file() for name in MSMT_LIST_FILES):
        return root
    subfolders = _visible_subfolders(root)
    nested = [f for f in subfolders if any((f / name).is_file() for name in MSMT_LIST_FILES)]
    if len(nested) == 1:
        return nested[0]
    if len(nested) > 1:
        raise MissingListFilesError(
            f"{root} holds several MSMT17 trees ({', '.join(f.name for f in nested)}); "
            f"pass the one you mean (e.g. {nested[0]}) as the root."
        )
    if not _contains_image(root):
        raise DatasetRootError(f"no images found under {root}. Check the path.")
    text_files = sorted(p.name for p in root.glob("*.txt"))
    raise MissingListFilesError(
        f"{root} is not an MSMT17 root: expected {', '.join(MSMT_LIST_FILES)} in it or in "
        f"one subfolder such as MSMT17_V1/, found "
        f"{', '.join(text_files) if text_files else 'no .txt files'}. Point at the folder "
        f"with the list files, or use --layout folders for one folder per identity."
    )


def _read_msmt_list(list_path: Path) -> list[tuple[str, int, int]]:
    """``(relpath, listed pid, line number)`` per non-blank line of an MSMT17 list file."""
    entries = []
    for line_number, line in enumerate(list_path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != 2:
                raise ValueError
            entries.append((fields[0].replace("\\", "/"), int(fields[1]), line_number))
        except ValueError:
            raise DatasetLayoutError(
                f"{list_path}, line {line_number}: expected '<relative/path.jpg> <pid>', "
                f"got {line.strip()!r}. Fix or remove that line."
            ) from None
    return entries


def _msmt_image_folder(base: Path, kind: str, first_relpath: str | None) -> str:
    """Which of the V1/V2 image folder names exists for ``kind`` (train/test)."""
    candidates = [name for name in MSMT_IMAGE_FOLDERS[kind] if (base / name).is_dir()]
    if not candidates:
        raise DatasetLayoutError(
            f"{base} has the MSMT17 list files but no {kind} image folder: expected "
            f"{' or '.join(n + '/' for n in MSMT_IMAGE_FOLDERS[kind])} "
            f"(MSMT17_V1 / MSMT17_V2). Extract the images next to the list files."
        )
    if len(candidates) > 1 and first_relpath is not None:
        holding = [name for name in candidates if (base / name / first_relpath).is_file()]
        if holding:
            return holding[0]
    return candidates[0]


def _index_msmt17(
    root: Path, bad_images: list[tuple[str, str]], unparsed: list[str], warnings: list[str]
) -> list[dict]:
    base = _msmt_base(root)
    prefix = base.relative_to(root).as_posix() if base != root else ""
    missing = [name for name in MSMT_LIST_FILES if not (base / name).is_file()]
    if missing:
        raise MissingListFilesError(
            f"{base} lacks MSMT17 list file(s) {', '.join(missing)} (expected all of "
            f"{', '.join(MSMT_LIST_FILES)}). Restore them from the dataset archive."
        )
    entries = {name: _read_msmt_list(base / name) for name in MSMT_LIST_FILES}
    train_entries = entries["list_train.txt"] + entries["list_val.txt"]
    test_entries = entries["list_query.txt"] + entries["list_gallery.txt"]
    # Train and test identities are both numbered from 0: shift so that no pid is 0
    # (our distractor code) and test pids start after the last train pid.
    test_offset = max((pid for _, pid, _ in train_entries), default=-1) + 1
    folders = {
        "train": _msmt_image_folder(base, "train", train_entries[0][0] if train_entries else None),
        "test": _msmt_image_folder(base, "test", test_entries[0][0] if test_entries else None),
    }
    rows: list[dict] = []
    for list_name, split in MSMT_LIST_FILES.items():
        kind = "train" if split == "train" else "test"
        for relpath, listed_pid, line_number in entries[list_name]:
            path = _join(prefix, folders[kind], relpath)
            fields = PurePosixPath(relpath).name.split("_")
            try:
                camid = int(fields[2])
            except (IndexError, ValueError):
                unparsed.append(path)
                continue
            if not (root / path).is_file():
                bad_images.append(
                    (path, f"missing: listed in {list_name} line {line_number} but not on disk")
                )
            pid = listed_pid + 1 + (test_offset if kind == "test" else 0)
            rows.append(
                _row(
                    path,
                    pid,
                    camid,
                    split,
                    identity=f"{kind}/{listed_pid}",
                    origin=f"{list_name}:{line_number}",
                )
            )
    if prefix:
        warnings.append(f"using the MSMT17 tree nested in {prefix}/")
    return rows


# --------------------------------------------------------------------------- folders


def _natural_key(name: str) -> tuple:
    # re.split with a capture group alternates text/number, so positions never
    # compare an int with a str.
    parts = re.split(r"(\d+)", name)
    return (
        tuple(int(part) if index % 2 else part.lower() for index, part in enumerate(parts)),
        name,
    )


def _compile_camera_regex(camera_regex: str) -> re.Pattern[str]:
    try:
        pattern = re.compile(camera_regex)
    except re.error as error:
        raise DatasetLayoutError(
            f"camera_regex {camera_regex!r} is not a valid regular expression: {error}."
        ) from None
    if pattern.groups != 1:
        raise DatasetLayoutError(
            f"camera_regex {camera_regex!r} has {pattern.groups} groups; it needs exactly one, "
            f"around the camera number, e.g. r'_c(\\d+)'."
        )
    return pattern


def _walk_images(root: Path, identity: str) -> list[str]:
    """Image paths (relative to ``root``) anywhere below ``root/identity``, sorted.

    Symlinked folders are followed (datasets are often assembled from links),
    each real folder once, so a link back up the tree cannot loop forever.
    """
    found: list[str] = []
    seen_folders: set[tuple[int, int]] = set()
    for folder, subfolders, filenames in os.walk(root / identity, followlinks=True):
        stat = os.stat(folder)
        if (stat.st_dev, stat.st_ino) in seen_folders:
            subfolders[:] = []
            continue
        seen_folders.add((stat.st_dev, stat.st_ino))
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        relative_folder = Path(folder).relative_to(root).as_posix()
        found += [
            f"{relative_folder}/{name}"
            for name in filenames
            if not name.startswith(".") and is_image_file(name)
        ]
    return sorted(found)


def _folders_structure(root: Path, warnings: list[str]) -> tuple[str, dict[str, str]]:
    """Which :data:`FOLDERS_STRUCTURES` entry ``root`` has, and the folder (relative to ``root``) of each part.

    Returns:
        ``(structure, parts)`` where ``parts`` maps "train"/"test"/"query"/"gallery" to the folder name
        as spelled on disk (``""`` for ``root`` itself in the ``identities`` structure).
    """
    folders = [folder.name for folder in _visible_subfolders(root)]
    split_named = [name for name in folders if name.lower() in SPLIT_FOLDER_NAMES]
    if not split_named:
        return "identities", {"train": ""}
    others = [name for name in folders if name.lower() not in SPLIT_FOLDER_NAMES and _contains_image(root / name)]
    if others:
        raise DatasetLayoutError(
            f"{root} mixes split folder(s) {', '.join(n + '/' for n in split_named)} with {len(others)} other "
            f"image folder(s) ({_examples(others)}); --layout folders cannot tell whether "
            f"{split_named[0]}/ is a split or an identity. Put every identity folder under ROOT/train/<identity>/ "
            f"(and held-out ones under ROOT/test/<identity>/), or move the split folder(s) out of {root}."
        )
    parts: dict[str, str] = {}
    for name in split_named:
        if not _contains_image(root / name):
            warnings.append(f"skipped split folder {name}/: it holds no images")
            continue
        part = name.lower()
        if part in parts:
            raise DatasetLayoutError(
                f"{root} holds both {parts[part]}/ and {name}/; keep one of them (merge their identity folders)."
            )
        parts[part] = name
    if not parts:
        raise DatasetRootError(
            f"no images found under {root}: its split folder(s) {', '.join(n + '/' for n in split_named)} are "
            f"empty. Check the path."
        )
    structure = _FOLDERS_STRUCTURE_OF_PARTS.get(frozenset(parts))
    if structure is None:
        raise DatasetLayoutError(
            f"{root} holds only split folders ({', '.join(n + '/' for n in parts.values())}), a shape --layout "
            f"folders does not understand. It reads ROOT/<identity>/<image>; ROOT/train/<identity>/<image> "
            f"(+ ROOT/test/<identity>/<image>, whose images it splits into query and gallery); or ROOT/query/ + "
            f"ROOT/gallery/ (+ ROOT/train/), each with <identity>/<image> inside. {_structure_hint(set(parts))}"
        )
    return structure, parts


def _structure_hint(parts: set[str]) -> str:
    """What to do about split folders :func:`_folders_structure` does not understand."""
    if parts & {"bounding_box_train", "bounding_box_test"}:
        return "These are Market-1501 / DukeMTMC-reID folder names: use --layout market1501 (or dukemtmc)."
    if parts & {"val", "valid", "validation"}:
        return ("Merge the validation identities into train/ (the teacher scores every train image itself), "
                "or rename that folder test/ to evaluate on those identities.")
    if parts & {"training", "testing"}:
        return "Rename training/ to train/ and testing/ to test/."
    if "train" not in parts and "test" in parts:
        return ("A test/ folder alone has no train identities: add ROOT/train/<identity>/..., or pass the test/ "
                "folder itself as the root (with --split-identities to hold some identities out).")
    return "Rearrange the folders into one of these shapes, or pass the folder that holds the identity folders."


def _identity_images(
    root: Path,
    folder: str,
    camera_pattern: re.Pattern[str] | None,
    unparsed: list[str],
    warnings: list[str],
) -> dict[str, list[tuple[str, int]]]:
    """Identity name → ``(path, camid)`` of its images, for the identity folders inside ``root/folder``.

    Images lying directly in ``root/folder`` (outside any identity folder), and
    names ``camera_pattern`` does not match, go to ``unparsed``.
    """
    base = root / folder if folder else root
    identity_folders: list[str] = []
    loose_images: list[str] = []
    with os.scandir(base) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                identity_folders.append(entry.name)
            elif entry.is_file() and is_image_file(entry.name):
                loose_images.append(_join(folder, entry.name))
    if loose_images:
        warnings.append(
            f"{len(loose_images)} image(s) lie directly in {base}, outside any identity folder, and count as "
            f"unparsed"
        )
        unparsed += sorted(loose_images)

    images_by_identity: dict[str, list[tuple[str, int]]] = {}
    for identity in identity_folders:
        images = []
        for path in _walk_images(root, _join(folder, identity)):
            camid = UNKNOWN_CAMERA
            if camera_pattern is not None:
                match = camera_pattern.search(PurePosixPath(path).name)
                try:
                    camid = int(match.group(1)) if match else None
                except (TypeError, ValueError):  # group did not take part, or not a number
                    camid = None
                if camid is None:
                    unparsed.append(path)
                    continue
            images.append((path, camid))
        if images:
            images_by_identity[identity] = images
    empty = sorted(set(identity_folders) - set(images_by_identity), key=_natural_key)
    if empty:
        where = f" in {folder}/" if folder else ""
        warnings.append(f"skipped {len(empty)} folder(s){where} with no usable images: {_examples(empty)}")
    return images_by_identity


def _index_folders(
    root: Path,
    camera_pattern: re.Pattern[str] | None,
    split_identities: float | None,
    seed: int,
    unparsed: list[str],
    warnings: list[str],
) -> tuple[list[dict], str]:
    structure, parts = _folders_structure(root, warnings)
    log.info("folders layout: %s has structure %r (%s)", root, structure, FOLDERS_STRUCTURES[structure])
    if split_identities is not None and structure not in ("identities", "train"):
        raise DatasetLayoutError(
            f"split_identities holds identities out of a root without test identities, but {root} already has "
            f"them (structure {structure!r}: {FOLDERS_STRUCTURES[structure]}). Drop --split-identities "
            f"(data.split_identities)."
        )
    images = {part: _identity_images(root, folder, camera_pattern, unparsed, warnings)
              for part, folder in parts.items()}
    # One pid per folder name across parts: "alice" in train/ and in test/ is one person.
    names = sorted({name for by_identity in images.values() for name in by_identity}, key=_natural_key)
    pid_of = {name: pid for pid, name in enumerate(names, start=1)}

    split_of: dict[str, str] = {}
    if "train" in images and split_identities is not None:
        split_of = _hold_out_identities(images["train"], split_identities, seed, warnings)
    if "test" in images:
        test_names = sorted(images["test"], key=_natural_key)
        split_of.update(_split_query_gallery(images["test"], test_names, np.random.default_rng(seed), warnings))
    _warn_about_shared_identities(images, warnings)

    default_split = {"train": "train", "test": "gallery", "query": "query", "gallery": "gallery"}
    return [
        _row(path, pid_of[identity], camid, split_of.get(path, default_split[part]), identity=identity)
        for part, by_identity in images.items()
        for identity, identity_images in by_identity.items()
        for path, camid in identity_images
    ], structure


def _warn_about_shared_identities(images: dict[str, dict[str, list]], warnings: list[str]) -> None:
    """Note train identities that are also test identities, and query identities missing from the gallery."""
    train = set(images.get("train", {}))
    test = set(images.get("test", {})) | set(images.get("query", {})) | set(images.get("gallery", {}))
    shared = sorted(train & test, key=_natural_key)
    if shared:
        warnings.append(
            f"{len(shared)} identit(ies) have folders in both train and test splits and share one pid "
            f"(the model then trains on test identities, so test results are optimistic): {_examples(shared)}"
        )
    if "query" in images:
        unmatched = sorted(set(images["query"]) - set(images.get("gallery", {})), key=_natural_key)
        if unmatched:
            warnings.append(
                f"{len(unmatched)} query identit(ies) have no gallery folder, so their queries cannot be "
                f"matched: {_examples(unmatched)}"
            )


def _hold_out_identities(
    images_by_identity: dict[str, list[tuple[str, int]]],
    fraction: float,
    seed: int,
    warnings: list[str],
) -> dict[str, str]:
    """Map image path → "query"/"gallery" for a seeded ``fraction`` of identities (train is the default)."""
    identities = sorted(images_by_identity, key=_natural_key)
    if not identities:
        return {}
    if len(identities) < 2:
        raise DatasetLayoutError(
            f"split_identities needs at least 2 identities (one train, one test), found "
            f"{len(identities)}. Drop split_identities or add identities."
        )
    wanted = round(fraction * len(identities))
    test_count = min(max(wanted, 1), len(identities) - 1)
    if test_count != wanted:
        warnings.append(
            f"split_identities={fraction} of {len(identities)} identities gives {wanted} test "
            f"identities; using {test_count} so that train and test are both non-empty"
        )
    rng = np.random.default_rng(seed)
    test_identities = [identities[index] for index in sorted(rng.permutation(len(identities))[:test_count].tolist())]
    return _split_query_gallery(images_by_identity, test_identities, rng, warnings)


def _split_query_gallery(
    images_by_identity: dict[str, list[tuple[str, int]]],
    identities: list[str],
    rng: np.random.Generator,
    warnings: list[str],
) -> dict[str, str]:
    """Map each image of ``identities`` to "query" or "gallery" (see :func:`choose_queries`)."""
    split_of: dict[str, str] = {}
    single_image: list[str] = []
    one_camera: list[str] = []
    for identity in identities:
        images = images_by_identity[identity]
        queries = set(choose_queries(images, rng))
        for path, _ in images:
            split_of[path] = "query" if path in queries else "gallery"
        if not queries:
            (single_image if len(images) == 1 else one_camera).append(identity)
    if single_image:
        warnings.append(
            f"{len(single_image)} test identit(ies) have a single image, kept in the gallery "
            f"with no query: {_examples(single_image)}"
        )
    if one_camera:
        warnings.append(
            f"{len(one_camera)} test identit(ies) were seen by one camera only; evaluation ignores same-camera "
            f"matches, so they are kept in the gallery with no query: {_examples(one_camera)}"
        )
    return split_of


def choose_queries(images: Sequence[tuple[str, int]], rng: np.random.Generator) -> list[str]:
    """Pick the query images of one test identity: one per camera, as in Market-1501.

    Cameras are visited in increasing camid order; each gets one query, drawn
    uniformly from its images with ``rng``, as long as every query so far still
    has a gallery image of the identity from another camera (retrieval
    evaluation ignores same-camera matches; camid −1, "unknown", matches any
    camera). The identity's other images form its gallery. So with unknown
    cameras an identity of two or more images gets exactly one query; a single
    image, or images from a single known camera, get none.

    Args:
        images: ``(path, camid)`` of the identity's images, in a fixed order (the draw depends on it).
        rng: the seeded generator; one draw per query.

    Returns:
        The query paths, in camera order.
    """
    by_camera: dict[int, list[str]] = defaultdict(list)
    for path, camid in images:
        by_camera[camid].append(path)
    left_in_gallery = {camid: len(paths) for camid, paths in by_camera.items()}

    def has_match(query_camid: int) -> bool:
        return any(count > 0 for camid, count in left_in_gallery.items()
                   if query_camid == UNKNOWN_CAMERA or camid != query_camid)

    query_cameras: list[int] = []
    queries: list[str] = []
    for camid in sorted(by_camera):
        left_in_gallery[camid] -= 1
        if not all(has_match(query_camid) for query_camid in (*query_cameras, camid)):
            left_in_gallery[camid] += 1
            continue
        paths = by_camera[camid]
        queries.append(paths[int(rng.integers(len(paths)))])
        query_cameras.append(camid)
    return queries
