"""The ``fat-distill`` command: data preparation, manifest inspection and (later) pipeline runs.

Every command is a thin wrapper over a library function; errors from bad input are
printed as one plain message (file, row, what to do) with exit status 2. Set
``FAT_DISTILL_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from fat_distill.config_hash import config_hash
from fat_distill.disk import OutputError
from fat_distill.manifests import (
    ManifestError,
    diff_manifests,
    parent_ref,
    read_manifest,
    summarise_manifest,
    write_manifest,
)

app = typer.Typer(
    name="fat-distill",
    help="Noisy-label distillation for identity embeddings (FAT loss, teacher-student soft labels).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
data_app = typer.Typer(help="Build, synthesise and corrupt datasets; each command writes a [b]dataset[/b] manifest.",
                       no_args_is_help=True)
manifest_app = typer.Typer(help="Validate, summarise and compare Parquet manifests.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(manifest_app, name="manifest")

console = Console()
err_console = Console(stderr=True)

DEFAULT_MANIFEST_ROOT = Path("data_manifests")
# OutputError: a full disk or a read-only folder, named with its path.
USER_ERRORS = (ManifestError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError,
               OutputError)


def _fail(exc: BaseException) -> None:
    if os.environ.get("FAT_DISTILL_DEBUG"):
        raise exc
    err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _json_print(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


# --------------------------------------------------------------------------- data commands

def _default_manifest_path(name: str) -> Path:
    return DEFAULT_MANIFEST_ROOT / f"{name}.parquet"


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise typer.BadParameter(f"size must be HEIGHTxWIDTH, e.g. 128x64, got {text!r}") from None
    return h, w


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Argument(help="Folder to create (Market-1501 layout).")],
    identities: Annotated[int, typer.Option(help="Identities in all; half train, half test (disjoint).")] = 100,
    cameras: Annotated[int, typer.Option(help="Cameras (2-9), each with its own lighting, colour cast and background.")] = 6,
    images_per_identity: Annotated[int, typer.Option(help="Images per identity.")] = 8,
    size: Annotated[str, typer.Option(help="Image HEIGHTxWIDTH.")] = "128x64",
    seed: Annotated[int, typer.Option(help="Seed; the same seed writes the same bytes.")] = 0,
    distractors: Annotated[int, typer.Option(help="Distractor images (pid 0) in the gallery.")] = 20,
    junk: Annotated[int, typer.Option(help="Junk images (pid -1) in the gallery.")] = 10,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing synthetic dataset in OUT.")] = False,
) -> None:
    """Synthesise a ReID dataset: identities differ only in appearance, under camera-dependent nuisance."""
    from fat_distill.data.synth import generate_synthetic_reid

    try:
        height, width = _parse_size(size)
        with console.status(f"drawing {identities * images_per_identity:,} images into {out}"):
            summary = generate_synthetic_reid(out, identities=identities, cameras=cameras,
                                              images_per_identity=images_per_identity, size=(height, width),
                                              seed=seed, distractors=distractors, junk=junk, overwrite=overwrite)
    except USER_ERRORS as exc:
        _fail(exc)
    console.print(f"wrote {summary.total_images:,} images to {out} in {summary.seconds:.1f}s "
                  f"(train {summary.train_images:,} of {summary.train_identities} identities, query "
                  f"{summary.query_images:,}, gallery {summary.gallery_images:,} incl. {summary.distractor_images} "
                  f"distractors and {summary.junk_images} junk); ground truth in {out / 'identities.csv'}",
                  highlight=False)
    console.print(f"next: fat-distill data index {out} --layout market1501", highlight=False)


@data_app.command("index")
def data_index(
    root: Annotated[Path, typer.Argument(help="Dataset root folder.")],
    layout: Annotated[str, typer.Option(help="market1501 | dukemtmc | msmt17 | folders (ROOT/<identity>/<image>, "
                                             "or ROOT/train/<identity>/... with ROOT/test/... or ROOT/query/... + "
                                             "ROOT/gallery/...).")],
    out: Annotated[Optional[Path], typer.Option(help="Manifest to write (default: data_manifests/<root name>.parquet).")] = None,
    verify: Annotated[bool, typer.Option(help="Decode every image and report unreadable ones (reads every file).")] = False,
    skip_bad: Annotated[bool, typer.Option(help="Leave missing/unreadable images out (and list them) instead of failing.")] = False,
    strict: Annotated[bool, typer.Option(help="Fail if any image name does not fit the layout.")] = False,
    camera_regex: Annotated[Optional[str], typer.Option(help="folders: regex with one group giving the camera id from the file name.")] = None,
    split_identities: Annotated[Optional[float], typer.Option(help="folders without test folders: fraction of identities held out as query/gallery test identities.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the --split-identities draw and of the query/gallery split of test/ identities.")] = 0,
    allow_outside_root: Annotated[bool, typer.Option(
        "--allow-outside-root",
        help="Index images reached through symlinks that lead outside ROOT, and record that permission in the "
             "manifest so later stages read them too.")] = False,
) -> None:
    """Index a dataset on disk into a [b]dataset[/b] manifest (sample_id, path, pid, camid, split)."""
    from fat_distill.data.layouts import index_dataset

    started = time.perf_counter()
    out = out or _default_manifest_path(root.resolve().name)
    try:
        with console.status(f"indexing {root} ({layout}{', decoding every image' if verify else ''})"):
            result = index_dataset(root, layout, camera_regex=camera_regex, split_identities=split_identities,
                                   seed=seed, strict=strict, verify=verify, skip_bad=skip_bad,
                                   allow_outside_root=allow_outside_root)
        meta = write_manifest(
            result.frame, out, "dataset", stage="data.index",
            config_hash=config_hash({"layout": layout, "camera_regex": camera_regex,
                                     "split_identities": split_identities, "seed": seed, "skip_bad": skip_bad}),
            extra={"dataset_root": str(root.resolve()), "layout": layout,
                   "unparsed": len(result.unparsed), "bad_images": len(result.bad_images),
                   **({"folders_structure": result.structure} if result.structure else {}),
                   **({"allow_outside_root": True} if allow_outside_root else {})},
        )
    except USER_ERRORS as exc:
        _fail(exc)
    if result.structure:
        console.print(f"detected {result.describe_structure()}", highlight=False, soft_wrap=True)
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    for path, reason in result.bad_images:
        err_console.print(f"[yellow]skipped[/] {path}: {reason}", highlight=False, soft_wrap=True)
    counts = result.frame["split"].value_counts().to_dict()
    console.print(f"wrote {out} — {meta.rows:,} rows "
                  f"(train {counts.get('train', 0):,}, query {counts.get('query', 0):,}, "
                  f"gallery {counts.get('gallery', 0):,}) in {time.perf_counter() - started:.1f}s", highlight=False)


@data_app.command("corrupt")
def data_corrupt(
    manifest: Annotated[Path, typer.Argument(help="A clean dataset manifest.")],
    rate: Annotated[float, typer.Option(help="Fraction of train rows to corrupt, in [0, 1).")],
    kind: Annotated[str, typer.Option(help="flip | pair | outlier | multi | mix (equal parts flip, pair, outlier).")],
    out: Annotated[Path, typer.Option(help="Noisy manifest to write.")],
    seed: Annotated[int, typer.Option(help="Seed of the corruption.")] = 0,
    pairing: Annotated[Optional[str], typer.Option(help="pair noise: mean_image (nearest identity by mean image; "
                                                        "needs the images) or derangement (seeded fixed pairing). "
                                                        "Default: mean_image when the dataset root is readable.")] = None,
) -> None:
    """Inject label noise into the train split, keeping the truth in [b]true_pid[/b] and [b]noise_kind[/b]."""
    from fat_distill.data.noise import corrupt_labels, noise_summary

    started = time.perf_counter()
    try:
        if out.resolve() == manifest.resolve():
            raise ValueError(f"--out {out} is the input manifest: the clean labels would be overwritten by the "
                             "noisy ones; write the noisy manifest to another file")
        frame = read_manifest(manifest, "dataset")
        meta = frame.attrs["manifest"]
        root = meta.extra.get("dataset_root")
        image_root = Path(root) if root and Path(root).is_dir() else None
        if pairing == "mean_image" and image_root is None:
            raise ValueError(f"--pairing mean_image needs the images, but the dataset root {root!r} recorded in "
                             f"{manifest} is not a readable folder; use --pairing derangement")
        if image_root is None and kind in ("pair", "mix") and pairing is None:
            err_console.print(f"[yellow]note:[/] dataset root {root!r} not found: pair noise uses a seeded "
                              "fixed pairing (derangement) instead of mean-image look-alikes")
        with console.status(f"corrupting {manifest} ({kind}, rate {rate})"):
            noisy = corrupt_labels(frame, rate=rate, kind=kind, seed=seed, image_root=image_root, pairing=pairing,
                                   allow_outside_root=bool(meta.extra.get("allow_outside_root", False)))
        written = write_manifest(
            noisy, out, "dataset", stage="data.corrupt",
            config_hash=config_hash({"rate": rate, "kind": kind, "seed": seed, "pairing": pairing}),
            parents=[parent_ref(manifest, meta)],
            extra={**meta.extra, "noise": {"rate": rate, "kind": kind, "seed": seed,
                                           "pairing": pairing or ("mean_image" if image_root else "derangement")}},
        )
    except USER_ERRORS as exc:
        _fail(exc)
    summary = noise_summary(noisy)
    console.print(f"wrote {out} ({written.rows:,} rows) in {time.perf_counter() - started:.1f}s", highlight=False)
    t = Table()
    t.add_column("noise kind (train)")
    t.add_column("rows", justify="right")
    t.add_column("rate", justify="right")
    for row in summary.itertuples():
        t.add_row(row.noise_kind, f"{row.n_samples:,}", f"{row.rate:.1%}")
    console.print(t)


# --------------------------------------------------------------------------- manifest commands

@manifest_app.command("validate")
def manifest_validate(
    paths: Annotated[list[Path], typer.Argument(help="Manifest file(s) to check.")],
    schema: Annotated[Optional[str], typer.Option(help="Expected schema (dataset, teacher_round, soft_labels, "
                                                       "metrics); default: the one the file names. Needed for a "
                                                       "file written back by pandas, Polars or DuckDB.")] = None,
    root: Annotated[Optional[Path], typer.Option(
        help="dataset manifests: the folder their image paths are relative to (replaces the recorded dataset "
             "root). Paths are checked under it and every image file must exist.")] = None,
    allow_outside_root: Annotated[bool, typer.Option(
        "--allow-outside-root",
        help="dataset manifests: accept paths that are absolute, climb out with '..' or are symlinks leaving the "
             "dataset root.")] = False,
) -> None:
    """Check that manifests match their schema (columns, types, values, unique keys).

    For [b]dataset[/b] manifests with a dataset root (--root, else the recorded one when it exists here),
    every path must stay inside that root (no absolute paths, no '..' escapes, no symlinks leading out)
    and every image file must exist. Without a root, absolute paths and '..' are still refused, and the
    files are not checked (pass --root). Paths outside the root pass when the manifest was indexed with
    --allow-outside-root or you pass it here. An identity in both train and query/gallery is an
    error (evaluation needs identities unseen in training). Exit status 2 if any manifest is invalid.
    """
    failed = 0
    for path in paths:
        try:
            frame = read_manifest(path, schema)
            note = _check_dataset_paths(path, frame, allow_outside_root, root)
            if frame.attrs["manifest"].schema == "dataset":
                from fat_distill.pipeline.preflight import dataset_manifest_problems

                problems = dataset_manifest_problems(path, frame)
                if problems:
                    raise ValueError(f"{path}: " + "; ".join(problems))
        except USER_ERRORS as exc:
            failed += 1
            err_console.print(f"[bold red]invalid:[/] {exc}", highlight=False, soft_wrap=True)
            continue
        meta = frame.attrs["manifest"]
        console.print(f"[green]ok[/] {path}  ({meta.schema} v{meta.version}, {len(frame):,} rows{note})",
                      highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(code=2)


def _check_dataset_paths(path: Path, frame, allow_outside_root: bool, root: Path | None = None) -> str:
    """Check a dataset manifest's paths (and, with a root, its files); returns a note for the "ok" line."""
    from fat_distill.data.images import find_missing_files
    from fat_distill.data.paths import check_sample_paths

    meta = frame.attrs["manifest"]
    if meta.schema != "dataset":
        return "; --root ignored: not a dataset manifest" if root is not None else ""
    if root is not None and not root.is_dir():
        raise ValueError(f"--root {str(root)!r} is not a folder; pass the folder {path}'s image paths are "
                         "relative to")
    unknown = ""
    if root is None:
        recorded = meta.extra.get("dataset_root")
        if not recorded:
            unknown = "no dataset root is recorded"
        else:
            root = Path(recorded) if Path(recorded).is_absolute() else Path(path).parent / recorded
            if not root.is_dir():
                unknown, root = f"the recorded dataset root {str(root)!r} is not here", None
    recorded_permission = bool(meta.extra.get("allow_outside_root", False))
    permitted = allow_outside_root or recorded_permission
    paths = frame["path"].astype(str).tolist()
    check_sample_paths(paths, root, sample_ids=frame["sample_id"].astype(str).tolist(),
                       allow_outside_root=permitted, where=str(path))
    if permitted:
        note = "; paths outside the dataset root permitted" + (" (recorded in the manifest)"
                                                                if recorded_permission else "")
    else:
        note = "; all paths inside the dataset root" if root is not None else "; no absolute or '..' paths"
    if root is None:
        return f"{note}; image files not checked: {unknown} (pass --root DIR)"
    with console.status(f"looking for {len(paths):,} image files under {root}"):
        missing = find_missing_files(root, paths)
    if missing:
        row = missing[0]
        raise ValueError(f"{path}: {len(missing)} of {len(paths)} image file(s) are missing under the dataset root "
                         f"{str(root)!r}, first row {row} (sample_id {frame['sample_id'].iloc[row]!r}, path "
                         f"{paths[row]!r}). Restore them, pass the folder the images are in now as --root, or "
                         "remove those rows")
    return f"{note}; all {len(paths):,} image files present"


