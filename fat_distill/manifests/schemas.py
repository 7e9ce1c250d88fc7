"""The manifest schemas (SPEC §3): columns, Arrow types and value rules.

A manifest is a Parquet file whose Arrow schema metadata carries, under the key
``fat_distill``, a JSON object naming the schema and its version, the stage
that produced it, that stage's config hash and the content hashes of the
manifests it was made from. Columns are plain Arrow types (strings, integers,
floats, booleans, lists of numbers) so pandas, Polars and DuckDB read them
without this package.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

METADATA_KEY = b"fat_distill"

SPLITS = ("train", "query", "gallery")
NOISE_KINDS = ("clean", "flip", "pair", "outlier", "multi")
LABEL_ACTIONS = ("keep", "relabel", "drop")


@dataclass(frozen=True)
class Column:
    """One column of a manifest schema.

    Args:
        name: column name.
        type: the Arrow type values are stored as.
        required: a manifest without this column is rejected.
        nullable: whether nulls are allowed.
        allowed: for string columns, the only values allowed (None: any).
        min_value / max_value: inclusive numeric bounds (lists: bounds on each element).
        doc: one line for the data_manifests README and ``manifest inspect``.
    """

    name: str
    type: pa.DataType
    required: bool = True
    nullable: bool = False
    allowed: tuple[str, ...] | None = None
    min_value: float | None = None
    max_value: float | None = None
    doc: str = ""


@dataclass(frozen=True)
class ManifestSchema:
    """A named, versioned manifest schema.

    ``unique`` names a column whose values must not repeat (the row key);
    ``label_column`` is the column ``manifest diff`` compares as "the label".
    """

    name: str
    version: int
    columns: tuple[Column, ...]
    unique: str | None = "sample_id"
    label_column: str | None = None
    doc: str = ""
    sort_by: tuple[str, ...] = field(default=())

    def column(self, name: str) -> Column | None:
        for col in self.columns:
            if col.name == name:
                return col
        return None

    @property
    def required_names(self) -> list[str]:
        return [c.name for c in self.columns if c.required]

    def arrow_schema(self, present: list[str] | None = None) -> pa.Schema:
        """The Arrow schema of the declared columns (those in ``present`` if given)."""
        cols = [c for c in self.columns if present is None or c.name in present]
        return pa.schema([pa.field(c.name, c.type, nullable=c.nullable) for c in cols])


DATASET = ManifestSchema(
    name="dataset",
    version=1,
    doc="One row per image (or per image-label pair for 'multi' noise).",
    label_column="pid",
    sort_by=("split", "sample_id"),
    columns=(
        Column("sample_id", pa.string(), doc="stable id: the image path relative to the dataset root"),
        Column("path", pa.string(), doc="image path relative to the dataset root (POSIX)"),
        Column("pid", pa.int64(), min_value=0, doc="given identity label (possibly noisy); 0 = distractor"),
        Column("camid", pa.int64(), min_value=-1, doc="camera id; -1 = unknown"),
        Column("split", pa.string(), allowed=SPLITS, doc="which split the row belongs to"),
        Column("true_pid", pa.int64(), required=False, nullable=True,
               doc="ground-truth identity when known (after `data corrupt`)"),
        Column("noise_kind", pa.string(), required=False, nullable=True, allowed=NOISE_KINDS,
               doc="injected noise kind (ground truth when known)"),
        Column("identity", pa.string(), required=False, nullable=True,
               doc="original identity name (folders layout)"),
        Column("flagged", pa.bool_(), required=False, nullable=True,
               doc="`labels export`: the teacher does not trust the given label"),
        Column("confidence", pa.float32(), required=False, nullable=True, min_value=0.0, max_value=1.0,
               doc="`labels export`: the teacher's confidence in the given label"),
        Column("suggested_pid", pa.int64(), required=False, nullable=True, min_value=0,
               doc="`labels export`: the teacher's most probable identity"),
        Column("suggested_prob", pa.float32(), required=False, nullable=True, min_value=0.0, max_value=1.0,
               doc="`labels export`: its probability"),
        Column("action", pa.string(), required=False, nullable=True, allowed=LABEL_ACTIONS,
               doc="`labels export`: proposed action (rule in the section below)"),
        Column("given_pid", pa.int64(), required=False, nullable=True, min_value=0,
               doc="`labels export --apply`: the label the row came with, before a relabel"),
    ),
)

TEACHER_ROUND = ManifestSchema(
    name="teacher_round",
    version=1,
    doc="Per-sample confidence of one teacher round in the sample's given label.",
    label_column="pred_label",
    sort_by=("sample_id",),
    columns=(
        Column("sample_id", pa.string()),
        Column("round", pa.int32(), min_value=0, doc="teacher round, 0-based"),
        Column("given_label", pa.int64(), min_value=0, doc="the (noisy) label the sample came with"),
        Column("pred_label", pa.int64(), min_value=0, doc="the teacher's arg-max identity"),
        Column("confidence", pa.float32(), min_value=0.0, max_value=1.0,
               doc="confidence in the given label (rule-dependent, in [0, 1])"),
        Column("max_prob", pa.float32(), min_value=0.0, max_value=1.0, doc="largest class probability"),
        Column("entropy", pa.float32(), min_value=0.0, doc="entropy of the predicted distribution (nats)"),
        Column("confident", pa.bool_(), doc="kept for the next round / as a centre contributor"),
        Column("fold", pa.int32(), required=False, nullable=True, min_value=0,
               doc="out-of-fold scoring: the fold whose model scored this sample"),
        Column("loss", pa.float32(), required=False, nullable=True, min_value=0.0,
               doc="cross-entropy of the given label"),
    ),
)

SOFT_LABELS = ManifestSchema(
    name="soft_labels",
    version=1,
    doc="Sparse soft labels from the final teacher (top-k identities and probabilities).",
    label_column="given_label",
    sort_by=("sample_id",),
    columns=(
        Column("sample_id", pa.string()),
        Column("given_label", pa.int64(), min_value=0),
        Column("topk_ids", pa.list_(pa.int32()), min_value=0, doc="top-k identity labels (pids)"),
        Column("topk_probs", pa.list_(pa.float32()), min_value=0.0, max_value=1.0,
               doc="their probabilities (softmax at temperature T), descending"),
        Column("confident", pa.bool_(), doc="whether the sample contributes to cluster centres"),
    ),
)

METRICS = ManifestSchema(
    name="metrics",
    version=1,
    doc="Scalar results of a stage.",
    unique=None,
    columns=(
        Column("stage", pa.string()),
        Column("metric", pa.string()),
        Column("value", pa.float64(), nullable=True),
        Column("step", pa.int64(), required=False, nullable=True, doc="epoch or round, when relevant"),
    ),
)

IDENTITY_AUDIT = ManifestSchema(
    name="identity_audit",
    version=1,
    doc="Per identity, what the final teacher round thinks of its given labels (no ground truth needed).",
    unique="pid",
    sort_by=("pid",),
    columns=(
        Column("pid", pa.int64(), min_value=0, doc="given identity label"),
        Column("identity", pa.string(), required=False, nullable=True, doc="original identity name, when known"),
        Column("rows", pa.int64(), min_value=0, doc="train rows with this given label"),
        Column("flagged", pa.int64(), min_value=0, doc="rows whose given label the teacher does not trust"),
        Column("flagged_fraction", pa.float64(), min_value=0.0, max_value=1.0,
               doc="flagged / rows: the identity's estimated noise rate"),
        Column("relabel", pa.int64(), min_value=0, doc="flagged rows the rule proposes to relabel"),
        Column("drop", pa.int64(), min_value=0, doc="flagged rows the rule proposes to drop"),
        Column("top_suggested_pid", pa.int64(), nullable=True, min_value=0,
               doc="the identity the teacher most often suggests for this identity's flagged rows"),
        Column("top_suggested_rows", pa.int64(), min_value=0, doc="how many flagged rows it is suggested for"),
    ),
)

LABEL_ISSUES = ManifestSchema(
    name="label_issues",
    version=1,
    doc="The cleanlab baseline's filter: confident learning (cleanlab.filter.find_label_issues) on K-fold "
        "out-of-fold probabilities.",
    label_column="pred_label",
    sort_by=("sample_id",),
    columns=(
        Column("sample_id", pa.string()),
        Column("given_label", pa.int64(), min_value=0, doc="the (noisy) label the sample came with"),
        Column("pred_label", pa.int64(), min_value=0, doc="arg-max identity of the out-of-fold probabilities"),
        Column("label_quality", pa.float32(), min_value=0.0, max_value=1.0,
               doc="out-of-fold probability of the given label (cleanlab's self-confidence)"),
        Column("flagged", pa.bool_(), doc="find_label_issues flags the given label; the cleanlab baseline "
                                          "trains on the rows not flagged"),
        Column("fold", pa.int32(), min_value=0, doc="the fold whose model scored this sample"),
    ),
)

SCHEMAS: dict[str, ManifestSchema] = {
    s.name: s for s in (DATASET, TEACHER_ROUND, SOFT_LABELS, METRICS, IDENTITY_AUDIT, LABEL_ISSUES)
}


def get_schema(name: str) -> ManifestSchema:
    try:
        return SCHEMAS[name]
    except KeyError:
        raise ValueError(f"unknown manifest schema {name!r}; known: {', '.join(SCHEMAS)}") from None
