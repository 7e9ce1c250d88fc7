"""Label-noise injection with known ground truth for ``dataset`` frames.

:func:`corrupt_labels` turns a clean ``dataset`` frame into a noisy one whose
``true_pid`` / ``noise_kind`` columns record exactly what was done, so noise
detection and robustness can be measured against the truth. Only train rows
are corrupted; query and gallery rows keep every value they had.

The kinds follow the three kinds of ReID label noise of the FAT paper
(wrong identity, no identity, several identities):

``flip``
    The sample's label becomes a uniformly random *other* training identity.
``pair``
    Systematic confusion: every training identity ``k`` has one look-alike
    partner ``partner[k] != k`` (see :func:`pair_partners`) and all of ``k``'s
    noisy samples carry ``partner[k]``.
``outlier``
    Images of no training identity carrying a real label. A seeded set of
    training identities is held out; its images stay in train as outliers
    labelled with kept identities (``true_pid`` is their real pid, which is no
    longer any train row's label). Held-out images beyond the number needed
    are **dropped from the frame**, so the held-out identities never survive
    as a phantom class.
``multi``
    One image under two (or more) identities: the row is duplicated with
    ``sample_id = original + "#multi<j>"`` (``j = 1, 2, ...``), the same
    ``path``, and another training identity's label. The original row stays
    clean.
``mix``
    An equal split of the noisy rows among ``mix_kinds`` (default flip, pair
    and outlier); the counts of the kinds differ by at most one, the first
    kinds in ``mix_kinds`` taking the remainder.

Rate accounting. ``rate`` is the fraction of noisy rows among the *final*
train rows (outlier drops rows, multi adds rows), and the realised number of
noisy rows is always within 0.5 of ``rate * n_final_train`` (the nearest
integer). It is stratified so that no group strays by more than one sample:

- flip / pair: every training identity ``i`` with ``n_i`` rows has
  ``floor`` or ``ceil`` of ``rate * n_i`` noisy rows (remainders go to the
  largest fractional parts, ties broken by the seed).
- multi: grouping final train rows by ``true_pid``, every identity has
  ``|noisy_i - rate * rows_i| <= 1``.
- outlier: held-out identities are entirely noisy by construction, so the
  bound holds per *given* label instead: every kept identity ``k`` has
  ``|outliers labelled k - rate * rows labelled k| <= 1``.
- mix: the global bound and the equal split between kinds.

Train rows with ``pid == 0`` (distractors) are never touched and do not count
as a training identity or towards the rate. Everything is deterministic given
``seed``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd

from fat_distill.data.layouts import UnreadableImageError
from fat_distill.data.paths import check_sample_paths

NOISE_KINDS: tuple[str, ...] = ("flip", "pair", "outlier", "multi")
"""The base noise kinds a row can carry (besides ``"clean"``)."""

CORRUPTION_KINDS: tuple[str, ...] = NOISE_KINDS + ("mix",)
"""The values :func:`corrupt_labels` accepts for ``kind``."""

DEFAULT_MIX_KINDS: tuple[str, ...] = ("flip", "pair", "outlier")
PAIRING_STRATEGIES: tuple[str, ...] = ("mean_image", "derangement")
DISTRACTOR_PID = 0
MEAN_IMAGE_SIZE = (8, 16)
"""(width, height) each image is downsized to before averaging for ``mean_image`` pairing."""

_REQUIRED_COLUMNS = ("sample_id", "path", "pid", "camid", "split")
# Kinds that add rows to the final train set (the others relabel rows in place).
_ADDITIVE_KINDS = frozenset({"outlier", "multi"})
# Independent random streams, so changing one step never reshuffles another.
_STREAM_HOLDOUT, _STREAM_INPLACE, _STREAM_FLIP, _STREAM_OUTLIER, _STREAM_MULTI, _STREAM_PAIRING = range(6)
# Rates are read as the nearest simple fraction (0.2 -> 1/5) so that quotas such
# as 0.2 * 5 are exactly 1 rather than 1.0000000000000002.
_RATE_DENOMINATOR_LIMIT = 10**6


def corrupt_labels(
    frame: pd.DataFrame,
    *,
    rate: float,
    kind: str,
    seed: int = 0,
    image_root: str | Path | None = None,
    pairing: str | Mapping[int, int] | None = None,
    mix_kinds: Sequence[str] = DEFAULT_MIX_KINDS,
    allow_outside_root: bool = False,
) -> pd.DataFrame:
    """Inject label noise with known truth into the train split of a ``dataset`` frame.

    Args:
        frame: a clean ``dataset`` frame (columns ``sample_id``, ``path``,
            ``pid``, ``camid``, ``split``; optional columns are carried over).
            A frame that already has noisy rows (``noise_kind`` other than
            ``"clean"``, or ``true_pid != pid``) is refused, so the truth can
            never be lost by corrupting twice.
        rate: fraction of final train rows that are noisy, in ``[0, 1)``.
        kind: one of ``"flip"``, ``"pair"``, ``"outlier"``, ``"multi"``, ``"mix"``.
        seed: seed of every random choice; equal inputs and seed give an
            identical frame.
        image_root: dataset root the ``path`` column is relative to. Used only
            for ``pair`` noise (also inside ``mix``): with it, partners are the
            nearest identities by mean image (``pairing="mean_image"``).
        pairing: how ``pair`` partners are chosen: ``"mean_image"`` (needs
            ``image_root``), ``"derangement"`` (seeded, no images needed), or an
            explicit ``{pid: partner_pid}`` mapping over the training
            identities. ``None`` picks ``"mean_image"`` when ``image_root`` is
            given, else ``"derangement"``. See :func:`pair_partners`.
        mix_kinds: distinct base kinds that ``kind="mix"`` splits the noise
            between; ignored for other kinds.
        allow_outside_root: let ``mean_image`` pairing read paths that leave
            ``image_root`` (see :mod:`fat_distill.data.paths`).

    Returns:
        A new frame: the input columns, with ``pid`` corrupted on the chosen
        train rows, plus ``true_pid`` (int64, the original pid) and
        ``noise_kind`` (``"clean"`` for untouched rows, including every query
        and gallery row). Surplus held-out rows of ``outlier`` noise are
        removed and ``multi`` duplicates are appended after the original rows;
        the index is a fresh ``RangeIndex``.

    Raises:
        ValueError: ``rate`` outside ``[0, 1)``, an unknown ``kind`` or
            ``pairing``, missing columns, duplicated ``sample_id`` values, a
            frame already noisy, fewer than two training identities, or a rate
            too high for ``outlier`` / ``multi`` on this frame.
        FileNotFoundError: an image needed for ``mean_image`` pairing is missing.
        UnsafeSamplePathError: ``mean_image`` pairing would read a path outside ``image_root``.
    """
    rate_q = _check_rate(rate)
    kinds = _check_kinds(kind, mix_kinds)
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative integer")
    if pairing is not None and "pair" not in kinds:
        raise ValueError(
            f"pairing={pairing!r} was given but kind={kind!r} (mix_kinds={tuple(kinds)}) has no 'pair' "
            "noise; drop the pairing argument or use kind='pair'"
        )
    _check_frame(frame)

    out = frame.reset_index(drop=True)  # a fresh copy; row positions double as labels below
    if "true_pid" in out.columns:
        out["true_pid"] = out["true_pid"].fillna(out["pid"]).astype("int64")
    else:
        out["true_pid"] = out["pid"].astype("int64")
    out["noise_kind"] = pd.Series("clean", index=out.index, dtype=str)

    pids = out["pid"].to_numpy(dtype=np.int64)
    train_mask = (out["split"] == "train").to_numpy() & (pids != DISTRACTOR_PID)
    train_positions = np.flatnonzero(train_mask)
    identities = np.unique(pids[train_positions])
    if len(identities) < 2:
        raise ValueError(
            f"corrupt_labels needs at least 2 training identities (pid != {DISTRACTOR_PID} in split "
            f"'train'); this frame has {len(identities)} among {len(train_positions)} train rows"
        )
    if rate_q == 0:
        return out

    rows_by_identity = {int(pid): train_positions[pids[train_positions] == pid] for pid in identities}
    min_kept = 2 if set(kinds) & {"flip", "pair", "multi"} else 1
    held_out, kept, counts = _choose_held_out(rows_by_identity, rate_q, kinds, seed, min_kept)
    kept_rows = {pid: rows_by_identity[pid] for pid in kept}
    additive_share = Fraction(sum(1 for k in kinds if k in _ADDITIVE_KINDS), len(kinds))
    # Target noisy rows per kind as a multiple of kept original rows: each kind
    # owns rate/m of the final rows, and final = kept / (1 - rate * additive share).
    per_kind_factor = (rate_q / len(kinds)) / (1 - rate_q * additive_share)

    new_pid = pids.copy()
    new_kind = np.full(len(out), "clean", dtype=object)
    n_inplace = counts.get("flip", 0) + counts.get("pair", 0)
    inplace_kinds = [k for k in kinds if k in ("flip", "pair")]
    if n_inplace:
        if image_root is not None:
            check_sample_paths(out["path"].astype(str).tolist(), image_root,
                               sample_ids=out["sample_id"].astype(str).tolist(),
                               allow_outside_root=allow_outside_root, where="corrupt_labels (mean_image pairing)")
        _relabel_in_place(
            kept_rows, counts, per_kind_factor * len(inplace_kinds), n_inplace, pids, new_pid, new_kind,
            frame=out, seed=seed, image_root=image_root, pairing=pairing,
        )
    drop_positions = np.empty(0, dtype=np.int64)
    if "outlier" in kinds and held_out:
        drop_positions = _make_outliers(
            rows_by_identity, held_out, kept_rows, counts["outlier"], per_kind_factor, new_pid, new_kind, seed
        )
    duplicates = None
    if counts.get("multi", 0):
        duplicates = _make_duplicates(
            out, kept_rows, counts["multi"], per_kind_factor, pids, new_pid, new_kind, seed
        )

    out["pid"] = new_pid
    out["noise_kind"] = pd.Series(new_kind, index=out.index, dtype=str)
    if len(drop_positions):
        out = out.drop(index=drop_positions)
    if duplicates is not None:
        out = pd.concat([out, duplicates], ignore_index=True)
        if out["sample_id"].duplicated().any():
            clash = out.loc[out["sample_id"].duplicated(), "sample_id"].iloc[0]
            raise ValueError(
                f"multi duplicate sample_id {clash!r} already exists in the frame; "
                "rename sample_ids ending in '#multi<j>' before corrupting"
            )
    return out.reset_index(drop=True)


def pair_partners(
    frame: pd.DataFrame,
    *,
    image_root: str | Path | None = None,
    seed: int = 0,
    identities: Sequence[int] | None = None,
) -> dict[int, int]:
    """Map every training identity to its look-alike partner for ``pair`` noise.

    With ``image_root``, each identity's mean image is the mean of its train
    images downsized to ``MEAN_IMAGE_SIZE`` RGB (scaled to [0, 1]), and its
    partner is the identity whose mean image is nearest in Euclidean distance
    (ties to the smaller pid). The map need not be symmetric. Without
    ``image_root``, the partners follow one seeded cycle through the
    identities (a derangement: nobody is their own partner; with two
    identities they swap).

    Args:
        frame: a ``dataset`` frame; its train rows with ``pid != 0`` define the
            identities and their images.
        image_root: dataset root the ``path`` column is relative to, or None.
        seed: seed of the derangement (unused with ``image_root``).
        identities: restrict partners to these pids (default: all training identities).

    Returns:
        ``{pid: partner_pid}`` with ``partner_pid != pid`` for every identity.
    """
    train = frame[(frame["split"] == "train") & (frame["pid"] != DISTRACTOR_PID)]
    ids = np.unique(train["pid"].to_numpy(dtype=np.int64)) if identities is None else np.unique(
        np.asarray(identities, dtype=np.int64)
    )
    if len(ids) < 2:
        raise ValueError(f"pair partners need at least 2 identities; got {len(ids)} ({ids.tolist()})")
    if image_root is None:
        order = np.random.default_rng([seed, _STREAM_PAIRING]).permutation(ids)
        return {int(a): int(b) for a, b in zip(order, np.roll(order, -1))}

    root = Path(image_root)
    means = np.stack([_mean_image(train[train["pid"] == pid], root) for pid in ids])
    sq = (means**2).sum(axis=1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * means @ means.T, 0.0))
    np.fill_diagonal(dist, np.inf)
    return {int(ids[i]): int(ids[j]) for i, j in enumerate(dist.argmin(axis=1))}


def noise_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Count the train rows of each noise kind.

    Args:
        frame: a ``dataset`` frame with a ``noise_kind`` column (missing
            values count as ``"clean"``, as in the manifest layer).

    Returns:
        One row per kind in the order ``clean, flip, pair, outlier, multi``
        (zeros included), with columns ``noise_kind`` (str), ``n_samples``
        (int64) and ``rate`` (float64: the fraction of all train rows,
        distractors included).
    """
    if "noise_kind" not in frame.columns:
        raise ValueError(
            "noise_summary needs a 'noise_kind' column, and this frame has none: its noise is unknown; "
            "run corrupt_labels first or use a manifest that records the ground truth"
        )
    train_kinds = frame.loc[frame["split"] == "train", "noise_kind"].fillna("clean")
    if train_kinds.empty:
        raise ValueError("noise_summary found no rows with split == 'train'")
    all_kinds = ("clean",) + NOISE_KINDS
    unknown = sorted(set(train_kinds) - set(all_kinds))
    if unknown:
        raise ValueError(f"unknown noise_kind values {unknown} in train rows; valid values: {list(all_kinds)}")
    counts = train_kinds.value_counts()
    n_samples = np.array([int(counts.get(k, 0)) for k in all_kinds], dtype=np.int64)
    return pd.DataFrame({
        "noise_kind": pd.Series(all_kinds, dtype=str),
        "n_samples": n_samples,
        "rate": n_samples / len(train_kinds),
    })


