"""Ranked-list pictures and t-SNE maps: the library on tiny real images, then `inspect --pictures` on real runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from fat_distill.data import ImageDecodeError
from fat_distill.evaluate import (
    choose_queries,
    plot_embedding_map,
    plot_ranked_results,
    rank_gallery,
)
from fat_distill.evaluate.pictures import MATCH_COLOUR, MISMATCH_COLOUR, QUERY_COLOUR
from tests.helpers import write_identity_images

WHITE = (255, 255, 255)
TILE = (48, 24)


def tile_frames(png: Path) -> list[tuple[int, int, int]]:
    """Colour of each tile's frame, left to right, read along the first pixel row that is not all white."""
    pixels = np.asarray(Image.open(png).convert("RGB"))
    top = next(y for y in range(pixels.shape[0]) if (pixels[y] != 255).any())
    line = [tuple(int(v) for v in p) for p in pixels[top]]
    colours, previous = [], WHITE
    for colour in line:
        if colour != WHITE and colour != previous:
            colours.append(colour)
        previous = colour
    return colours


@pytest.fixture(scope="module")
def test_set(tmp_path_factory):
    """3 query images (pids 1-3, camera 1) and 13 gallery rows: pids 1-3 on cameras 1,2,3,1, plus a distractor."""
    root = tmp_path_factory.mktemp("pictures_data")
    query = write_identity_images(root, identities=3, per_identity=1, size=(32, 16), seed=1, split="query")
    gallery = write_identity_images(root, identities=3, per_identity=4, size=(32, 16), seed=2, split="gallery")
    shutil.copy(root / gallery["path"].iloc[0], root / "gallery" / "distractor.png")
    gallery = pd.concat([gallery, pd.DataFrame([{"sample_id": "gallery/distractor.png", "path": "gallery/distractor.png",
                                                 "pid": 0, "camid": 2, "split": "gallery"}])], ignore_index=True)
    return root, query, gallery


def row_of(gallery: pd.DataFrame, pid: int, camid: int) -> int:
    return int(gallery.index[(gallery["pid"] == pid) & (gallery["camid"] == camid)][0])


def test_ranked_rows_skip_same_camera_matches_and_colour_the_rest(test_set, tmp_path):
    root, query, gallery = test_set
    distmat = np.full((len(query), len(gallery)), 5.0)
    near = [row_of(gallery, 1, 1),            # pid 1, camera 1 = the query's camera: junk, skipped
            len(gallery) - 1,                 # the distractor: a false match
            row_of(gallery, 1, 2),            # pid 1 on camera 2: a true match
            row_of(gallery, 2, 2)]            # another identity
    distmat[0, near] = [0.1, 0.2, 0.3, 0.4]
    out = tmp_path / "ranked"
    drawn = plot_ranked_results(distmat, query, gallery, root, out, tmp_path / "grid.png", query_indices=[0, 2],
                                topk=3, tile_size=TILE)

    assert drawn.ranked.gallery_indices[0].tolist() == near[1:]
    assert drawn.ranked.matches[0].tolist() == [False, True, False]
    assert [p.parent for p in drawn.rows] == [out, out] and all(p.is_file() for p in drawn.rows)
    assert drawn.rows[0].name == "q000_query_0001_c1_000.png"
    assert tile_frames(drawn.rows[0]) == [QUERY_COLOUR, MISMATCH_COLOUR, MATCH_COLOUR, MISMATCH_COLOUR]
    # Query 2 (pid 3, camera 1): all distances tie, so non-matches come first (the pessimistic order).
    assert not drawn.ranked.matches[1].any()
    assert tile_frames(drawn.rows[1]) == [QUERY_COLOUR, *[MISMATCH_COLOUR] * 3]

    row = np.asarray(Image.open(drawn.rows[0]))
    grid = np.asarray(Image.open(drawn.grid))
    assert grid.shape == (2 * row.shape[0], row.shape[1], 3)
    assert np.array_equal(grid[: row.shape[0]], row)
    assert np.array_equal(grid[row.shape[0]:], np.asarray(Image.open(drawn.rows[1])))


