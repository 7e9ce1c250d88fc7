"""Manifests: schemas, atomic writes, content hashes, validation errors, other readers."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fat_distill.manifests import (
    ManifestError,
    content_hash,
    diff_manifests,
    file_content_hash,
    parent_ref,
    read_manifest,
    read_manifest_meta,
    summarise_manifest,
    write_manifest,
)
from fat_distill.manifests.schemas import METADATA_KEY
from tests.helpers import EFBIG, run_on_a_full_disk


def dataset_frame(n_ids: int = 4, per_id: int = 3) -> pd.DataFrame:
    rows = []
    for pid in range(1, n_ids + 1):
        for j in range(per_id):
            rel = f"bounding_box_train/{pid:04d}_c{j + 1}s1_{j:06d}_00.jpg"
            rows.append({"sample_id": rel, "path": rel, "pid": pid, "camid": j + 1, "split": "train"})
    rows.append({"sample_id": "query/0009_c1.jpg", "path": "query/0009_c1.jpg", "pid": 9, "camid": 1, "split": "query"})
    rows.append({"sample_id": "bounding_box_test/0000_c2.jpg", "path": "bounding_box_test/0000_c2.jpg",
                 "pid": 0, "camid": 2, "split": "gallery"})
    return pd.DataFrame(rows)


def teacher_frame(n: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({
        "sample_id": [f"s{i}" for i in range(n)],
        "round": np.zeros(n, dtype=np.int32),
        "given_label": rng.integers(1, 4, n),
        "pred_label": rng.integers(1, 4, n),
        "confidence": rng.random(n).astype(np.float32),
        "max_prob": rng.random(n).astype(np.float32),
        "entropy": rng.random(n).astype(np.float32),
        "confident": rng.random(n) > 0.5,
    })


def soft_frame() -> pd.DataFrame:
    return pd.DataFrame({
        "sample_id": ["a", "b", "c"],
        "given_label": [1, 2, 3],
        "topk_ids": [[1, 2], [2, 1], [1, 3]],
        "topk_probs": [[0.9, 0.1], [0.6, 0.4], [0.7, 0.2]],
        "confident": [True, True, False],
    })


@pytest.mark.parametrize("schema,frame_fn", [
    ("dataset", dataset_frame), ("teacher_round", teacher_frame), ("soft_labels", soft_frame),
    ("metrics", lambda: pd.DataFrame({"stage": ["eval"], "metric": ["mAP"], "value": [0.5]})),
])
def test_round_trip_keeps_values_types_and_provenance(tmp_path, schema, frame_fn):
    frame = frame_fn()
    path = tmp_path / f"{schema}.parquet"
    meta = write_manifest(frame, path, schema, stage="unit", config_hash="cfg123",
                          parents=[{"schema": "dataset", "content_hash": "sha256:abc", "path": "x"}],
                          extra={"dataset_root": "/data"})
    back = read_manifest(path)
    got = back.attrs["manifest"]
    assert got.schema == schema and got.stage == "unit" and got.config_hash == "cfg123"
    assert got.parents[0]["content_hash"] == "sha256:abc"
    assert got.extra == {"dataset_root": "/data"}
    assert got.content_hash == meta.content_hash == file_content_hash(path)
    assert len(back) == len(frame)
    key = "sample_id" if "sample_id" in frame else "metric"
    merged = frame.set_index(key).sort_index()
    back_sorted = back.set_index(key).sort_index()
    for col in merged.columns:
        if col in ("topk_ids", "topk_probs"):
            for x, y in zip(merged[col], back_sorted[col]):
                np.testing.assert_allclose(np.asarray(x, dtype=float), np.asarray(y, dtype=float), rtol=1e-6)
        elif merged[col].dtype.kind == "f":
            np.testing.assert_allclose(merged[col].to_numpy(), back_sorted[col].to_numpy(), rtol=1e-6)
        else:
            assert list(merged[col]) == list(back_sorted[col]), col


def test_written_types_are_the_schema_types(tmp_path):
    path = tmp_path / "t.parquet"
    write_manifest(teacher_frame(), path, "teacher_round", stage="unit")
    schema = pq.read_schema(path)
    assert schema.field("round").type == pa.int32()
    assert schema.field("confidence").type == pa.float32()
    assert schema.field("confident").type == pa.bool_()
    write_manifest(soft_frame(), tmp_path / "s.parquet", "soft_labels", stage="unit")
    s = pq.read_schema(tmp_path / "s.parquet")
    assert s.field("topk_ids").type == pa.list_(pa.int32())
    assert s.field("topk_probs").type == pa.list_(pa.float32())


def test_content_hash_ignores_layout_and_metadata_but_not_values(tmp_path):
    frame = dataset_frame(n_ids=20, per_id=5)
    write_manifest(frame, tmp_path / "a.parquet", "dataset", stage="one")
    table = pq.read_table(tmp_path / "a.parquet")
    # Same rows, other row groups, compression and metadata.
    pq.write_table(table.replace_schema_metadata({b"other": b"x"}), tmp_path / "b.parquet",
                   row_group_size=7, compression="snappy")
    assert file_content_hash(tmp_path / "a.parquet") == file_content_hash(tmp_path / "b.parquet")
    chunked = pa.concat_tables([table.slice(0, 13), table.slice(13)])
    assert content_hash(chunked) == content_hash(table)
    # Writing again later (new mtime, another stage name) gives the same hash.
    m2 = write_manifest(frame.sample(frac=1.0, random_state=1), tmp_path / "c.parquet", "dataset", stage="two")
    assert m2.content_hash == read_manifest_meta(tmp_path / "a.parquet").content_hash
    changed = frame.copy()
    changed.loc[3, "pid"] = 2
    m3 = write_manifest(changed, tmp_path / "d.parquet", "dataset", stage="one")
    assert m3.content_hash != m2.content_hash


def test_string_hash_is_unambiguous():
    t1 = pa.table({"s": ["ab", "c"]})
    t2 = pa.table({"s": ["a", "bc"]})
    assert content_hash(t1) != content_hash(t2)


def test_invalid_rows_are_refused_before_anything_is_written(tmp_path):
    path = tmp_path / "m.parquet"
    write_manifest(dataset_frame(), path, "dataset", stage="unit")
    before = path.read_bytes()
    bad = dataset_frame()
    bad.loc[2, "split"] = "training"
    with pytest.raises(ManifestError):
        write_manifest(bad, path, "dataset", stage="unit")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.parquet"]  # no temp files left


@pytest.mark.parametrize("existing", [True, False], ids=["replacing", "new"])
def test_write_interrupted_by_a_full_disk_leaves_no_partial_manifest(tmp_path, existing):
    path = tmp_path / "m.parquet"
    if existing:
        write_manifest(dataset_frame(), path, "dataset", stage="unit")
    before = path.read_bytes() if existing else None
    # 2,000 rows of long unique paths compress to far more than the 16 KiB the disk has left
    done = run_on_a_full_disk(
        prepare="""
            from fat_distill.manifests import write_manifest
            from tests.test_manifests import dataset_frame
            frame = dataset_frame(n_ids=500, per_id=4)
            frame["path"] = [f"{p}/{i:032x}.jpg" for i, p in enumerate(frame["path"])]
        """,
        write=f"write_manifest(frame, {str(path)!r}, 'dataset', stage='unit')",
        limit_bytes=16 * 1024)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["errno", str(EFBIG)], done.stdout + done.stderr  # pyarrow failed while writing
    if existing:
        assert path.read_bytes() == before
        read_manifest(path, "dataset")  # still the complete old manifest
    else:
        assert not path.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["m.parquet"] if existing else [])  # no temp file left


def test_parent_ref_points_at_content(tmp_path):
    meta = write_manifest(dataset_frame(), tmp_path / "m.parquet", "dataset", stage="unit")
    ref = parent_ref(tmp_path / "m.parquet")
    assert ref == {"schema": "dataset", "content_hash": meta.content_hash, "path": str(tmp_path / "m.parquet")}


# --------------------------------------------------------------------------- bad input

def _write_raw(path, table, schema="dataset", version=1):
    meta = {"schema": schema, "version": version, "stage": "raw"}
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()}), path)


def test_missing_column_names_file_and_column(tmp_path):
    frame = dataset_frame().drop(columns=["camid"])
    path = tmp_path / "m.parquet"
    _write_raw(path, pa.Table.from_pandas(frame, preserve_index=False))
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    assert str(path) in str(err.value) and "camid" in str(err.value)
    assert not list(tmp_path.glob(".*tmp*"))


def test_wrong_type_names_column_and_row(tmp_path):
    frame = dataset_frame().astype({"pid": object})
    frame.loc[4, "pid"] = "seven"
    path = tmp_path / "m.parquet"
    _write_raw(path, pa.Table.from_pandas(frame.astype({"pid": str}), preserve_index=False))
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    assert err.value.column == "pid"
    assert "expected int64" in str(err.value)
    with pytest.raises(ManifestError) as err:
        write_manifest(frame, tmp_path / "w.parquet", "dataset", stage="unit")
    assert err.value.column == "pid" and err.value.row == 4 and "'seven'" in str(err.value)
    assert not (tmp_path / "w.parquet").exists()


def test_fractional_integer_is_rejected(tmp_path):
    frame = dataset_frame()
    frame["true_pid"] = frame["pid"].astype(float)
    frame.loc[1, "true_pid"] = 2.5
    with pytest.raises(ManifestError) as err:
        write_manifest(frame, tmp_path / "w.parquet", "dataset", stage="unit")
    assert err.value.column == "true_pid" and err.value.row == 1


@pytest.mark.parametrize("column,value,expect", [
    ("split", "validation", "not allowed"),
    ("camid", -5, "below"),
    ("sample_id", None, "missing value"),
])
def test_bad_values_name_the_row(tmp_path, column, value, expect):
    frame = dataset_frame()
    frame[column] = frame[column].astype(object)
    frame.loc[5, column] = value
    path = tmp_path / "m.parquet"
    _write_raw(path, pa.Table.from_pandas(frame, preserve_index=False))
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    assert err.value.column == column and err.value.row == 5 and expect in str(err.value)


def test_duplicate_sample_id(tmp_path):
    frame = dataset_frame()
    frame.loc[6, "sample_id"] = frame.loc[2, "sample_id"]
    with pytest.raises(ManifestError) as err:
        write_manifest(frame, tmp_path / "m.parquet", "dataset", stage="unit", sort=False)
    assert "duplicate" in str(err.value) and err.value.row == 2


def test_probabilities_out_of_range_and_nan(tmp_path):
    frame = soft_frame()
    frame.at[1, "topk_probs"] = [0.6, 1.7]
    with pytest.raises(ManifestError) as err:
        write_manifest(frame, tmp_path / "s.parquet", "soft_labels", stage="unit")
    assert err.value.column == "topk_probs" and err.value.row == 1
    frame = teacher_frame()
    frame.loc[3, "confidence"] = np.nan
    with pytest.raises(ManifestError) as err:
        write_manifest(frame, tmp_path / "t.parquet", "teacher_round", stage="unit", sort=False)
    assert err.value.column == "confidence" and err.value.row == 3 and "NaN" in str(err.value)


def test_mismatched_topk_lengths(tmp_path):
    frame = soft_frame()
    frame.at[2, "topk_ids"] = [1]
    with pytest.raises(ManifestError) as err:
        write_manifest(frame, tmp_path / "s.parquet", "soft_labels", stage="unit")
    assert err.value.row == 2


def test_newer_schema_version_is_refused(tmp_path):
    path = tmp_path / "m.parquet"
    _write_raw(path, pa.Table.from_pandas(dataset_frame(), preserve_index=False), version=99)
    with pytest.raises(ManifestError, match="version 99 is newer"):
        read_manifest(path)


def test_wrong_schema_and_missing_metadata(tmp_path):
    path = tmp_path / "m.parquet"
    write_manifest(dataset_frame(), path, "dataset", stage="unit")
    with pytest.raises(ManifestError, match="expected 'teacher_round'"):
        read_manifest(path, "teacher_round")
    plain = tmp_path / "plain.parquet"
    dataset_frame().to_parquet(plain)  # written by pandas, no fat-distill metadata
    with pytest.raises(ManifestError, match="no fat-distill metadata"):
        read_manifest(plain)
    assert len(read_manifest(plain, "dataset")) == len(dataset_frame())


def test_truncated_and_non_parquet_files(tmp_path):
    path = tmp_path / "m.parquet"
    write_manifest(dataset_frame(), path, "dataset", stage="unit")
    data = path.read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(ManifestError, match="cut.parquet"):
        read_manifest(tmp_path / "cut.parquet")
    (tmp_path / "text.parquet").write_text("hello")
    with pytest.raises(ManifestError, match="not a readable Parquet"):
        read_manifest(tmp_path / "text.parquet")
    with pytest.raises(ManifestError, match="no such file"):
        read_manifest(tmp_path / "missing.parquet")


# --------------------------------------------------------------------------- other readers

def test_duckdb_and_polars_read_manifests_without_our_code(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    pl = pytest.importorskip("polars")
    path = tmp_path / "soft.parquet"
    write_manifest(soft_frame(), path, "soft_labels", stage="unit")
    rows = duckdb.sql(f"SELECT sample_id, topk_ids[1] AS top1, topk_probs[1] AS p FROM '{path}' "
                      "WHERE confident ORDER BY sample_id").fetchall()
    assert [(r[0], r[1]) for r in rows] == [("a", 1), ("b", 2)]
    assert rows[0][2] == pytest.approx(0.9)
    dpath = tmp_path / "ds.parquet"
    write_manifest(dataset_frame(), dpath, "dataset", stage="unit")
    df = pl.read_parquet(dpath)
    assert df.filter(pl.col("split") == "train").height == 12
    assert df.schema["pid"] == pl.Int64
    assert pd.read_parquet(dpath)["sample_id"].is_unique


# --------------------------------------------------------------------------- summaries and diffs

def test_summary_of_noisy_dataset(tmp_path):
    frame = dataset_frame()
    frame["true_pid"] = frame["pid"]
    frame["noise_kind"] = "clean"
    frame.loc[0, ["pid", "noise_kind"]] = [2, "flip"]
    write_manifest(frame, tmp_path / "m.parquet", "dataset", stage="unit")
    back = read_manifest(tmp_path / "m.parquet")
    s = summarise_manifest(back, back.attrs["manifest"])
    assert s["splits"]["train"]["identities"] == 4
    assert s["splits"]["gallery"]["distractor_rows"] == 1
    assert s["noise"]["noisy_rows"] == 1 and s["noise"]["by_kind"] == {"clean": 11, "flip": 1}
    assert s["cameras"] == {"1": 5, "2": 5, "3": 4}


def test_diff_reports_added_removed_relabelled_and_flipped(tmp_path):
    a = teacher_frame(8)
    b = a.copy()
    b = b.drop(index=0)
    b.loc[1, "pred_label"] = b.loc[1, "pred_label"] % 3 + 1
    b.loc[2, "confident"] = not b.loc[2, "confident"]
    b = pd.concat([b, a.iloc[[3]].assign(sample_id="new")], ignore_index=True)
    ma = write_manifest(a, tmp_path / "a.parquet", "teacher_round", stage="unit")
    mb = write_manifest(b, tmp_path / "b.parquet", "teacher_round", stage="unit")
    fa, fb = read_manifest(tmp_path / "a.parquet"), read_manifest(tmp_path / "b.parquet")
    d = diff_manifests(fa, ma, fb, mb)
    assert d["added"] == {"count": 1, "examples": ["new"]}
    assert d["removed"] == {"count": 1, "examples": ["s0"]}
    assert d["labels_changed"]["count"] == 1 and d["labels_changed"]["examples"][0]["sample_id"] == "s1"
    assert d["confident_flipped"]["count"] == 1
    assert not d["identical"]
    assert diff_manifests(fa, ma, fa, ma)["identical"]


def test_no_partial_file_after_interrupted_write(tmp_path, monkeypatch):
    # Simulate a crash in the middle of writing: the destination must not appear.
    import fat_distill.manifests.io as mio

    def exploding_write(table, where, **kwargs):
        where.write(b"PAR1 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(mio.pq, "write_table", exploding_write)
    with pytest.raises(KeyboardInterrupt):
        write_manifest(dataset_frame(), tmp_path / "m.parquet", "dataset", stage="unit")
    assert os.listdir(tmp_path) == []
