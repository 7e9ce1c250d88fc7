"""Pictures of a finished run: ranked lists and t-SNE maps of each student method, in the run's plots folder.

Reads the run folder (``run.json``, ``config.yaml``), the dataset manifest the
students were evaluated on and their ``final.pt`` checkpoints; extracts features
the way the evaluation stage does (same model, image size, flip setting and
distance) and draws with :mod:`fat_distill.evaluate.pictures`. Torch is imported
only when pictures are made, so importing this module stays cheap.

Files written under ``<run>/plots/``:

    ranked_<method>.png           every chosen query's row, stacked
    ranked/<method>/q*_<id>.png   one row per query
    tsne_test_<method>.png        query + gallery embeddings, coloured by identity
    tsne_train_<method>.png       train embeddings, teacher-flagged samples as crosses (``train_map``)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fat_distill.pipeline.runs import CONFIG_FILE, load_run_json

log = logging.getLogger("fat_distill.pipeline")

FINISHED = ("ran", "cached")


@dataclass
class RunPictures:
    """The PNGs :func:`make_run_pictures` wrote.

    Attributes:
        run_id: the run.
        plots_dir: ``<run>/plots``.
        overview: per method its ranked grid, then the t-SNE maps (one picture per method and kind).
        rows: the per-query ranked rows, method after method.
    """

    run_id: str
    plots_dir: Path
    overview: list[Path] = field(default_factory=list)
    rows: list[Path] = field(default_factory=list)

    @property
    def paths(self) -> list[Path]:
        return [*self.overview, *self.rows]


def _finished_outputs(stages: dict[str, Any], name: str) -> dict[str, Any] | None:
    entry = stages.get(name) or {}
    if entry.get("state") in FINISHED and entry.get("outputs"):
        return entry["outputs"]
    return None


def _dataset_manifest(run_dir: Path, data: dict[str, Any], run_id: str) -> Path:
    """The dataset manifest the students trained and were evaluated on (noisy pids, same test rows)."""
    published = Path(data.get("manifest_dir", "")) / "dataset_noisy.parquet"
    if published.is_file():
        return published
    outputs = _finished_outputs(data.get("stages", {}), "noise")
    if outputs and Path(outputs["dataset"]).is_file():
        return Path(outputs["dataset"])
    raise FileNotFoundError(f"run {run_id}: no dataset manifest found (neither {published} nor the noise stage's "
                            f"output); did the run get past its noise stage? Continue it with "
                            f"`fat-distill resume {run_id}`")


def _final_teacher_round(data: dict[str, Any], run_id: str) -> Path:
    rounds = {}
    for name in data.get("stages", {}):
        parts = name.split(".")
        if len(parts) == 2 and parts[0] == "teacher" and parts[1].startswith("round"):
            outputs = _finished_outputs(data["stages"], name)
            if outputs and outputs.get("teacher_round"):
                rounds[int(parts[1][len("round"):])] = Path(outputs["teacher_round"])
    if not rounds:
        raise FileNotFoundError(f"run {run_id}: no finished teacher round, so the train map has no noisy flags; "
                                f"continue the run with `fat-distill resume {run_id}` or leave out the train map")
    path = rounds[max(rounds)]
    if not path.is_file():
        raise FileNotFoundError(f"run {run_id}: the final teacher round's manifest {path} is gone; "
                                f"`fat-distill resume {run_id}` recomputes it")
    return path


def _student_checkpoints(data: dict[str, Any], config, methods: Sequence[str] | None,
                         run_id: str) -> dict[str, Path]:
    planned = list(config.student_configs())
    stages = data.get("stages", {})
    finished = {m: Path(out["checkpoint"]) for m in planned
                if (out := _finished_outputs(stages, f"student.{m}")) and out.get("checkpoint")}
    if methods is None:
        if not finished:
            raise FileNotFoundError(f"run {run_id} never finished a student stage (planned: {', '.join(planned)}), "
                                    f"so there is no model to draw pictures of; continue it with "
                                    f"`fat-distill resume {run_id}`")
        chosen = [m for m in planned if m in finished]
    else:
        chosen = list(dict.fromkeys(methods))
        unknown = [m for m in chosen if m not in planned]
        if unknown:
            raise ValueError(f"run {run_id} trained no method {unknown}; its methods are {', '.join(planned)}")
        missing = [m for m in chosen if m not in finished]
        if missing:
            raise FileNotFoundError(f"run {run_id}: the student stage of {missing} has not finished; continue the "
                                    f"run with `fat-distill resume {run_id}`")
    for method in chosen:
        if not finished[method].is_file():
            raise FileNotFoundError(f"run {run_id}: checkpoint {finished[method]} of student.{method} is gone; "
                                    f"`fat-distill resume {run_id}` retrains it")
    return {m: finished[m] for m in chosen}


def _clear_pngs(folder: Path) -> None:
    """Remove the rows of an earlier call, so the folder shows exactly this call's queries."""
    if folder.is_dir():
        for old in folder.glob("*.png"):
            old.unlink()