def test_short_gallery_leaves_blank_slots(test_set, tmp_path):
    root, query, gallery = test_set
    few = gallery.iloc[:4].reset_index(drop=True)  # pid 1 on cameras 1, 2, 3, 1: two remain for query pid 1 cam 1
    drawn = plot_ranked_results(np.zeros((len(query), len(few))), query, few, root, tmp_path, query_indices=[0],
                                topk=5, tile_size=TILE)
    assert drawn.grid is None
    assert drawn.ranked.gallery_indices[0].tolist() == [1, 2, -1, -1, -1]
    assert tile_frames(drawn.rows[0]) == [QUERY_COLOUR, MATCH_COLOUR, MATCH_COLOUR]


def test_rank_gallery_protocol():
    # gallery: same pid+camera, same pid unknown camera, junk, distractor, another pid
    g_pids, g_cams = [1, 1, -1, 0, 2], [1, -1, 2, 2, 3]
    ranked = rank_gallery(np.array([[0.0, 0.1, 0.0, 0.2, 0.2]]), [1], [1], g_pids, g_cams, topk=5)
    assert ranked.gallery_indices.tolist() == [[1, 3, 4, -1, -1]]
    assert ranked.matches.tolist() == [[True, False, False, False, False]]
    # An unknown query camera is never the same camera: the pid-1 image on camera 1 counts.
    unknown = rank_gallery(np.array([[0.0, 0.1, 0.0, 0.2, 0.2]]), [1], [-1], g_pids, g_cams, topk=2)
    assert unknown.gallery_indices.tolist() == [[0, 1]]


def test_ranked_results_reject_bad_input(test_set, tmp_path):
    root, query, gallery = test_set
    distmat = np.zeros((len(query), len(gallery)))
    with pytest.raises(ValueError, match="topk must be >= 1"):
        plot_ranked_results(distmat, query, gallery, root, tmp_path, topk=0)
    with pytest.raises(ValueError, match="query_frame has 2 rows but distmat has 3"):
        plot_ranked_results(distmat, query.iloc[:2], gallery, root, tmp_path)
    with pytest.raises(ValueError, match=r"query_indices \[7\] are outside the 3 query rows"):
        plot_ranked_results(distmat, query, gallery, root, tmp_path, query_indices=[0, 7])
    with pytest.raises(ValueError, match="lacks column"):
        plot_ranked_results(distmat, query.drop(columns="camid"), gallery, root, tmp_path)
    broken = gallery.copy()
    broken.loc[0, "path"] = "gallery/missing.png"
    with pytest.raises(ImageDecodeError, match=r"missing\.png.*sample_id 'gallery/0001_c1_000\.png'.*does not exist"):
        plot_ranked_results(np.arange(len(gallery))[None].repeat(3, 0), query, broken, root, tmp_path,
                            query_indices=[1], topk=2, tile_size=TILE)


def test_choose_queries_is_seeded_or_explicit(test_set):
    _, query, _ = test_set
    first = choose_queries(query, 2, seed=3)
    assert first.tolist() == choose_queries(query, 2, seed=3).tolist()
    assert len(first) == 2 and list(first) == sorted(first)
    assert choose_queries(query, 10).tolist() == [0, 1, 2]
    assert choose_queries(query, query_ids=["query/0003_c1_000.png", "query/0001_c1_000.png"]).tolist() == [2, 0]
    with pytest.raises(ValueError, match="not query rows"):
        choose_queries(query, query_ids=["gallery/0001_c1_000.png"])