# --------------------------------------------------------------------------- checks


def _check_rate(rate: float) -> Fraction:
    is_number = isinstance(rate, numbers.Real) and not isinstance(rate, bool)
    as_float = float(rate) if is_number else float("nan")
    if not (0.0 <= as_float < 1.0):
        raise ValueError(f"rate={rate!r} is outside the allowed range [0, 1): it is the fraction of noisy train rows")
    return Fraction(as_float).limit_denominator(_RATE_DENOMINATOR_LIMIT)


def _check_kinds(kind: str, mix_kinds: Sequence[str]) -> list[str]:
    if kind not in CORRUPTION_KINDS:
        raise ValueError(f"kind={kind!r} is not a noise kind; valid kinds: {', '.join(map(repr, CORRUPTION_KINDS))}")
    if kind != "mix":
        return [kind]
    kinds = list(mix_kinds)
    bad = [k for k in kinds if k not in NOISE_KINDS]
    if not kinds or bad or len(set(kinds)) != len(kinds):
        raise ValueError(
            f"mix_kinds={tuple(mix_kinds)!r} must be distinct, non-empty choices among {NOISE_KINDS}"
            + (f"; not kinds: {bad}" if bad else "")
        )
    return kinds


def _check_frame(frame: pd.DataFrame) -> None:
    missing = [c for c in _REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"dataset frame is missing columns {missing}; required: {list(_REQUIRED_COLUMNS)}")
    if not pd.api.types.is_integer_dtype(frame["pid"]):
        raise ValueError(f"column 'pid' must hold integers, got dtype {frame['pid'].dtype}")
    dup = frame["sample_id"].duplicated()
    if dup.any():
        raise ValueError(
            f"sample_id must be unique; {int(dup.sum())} duplicates, first {frame.loc[dup, 'sample_id'].iloc[0]!r}"
        )
    train = frame["split"] == "train"
    if not train.any():
        raise ValueError("the frame has no rows with split == 'train'; only train rows can be corrupted")
    if "noise_kind" in frame.columns:
        noisy = frame["noise_kind"].notna() & (frame["noise_kind"] != "clean")
        if noisy.any():
            first = frame.loc[noisy].iloc[0]
            raise ValueError(
                f"the frame already contains {int(noisy.sum())} noisy rows (first: sample_id "
                f"{first['sample_id']!r}, noise_kind {first['noise_kind']!r}); corrupting twice would "
                "lose the ground truth. Corrupt the clean dataset manifest instead"
            )
    if "true_pid" in frame.columns:
        differs = frame["true_pid"].notna() & (frame["true_pid"] != frame["pid"])
        if differs.any():
            first = frame.loc[differs].iloc[0]
            raise ValueError(
                f"the frame already has {int(differs.sum())} rows whose pid differs from true_pid (first: "
                f"sample_id {first['sample_id']!r}, split {first['split']!r}, pid {first['pid']}, true_pid "
                f"{first['true_pid']}); corrupting twice would lose the ground truth. Corrupt the clean "
                "dataset manifest instead"
            )