def _render_summary(summary: dict) -> None:
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    for key in ("schema", "version", "stage", "rows", "content_hash", "config_hash"):
        head.add_row(key, str(summary.get(key)))
    for key, value in (summary.get("extra") or {}).items():
        head.add_row(key, str(value))
    for parent in summary.get("parents") or []:
        head.add_row("parent", f"{parent.get('schema')} {parent.get('content_hash', '')[:19]} {parent.get('path', '')}")
    console.print(head)
    if "splits" in summary:
        t = Table(title="Splits")
        for col in ("split", "rows", "identities", "distractors", "images/identity min/median/max"):
            t.add_column(col, justify="right" if col != "split" else "left")
        for split, s in summary["splits"].items():
            ipi = s["images_per_identity"]
            t.add_row(split, f"{s['rows']:,}", f"{s['identities']:,}", f"{s['distractor_rows']:,}",
                      f"{ipi['min']} / {ipi['median']:g} / {ipi['max']}")
        console.print(t)
        console.print("rows per camera")
        cams = Table()
        for cam in summary["cameras"]:
            cams.add_column("unknown" if cam == "-1" else f"c{cam}", justify="right")
        cams.add_row(*(f"{n:,}" for n in summary["cameras"].values()))
        console.print(cams)
    if "noise" in summary:
        n = summary["noise"]
        console.print(f"label noise (train): {n['noisy_rows']:,} of {n['train_rows']:,} rows = {n['noise_rate']:.1%}")
        t = Table()
        t.add_column("kind")
        t.add_column("rows", justify="right")
        for kind, count in n["by_kind"].items():
            t.add_row(kind, f"{count:,}")
        console.print(t)
    if "kept" in summary:
        console.print(f"rounds {summary['rounds']}: kept [green]{summary['kept']:,}[/], dropped "
                      f"[red]{summary['dropped']:,}[/] ({summary['kept_fraction']:.1%} kept); "
                      f"prediction = given label for {summary['agree_with_given']:.1%}")
        _render_histogram("confidence in the given label", summary["confidence_histogram"])
    if "top1_prob_histogram" in summary:
        console.print(f"k = {summary['k']}; confident {summary['confident']:,}, not confident "
                      f"{summary['not_confident']:,}; top-1 = given label for {summary['top1_equals_given']:.1%}")
        _render_histogram("top-1 probability", summary["top1_prob_histogram"])
    if "metrics" in summary:
        t = Table(title="Metrics")
        for col in ("stage", "metric", "value", "step"):
            t.add_column(col)
        for row in summary["metrics"]:
            value = row.get("value")
            t.add_row(str(row.get("stage")), str(row.get("metric")),
                      "—" if value is None else f"{value:.4g}", str(row.get("step", "")))
        console.print(t)


