"""Model commands of the ``fat-distill`` CLI: export a trained student, embed images with it.

Both read a run folder and a checkpoint's model card only: no Prefect, no ``flows``.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)

RunArgument = Annotated[str, typer.Argument(
    help="Run id (or a unique prefix) under --runs-root, a run folder, or a final.pt file.")]
MethodOption = Annotated[str, typer.Option(
    help="Which model of the run: distilled (the student) or a baseline (ce, ce_triplet, …).")]
RunsRootOption = Annotated[Path, typer.Option(help="Folder holding the run folders.")]
DeviceOption = Annotated[str, typer.Option(help="cpu, cuda:N or auto.")]


class ExportFormat(str, Enum):
    torchscript = "torchscript"
    onnx = "onnx"


def _user_errors() -> tuple[type[BaseException], ...]:
    from fat_distill.data import ImageDecodeError
    from fat_distill.train import CheckpointError

    # OSError covers FileNotFoundError, PermissionError, NotADirectoryError and IsADirectoryError;
    # ValueError covers ManifestError and unsafe sample paths; CheckpointError a missing model card.
    return (OSError, ValueError, CheckpointError, ImageDecodeError, ImportError)


def _fail(exc: BaseException) -> None:
    if os.environ.get("FAT_DISTILL_DEBUG"):
        raise exc
    err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export(
        run_id: RunArgument,
        format: Annotated[ExportFormat, typer.Option("--format", help="torchscript or onnx (needs the onnx extra).")],
        out: Annotated[Path, typer.Option(help="File to write (replaced atomically).")],
        method: MethodOption = "distilled",
        runs_root: RunsRootOption = Path("runs"),
        device: DeviceOption = "cpu",
    ) -> None:
        """Export a trained student or baseline as one file with its model card inside.

        The exported model takes a float32 batch (B, 3, H, W) of RGB images with values in [0, 1], already
        resized to the model's image size (in the card), normalises it, averages each image with its mirror
        image when the model was evaluated that way, and returns (B, D) embeddings of unit length.
        TorchScript keeps the card in the extra file model_card.json, ONNX in the metadata key
        fat_distill.model_card.
        """
        try:
            from fat_distill.export import export_model
            from fat_distill.inference import check_writable, load_student

            check_writable(out)
            model = load_student(run_id, method, runs_root, device)
            export_model(model, out, format.value)
        except _user_errors() as exc:
            _fail(exc)
        card = model.model_card
        console.print(f"wrote {out} ({format.value}; {card.method} {card.model} from {model.checkpoint}): input "
                      f"(B, 3, {card.image_size[0]}, {card.image_size[1]}) float RGB in [0, 1], output "
                      f"(B, {card.embedding_dim}) unit-length embeddings"
                      + (", flip-averaged" if card.flip_test else ""), highlight=False, soft_wrap=True)

    @app.command("embed")
    def embed(
        run_id: RunArgument,
        out: Annotated[Path, typer.Option(help="Parquet file to write: sample_id, path, embedding (list<float32>).")],
        folder: Annotated[Optional[Path], typer.Option(
            help="Embed every image under this folder (recursively: jpg, jpeg, png, bmp, webp).")] = None,
        manifest: Annotated[Optional[Path], typer.Option(
            help="Embed every row of this dataset manifest (its paths are relative to its dataset root).")] = None,
        root: Annotated[Optional[Path], typer.Option(
            help="--manifest: the folder its paths are relative to (needed for a manifest written back by "
                 "pandas, Polars or DuckDB, which records no dataset root).")] = None,
        method: MethodOption = "distilled",
        batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 64,
        device: DeviceOption = "cpu",
        num_workers: Annotated[int, typer.Option(min=0, help="Processes decoding images.")] = 0,
        runs_root: RunsRootOption = Path("runs"),
    ) -> None:
        """Embed images with a trained student or baseline, as the pipeline's evaluation does.

        One row per image: sample_id (the path relative to --folder, or the manifest's sample_id), path (the
        file read) and embedding (L2-normalised, list<float32>). The model card is stored as JSON in the
        Parquet schema metadata (key fat_distill.model_card).
        """
        try:
            from fat_distill.inference import check_writable, embed_images, find_images, load_student, \
                write_embeddings

            if (folder is None) == (manifest is None):
                raise ValueError("give exactly one of --folder DIR or --manifest FILE")
            if root is not None and manifest is None:
                raise ValueError("--root goes with --manifest (a --folder is its own root)")
            if folder is not None:
                files = find_images(folder)
                sample_ids = [f.relative_to(folder).as_posix() for f in files]
                source = {"folder": str(folder)}
            else:
                from fat_distill.distill import load_dataset

                dataset = load_dataset(manifest, root=root)
                if dataset.frame.empty:
                    raise ValueError(f"{manifest} has no rows to embed")
                files = [dataset.root / p for p in dataset.frame["path"].astype(str)]
                sample_ids = dataset.frame["sample_id"].astype(str).tolist()
                source = {"manifest": str(manifest)}
            check_writable(out)
            model = load_student(run_id, method, runs_root, device)
            features = embed_images(model, files, batch_size=batch_size, num_workers=num_workers, progress=True,
                                    console=console)
            card = model.model_card
            write_embeddings(out, sample_ids, [str(f) for f in files], features, card,
                             source={**source, "run": run_id, "method": card.method,
                                     "checkpoint": str(model.checkpoint)})
        except _user_errors() as exc:
            _fail(exc)
        console.print(f"wrote {len(files):,} embeddings (D={features.shape[1]}, {card.method} {card.model}) to {out}",
                      highlight=False, soft_wrap=True)