# --------------------------------------------------------------------------- planning


def _nearest_int(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


def _equal_split(total: int, kinds: Sequence[str]) -> dict[str, int]:
    base, extra = divmod(total, len(kinds))
    return {k: base + (1 if i < extra else 0) for i, k in enumerate(kinds)}


def _plan_counts(n_kept_rows: int, rate: Fraction, kinds: Sequence[str]) -> dict[str, int]:
    """Noisy rows per kind whose total is nearest to ``rate`` times the final train rows.

    Each extra noisy row changes ``total - rate * final`` by ``1`` (in-place
    kinds) or ``1 - rate`` (additive kinds), so some total is within 0.5.
    """
    additive_share = Fraction(sum(1 for k in kinds if k in _ADDITIVE_KINDS), len(kinds))
    estimate = rate * n_kept_rows / (1 - rate * additive_share)

    def miss(total: int) -> tuple[Fraction, Fraction, int]:
        n_final = n_kept_rows + sum(n for k, n in _equal_split(total, kinds).items() if k in _ADDITIVE_KINDS)
        return abs(total - rate * n_final), abs(total - estimate), total

    candidates = range(max(0, math.floor(estimate) - 4), math.ceil(estimate) + 5)
    return _equal_split(min(candidates, key=miss), kinds)


def _choose_held_out(
    rows_by_identity: dict[int, np.ndarray], rate: Fraction, kinds: Sequence[str], seed: int, min_kept: int
) -> tuple[list[int], list[int], dict[str, int]]:
    """Smallest seeded prefix of identities whose images cover the outliers needed."""
    ids = sorted(rows_by_identity)
    n_rows = sum(len(r) for r in rows_by_identity.values())
    if "outlier" not in kinds:
        return [], ids, _plan_counts(n_rows, rate, kinds)
    order = [int(p) for p in np.random.default_rng([seed, _STREAM_HOLDOUT]).permutation(ids)]
    held_rows = 0
    for n_held in range(len(order) + 1):
        if len(order) - n_held < min_kept:
            break
        counts = _plan_counts(n_rows - held_rows, rate, kinds)
        if held_rows >= counts["outlier"]:
            held = order[:n_held]
            return held, sorted(set(ids) - set(held)), counts
        held_rows += len(rows_by_identity[order[n_held]])
    raise ValueError(
        f"rate={float(rate)} is too high for outlier noise on this frame: holding out identities never "
        f"yields enough outlier images while keeping {min_kept} training identit{'y' if min_kept == 1 else 'ies'} "
        f"({len(ids)} identities, {n_rows} train rows); lower the rate"
    )


def _apportion(quotas: Sequence[Fraction], total: int, rng: np.random.Generator) -> np.ndarray:
    """Integers summing to ``total``, each the floor or ceil of its quota when possible.

    Remainders go to the largest fractional parts (seeded tie-break). If
    ``total`` is outside [sum of floors, sum of ceils], the quotas are first
    rescaled proportionally to sum to ``total``.
    """
    floors = [math.floor(q) for q in quotas]
    if not sum(floors) <= total <= sum(math.ceil(q) for q in quotas):
        scale = sum(quotas)
        quotas = [q * total / scale for q in quotas] if scale else [Fraction(total, len(quotas))] * len(quotas)
        floors = [math.floor(q) for q in quotas]
    remainders = np.array([float(q - f) for q, f in zip(quotas, floors)])
    extra = total - sum(floors)
    order = np.lexsort((rng.random(len(quotas)), -remainders))
    counts = np.array(floors, dtype=np.int64)
    counts[order[:extra]] += 1
    return counts


# --------------------------------------------------------------------------- kinds


def _relabel_in_place(
    kept_rows: dict[int, np.ndarray],
    counts: dict[str, int],
    factor: Fraction,
    n_inplace: int,
    pids: np.ndarray,
    new_pid: np.ndarray,
    new_kind: np.ndarray,
    *,
    frame: pd.DataFrame,
    seed: int,
    image_root: str | Path | None,
    pairing: str | Mapping[int, int] | None,
) -> None:
    """Flip / pair-relabel ``n_inplace`` kept rows, stratified per identity."""
    rng = np.random.default_rng([seed, _STREAM_INPLACE])
    ids = list(kept_rows)
    per_identity = _apportion([factor * len(kept_rows[p]) for p in ids], n_inplace, rng)
    chosen = np.concatenate([
        rng.permutation(kept_rows[p])[:n] for p, n in zip(ids, per_identity)
    ])
    # Which chosen rows are flip and which pair is a global random split with exact counts.
    chosen = rng.permutation(chosen)
    n_flip = counts.get("flip", 0)
    flip_rows, pair_rows = np.sort(chosen[:n_flip]), np.sort(chosen[n_flip:])

    kept_ids = np.array(ids, dtype=np.int64)
    if len(flip_rows):
        own = np.searchsorted(kept_ids, pids[flip_rows])
        draw = np.random.default_rng([seed, _STREAM_FLIP]).integers(0, len(kept_ids) - 1, size=len(flip_rows))
        new_pid[flip_rows] = kept_ids[draw + (draw >= own)]
        new_kind[flip_rows] = "flip"
    if len(pair_rows):
        partners = _resolve_pairing(frame, kept_ids, seed=seed, image_root=image_root, pairing=pairing)
        new_pid[pair_rows] = [partners[int(p)] for p in pids[pair_rows]]
        new_kind[pair_rows] = "pair"


def _resolve_pairing(
    frame: pd.DataFrame,
    kept_ids: np.ndarray,
    *,
    seed: int,
    image_root: str | Path | None,
    pairing: str | Mapping[int, int] | None,
) -> dict[int, int]:
    if isinstance(pairing, Mapping):
        partners = {int(k): int(v) for k, v in pairing.items()}
        kept = set(int(p) for p in kept_ids)
        for pid in kept_ids:
            partner = partners.get(int(pid))
            if partner is None or partner == pid or partner not in kept:
                problem = (
                    "has no partner" if partner is None
                    else "is its own partner" if partner == pid
                    else f"has partner {partner}, which is not a (kept) training identity"
                )
                raise ValueError(
                    f"pairing: identity {int(pid)} {problem}; the mapping must send every training "
                    "identity to another training identity (with outlier noise in mix, partners must "
                    "not be held out: use a computed pairing instead)"
                )
        return partners
    strategy = pairing if pairing is not None else ("derangement" if image_root is None else "mean_image")
    if strategy not in PAIRING_STRATEGIES:
        raise ValueError(
            f"pairing={pairing!r} is not a pairing; use one of {PAIRING_STRATEGIES}, "
            "a {pid: partner_pid} mapping, or None"
        )
    if strategy == "mean_image" and image_root is None:
        raise ValueError("pairing='mean_image' needs image_root (the dataset root the 'path' column is relative to)")
    root = image_root if strategy == "mean_image" else None
    return pair_partners(frame, image_root=root, seed=seed, identities=kept_ids)


def _make_outliers(
    rows_by_identity: dict[int, np.ndarray],
    held_out: list[int],
    kept_rows: dict[int, np.ndarray],
    n_outliers: int,
    factor: Fraction,
    new_pid: np.ndarray,
    new_kind: np.ndarray,
    seed: int,
) -> np.ndarray:
    """Relabel ``n_outliers`` held-out rows with kept identities; return the surplus rows to drop."""
    rng = np.random.default_rng([seed, _STREAM_OUTLIER])
    held_rows = rng.permutation(np.concatenate([rows_by_identity[p] for p in held_out]))
    outlier_rows, surplus = np.sort(held_rows[:n_outliers]), np.sort(held_rows[n_outliers:])
    ids = list(kept_rows)
    # Each kept label receives outliers in proportion to its own rows, so every
    # given-label class ends up noisy at about `rate`.
    per_label = _apportion([factor * len(kept_rows[p]) for p in ids], n_outliers, rng)
    new_pid[outlier_rows] = rng.permutation(np.repeat(np.array(ids, dtype=np.int64), per_label))
    new_kind[outlier_rows] = "outlier"
    return surplus


def _make_duplicates(
    frame: pd.DataFrame,
    kept_rows: dict[int, np.ndarray],
    n_duplicates: int,
    factor: Fraction,
    pids: np.ndarray,
    new_pid: np.ndarray,
    new_kind: np.ndarray,
    seed: int,
) -> pd.DataFrame:
    """Rows duplicating kept images under other identities' labels (``noise_kind="multi"``)."""
    rng = np.random.default_rng([seed, _STREAM_MULTI])
    ids = list(kept_rows)
    kept_ids = np.array(ids, dtype=np.int64)
    per_identity = _apportion([factor * len(kept_rows[p]) for p in ids], n_duplicates, rng)
    sources: list[int] = []
    labels: list[int] = []
    copy_numbers: list[int] = []
    for pid, n_dup in zip(ids, per_identity):
        if not n_dup:
            continue
        rows = kept_rows[pid]
        # Duplicate clean rows first so the duplicated image's own row stays clean.
        clean = new_kind[rows] == "clean"
        rows = np.concatenate([rng.permutation(rows[clean]), rng.permutation(rows[~clean])])
        per_row = np.full(len(rows), n_dup // len(rows), dtype=np.int64)
        per_row[: n_dup % len(rows)] += 1
        for row, n_copies in zip(rows, per_row):
            if not n_copies:
                continue
            excluded = {int(pids[row]), int(new_pid[row])}
            candidates = kept_ids[~np.isin(kept_ids, list(excluded))]
            if n_copies > len(candidates):
                raise ValueError(
                    f"multi noise at this rate needs {n_copies} duplicates of sample_id "
                    f"{frame['sample_id'].iloc[row]!r} under distinct other identities, but only "
                    f"{len(candidates)} exist; lower the rate or use a frame with more identities"
                )
            labels.extend(rng.choice(candidates, size=n_copies, replace=False).tolist())
            sources.extend([int(row)] * n_copies)
            copy_numbers.extend(range(1, n_copies + 1))
    duplicates = frame.iloc[sources].copy()
    duplicates["sample_id"] = [f"{sid}#multi{j}" for sid, j in zip(duplicates["sample_id"], copy_numbers)]
    duplicates["pid"] = np.array(labels, dtype=np.int64)
    duplicates["true_pid"] = pids[sources]
    duplicates["noise_kind"] = pd.Series("multi", index=duplicates.index, dtype=str)
    return duplicates


# --------------------------------------------------------------------------- images


def _mean_image(rows: pd.DataFrame, root: Path) -> np.ndarray:
    from PIL import Image

    width, height = MEAN_IMAGE_SIZE
    total = np.zeros(width * height * 3, dtype=np.float64)
    paths = rows["path"].drop_duplicates()
    for rel in paths:
        file = root / rel
        if not file.is_file():
            sid = rows.loc[rows["path"] == rel, "sample_id"].iloc[0]
            raise FileNotFoundError(
                f"mean_image pairing: image {file} (sample_id {sid!r}) does not exist; check image_root "
                f"({root}) or use pairing='derangement'"
            )
        try:
            with Image.open(file) as image:
                image.draft("RGB", (width * 2, height * 2))  # JPEG: decode at reduced scale, much faster
                small = image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
        # A truncated or non-image file raises from almost anywhere in a decoder plugin.
        except Exception as error:  # noqa: BLE001
            sid = rows.loc[rows["path"] == rel, "sample_id"].iloc[0]
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise UnreadableImageError(
                f"mean_image pairing: image {file} (sample_id {sid!r}) cannot be decoded "
                f"({type(error).__name__}: {first}); replace or delete it, or leave unreadable images out with "
                "--skip-bad (data.skip_bad=true), or use pairing='derangement'", [(str(rel), first)]
            ) from error
        total += np.asarray(small, dtype=np.float64).reshape(-1) / 255.0
    return total / len(paths)