def test_embedding_map_draws_noisy_as_crosses(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(1, 7), 5)
    features = rng.normal(size=(6, 16))[labels - 1] + 0.1 * rng.normal(size=(30, 16))
    noisy = np.zeros(30, dtype=bool)
    noisy[[1, 7, 20]] = True
    drawn = plot_embedding_map(features, labels, tmp_path / "map.png", noisy=noisy, seed=0)
    assert drawn.num_crosses == 3
    assert drawn.perplexity == pytest.approx(29 / 3)  # 30 clamped below the number of points
    assert drawn.coordinates.shape == (30, 2) and np.isfinite(drawn.coordinates).all()
    assert Image.open(drawn.path).size[0] > 300

    subset = plot_embedding_map(features, labels, tmp_path / "small.png", noisy=noisy, max_points=10, seed=1)
    again = plot_embedding_map(features, labels, tmp_path / "small2.png", noisy=noisy, max_points=10, seed=1)
    assert len(subset.indices) == 10 and subset.indices.tolist() == again.indices.tolist()
    assert subset.num_crosses == int(noisy[subset.indices].sum())
    assert np.allclose(subset.coordinates, again.coordinates)

    tiny = plot_embedding_map(features[:4], np.array([0, 1, 1, 2]), tmp_path / "tiny.png", perplexity=30.0)
    assert tiny.perplexity == pytest.approx(1.0) and tiny.num_crosses == 0


def test_embedding_map_rejects_bad_input(tmp_path):
    features = np.ones((5, 4))
    with pytest.raises(ValueError, match="at least 3 points"):
        plot_embedding_map(features[:2], [1, 2], tmp_path / "m.png")
    with pytest.raises(ValueError, match=r"labels must have shape \(5,\)"):
        plot_embedding_map(features, [1, 2], tmp_path / "m.png")
    with pytest.raises(ValueError, match="noisy must be a bool array"):
        plot_embedding_map(features, [1, 2, 3, 4, 5], tmp_path / "m.png", noisy=[0, 1, 0, 0, 0])
    with pytest.raises(ValueError, match="NaN or infinite"):
        plot_embedding_map(np.full((5, 4), np.nan), [1, 2, 3, 4, 5], tmp_path / "m.png")
    assert not (tmp_path / "m.png").exists()


# --- `fat-distill inspect RUN_ID --pictures` on real runs -------------------------------------------------------

runner = CliRunner()


def invoke(*args: str):
    from fat_distill.cli import app

    return runner.invoke(app, [str(a) for a in args])


# prefect_run and direct_run: session fixtures in tests/conftest.py (one tiny run each, shared with other tests).


