"""Parquet manifests: the only way stages exchange data (SPEC §3).

>>> from fat_distill.manifests import write_manifest, read_manifest
>>> meta = write_manifest(frame, "data_manifests/market.parquet", "dataset", stage="data.index")
>>> frame = read_manifest("data_manifests/market.parquet", schema="dataset")
"""

from fat_distill.manifests.hashing import content_hash, file_content_hash
from fat_distill.manifests.io import (
    ManifestError,
    ManifestMeta,
    atomic_write_parquet,
    parent_ref,
    read_manifest,
    read_manifest_meta,
    read_manifest_table,
    validate_table,
    write_manifest,
)
from fat_distill.manifests.schemas import (
    DATASET,
    IDENTITY_AUDIT,
    LABEL_ACTIONS,
    METRICS,
    NOISE_KINDS,
    SCHEMAS,
    SOFT_LABELS,
    SPLITS,
    TEACHER_ROUND,
    Column,
    ManifestSchema,
    get_schema,
)
from fat_distill.manifests.summary import diff_manifests, summarise_manifest

__all__ = [
    "DATASET", "IDENTITY_AUDIT", "LABEL_ACTIONS", "METRICS", "NOISE_KINDS", "SCHEMAS", "SOFT_LABELS", "SPLITS", "TEACHER_ROUND",
    "Column", "ManifestError", "ManifestMeta", "ManifestSchema", "atomic_write_parquet", "content_hash",
    "diff_manifests", "file_content_hash", "get_schema", "parent_ref", "read_manifest", "read_manifest_meta",
    "read_manifest_table", "summarise_manifest", "validate_table", "write_manifest",
]
