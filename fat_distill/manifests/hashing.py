"""Content hashes of manifests: equal data gives an equal hash, whatever the file layout.

The hash covers column names, Arrow types and values in row order. It does not
cover file modification times, compression, row-group or chunk boundaries, or the
provenance metadata, so re-writing the same rows always hashes the same and a
stage's cache key can depend on its inputs' content alone.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

HASH_PREFIX = "sha256:"


def _type_name(t: pa.DataType) -> str:
    # Parquet round trips rename list item fields ("item" vs "element"): hash the value type only.
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list<{_type_name(t.value_type)}>"
    if pa.types.is_large_string(t):
        return "string"
    if pa.types.is_dictionary(t):
        return _type_name(t.value_type)
    return str(t)


def _feed_array(h: "hashlib._Hash", arr: pa.Array) -> None:
    """Feed one (single-chunk) array's logical values into the hash."""
    h.update(_type_name(arr.type).encode())
    h.update(len(arr).to_bytes(8, "little"))
    if arr.null_count:
        h.update(np.packbits(arr.is_null().to_numpy(zero_copy_only=False)).tobytes())
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        h.update(lengths.tobytes())
        # list_flatten honours slicing offsets and skips null lists.
        _feed_array(h, pc.list_flatten(arr))
        return
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type) or pa.types.is_binary(arr.type):
        filled = pc.fill_null(arr, "")
        lengths = pc.binary_length(filled).to_numpy(zero_copy_only=False).astype(np.int64)
        h.update(lengths.tobytes())
        for chunk_start in range(0, len(filled), 65536):
            part = filled.slice(chunk_start, 65536).to_pylist()
            h.update("".join(part).encode() if not pa.types.is_binary(arr.type) else b"".join(part))
        return
    if pa.types.is_boolean(arr.type):
        h.update(np.packbits(pc.fill_null(arr, False).to_numpy(zero_copy_only=False)).tobytes())
        return
    if pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type):
        zero = pa.scalar(0, type=arr.type)
        h.update(np.ascontiguousarray(pc.fill_null(arr, zero).to_numpy(zero_copy_only=False)).tobytes())
        return
    # Anything else (timestamps, structs): a canonical Python representation.
    h.update(repr(arr.to_pylist()).encode())


def content_hash(table: pa.Table) -> str:
    """SHA-256 of a table's content (column names, types and values, in row order).

    Args:
        table: an Arrow table (any chunking).

    Returns:
        ``"sha256:<hex>"``.
    """
    h = hashlib.sha256()
    for name in table.column_names:
        h.update(b"\x00col\x00" + name.encode())
        col = table.column(name)
        arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        _feed_array(h, arr)
    return HASH_PREFIX + h.hexdigest()


def file_content_hash(path: str | os.PathLike) -> str:
    """Content hash of a Parquet file's table, ignoring its metadata (see ``content_hash``)."""
    return content_hash(pq.read_table(Path(path)))
