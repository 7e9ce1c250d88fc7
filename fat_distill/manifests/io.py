"""Reading, validating and atomically writing manifests."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fat_distill.atomic import atomic_write
from fat_distill.manifests.hashing import content_hash
from fat_distill.manifests.schemas import METADATA_KEY, Column, ManifestSchema, get_schema


class ManifestError(ValueError):
    """A manifest file is missing, unreadable or does not match its schema.

    The message names the file and, where it applies, the column and row.
    """

    def __init__(self, path: str | os.PathLike | None, message: str, *, column: str | None = None,
                 row: int | None = None, hint: str | None = None):
        self.path = None if path is None else str(path)
        self.column = column
        self.row = row
        where = [] if self.path is None else [self.path]
        if column is not None:
            where.append(f"column {column!r}")
        if row is not None:
            where.append(f"row {row}")
        text = (": ".join([", ".join(where), message]) if where else message)
        if hint:
            text += f" ({hint})"
        super().__init__(text)


@dataclass
class ManifestMeta:
    """What a manifest says about itself (stored as JSON in the Parquet schema metadata)."""

    schema: str
    version: int
    stage: str = ""
    config_hash: str | None = None
    parents: list[dict[str, str]] = field(default_factory=list)
    content_hash: str | None = None
    rows: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ManifestMeta:
        data = json.loads(raw)
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def parent_ref(path: str | os.PathLike, meta: ManifestMeta | None = None) -> dict[str, str]:
    """A parent entry for ``write_manifest(parents=...)``: schema, content hash and path."""
    meta = meta or read_manifest_meta(path)
    return {"schema": meta.schema, "content_hash": meta.content_hash or "", "path": str(path)}


# --------------------------------------------------------------------------- conversion

def _to_arrow_column(values: pd.Series | pa.Array | pa.ChunkedArray, col: Column, path) -> pa.Array:
    """Convert one column to its declared type, naming the first bad row on failure."""
    try:
        if isinstance(values, (pa.Array, pa.ChunkedArray)):
            arr = values.cast(col.type) if values.type != col.type else values
            return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
        if pa.types.is_integer(col.type) and values.dtype.kind == "f":
            # pandas stores nullable ints as floats: reject fractional values instead of truncating.
            finite = values.dropna()
            frac = finite[finite != np.floor(finite)]
            if len(frac):
                row = int(values.index.get_loc(frac.index[0]))
                raise ManifestError(path, f"value {frac.iloc[0]!r} is not an integer ({col.type} expected)",
                                    column=col.name, row=row)
        return pa.array(values, type=col.type, from_pandas=True)
    except ManifestError:
        raise
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as exc:
        seq = values.to_pylist() if isinstance(values, (pa.Array, pa.ChunkedArray)) else list(values)
        for i, v in enumerate(seq):
            try:
                pa.array([v], type=col.type, from_pandas=True)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
                raise ManifestError(path, f"value {v!r} cannot be stored as {col.type}",
                                    column=col.name, row=i) from exc
        raise ManifestError(path, f"cannot convert to {col.type}: {exc}", column=col.name) from exc


def _as_table(data: pd.DataFrame | pa.Table, schema: ManifestSchema, path) -> pa.Table:
    names = list(data.columns) if isinstance(data, pd.DataFrame) else data.column_names
    missing = [n for n in schema.required_names if n not in names]
    if missing:
        raise ManifestError(path, f"missing required column(s) {missing} for schema {schema.name!r}",
                            hint=f"a {schema.name} manifest needs {schema.required_names}")
    arrays, fields = [], []
    declared = [c for c in schema.columns if c.name in names]
    extras = [n for n in names if schema.column(n) is None]
    for col in declared:
        values = data[col.name] if isinstance(data, pd.DataFrame) else data.column(col.name)
        if isinstance(values, pd.Series):
            values = values.reset_index(drop=True)
        arrays.append(_to_arrow_column(values, col, path))
        fields.append(pa.field(col.name, col.type, nullable=col.nullable))
    for name in extras:
        values = data[name] if isinstance(data, pd.DataFrame) else data.column(name)
        arr = pa.array(values.reset_index(drop=True), from_pandas=True) if isinstance(values, pd.Series) else values
        arrays.append(arr)
        fields.append(pa.field(name, arr.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


# --------------------------------------------------------------------------- validation

def validate_table(table: pa.Table, schema: ManifestSchema, path=None) -> None:
    """Check a table against ``schema``: columns, types, nulls, allowed values, bounds, uniqueness.

    Raises:
        ManifestError naming the file, the column and the first offending row.
    """
    missing = [n for n in schema.required_names if n not in table.column_names]
    if missing:
        raise ManifestError(path, f"missing required column(s) {missing} for schema {schema.name!r}",
                            hint=f"columns present: {table.column_names}")
    for col in schema.columns:
        if col.name not in table.column_names:
            continue
        arr = table.column(col.name)
        if arr.type != col.type:
            if not _safe_cast_ok(arr, col.type):
                raise ManifestError(path, f"has type {arr.type}, expected {col.type}", column=col.name,
                                    row=_first_uncastable_row(arr, col.type),
                                    hint="rewrite the column with the expected type")
            arr = arr.cast(col.type)
        if not col.nullable and arr.null_count:
            row = _first_true(pc.is_null(arr))
            raise ManifestError(path, "missing value (null/NaN) in a column that must not have any", column=col.name, row=row)
        values = pc.list_flatten(arr) if pa.types.is_list(col.type) else arr
        if col.allowed is not None:
            bad = pc.invert(pc.fill_null(pc.is_in(arr, value_set=pa.array(col.allowed)), True))
            if pc.any(bad).as_py():
                row = _first_true(bad)
                raise ManifestError(path, f"value {arr[row].as_py()!r} not allowed; expected one of {list(col.allowed)}",
                                    column=col.name, row=row)
        if pa.types.is_floating(values.type) and len(values):
            nonfinite = pc.invert(pc.fill_null(pc.is_finite(values), True))
            if pc.any(nonfinite).as_py():
                raise ManifestError(path, "NaN or infinite value", column=col.name,
                                    row=_row_of_element(arr, _first_true(nonfinite)))
        for bound, op, word in ((col.min_value, pc.less, "below"), (col.max_value, pc.greater, "above")):
            if bound is None or not len(values):
                continue
            tol = 1e-5 if pa.types.is_floating(values.type) else 0
            limit = bound - tol if op is pc.less else bound + tol
            bad = pc.fill_null(op(values, limit), False)
            if pc.any(bad).as_py():
                elem = _first_true(bad)
                raise ManifestError(path, f"value {values[elem].as_py()!r} is {word} the allowed {bound}",
                                    column=col.name, row=_row_of_element(arr, elem))
    if schema.unique and schema.unique in table.column_names:
        _check_unique(table.column(schema.unique), schema.unique, path)
    if schema.name == "soft_labels":
        ids_len = pc.list_value_length(table.column("topk_ids"))
        probs_len = pc.list_value_length(table.column("topk_probs"))
        bad = pc.not_equal(ids_len, probs_len)
        if pc.any(bad).as_py():
            raise ManifestError(path, "topk_ids and topk_probs have different lengths", column="topk_probs",
                                row=_first_true(bad))


def _check_unique(arr: pa.ChunkedArray, name: str, path) -> None:
    counts = pc.value_counts(arr)
    dup_mask = pc.greater(counts.field("counts"), 1)
    if pc.any(dup_mask).as_py():
        dups = counts.field("values").filter(dup_mask)
        first = dups[0].as_py()
        row = _first_true(pc.equal(arr, first))
        raise ManifestError(path, f"duplicate value {first!r} ({len(dups)} duplicated value(s) in all)",
                            column=name, row=row, hint="each row key must appear once")


def _first_true(mask) -> int:
    mask = mask.combine_chunks() if isinstance(mask, pa.ChunkedArray) else mask
    return int(np.flatnonzero(mask.to_numpy(zero_copy_only=False))[0])


def _row_of_element(arr, elem: int) -> int:
    """Map an index into a flattened list column back to its row (identity for flat columns)."""
    if not pa.types.is_list(arr.type):
        return elem
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy()
    return int(np.searchsorted(np.cumsum(lengths), elem, side="right"))


def _is_text(t: pa.DataType) -> bool:
    is_string_view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow >= 16
    return pa.types.is_string(t) or pa.types.is_large_string(t) or is_string_view(t)


def _safe_cast_ok(arr, target: pa.DataType) -> bool:
    # Only same-kind casts that lose nothing are accepted on read: what pandas, Polars and DuckDB
    # make of our types (int32 for int64, large_string, categorical as dictionary, integers
    # stored as floats after a NaN passed through pandas); a value that would change is refused.
    src = arr.type
    same_kind = (
        (pa.types.is_integer(src) and pa.types.is_integer(target))
        or (pa.types.is_floating(src) and (pa.types.is_floating(target) or pa.types.is_integer(target)))
        or _is_text(src) and pa.types.is_string(target)
        or (pa.types.is_list(src) or pa.types.is_large_list(src)) and pa.types.is_list(target)
        or (pa.types.is_dictionary(src) and _is_text(src.value_type) and pa.types.is_string(target))
    )
    if not same_kind:
        return False
    try:
        arr.cast(target, safe=True)
        return True
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False


def _first_uncastable_row(arr, target) -> int | None:
    for i, v in enumerate(arr.to_pylist()):
        try:
            pa.array([v]).cast(target, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            return i
    return None


# --------------------------------------------------------------------------- public API

def _open_parquet(path: Path) -> pq.ParquetFile:
    if not path.exists():
        raise ManifestError(path, "no such file", hint="check the path, or create it with `fat-distill data index`")
    if path.is_dir():
        raise ManifestError(path, "is a directory, expected a Parquet manifest file")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(path, f"not a readable Parquet file ({exc})",
                            hint="the file may be truncated; re-create it from its producing stage") from exc


def read_manifest_meta(path: str | os.PathLike) -> ManifestMeta:
    """Read only the metadata of a manifest (fast: no column data is read).

    Raises:
        ManifestError: the file is missing, not Parquet, or carries no fat-distill metadata.
    """
    path = Path(path)
    pf = _open_parquet(path)
    raw = (pf.schema_arrow.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ManifestError(path, "carries no fat-distill metadata",
                            hint="it was not written by fat-distill; pass schema=... to read it anyway")
    meta = ManifestMeta.from_json(raw)
    if meta.rows is None:
        meta.rows = pf.metadata.num_rows
    return meta


#: Columns pandas adds for a DataFrame index (``to_parquet`` of a filtered frame keeps its row labels).
_PANDAS_INDEX_COLUMN = re.compile(r"__index_level_\d+__")


def _without_foreign_metadata(table: pa.Table, raw: bytes | None) -> pa.Table:
    """Drop pandas' index columns and every schema metadata key but ours.

    A manifest's meaning is its columns. pandas' metadata would turn columns back
    into a (non-contiguous) index or into nullable/categorical dtypes in
    :func:`read_manifest`, and an ``__index_level_0__`` column would travel on
    as a column of its own.
    """
    index_columns = [name for name in table.column_names if _PANDAS_INDEX_COLUMN.fullmatch(name)]
    if index_columns:
        table = table.drop_columns(index_columns)
    return table.replace_schema_metadata({METADATA_KEY: raw} if raw is not None else None)


def read_manifest_table(path: str | os.PathLike, schema: str | None = None) -> tuple[pa.Table, ManifestMeta]:
    """Read and validate a manifest as an Arrow table.

    Args:
        path: the Parquet file.
        schema: the schema expected ("dataset", "teacher_round", "soft_labels", "metrics").
            If None, the schema named in the file's metadata is used. A file without
            fat-distill metadata (e.g. filtered in pandas, Polars or DuckDB and written
            back) is accepted when ``schema`` is given: its metadata then says
            ``stage="external"``, ``extra={}``, and carries the content hash of what was read.
            Types those libraries substitute are cast back (int32 → int64, large_string
            or dictionary → string, integral floats → int64); pandas' ``__index_level_N__``
            columns are dropped.

    Returns:
        (table with columns cast to the schema's types, metadata).

    Raises:
        ManifestError naming the file, column and row of the first problem: wrong schema,
        a version newer than this library understands, a missing column, a wrong type,
        a null, a value outside its allowed set or range, a duplicate row key.
    """
    path = Path(path)
    pf = _open_parquet(path)
    raw = (pf.schema_arrow.metadata or {}).get(METADATA_KEY)
    if raw is None:
        if schema is None:
            raise ManifestError(path, "carries no fat-distill metadata and no schema was given",
                                hint="pass the expected schema (e.g. --schema dataset)")
        meta = ManifestMeta(schema=schema, version=get_schema(schema).version, stage="external")
    else:
        try:
            meta = ManifestMeta.from_json(raw)
        except (json.JSONDecodeError, TypeError) as exc:
            raise ManifestError(path, f"corrupt fat-distill metadata ({exc})") from exc
    if schema is not None and meta.schema != schema:
        raise ManifestError(path, f"is a {meta.schema!r} manifest, expected {schema!r}")
    spec = get_schema(meta.schema)
    if meta.version > spec.version:
        raise ManifestError(path, f"schema {meta.schema!r} version {meta.version} is newer than this "
                                  f"fat-distill understands (version {spec.version})",
                            hint="upgrade fat-distill, or re-create the manifest with this version")
    try:
        table = pf.read()
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(path, f"cannot read column data ({exc})",
                            hint="the file is damaged; re-create it from its producing stage") from exc
    table = _without_foreign_metadata(table, raw)
    validate_table(table, spec, path)
    # Cast declared columns to their canonical types (e.g. large_string from another writer).
    for col in spec.columns:
        if col.name in table.column_names and table.column(col.name).type != col.type:
            idx = table.column_names.index(col.name)
            table = table.set_column(idx, pa.field(col.name, col.type, nullable=col.nullable),
                                     table.column(col.name).cast(col.type))
    meta.rows = table.num_rows
    if raw is None:
        meta.content_hash = content_hash(table)
    return table, meta


def read_manifest(path: str | os.PathLike, schema: str | None = None) -> pd.DataFrame:
    """Read and validate a manifest as a pandas DataFrame (see ``read_manifest_table``).

    The metadata is attached as ``frame.attrs["manifest"]`` (a ManifestMeta).
    List columns come back as numpy arrays per row.
    """
    table, meta = read_manifest_table(path, schema)
    frame = table.to_pandas()
    frame.attrs["manifest"] = meta
    return frame


def write_manifest(
    data: pd.DataFrame | pa.Table,
    path: str | os.PathLike,
    schema: str,
    *,
    stage: str,
    config_hash: str | None = None,
    parents: Iterable[Mapping[str, str]] = (),
    extra: Mapping[str, Any] | None = None,
    sort: bool = True,
) -> ManifestMeta:
    """Validate ``data`` against ``schema`` and write it atomically to ``path``.

    The table is written to a temporary file in the same folder, flushed to disk and
    renamed over ``path``: a reader never sees a partial manifest, and a crash leaves
    at most a hidden ``.*.tmp-*`` file behind.

    Args:
        data: the rows (pandas DataFrame or Arrow table). Declared columns are cast to
            their schema types; extra columns are kept as they are.
        path: destination ``.parquet`` file; parent folders are created.
        schema: schema name.
        stage: the producing stage, e.g. "data.index" or "teacher.round2".
        config_hash: hash of the stage's config, part of the provenance.
        parents: ``parent_ref(...)`` entries of the manifests this one was made from.
        extra: small JSON-serialisable facts (e.g. ``{"dataset_root": "/data/market"}``).
        sort: sort rows by the schema's natural order (so equal content gives equal files).

    Returns:
        The metadata written, including ``content_hash`` and ``rows``.
    """
    path = Path(path)
    spec = get_schema(schema)
    table = _as_table(data, spec, path)
    if sort and spec.sort_by and all(c in table.column_names for c in spec.sort_by):
        table = table.sort_by([(c, "ascending") for c in spec.sort_by])
    validate_table(table, spec, path)
    meta = ManifestMeta(
        schema=spec.name, version=spec.version, stage=stage, config_hash=config_hash,
        parents=[dict(p) for p in parents], content_hash=content_hash(table), rows=table.num_rows,
        extra=dict(extra or {}),
    )
    table = table.replace_schema_metadata({METADATA_KEY: meta.to_json()})
    atomic_write_parquet(table, path)
    return meta


def atomic_write_parquet(table: pa.Table, path: Path) -> None:
    atomic_write(path, lambda handle: pq.write_table(table, handle, compression="zstd"))