def _render_histogram(title: str, hist: dict) -> None:
    counts, edges = hist["counts"], hist["edges"]
    peak = max(counts) or 1
    t = Table(title=title, show_header=True)
    t.add_column("bin")
    t.add_column("rows", justify="right")
    t.add_column("")
    for i, c in enumerate(counts):
        t.add_row(f"[{edges[i]:.1f}, {edges[i + 1]:.1f})", f"{c:,}", "█" * round(30 * c / peak))
    console.print(t)


@manifest_app.command("inspect")
def manifest_inspect(
    path: Annotated[Path, typer.Argument(help="Manifest file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    schema: Annotated[Optional[str], typer.Option(help="Expected schema; default: the one the file names.")] = None,
) -> None:
    """Summarise a manifest: provenance, rows, identities, splits, cameras, noise and confidence."""
    try:
        frame = read_manifest(path, schema)
    except USER_ERRORS as exc:
        _fail(exc)
    summary = summarise_manifest(frame, frame.attrs["manifest"])
    summary["path"] = str(path)
    if as_json:
        _json_print(summary)
    else:
        console.rule(str(path))
        _render_summary(summary)


@manifest_app.command("diff")
def manifest_diff(
    a: Annotated[Path, typer.Argument(help="First manifest (before).")],
    b: Annotated[Path, typer.Argument(help="Second manifest (after).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the difference as JSON.")] = False,
) -> None:
    """Compare two manifests by sample_id: rows added/removed, labels changed, confident flags flipped."""
    try:
        fa, fb = read_manifest(a), read_manifest(b)
        result = diff_manifests(fa, fa.attrs["manifest"], fb, fb.attrs["manifest"])
    except USER_ERRORS as exc:
        _fail(exc)
    if as_json:
        _json_print(result)
        return
    console.print(f"A: {a} ({result['a']['schema']}, {result['a']['rows']:,} rows)", highlight=False)
    console.print(f"B: {b} ({result['b']['schema']}, {result['b']['rows']:,} rows)", highlight=False)
    if result["identical"]:
        console.print("[green]identical content[/]")
    t = Table()
    t.add_column("change")
    t.add_column("rows", justify="right")
    t.add_column("examples")
    t.add_row("added", f"{result['added']['count']:,}", ", ".join(result["added"]["examples"]))
    t.add_row("removed", f"{result['removed']['count']:,}", ", ".join(result["removed"]["examples"]))
    t.add_row("label changed", f"{result['labels_changed']['count']:,}",
              ", ".join(f"{e['sample_id']} {e['a']}→{e['b']}" for e in result["labels_changed"]["examples"]))
    if "confident_flipped" in result:
        cf = result["confident_flipped"]
        t.add_row("became confident", f"{cf['to_confident']['count']:,}", ", ".join(cf["to_confident"]["examples"]))
        t.add_row("lost confidence", f"{cf['to_not_confident']['count']:,}",
                  ", ".join(cf["to_not_confident"]["examples"]))
    console.print(t)


from fat_distill.cli_pipeline import register as _register_pipeline_commands  # noqa: E402

_register_pipeline_commands(app)
from fat_distill.cli_model import register as _register_model_commands  # noqa: E402

_register_model_commands(app)

from fat_distill.cli_labels import register as _register_label_commands  # noqa: E402

_register_label_commands(app)


if __name__ == "__main__":  # pragma: no cover
    app()