def make_run_pictures(
    run_dir: str | Path,
    *,
    methods: Sequence[str] | None = None,
    num_queries: int = 8,
    query_ids: Sequence[str] | None = None,
    topk: int = 10,
    train_map: bool = False,
    max_points: int = 2000,
    device: str = "cpu",
    seed: int = 0,
    tile_size: tuple[int, int] = (128, 64),
) -> RunPictures:
    """Draw ranked lists and t-SNE maps for each student method of a run into ``<run>/plots``.

    Every method shows the same queries (drawn once, seeded, or given by sample_id),
    so their rows can be compared side by side.

    Args:
        run_dir: the run folder (``runs/<run_id>``).
        methods: student methods to draw (default: every method whose student stage finished).
        num_queries: queries drawn at random when ``query_ids`` is None.
        query_ids: sample_ids of query rows to draw instead.
        topk: gallery images per ranked row.
        train_map: also map the train rows, samples the final teacher round did not
            keep (``confident`` False) drawn as crosses, coloured by their given pid.
        max_points: points per t-SNE map at most (a seeded random subset beyond that).
        device: where features are extracted: ``"cpu"``, ``"cuda:N"`` or ``"auto"``.
        seed: seeds the query draw, the map subsets and t-SNE.
        tile_size: (height, width) of a ranked-list tile in pixels.

    Returns:
        :class:`RunPictures`.

    Raises:
        FileNotFoundError: the run, its dataset manifest, a student checkpoint or the
            final teacher round (for ``train_map``) is missing; the message says how to continue.
        ValueError: an unknown method, query id or setting.
    """
    import numpy as np

    from fat_distill.distill import load_dataset, student_features
    from fat_distill.distill._common import query_and_gallery
    from fat_distill.evaluate import choose_queries, compute_distance_matrix, plot_embedding_map, plot_ranked_results
    from fat_distill.manifests import read_manifest
    from fat_distill.pipeline.config import PipelineConfig
    from fat_distill.pipeline.overrides import load_config

    run_dir = Path(run_dir)
    data = load_run_json(run_dir)
    if data is None:
        raise FileNotFoundError(f"{run_dir} is not a run folder (no run.json); `fat-distill runs` lists the runs")
    run_id = data.get("run_id", run_dir.name)
    if not (run_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"run {run_id}: {run_dir / CONFIG_FILE} is missing, so the models' settings are "
                                "unknown")
    config = load_config(PipelineConfig, run_dir / CONFIG_FILE)
    checkpoints = _student_checkpoints(data, config, methods, run_id)
    dataset = load_dataset(_dataset_manifest(run_dir, data, run_id))
    frame = dataset.frame
    query, gallery = query_and_gallery(dataset, f"run {run_id}", "drawing ranked lists")
    chosen = choose_queries(query, num_queries, query_ids=query_ids, seed=seed)
    train = noisy = None
    if train_map:
        rounds = read_manifest(_final_teacher_round(data, run_id), "teacher_round")
        confident = rounds.set_index("sample_id")["confident"].astype(bool)
        train = frame[(frame["split"] == "train") & frame["sample_id"].isin(confident.index)].reset_index(drop=True)
        noisy = ~confident.loc[train["sample_id"]].to_numpy(dtype=bool)

    plots_dir = run_dir / "plots"
    pictures = RunPictures(run_id=run_id, plots_dir=plots_dir)
    test = {"query": query, "gallery": gallery, "train": train}
    for method, checkpoint in checkpoints.items():
        cfg = config.student_configs()[method]
        features = student_features(dataset, checkpoint, cfg,
                                    {part: rows for part, rows in test.items() if rows is not None}, device)
        # Only the drawn queries' rows of the distance matrix are needed.
        distmat = compute_distance_matrix(features["query"][chosen], features["gallery"], cfg.distance)
        rows_dir = plots_dir / "ranked" / method
        _clear_pngs(rows_dir)
        ranked = plot_ranked_results(distmat, query.iloc[chosen].reset_index(drop=True), gallery, dataset.root,
                                     rows_dir, plots_dir / f"ranked_{method}.png", topk=topk, tile_size=tile_size)
        pictures.overview.append(ranked.grid)
        pictures.rows.extend(ranked.rows)
        test_features = np.concatenate([features["query"].numpy(), features["gallery"].numpy()])
        test_pids = np.concatenate([query["pid"].to_numpy(dtype=np.int64), gallery["pid"].to_numpy(dtype=np.int64)])
        test_map = plot_embedding_map(test_features, test_pids, plots_dir / f"tsne_test_{method}.png",
                                      max_points=max_points, seed=seed,
                                      title=f"{method}: query + gallery embeddings (run {run_id})")
        pictures.overview.append(test_map.path)
        if train is not None:
            train_picture = plot_embedding_map(
                features["train"].numpy(), train["pid"].to_numpy(dtype=np.int64),
                plots_dir / f"tsne_train_{method}.png", noisy=noisy, max_points=max_points, seed=seed,
                noisy_name="not confident in the final teacher round",
                title=f"{method}: train embeddings, colour = given pid (run {run_id})")
            pictures.overview.append(train_picture.path)
        log.info("pictures of %s (%s): %d ranked rows, maps in %s", run_id, method, len(ranked.rows), plots_dir)
    return pictures
