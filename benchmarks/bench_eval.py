"""Blocked retrieval evaluation vs torchreid's ``evaluate_rank`` at Market-1501 size.

Same numbers and the time ratio on 3,368 queries × 15,913 gallery images
(Market-1501's query and gallery sizes) of synthetic features: random pids over
750 identities plus distractors (pid 0), 6 cameras, each feature the identity's
random centre times ``--signal`` plus unit Gaussian noise (``--signal 0`` is
pure noise: near-chance scores, the worst case for our method since the last
match of every query is deep in the ranking).

torchreid takes a full distance matrix, so it gets the same float32 cosine
distances we compute (timed separately). Its reference implementations:

* Python: ``eval_market1501`` from the installed ``torchreid`` package's
  ``metrics/rank.py`` if it can be found, else the port below (the same code);
* Cython: ``evaluate_cy`` from a built ``rank_cy`` module: importable from an
  official torchreid install, or found in ``--rank-cy-dir`` (build it from
  deep-person-reid's ``torchreid/metrics/rank_cylib/rank_cy.pyx``; see
  benchmarks/README.md). Skipped, and said so, when neither exists.

Run:  .venv/bin/python benchmarks/bench_eval.py [--rank-cy-dir DIR] [--threads 1] [--markdown]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fat_distill.evaluate import compute_distance_matrix, evaluate_distance_matrix, evaluate_retrieval

REPORTED_RANKS = (1, 5, 10, 50)


def eval_market1501_port(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    """torchreid ``metrics/rank.py::eval_market1501``, verbatim but for formatting (used when torchreid is absent)."""
    num_q, num_g = distmat.shape
    if num_g < max_rank:
        max_rank = num_g
    indices = np.argsort(distmat, axis=1)
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
    all_cmc = []
    all_AP = []
    num_valid_q = 0.0
    for q_idx in range(num_q):
        q_pid = q_pids[q_idx]
        q_camid = q_camids[q_idx]
        order = indices[q_idx]
        remove = (g_pids[order] == q_pid) & (g_camids[order] == q_camid)
        keep = np.invert(remove)
        raw_cmc = matches[q_idx][keep]
        if not np.any(raw_cmc):
            continue
        cmc = raw_cmc.cumsum()
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        num_valid_q += 1.0
        num_rel = raw_cmc.sum()
        tmp_cmc = raw_cmc.cumsum()
        tmp_cmc = [x / (i + 1.0) for i, x in enumerate(tmp_cmc)]
        tmp_cmc = np.asarray(tmp_cmc) * raw_cmc
        AP = tmp_cmc.sum() / num_rel
        all_AP.append(AP)
    assert num_valid_q > 0, "Error: all query identities do not appear in gallery"
    all_cmc = np.asarray(all_cmc).astype(np.float32)
    all_cmc = all_cmc.sum(0) / num_valid_q
    mAP = np.mean(all_AP)
    return all_cmc, mAP


def find_torchreid_python() -> tuple[Callable, str]:
    """torchreid's Python ``eval_market1501`` loaded from its file (the package's ``__init__`` needs OpenCV etc.)."""
    spec = importlib.util.find_spec("torchreid")
    if spec is not None and spec.origin is not None:
        package = Path(spec.origin).parent
        for relative in ("metrics/rank.py", "reid/metrics/rank.py"):
            path = package / relative
            if path.is_file():
                module_spec = importlib.util.spec_from_file_location("_torchreid_rank", path)
                module = importlib.util.module_from_spec(module_spec)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "Cython evaluation … is unavailable"
                    module_spec.loader.exec_module(module)
                from importlib.metadata import version

                return module.eval_market1501, f"torchreid {version('torchreid')} {relative}"
    return eval_market1501_port, "port of torchreid metrics/rank.py (torchreid not installed)"


def find_torchreid_cython(rank_cy_dir: str | None) -> tuple[Callable | None, str]:
    """torchreid's Cython ``evaluate_cy``, or ``None`` and why not."""
    for name in ("torchreid.metrics.rank_cylib.rank_cy", "torchreid.reid.metrics.rank_cylib.rank_cy"):
        try:
            return importlib.import_module(name).evaluate_cy, name
        except Exception:  # noqa: BLE001 - torchreid's package import can fail in many ways (missing cv2 …)
            continue
    if rank_cy_dir is not None:
        sys.path.insert(0, str(Path(rank_cy_dir).resolve()))
        try:
            return importlib.import_module("rank_cy").evaluate_cy, f"rank_cy built in {rank_cy_dir}"
        except ImportError as error:
            return None, f"no importable rank_cy in {rank_cy_dir} ({error})"
    return None, "no built rank_cy (the PyPI torchreid sdist ships no rank_cy.pyx); pass --rank-cy-dir"


def interleaved_best_times(functions: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, object]]:
    """Best-of-``repeats`` wall time of each function, run in turns so background load hits all alike."""
    best: dict[str, tuple[float, object]] = {}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            result = function()
            seconds = time.perf_counter() - start
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, result)
    return best