@pytest.mark.slow
def test_inspect_pictures_writes_pngs_and_attaches_them_to_the_flow_run(prefect_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from fat_distill.pipeline import load_run_json

    runs_root, run_id = prefect_run
    result = invoke("inspect", run_id, "--runs-root", runs_root, "--pictures", "--train-map", "--queries", 3,
                    "--topk", 4)
    assert result.exit_code == 0, result.output
    plots = runs_root / run_id / "plots"
    overview = [plots / f"{kind}_{method}.png" for method in ("distilled", "ce")
                for kind in ("ranked", "tsne_test", "tsne_train")]
    assert all(p.is_file() for p in overview)
    for method in ("distilled", "ce"):
        rows = sorted((plots / "ranked" / method).glob("*.png"))
        assert len(rows) == 3
        assert Image.open(plots / f"ranked_{method}.png").height == 3 * Image.open(rows[0]).height
    assert f"wrote {plots / 'tsne_train_ce.png'}" in result.output
    assert "attached 6 image artifact(s)" in result.output

    flow_run_id = load_run_json(runs_root / run_id)["flow_run_id"]
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    images = {a.data for a in artifacts if a.type == "image"}
    assert {p.resolve().as_uri() for p in overview} <= images
    listing = [a for a in artifacts if a.type == "markdown" and a.key == "run-pictures"]
    assert len(listing) == 1 and str((plots / "ranked" / "ce").resolve()) in listing[0].data


@pytest.mark.slow
def test_inspect_pictures_of_a_direct_run_has_nothing_to_attach(direct_run):
    runs_root, run_id = direct_run
    result = invoke("inspect", run_id, "--runs-root", runs_root, "--pictures", "--queries", 2, "--topk", 3,
                    "--method", "ce", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    plots = runs_root / run_id / "plots"
    assert report["pictures"]["overview"] == [str(plots / "ranked_ce.png"), str(plots / "tsne_test_ce.png")]
    assert len(report["pictures"]["rows"]) == 2 and all(Path(p).is_file() for p in report["pictures"]["rows"])
    assert "no Prefect flow run" in report["pictures"]["attached"]
    assert not (plots / "ranked_distilled.png").exists()

    # The same queries again, fewer of them: the folder holds exactly this call's rows.
    again = invoke("inspect", run_id, "--runs-root", runs_root, "--pictures", "--queries", 1, "--method", "ce")
    assert again.exit_code == 0, again.output
    assert "no Prefect flow run" in again.output
    assert len(list((plots / "ranked" / "ce").glob("*.png"))) == 1


@pytest.mark.slow
def test_inspect_pictures_draws_the_chosen_query_ids_in_their_order(direct_run):
    from fat_distill.manifests import read_manifest

    runs_root, run_id = direct_run
    dataset = read_manifest(runs_root.parent / "manifests" / run_id / "dataset_noisy.parquet", "dataset")
    queries = dataset.loc[dataset["split"] == "query", "sample_id"].tolist()
    chosen = [queries[-1], queries[0]]  # not the manifest's order
    result = invoke("inspect", run_id, "--runs-root", runs_root, "--pictures", "--method", "ce", "--topk", 3,
                    "--query-id", chosen[0], "--query-id", chosen[1], "--json")
    assert result.exit_code == 0, result.output
    rows = [Path(p).name for p in json.loads(result.stdout)["pictures"]["rows"]]
    stems = [Path(q).stem for q in chosen]
    assert len(rows) == 2 and rows[0].startswith("q000_") and rows[1].startswith("q001_")
    assert stems[0] in rows[0] and stems[1] in rows[1], (rows, chosen)

    unknown = invoke("inspect", run_id, "--runs-root", runs_root, "--pictures", "--method", "ce",
                     "--query-id", "query/no_such_image.png")
    assert unknown.exit_code == 2
    assert "not query rows of the dataset" in " ".join(unknown.output.split())
    assert "query/no_such_image.png" in unknown.output


@pytest.mark.slow
def test_inspect_pictures_explains_a_run_without_students(direct_run, tmp_path):
    runs_root, run_id = direct_run
    source = runs_root / run_id
    unfinished = tmp_path / "runs" / run_id
    unfinished.mkdir(parents=True)
    shutil.copy(source / "config.yaml", unfinished / "config.yaml")
    data = json.loads((source / "run.json").read_text())
    data["stages"] = {k: v for k, v in data["stages"].items() if not k.startswith(("student.", "evaluate."))}
    (unfinished / "run.json").write_text(json.dumps(data))
    result = invoke("inspect", run_id, "--runs-root", tmp_path / "runs", "--pictures")
    assert result.exit_code == 2
    assert "never finished a student stage" in result.output and f"fat-distill resume {run_id}" in result.output

    unknown = invoke("inspect", run_id, "--runs-root", runs_root, "--pictures", "--method", "oracle")
    assert unknown.exit_code == 2 and "trained no method ['oracle']" in unknown.output


@pytest.mark.slow
def test_plain_inspect_imports_neither_torch_nor_prefect(direct_run):
    runs_root, run_id = direct_run
    code = ("import sys; from typer.testing import CliRunner; from fat_distill.cli import app; "
            f"r = CliRunner().invoke(app, ['inspect', {run_id!r}, '--runs-root', {str(runs_root)!r}]); "
            "assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('torch', 'prefect', 'sklearn') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.slow
def test_unknown_flow_run_is_explained_and_the_pictures_stay(prefect_run, direct_run, tmp_path):
    import uuid

    runs_root, run_id = direct_run
    copy = tmp_path / "runs" / run_id
    copy.mkdir(parents=True)
    shutil.copy(runs_root / run_id / "config.yaml", copy / "config.yaml")
    data = json.loads((runs_root / run_id / "run.json").read_text())
    data["flow_run_id"] = str(uuid.uuid4())
    (copy / "run.json").write_text(json.dumps(data))
    result = invoke("inspect", run_id, "--runs-root", tmp_path / "runs", "--pictures", "--queries", 1,
                    "--method", "ce")
    assert result.exit_code == 2
    assert f"flow run {data['flow_run_id']} is not on" in result.output
    assert "only attaching them to Prefect failed" in result.output
    assert (copy / "plots" / "ranked_ce.png").is_file()
