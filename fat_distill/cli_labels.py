"""``fat-distill labels``: the cleaned labels of a finished run, as a file the user's own training code reads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console()

labels_app = typer.Typer(help="Cleaned labels: what the teacher proposes for every train sample.",
                         no_args_is_help=True)


@labels_app.command("export")
def labels_export(
    run_id: Annotated[str, typer.Argument(help="Run id, a unique prefix, or 'latest'.")],
    out: Annotated[Path, typer.Option(help="File to write: .parquet (a dataset manifest) or .csv.")],
    round: Annotated[Optional[int], typer.Option(help="Teacher round to use (default: the run's last).")] = None,
    min_prob: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="A flagged row is proposed for relabelling when the teacher gives its suggested "
                               "identity at least this probability; otherwise it is proposed for dropping.")] = 0.5,
    include_test: Annotated[bool, typer.Option(
        "--include-test", help="Also write the query and gallery rows (unchanged), so the file is a whole "
                               "dataset to run the pipeline on again.")] = False,
    apply: Annotated[bool, typer.Option(
        "--apply", help="Carry the proposals out: leave dropped rows out and give relabelled rows the suggested "
                        "pid (the old label stays in given_pid).")] = False,
    runs_root: Annotated[Path, typer.Option(help="Folder holding the run folders.")] = Path("runs"),
) -> None:
    """Write one row per train sample: sample_id, path, given pid, flagged, confidence, the teacher's
    suggested pid and its probability, and a proposed action (keep / relabel / drop).

    The rule: [b]keep[/b] what the teacher trusts; [b]relabel[/b] a flagged row when the teacher's most probable
    identity differs from the given one with probability ≥ --min-prob; [b]drop[/b] the other flagged rows.
    """
    from fat_distill.cli import USER_ERRORS, _fail
    from fat_distill.pipeline.labels import export_labels
    from fat_distill.pipeline.runs import find_run

    try:
        run_dir = find_run(runs_root, run_id)
        result = export_labels(run_dir, out, round=round, min_prob=min_prob, include_test=include_test, apply=apply)
    except USER_ERRORS as exc:
        _fail(exc)
    t = Table(title=f"proposed actions, teacher round {result.round} of {run_dir.name}")
    for col in ("action", "train rows"):
        t.add_column(col, justify="right" if col != "action" else "left")
    for action, count in result.actions.items():
        t.add_row(action, f"{count:,}")
    console.print(t)
    console.print(f"wrote {result.path} ({result.rows:,} rows{', actions applied' if apply else ''})",
                  highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.add_typer(labels_app, name="labels")