def make_problem(args: argparse.Namespace):
    rng = np.random.default_rng(args.seed)
    centres = rng.normal(size=(args.identities + 1, args.dim)).astype(np.float32)
    query_pids = rng.integers(1, args.identities + 1, args.num_query)
    gallery_pids = rng.integers(1, args.identities + 1, args.num_gallery)
    gallery_pids[rng.random(args.num_gallery) < args.distractor_fraction] = 0
    query_camids = rng.integers(1, args.cameras + 1, args.num_query)
    gallery_camids = rng.integers(1, args.cameras + 1, args.num_gallery)
    noise = rng.normal(size=(args.num_query + args.num_gallery, args.dim)).astype(np.float32)
    query = torch.from_numpy(args.signal * centres[query_pids] + noise[: args.num_query])
    gallery = torch.from_numpy(args.signal * centres[gallery_pids] + noise[args.num_query :])
    return query, gallery, query_pids, gallery_pids, query_camids, gallery_camids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-query", type=int, default=3368)
    parser.add_argument("--num-gallery", type=int, default=15913)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--identities", type=int, default=750)
    parser.add_argument("--cameras", type=int, default=6)
    parser.add_argument("--distractor-fraction", type=float, default=0.18, help="Market-1501: 2,798 of 15,913")
    parser.add_argument("--signal", type=float, default=0.4, help="centre scale; 0 = pure noise features")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=5, help="best-of-N for every timing but torchreid Python")
    parser.add_argument("--rank-cy-dir", default=None, help="folder holding a built rank_cy extension")
    parser.add_argument("--skip-python", action="store_true", help="skip torchreid's slow Python path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", action="store_true", help="print the Markdown table only")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    query, gallery, q_pids, g_pids, q_camids, g_camids = make_problem(args)
    labels = (q_pids, g_pids, q_camids, g_camids)
    distmat_tensor = compute_distance_matrix(query, gallery)  # also warms up the GEMM kernels
    distmat = distmat_tensor.numpy()
    cython, cython_source = find_torchreid_cython(args.rank_cy_dir)
    python, python_source = find_torchreid_python()

    functions: dict[str, Callable[[], object]] = {
        "distances": lambda: compute_distance_matrix(query, gallery),
        "ours": lambda: evaluate_retrieval(query, gallery, *labels, block_size=args.block_size, max_rank=50),
        "ours_matrix": lambda: evaluate_distance_matrix(
            distmat_tensor, *labels, block_size=args.block_size, max_rank=50
        ),
    }
    if cython is not None:
        functions["cython"] = lambda: cython(distmat, *labels, 50, False)
    timings = interleaved_best_times(functions, args.repeats)
    distance_seconds = timings["distances"][0]
    ours_full, ours = timings["ours"]
    ours_matrix_seconds = timings["ours_matrix"][0]

    rows: list[tuple[str, float | None, float, np.ndarray, float]] = []  # name, with distances, without, cmc, mAP
    rows.append(("fat_distill evaluate_retrieval (blocked)", ours_full, ours_matrix_seconds, ours.cmc, ours.mAP))
    if cython is not None:
        seconds, (cmc, mAP) = timings["cython"]
        rows.append((f"torchreid evaluate_rank, Cython ({cython_source})", None, seconds, cmc, float(mAP)))
    if not args.skip_python:
        start = time.perf_counter()
        cmc, mAP = python(distmat, *labels, 50)
        seconds = time.perf_counter() - start
        rows.append((f"torchreid evaluate_rank, Python ({python_source})", None, seconds, cmc, float(mAP)))

    threads = torch.get_num_threads()
    header = (
        f"{args.num_query} × {args.num_gallery}, D={args.dim}, signal {args.signal}, block {args.block_size}, "
        f"torch threads {threads}; distance matrix (cosine, float32, torch): {distance_seconds:.2f} s"
    )
    if not args.markdown:
        print(header)
        print(f"Cython: {cython_source}")
    print(
        "| implementation | time incl. distances (s) | time from distmat (s) | ratio to ours (from distmat) "
        "| R1 | R5 | R10 | R50 | mAP | max abs diff to ours (CMC, mAP) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, with_distances, seconds, cmc, mAP in rows:
        total = with_distances if with_distances is not None else seconds + distance_seconds
        cmc = np.asarray(cmc, dtype=np.float64)
        difference = max(float(np.abs(cmc[:50] - ours.cmc[:50]).max()), abs(mAP - ours.mAP))
        ranks = " | ".join(f"{100 * cmc[k - 1]:.2f}" for k in REPORTED_RANKS)
        print(
            f"| {name} | {total:.2f} | {seconds:.2f} | {seconds / ours_matrix_seconds:.1f}× | {ranks} "
            f"| {100 * mAP:.3f} | {difference:.1e} |"
        )
    if args.markdown:
        print(f"\n{header}. mINP (ours only): {100 * ours.mINP:.2f}; valid queries {ours.num_valid_queries}.")


if __name__ == "__main__":
    main()
