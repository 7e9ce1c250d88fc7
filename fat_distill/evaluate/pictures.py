"""Pictures of what a model retrieves: ranked-list rows (torchreid style) and t-SNE maps of embeddings.

Ranked lists follow torchreid's ``visualize_ranked_results``: a row holds the
query and its top-k gallery images, each gallery tile framed green for a true
match and red for a false one. The Market-1501 protocol of
:mod:`fat_distill.evaluate.retrieval` decides what is shown: gallery images of
the query's identity *and* camera are skipped (camid −1 = unknown camera, never
the same), junk (pid −1) is skipped, distractors (pid 0) are false matches.

Rows are composed with PIL (exact pixel colours, so a border can be checked by
reading the PNG back); the t-SNE map is drawn on matplotlib's Agg canvas as in
:mod:`fat_distill.evaluate.plots`. Every PNG is written atomically.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import to_rgba_array
from matplotlib.lines import Line2D
from PIL import Image, ImageDraw, ImageFont

from fat_distill.atomic import atomic_write
from fat_distill.evaluate.plots import _new_figure, _save_png
from fat_distill.evaluate.retrieval import DISTRACTOR_PID, JUNK_PID, UNKNOWN_CAMERA

MATCH_COLOUR = (0, 200, 0)
MISMATCH_COLOUR = (220, 0, 0)
QUERY_COLOUR = (30, 90, 230)
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)
NO_IDENTITY_COLOUR = "0.6"  # grey for distractors and junk on the t-SNE map

_MARGIN = 4       # around a row
_GAP = 6          # between gallery tiles
_QUERY_GAP = 20   # after the query tile, so it stands apart as in torchreid
_FRAME_COLUMNS = ("sample_id", "path", "pid", "camid")
MIN_MAP_POINTS = 3


@dataclass(frozen=True)
class RankedLists:
    """The top-k gallery rows of some queries, after the protocol's exclusions.

    Attributes:
        gallery_indices: shape (Q, k), int64; row positions in the gallery, best
            first, −1 where fewer than k gallery images remain.
        matches: shape (Q, k), bool; the gallery image has the query's pid
            (False for padding).
    """

    gallery_indices: np.ndarray
    matches: np.ndarray


@dataclass(frozen=True)
class RankedPictures:
    """What :func:`plot_ranked_results` wrote.

    Attributes:
        rows: one PNG per query, in ``query_indices`` order.
        grid: all rows stacked, top to bottom in the same order (None if not asked for).
        query_indices: shape (Q,), the query rows drawn.
        ranked: the ranked lists the rows show.
    """

    rows: list[Path]
    grid: Path | None
    query_indices: np.ndarray
    ranked: RankedLists

    @property
    def paths(self) -> list[Path]:
        return [*self.rows, *([self.grid] if self.grid is not None else [])]


@dataclass(frozen=True)
class EmbeddingMap:
    """What :func:`plot_embedding_map` drew.

    Attributes:
        path: the PNG.
        indices: shape (n,), the input rows drawn (all of them unless subsampled), ascending.
        coordinates: shape (n, 2), their t-SNE positions.
        perplexity: the perplexity used (clamped below the number of points).
        num_crosses: points drawn as crosses (noisy), 0 without ``noisy``.
    """

    path: Path
    indices: np.ndarray
    coordinates: np.ndarray
    perplexity: float
    num_crosses: int


def _as_array(values, name: str) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, without importing torch here
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.dtype == object:
        raise ValueError(f"{name} must be numeric, got dtype object")
    return array


def _int_labels(values, name: str, length: int) -> np.ndarray:
    array = _as_array(values, name)
    if array.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def rank_gallery(
    distmat,
    query_pids,
    query_camids,
    gallery_pids,
    gallery_camids,
    *,
    topk: int = 10,
) -> RankedLists:
    """Each query's top-k gallery images under the Market-1501 protocol.

    Gallery images with the query's pid and camera are skipped (camid −1 never
    counts as the same camera), junk (pid −1) is skipped, distractors (pid 0)
    stay as non-matches. Ties in distance put the non-match first, the
    pessimistic order :func:`fat_distill.evaluate.evaluate_distance_matrix` scores.

    Args:
        distmat: shape (Q, G), smaller = more similar (array or tensor).
        query_pids, query_camids: shape (Q,), int.
        gallery_pids, gallery_camids: shape (G,), int.
        topk: gallery images per query, >= 1.

    Returns:
        :class:`RankedLists` with arrays of shape (Q, topk).
    """
    if topk < 1:
        raise ValueError(f"topk must be >= 1 gallery image per query, got {topk}")
    distances = _as_array(distmat, "distmat")
    if distances.ndim != 2:
        raise ValueError(f"distmat must be a (num_queries, num_gallery) matrix, got shape {distances.shape}")
    num_queries, num_gallery = distances.shape
    q_pids = _int_labels(query_pids, "query_pids", num_queries)
    q_cams = _int_labels(query_camids, "query_camids", num_queries)
    g_pids = _int_labels(gallery_pids, "gallery_pids", num_gallery)
    g_cams = _int_labels(gallery_camids, "gallery_camids", num_gallery)
    indices = np.full((num_queries, topk), -1, dtype=np.int64)
    matches = np.zeros((num_queries, topk), dtype=bool)
    for row in range(num_queries):
        same_pid = g_pids == q_pids[row]
        same_camera = (g_cams == q_cams[row]) & (q_cams[row] != UNKNOWN_CAMERA)
        kept = np.flatnonzero(~(same_pid & same_camera) & (g_pids != JUNK_PID))
        # lexsort: last key is primary; a non-match (False) sorts before a match at equal distance.
        order = kept[np.lexsort((same_pid[kept], distances[row, kept]))][:topk]
        indices[row, : len(order)] = order
        matches[row, : len(order)] = same_pid[order]
    return RankedLists(gallery_indices=indices, matches=matches)


def _check_frame(frame: pd.DataFrame, name: str, length: int) -> None:
    missing = [c for c in _FRAME_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{name} lacks column(s) {missing}; pass rows of a dataset manifest")
    if len(frame) != length:
        raise ValueError(f"{name} has {len(frame)} rows but distmat has {length} along that axis; "
                         "pass the frames the distance matrix was computed from, in the same order")


def _font(tile_width: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(8, min(12, tile_width // 6)))


class _TileMaker:
    """Decodes and frames images (each decoded once), and labels them."""

    def __init__(self, root: Path, tile_size: tuple[int, int]):
        from fat_distill.data import decode_image_file

        self._decode = decode_image_file
        self.root = root
        self.height, self.width = tile_size
        self.border = max(2, round(min(tile_size) / 16))
        self.font = _font(self.width)
        self.label_height = int(self.font.getbbox("Ag#0")[3]) + 4
        self._cache: dict[str, Image.Image] = {}

    def picture(self, sample_id: str, path: str) -> Image.Image:
        if sample_id not in self._cache:
            image = self._decode(self.root / path, sample_id=sample_id)
            rgb = Image.fromarray(image.permute(1, 2, 0).numpy())
            inner = (self.width - 2 * self.border, self.height - 2 * self.border)
            self._cache[sample_id] = rgb.resize(inner, Image.Resampling.BILINEAR)
        return self._cache[sample_id]

    def paste(self, canvas: Image.Image, draw: ImageDraw.ImageDraw, left: int, top: int, sample_id: str,
              path: str, colour: tuple[int, int, int], label: str) -> None:
        draw.rectangle([left, top, left + self.width - 1, top + self.height - 1], fill=colour)
        canvas.paste(self.picture(sample_id, path), (left + self.border, top + self.border))
        draw.text((left + 1, top + self.height + 2), label, fill=TEXT_COLOUR, font=self.font)


def _safe_name(sample_id: str) -> str:
    stem = str(sample_id).rsplit(".", 1)[0] if "." in Path(str(sample_id)).name else str(sample_id)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("_") or "query"


def _save_image(image: Image.Image, path: Path) -> Path:
    return atomic_write(path, lambda handle: image.save(handle, format="PNG"), fsync=False)


def plot_ranked_results(
    distmat,
    query_frame: pd.DataFrame,
    gallery_frame: pd.DataFrame,
    root: str | Path,
    out_dir: str | Path,
    grid_path: str | Path | None = None,
    *,
    query_indices: Sequence[int] | np.ndarray | None = None,
    topk: int = 10,
    tile_size: tuple[int, int] = (128, 64),
) -> RankedPictures:
    """One PNG per query: the query tile (blue frame), then its top-k gallery tiles framed green
    (same pid) or red (another pid or a distractor), each labelled with its rank and pid.

    Which gallery images are shown is :func:`rank_gallery`'s choice. A query with
    fewer than ``topk`` gallery images left gets blank slots. ``grid_path`` (if
    given) gets every row stacked, in ``query_indices`` order.

    Args:
        distmat: shape (Q, G), smaller = more similar; row i is ``query_frame.iloc[i]``,
            column j is ``gallery_frame.iloc[j]``.
        query_frame: Q rows with sample_id, path, pid, camid (a dataset manifest's query rows).
        gallery_frame: G rows with the same columns.
        root: the dataset root the ``path`` column is relative to.
        out_dir: folder of the per-query PNGs, named ``q<position>_<sample_id>.png``.
        grid_path: the stacked PNG, or None for none.
        query_indices: rows of ``distmat`` / ``query_frame`` to draw (default: all), in row order.
        topk: gallery images per row, >= 1.
        tile_size: (height, width) of a tile in pixels, frame included.

    Returns:
        :class:`RankedPictures`.

    Raises:
        ValueError: bad shapes, columns, topk, tile size or query indices.
        fat_distill.data.ImageDecodeError: an image cannot be read (names the file and sample_id).
    """
    distances = _as_array(distmat, "distmat")
    if distances.ndim != 2:
        raise ValueError(f"distmat must be a (num_queries, num_gallery) matrix, got shape {distances.shape}")
    if topk < 1:
        raise ValueError(f"topk must be >= 1 gallery image per query, got {topk}")
    if len(tile_size) != 2 or min(tile_size) < 16:
        raise ValueError(f"tile_size must be (height, width) with both >= 16 pixels, got {tuple(tile_size)}")
    _check_frame(query_frame, "query_frame", distances.shape[0])
    _check_frame(gallery_frame, "gallery_frame", distances.shape[1])
    if query_indices is None:
        chosen = np.arange(distances.shape[0])
    else:
        chosen = np.asarray(query_indices, dtype=np.int64).reshape(-1)
        bad = chosen[(chosen < 0) | (chosen >= distances.shape[0])]
        if len(bad):
            raise ValueError(f"query_indices {bad.tolist()} are outside the {distances.shape[0]} query rows")
    if len(chosen) == 0:
        raise ValueError("no query to draw: query_indices is empty (or the query frame has no rows)")

    queries = query_frame.iloc[chosen].reset_index(drop=True)
    ranked = rank_gallery(distances[chosen], queries["pid"], queries["camid"], gallery_frame["pid"],
                          gallery_frame["camid"], topk=topk)
    tiles = _TileMaker(Path(root), (int(tile_size[0]), int(tile_size[1])))
    row_width = 2 * _MARGIN + (topk + 1) * tiles.width + _QUERY_GAP + (topk - 1) * _GAP
    row_height = 2 * _MARGIN + tiles.height + tiles.label_height
    out_dir = Path(out_dir)
    rows: list[Path] = []
    row_images: list[Image.Image] = []
    for position, query in enumerate(queries.itertuples(index=False)):
        canvas = Image.new("RGB", (row_width, row_height), BACKGROUND)
        draw = ImageDraw.Draw(canvas)
        tiles.paste(canvas, draw, _MARGIN, _MARGIN, query.sample_id, query.path, QUERY_COLOUR,
                    f"query pid {query.pid}")
        left = _MARGIN + tiles.width + _QUERY_GAP
        for rank, (g_index, matched) in enumerate(zip(ranked.gallery_indices[position], ranked.matches[position]),
                                                  start=1):
            if g_index >= 0:
                g = gallery_frame.iloc[int(g_index)]
                pid = int(g["pid"])
                label = f"#{rank} pid {pid}" if pid != DISTRACTOR_PID else f"#{rank} distractor"
                tiles.paste(canvas, draw, left, _MARGIN, str(g["sample_id"]), str(g["path"]),
                            MATCH_COLOUR if matched else MISMATCH_COLOUR, label)
            left += tiles.width + _GAP
        rows.append(_save_image(canvas, out_dir / f"q{position:03d}_{_safe_name(query.sample_id)}.png"))
        row_images.append(canvas)
    grid = None
    if grid_path is not None:
        stacked = Image.new("RGB", (row_width, row_height * len(row_images)), BACKGROUND)
        for position, image in enumerate(row_images):
            stacked.paste(image, (0, position * row_height))
        grid = _save_image(stacked, Path(grid_path))
    return RankedPictures(rows=rows, grid=grid, query_indices=chosen, ranked=ranked)


def choose_queries(
    query_frame: pd.DataFrame,
    num_queries: int = 8,
    *,
    query_ids: Sequence[str] | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Rows of ``query_frame`` to draw: the given sample_ids, or ``num_queries`` rows drawn at random (seeded).

    Args:
        query_frame: the query rows (column ``sample_id``).
        num_queries: how many to draw when ``query_ids`` is None (all if fewer exist), >= 1.
        query_ids: sample_ids to draw, in this order.
        seed: seeds the random draw, so every model of a run shows the same queries.

    Returns:
        shape (n,), int64 row positions (ascending for a random draw).
    """
    if query_ids is not None:
        ids = list(query_ids)
        if not ids:
            raise ValueError("query_ids is empty; pass sample_ids of query rows or leave it out")
        position = pd.Series(np.arange(len(query_frame)), index=query_frame["sample_id"].astype(str))
        unknown = [q for q in ids if q not in position.index]
        if unknown:
            raise ValueError(f"{len(unknown)} query id(s) are not query rows of the dataset, e.g. {unknown[:3]}; "
                             "query ids are sample_ids of rows with split 'query'")
        return position.loc[ids].to_numpy(dtype=np.int64)
    if num_queries < 1:
        raise ValueError(f"num_queries must be >= 1, got {num_queries}")
    if len(query_frame) == 0:
        raise ValueError("the dataset has no query rows to draw")
    rng = np.random.default_rng(seed)
    count = min(num_queries, len(query_frame))
    return np.sort(rng.choice(len(query_frame), size=count, replace=False)).astype(np.int64)


def _identity_colours(labels: np.ndarray) -> np.ndarray:
    """(N, 4) RGBA: a categorical colour per identity (tab20, cycling); pid <= 0 (distractor, junk) in grey."""
    palette = colormaps["tab20"]
    # tab20 pairs a dark and a light shade of each hue: the ten dark ones first, so neighbours differ in hue.
    order = [*range(0, palette.N, 2), *range(1, palette.N, 2)]
    identities, inverse = np.unique(labels, return_inverse=True)
    slot = {int(pid): i for i, pid in enumerate(identities[identities > DISTRACTOR_PID])}
    colours = [palette(order[slot[int(pid)] % palette.N]) if pid > DISTRACTOR_PID else NO_IDENTITY_COLOUR
               for pid in identities]
    return to_rgba_array(colours)[inverse]


def plot_embedding_map(
    features,
    labels,
    path: str | Path,
    *,
    noisy=None,
    max_points: int = 2000,
    perplexity: float = 30.0,
    seed: int = 0,
    title: str = "t-SNE of the embeddings",
    noisy_name: str = "flagged noisy",
) -> EmbeddingMap:
    """A Barnes-Hut t-SNE map of embeddings, one colour per identity; noisy samples as crosses.

    Rows are L2-normalised first (the cosine geometry retrieval ranks by), at most
    ``max_points`` rows are drawn (a seeded random subset), and the perplexity is
    clamped to ``(n − 1) / 3`` for small n (t-SNE needs it below the number of
    points; Barnes-Hut looks at 3·perplexity neighbours). Colours cycle through a
    20-colour palette (no legend: there are usually hundreds of identities);
    pid <= 0 (distractors, junk) is grey.

    Args:
        features: shape (N, D), D >= 2, finite (array or tensor).
        labels: shape (N,), int identity of each row.
        path: the PNG to write.
        noisy: shape (N,), bool, or None; True rows are drawn as crosses, the rest as dots.
        max_points: draw at most this many rows, >= 3.
        perplexity: t-SNE perplexity before clamping, > 0.
        seed: seeds the subset and t-SNE.
        title: the figure's title.
        noisy_name: what the crosses are, for the legend (e.g. "teacher: not confident").

    Returns:
        :class:`EmbeddingMap`.
    """
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    x = _as_array(features, "features").astype(np.float64, copy=False)
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(f"features must have shape (N, D) with D >= 2, got {x.shape}")
    n_rows = len(x)
    y = _int_labels(labels, "labels", n_rows)
    flags = None
    if noisy is not None:
        flags = _as_array(noisy, "noisy")
        if flags.shape != (n_rows,) or flags.dtype != bool:
            raise ValueError(f"noisy must be a bool array of shape ({n_rows},), got {flags.dtype} {flags.shape}")
    if max_points < MIN_MAP_POINTS:
        raise ValueError(f"max_points must be >= {MIN_MAP_POINTS}, got {max_points}")
    if perplexity <= 0:
        raise ValueError(f"perplexity must be > 0, got {perplexity}")
    if n_rows < MIN_MAP_POINTS:
        raise ValueError(f"a t-SNE map needs at least {MIN_MAP_POINTS} points, got {n_rows}")
    if not np.isfinite(x).all():
        raise ValueError("features hold NaN or infinite values; was the model trained to divergence?")

    indices = np.arange(n_rows)
    if n_rows > max_points:
        indices = np.sort(np.random.default_rng(seed).choice(n_rows, size=max_points, replace=False))
    x, y = x[indices], y[indices]
    flags = flags[indices] if flags is not None else None
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    used = float(min(perplexity, (len(x) - 1) / 3))
    tsne = TSNE(n_components=2, method="barnes_hut", init="pca", perplexity=used, random_state=seed,
                learning_rate="auto")
    # One OpenMP thread: the Barnes-Hut gradient's spinning workers slow down several-fold (measured 6 s → 34 s
    # for 2000 points on 2 cores) as soon as another process competes for the cores; alone, 2 threads save ~10%.
    with threadpool_limits(limits=1, user_api="openmp"):
        coordinates = tsne.fit_transform(x)

    figure = _new_figure(7.0, 7.0)
    axes = figure.add_subplot()
    colours = _identity_colours(y)
    size = float(np.clip(6000 / len(x), 6, 40))
    crosses = flags if flags is not None else np.zeros(len(x), dtype=bool)
    if (~crosses).any():
        axes.scatter(coordinates[~crosses, 0], coordinates[~crosses, 1], c=colours[~crosses], s=size,
                     marker="o", linewidths=0, alpha=0.85)
    if crosses.any():
        axes.scatter(coordinates[crosses, 0], coordinates[crosses, 1], c=colours[crosses], s=size * 2.5,
                     marker="x", linewidths=1.2)
    identities = len(np.unique(y[y > DISTRACTOR_PID]))
    handles = []
    if flags is not None:
        handles += [Line2D([], [], marker="o", linestyle="", color="black", label=f"kept ({int((~crosses).sum())})"),
                    Line2D([], [], marker="x", linestyle="", color="black",
                           label=f"{noisy_name} ({int(crosses.sum())})")]
    if (y <= DISTRACTOR_PID).any():
        handles.append(Line2D([], [], marker="o", linestyle="", color=NO_IDENTITY_COLOUR,
                              label=f"no identity: distractor/junk ({int((y <= DISTRACTOR_PID).sum())})"))
    if handles:
        axes.legend(handles=handles, loc="best", fontsize="small")
    subset = f", random {len(x)} of {n_rows}" if len(x) < n_rows else ""
    axes.set_title(f"{title}\n{len(x)} points{subset}, {identities} identities (colour), perplexity {used:.3g}",
                   fontsize="medium")
    axes.set_xticks([])
    axes.set_yticks([])
    return EmbeddingMap(path=_save_png(figure, path), indices=indices, coordinates=coordinates, perplexity=used,
                        num_crosses=int(crosses.sum()))
