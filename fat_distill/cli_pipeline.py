"""Pipeline commands of the ``fat-distill`` CLI: run, demo, resume, sweep, runs, inspect, config.

``runs`` and ``inspect`` read run folders only (no Prefect, no torch), so they answer at once.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

console = Console()
err_console = Console(stderr=True)

STATE_STYLE = {"ran": "green", "cached": "cyan", "failed": "bold red", "running": "yellow",
               "submitted": "dim", "completed": "green", "interrupted": "yellow", "cancelled": "yellow",
               "damaged": "bold red"}

SetOption = Annotated[Optional[list[str]], typer.Option(
    "--set", "-s", help="Override a config value, e.g. --set teacher.rounds=3 (repeatable).")]
RunsRootOption = Annotated[Path, typer.Option(help="Folder holding the run folders.")]


def _fail(exc: BaseException, hint: str | None = None) -> None:
    import os

    if os.environ.get("FAT_DISTILL_DEBUG"):
        raise exc
    err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    if hint:
        err_console.print(hint, highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _load(config_path: Path | None, overrides: list[str] | None, *, demo: bool = False):
    from fat_distill.pipeline import PipelineConfig, apply_overrides, demo_config, load_config, validate_config

    if demo and config_path is None:
        data = apply_overrides(demo_config().model_dump(mode="json"), overrides or [])
        return validate_config(PipelineConfig, data, "the demo config" + (f" with {overrides}" if overrides else ""))
    return load_config(PipelineConfig, config_path, overrides or [])


def _execute(config, *, run_id: str | None = None, resume: bool = False, direct: bool = False) -> None:
    from fat_distill.cancel import RunCancelled, cancel_reason, cancel_signal
    from fat_distill.cli_interrupt import exit_code, run_interruptibly
    from fat_distill.pipeline import new_run_id
    from fat_distill.pipeline.overrides import ConfigError

    run_id = run_id or new_run_id(config.run.name)
    started = time.perf_counter()
    run_dir = Path(config.run.runs_root) / run_id
    if not direct:
        from flows.environment import configure_prefect

        configure_prefect(Path(config.run.runs_root).parent / ".prefect")
    _preflight(config, direct=direct)
    console.print(f"run [bold]{run_id}[/] — manifests → {config.run.manifests_root}/{run_id}, "
                  f"checkpoints, plots and logs → {config.run.runs_root}/{run_id}", highlight=False)
    before_exit = None
    try:
        if direct:
            from fat_distill.pipeline import run_direct

            def work():
                return run_direct(config, run_id)
        else:
            from flows.environment import brief_console_logging
            from flows.pipeline import run_pipeline
            from flows.server import start_embedded_server, stop_embedded_server_now

            brief_console_logging()

            # From the main thread, before the run's thread: in its own session, so Ctrl-C reaches only us.
            start_embedded_server()
            before_exit = stop_embedded_server_now

            def work():
                return run_pipeline(config, run_id, resume=resume)

        run_id, summary = run_interruptibly(work, console=err_console, before_exit=before_exit)
    except KeyboardInterrupt:  # Ctrl-C while the embedded server was still starting: no stage ran
        err_console.print("interrupted before the run started"
                          + (f"; continue with: fat-distill resume {run_id}" if resume else ""), highlight=False)
        raise typer.Exit(code=exit_code(signal.SIGINT))
    except BaseException as exc:
        signum = cancel_signal()
        if isinstance(exc, RunCancelled) or signum is not None:
            _show_stages(run_dir)
            err_console.print(f"cancelled ({cancel_reason() or exc}); the stopped stage keeps its last epoch "
                              f"checkpoint. Continue with: fat-distill resume {run_id}", highlight=False)
            raise typer.Exit(code=exit_code(signum if signum is not None else signal.SIGINT)) from None
        if isinstance(exc, (ConfigError, ValueError, OSError, RuntimeError, KeyError)):
            from fat_distill.pipeline.advice import failure_advice

            _show_stages(run_dir)
            _fail(exc, failure_advice(exc, run_id, config))
        raise
    _show_stages(run_dir)
    _show_metrics(summary)
    console.print(f"done in {time.perf_counter() - started:.0f}s — run {run_id}; "
                  f"inspect with: fat-distill inspect {run_id}", highlight=False)


def _preflight(config, *, direct: bool) -> None:
    """Check images, weights, devices, sizes, folders and free disk before the first stage (exit 2 if not)."""
    import os

    from fat_distill.pipeline.preflight import preflight

    folders = [] if direct or os.environ.get("PREFECT_API_URL") else [Path(os.environ["PREFECT_HOME"])]
    try:
        with err_console.status("checking images, weights, devices and output folders …"):
            report = preflight(config, folders=folders)
    except (ValueError, FileNotFoundError, OSError) as exc:  # PreflightError is a ValueError
        _fail(exc)
    except KeyboardInterrupt:
        err_console.print("interrupted before the run started", highlight=False)
        raise typer.Exit(code=130) from None
    for warning in report.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)


def _state_text(state: Any) -> Text:
    """A run's or stage's state, coloured; plain text, so no value is read as console markup."""
    return Text(str(state), style=STATE_STYLE.get(str(state), ""))


def _show_stages(run_dir: Path) -> None:
    from fat_distill.pipeline.runs import load_run_json

    data = load_run_json(run_dir) if run_dir.exists() else None
    if not data:
        return
    t = Table(title=f"stages of {data['run_id']}")
    for col in ("stage", "state", "seconds", "device", "why"):
        t.add_column(col, overflow="fold")
    for name, entry in data.get("stages", {}).items():
        state = entry.get("state", "?")
        t.add_row(Text(name), _state_text(state), str(entry.get("seconds", "")),
                  str(entry.get("device", "")), Text(str(entry.get("why") or entry.get("error") or "")))
    console.print(t)


def _show_metrics(summary: dict[str, Any]) -> None:
    t = Table(title="retrieval (query vs gallery)")
    for col in ("method", "rank-1", "rank-5", "mAP", "mINP"):
        t.add_column(col, justify="right" if col != "method" else "left")
    for method, m in summary.get("retrieval", {}).items():
        t.add_row(method, *(f"{100 * m.get(k, float('nan')):.1f}" for k in ("rank1", "rank5", "mAP", "mINP")))
    console.print(t)
    det = summary.get("noise_detection", {})
    if det:
        parts = [f"{k.split('.', 1)[1]} {v:.3f}" for k, v in det.items()
                 if v is not None and k.split(".", 1)[1] in ("precision", "recall", "f1", "auroc")]
        console.print("noise detection of the final teacher round: " + ", ".join(parts), highlight=False)
    audit = summary.get("label_audit")
    if audit:
        from fat_distill.pipeline.inspect import describe_label_audit

        console.print(f"label audit (teacher's view, no ground truth used): {describe_label_audit(audit)}",
                      highlight=False)
    for warning in summary.get("warnings") or []:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)


def _show_sweep(report: dict[str, Any]) -> None:
    """A sweep's points (run, status) and its table: one row per point and model."""
    console.rule(f"sweep {report.get('sweep_id')} — {report.get('status')}")
    console.print(f"base config: {report['config_path']}\nsweep folder: {report['sweep_dir']}", highlight=False)
    t = Table(title="points")
    for col in ("point", "run", "status"):
        t.add_column(col, overflow="fold")
    for point in report.get("points", []):
        t.add_row(point["label"], point["run_id"], f"[{STATE_STYLE.get(point['status'], '')}]{point['status']}[/]")
    console.print(t)
    rows = report.get("rows", [])
    if not rows:
        console.print("no point has finished yet, so the sweep has no metrics")
        return
    keys = list(report.get("grid", {}))  # one column per grid key: the point's value
    t = Table(title="metrics (runs/SWEEP_ID/sweep.parquet)")
    for col in (*keys, "method", "rank-1", "rank-5", "mAP", "mINP", "noise F1"):
        t.add_column(col, justify="right" if col in ("rank-1", "rank-5", "mAP", "mINP", "noise F1") else "left",
                     overflow="fold")

    def pct(value: Any) -> str:
        return "" if value is None else f"{100 * value:.1f}"

    for row in rows:
        f1 = row.get("noise_detection_f1")
        t.add_row(*(str(row.get(k)) for k in keys), row["method"],
                  *(pct(row.get(k)) for k in ("rank1", "rank5", "mAP", "mINP")), "" if f1 is None else f"{f1:.3f}")
    console.print(t)


def _trigger_deployment(config, deployment: str, *, watch: bool = False, grid: dict[str, list[Any]] | None = None,
                        resume_run: str | None = None) -> None:
    """Start a flow run of a deployment on the Prefect server named by PREFECT_API_URL.

    Without ``watch`` it returns once the run is scheduled; with it, it prints each state change of the
    flow run, its subflows and stages until the run ends, and exits 1 unless it completed. ``grid``: the
    run is a sweep (the ``fat-distill-sweep`` flow's deployments). ``resume_run``: continue that run
    (a pipeline deployment) instead of starting a new one.
    """
    import os

    from fat_distill.pipeline import new_run_id

    if not os.environ.get("PREFECT_API_URL"):
        _fail(ValueError("--deployment needs a Prefect server: set PREFECT_API_URL (e.g. "
                         "http://localhost:4200/api, see README 'Run on a cluster')"))
    from flows.environment import configure_prefect

    configure_prefect()
    from flows import watch as watching

    if grid is None:
        name = watching.deployment_name(deployment, watching.PIPELINE_FLOW)
        run_id = resume_run or new_run_id(config.run.name)
        parameters = {"config": config.model_dump(mode="json"), "run_id": run_id, "resume": bool(resume_run)}
    else:
        name = watching.deployment_name(deployment, watching.SWEEP_FLOW)
        run_id = new_run_id(f"{config.run.name}-sweep")
        parameters = {"config": config.model_dump(mode="json"), "grid": grid, "sweep_id": run_id}
    try:
        flow_run = watching.trigger(name, parameters, flow_run_name=run_id)
    except Exception as exc:  # noqa: BLE001 - unknown deployment, unreachable server: one clear line
        _fail(exc, "list deployments with: prefect deployment ls (deploy them with: prefect deploy --all)")
    console.print(f"submitted run {run_id} to deployment {name}: flow run {flow_run.id} "
                  f"(state {flow_run.state.name if flow_run.state else 'Scheduled'})", highlight=False, soft_wrap=True)
    if not watch:
        console.print(f"see it with: prefect flow-run inspect {flow_run.id} (or trigger with --watch to follow "
                      "a run to its end)", highlight=False)
        return
    try:
        final = watching.follow(flow_run.id, lambda line: console.print(line, highlight=False, soft_wrap=True))
    except KeyboardInterrupt:
        err_console.print(f"stopped watching; flow run {flow_run.id} goes on on its worker "
                          f"(cancel it with: prefect flow-run cancel {flow_run.id})")
        raise typer.Exit(code=130)
    run_dir = Path(config.run.runs_root) / run_id
    if grid is None and (run_dir / "run.json").exists():  # the run folder is shared with the worker
        _show_stages(run_dir)
        from fat_distill.pipeline.runs import load_run_json

        metrics = (load_run_json(run_dir) or {}).get("metrics")
        if metrics:
            _show_metrics(metrics)
    state = final.state
    if state is None or not state.is_completed():
        err_console.print(f"[bold red]run {run_id} {state.name.lower() if state else 'ended'}[/]"
                          f"{': ' + state.message if state and state.message else ''}", highlight=False,
                          soft_wrap=True)
        raise typer.Exit(code=1)
    console.print(f"run {run_id} completed (flow run {final.name})", highlight=False, soft_wrap=True)


def _draw_pictures(run_dir: Path, runs_root: Path, *, quiet: bool, **options: Any) -> dict[str, Any]:
    """`inspect --pictures`: draw into the run's plots folder, then attach to its Prefect flow run if it had one."""
    from fat_distill.pipeline.pictures import make_run_pictures
    from fat_distill.pipeline.runs import load_run_json

    started = time.perf_counter()
    drawn = make_run_pictures(run_dir, **options)
    # soft_wrap: a path is printed whole, so it can be copied.
    say = (lambda text: None) if quiet else (lambda text: console.print(text, highlight=False, soft_wrap=True))
    for path in drawn.paths:
        say(f"wrote {path}")
    say(f"{len(drawn.paths)} picture(s) in {time.perf_counter() - started:.1f}s")
    result: dict[str, Any] = {"overview": [str(p) for p in drawn.overview], "rows": [str(p) for p in drawn.rows]}
    flow_run_id = (load_run_json(run_dir) or {}).get("flow_run_id")
    if not flow_run_id:
        result["attached"] = f"run {drawn.run_id} has no Prefect flow run (a --direct run): nothing to attach to"
        say(result["attached"])
        return result
    from flows.environment import configure_prefect

    configure_prefect(Path(runs_root).parent / ".prefect")
    from flows.pictures import attach_pictures

    try:
        count = attach_pictures(flow_run_id, drawn.overview, drawn.run_id, listed=drawn.rows)
    except Exception as exc:  # noqa: BLE001 - an unknown flow run, an unreachable server …: the PNGs are on disk
        raise RuntimeError(f"{exc} (the pictures are written under {drawn.plots_dir}; only attaching them to "
                           "Prefect failed)") from exc
    result["attached"] = (f"attached {count} image artifact(s) and a list of all pictures to Prefect flow run "
                          f"{flow_run_id}")
    say(result["attached"])
    return result


def register(app: typer.Typer) -> None:
    config_app = typer.Typer(help="Show configs: the defaults, the demo, or a file with overrides applied.",
                             no_args_is_help=True)
    app.add_typer(config_app, name="config")

    @app.command("run")
    def run(
        config: Annotated[Optional[Path], typer.Argument(help="YAML config (default: built-in defaults).")] = None,
        overrides: SetOption = None,
        direct: Annotated[bool, typer.Option(help="Run the stages in this process without Prefect (no cache).")] = False,
        deployment: Annotated[Optional[str], typer.Option(
            help="Trigger this deployment (e.g. 'pipeline') on a Prefect server instead of running here; "
                 "needs PREFECT_API_URL.")] = None,
        watch: Annotated[bool, typer.Option(
            help="With --deployment: follow the run until it ends, print each stage's state as it changes, "
                 "exit 1 if it does not complete.")] = False,
        allow_outside_root: Annotated[bool, typer.Option(
            "--allow-outside-root",
            help="Read images whose manifest paths are absolute, climb out of the dataset root with '..' or are "
                 "symlinks leading out of it (same as --set data.allow_outside_root=true).")] = False,
        verify: Annotated[bool, typer.Option(
            "--verify", help="Before the run, decode every image fully (default: a quick check of each file's "
                             "header and end; same as --set data.verify=true).")] = False,
        skip_bad: Annotated[bool, typer.Option(
            "--skip-bad", help="Leave missing or undecodable images out of the run instead of stopping "
                               "(same as --set data.skip_bad=true).")] = False,
    ) -> None:
        """Run the pipeline: data → noise → teacher rounds → soft labels → student + baselines → evaluation.

        Embedded Prefect by default (no server to start); with PREFECT_API_URL set the run reports to that
        server. Finished stages with unchanged inputs, config and code are taken from cache. Before the
        first stage, every image, weights file, device and output folder is checked.
        Ctrl-C (or SIGTERM) stops the running stage at its next batch; `fat-distill resume` continues.
        """
        from fat_distill.pipeline.overrides import ConfigError

        flags = {"data.allow_outside_root": allow_outside_root, "data.verify": verify, "data.skip_bad": skip_bad}
        overrides = [*(overrides or []), *(f"{key}=true" for key, on in flags.items() if on)]
        try:
            cfg = _load(config, overrides)
        except ConfigError as exc:
            _fail(exc)
        if deployment:
            _trigger_deployment(cfg, deployment, watch=watch)
            return
        if watch:
            _fail(ValueError("--watch follows a run started with --deployment; a local run shows its stages anyway"))
        _execute(cfg, direct=direct)

    @app.command("demo")
    def demo(
        overrides: SetOption = None,
        direct: Annotated[bool, typer.Option(help="Run without Prefect.")] = False,
    ) -> None:
        """Synthesise a noisy dataset and run the whole pipeline with tiny_cnn on the CPU (a few minutes)."""
        from fat_distill.pipeline.overrides import ConfigError

        try:
            cfg = _load(None, overrides, demo=True)
        except ConfigError as exc:
            _fail(exc)
        _execute(cfg, direct=direct)

    @app.command("resume")
    def resume(
        run_id: Annotated[str, typer.Argument(
            help="Run id (or a unique prefix) of a failed, cancelled or killed run, or 'latest' (the newest run).")],
        runs_root: RunsRootOption = Path("runs"),
        overrides: Annotated[Optional[list[str]], typer.Option(
            "--set", "-s", help="Change a value of the run's saved config, e.g. --set teacher.train.lr=3e-4 "
                                "(repeatable): that section's stages and every stage after them run again.")] = None,
        deployment: Annotated[Optional[str], typer.Option(
            help="Continue it on a worker: trigger this deployment of the pipeline flow (e.g. 'pipeline') on the "
                 "Prefect server of PREFECT_API_URL; the worker must see the same runs folder.")] = None,
        watch: Annotated[bool, typer.Option(
            help="With --deployment: follow the run until it ends; exit 1 unless it completes.")] = False,
    ) -> None:
        """Continue a run with its saved config: finished stages from cache, the interrupted one from its
        last epoch checkpoint.

        With --set, the changed config sections' stages (their checkpoints and manifests) are discarded and
        run again with the new values, and so is every stage after them; earlier stages are reused.
        A run whose process is still alive is refused. A run killed with its machine or worker (its
        flow run still Running on the server) is marked Crashed there first when its process is gone;
        a run of another machine is resumed once the server says its flow run ended.
        """
        from fat_distill.pipeline.overrides import ConfigError
        from fat_distill.pipeline.rerun import discard_stale_stages
        from fat_distill.pipeline.runs import RunPaths, find_run, load_run_json
        from flows.run_liveness import check_resumable

        if watch and not deployment:
            _fail(ValueError("--watch follows a run resumed with --deployment; a local resume shows its stages anyway"))
        try:
            run_dir = find_run(runs_root, run_id)
            for note in check_resumable(load_run_json(run_dir) or {}, run_dir.name):
                console.print(note, highlight=False, soft_wrap=True)
            saved = _load(run_dir / "config.yaml", [])
            cfg = _load(run_dir / "config.yaml", overrides) if overrides else saved
            sections, discarded = discard_stale_stages(RunPaths.for_run(saved, run_dir.name), saved, cfg)
        except (ConfigError, FileNotFoundError, ValueError) as exc:
            _fail(exc)
        if sections:
            console.print(f"changed: {', '.join(sections)}; discarded {len(discarded)} stale stage folder(s) and "
                          "manifest(s): those stages and every stage after them run again", highlight=False)
        if deployment:
            _trigger_deployment(cfg, deployment, watch=watch, resume_run=run_dir.name)
            return
        _execute(cfg, run_id=run_dir.name, resume=True)

    @app.command("sweep")
    def sweep(
        config: Annotated[Optional[Path], typer.Argument(help="Base YAML config (default: the demo config).")] = None,
        grid: Annotated[list[str], typer.Option(help="KEY=V1,V2,… (repeatable); every combination is run.")] = [],
        overrides: SetOption = None,
        deployment: Annotated[Optional[str], typer.Option(
            help="Trigger this deployment of the sweep flow (e.g. 'sweep') on a Prefect server instead of running "
                 "here; needs PREFECT_API_URL.")] = None,
        watch: Annotated[bool, typer.Option(
            help="With --deployment: follow the sweep and its points until it ends; exit 1 if it fails.")] = False,
    ) -> None:
        """Run the pipeline for every combination of --grid values; points share devices and cached stages."""
        import yaml

        from fat_distill.pipeline.overrides import ConfigError

        try:
            cfg = _load(config, overrides, demo=config is None)
            parsed: dict[str, list[Any]] = {}
            for item in grid:
                if "=" not in item:
                    raise ConfigError(f"--grid {item!r} must look like key=value1,value2")
                key, values = item.split("=", 1)
                parsed[key.strip()] = [yaml.safe_load(v) for v in values.split(",")]
            if not parsed:
                raise ConfigError("give at least one --grid key=v1,v2")
        except ConfigError as exc:
            _fail(exc)
        if deployment:
            _trigger_deployment(cfg, deployment, watch=watch, grid=parsed)
            return
        if watch:
            _fail(ValueError("--watch follows a sweep started with --deployment; a local sweep shows its points "
                             "anyway"))
        from fat_distill.cancel import RunCancelled, cancel_signal
        from fat_distill.cli_interrupt import exit_code, run_interruptibly
        from fat_distill.pipeline.sweeps import inspect_sweep, new_sweep_id, sweep_dir
        from flows.environment import brief_console_logging, configure_prefect

        configure_prefect(Path(cfg.run.runs_root).parent / ".prefect")
        _preflight(cfg, direct=False)
        from flows.pipeline import run_sweep
        from flows.server import start_embedded_server, stop_embedded_server_now

        sweep_id = new_sweep_id(cfg.run.name)
        folder = sweep_dir(cfg.run.runs_root, sweep_id)
        console.print(f"sweep [bold]{sweep_id}[/] — table → {folder}/sweep.parquet, "
                      f"point i runs as {sweep_id}-i", highlight=False)
        brief_console_logging()
        start_embedded_server()
        try:
            run_interruptibly(lambda: run_sweep(cfg, parsed, sweep_id), console=err_console,
                              before_exit=stop_embedded_server_now)
        except BaseException as exc:
            signum = cancel_signal()
            if isinstance(exc, RunCancelled) or signum is not None:
                err_console.print(f"sweep cancelled ({exc}); finished stages are cached: running the sweep again "
                                  "reuses them", highlight=False)
                raise typer.Exit(code=exit_code(signum if signum is not None else signal.SIGINT)) from None
            if isinstance(exc, (ConfigError, ValueError, OSError, RuntimeError)):
                if folder.exists():
                    _show_sweep(inspect_sweep(folder))
                _fail(exc)
            raise
        _show_sweep(inspect_sweep(folder))
        console.print(f"inspect with: fat-distill inspect {sweep_id}", highlight=False)

    @app.command("runs")
    def runs(
        runs_root: RunsRootOption = Path("runs"),
        as_json: Annotated[bool, typer.Option("--json", help="Print as JSON (runs; a sweep point names its sweep).")]
        = False,
    ) -> None:
        """List runs with their status and per-stage states, then sweeps (reads run folders; no server needed)."""
        from fat_distill.pipeline.runs import list_runs
        from fat_distill.pipeline.sweeps import list_sweeps

        items = list_runs(runs_root)
        if as_json:
            sys.stdout.write(json.dumps([{**{k: d.get(k) for k in ("run_id", "status", "created", "updated", "stages")},
                                          "sweep": (d.get("sweep") or {}).get("sweep_id")}
                                         for d in items], indent=2, default=str) + "\n")
            return
        if not items:
            console.print(f"no runs under {runs_root}")
            return
        t = Table()
        t.add_column("run", no_wrap=True)
        for col in ("status", "created", "ran/cached/failed", "student mAP"):
            t.add_column(col)
        for d in items:
            states = [e.get("state") for e in d.get("stages", {}).values()]
            # The student is the first model of the summary (its method: distilled, or what a sweep point set).
            method, scores = next(iter((d.get("metrics") or {}).get("retrieval", {}).items()), (None, {}))
            mAP = "" if scores.get("mAP") is None else f"{100 * scores['mAP']:.1f}" + (
                "" if method == "distilled" else f" ({method})")
            t.add_row(Text(str(d.get("run_id", "?"))), _state_text(d.get("status", "?")), str(d.get("created", "")),
                      f"{states.count('ran')}/{states.count('cached')}/{states.count('failed')}", mAP)
        console.print(t)
        sweeps = list_sweeps(runs_root)
        if sweeps:
            t = Table(title="sweeps (fat-distill inspect SWEEP_ID shows the table)")
            for col in ("sweep", "status", "created", "points", "grid"):
                t.add_column(col, overflow="fold")
            for record in sweeps:
                points = record.get("points", [])
                done = sum(p.get("status") == "completed" for p in points)
                grid = "; ".join(f"{k}={','.join(map(str, v))}" for k, v in record.get("grid", {}).items())
                t.add_row(record["sweep_id"], f"[{STATE_STYLE.get(record.get('status'), '')}]{record.get('status')}[/]",
                          record.get("created", ""), f"{done}/{len(points)} completed", grid)
            console.print(t)

    @app.command("inspect")
    def inspect(
        run_id: Annotated[str, typer.Argument(
            help="Run id or a unique prefix, 'latest' (the newest run), or a sweep id (shows its table).")],
        runs_root: RunsRootOption = Path("runs"),
        as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
        pictures: Annotated[bool, typer.Option(
            "--pictures", help="Also draw ranked lists and t-SNE maps of each student method into the run's "
                               "plots folder, and attach them to the run's Prefect flow run.")] = False,
        queries: Annotated[int, typer.Option("--queries", min=1, help="Queries drawn at random (seeded).")] = 8,
        query_ids: Annotated[list[str] | None, typer.Option(
            "--query-id", help="Draw this query (a sample_id) instead (repeatable).")] = None,
        topk: Annotated[int, typer.Option("--topk", min=1, help="Gallery images per ranked row.")] = 10,
        train_map: Annotated[bool, typer.Option(
            "--train-map", help="Also map the train set, samples the teacher flagged as crosses.")] = False,
        methods: Annotated[list[str] | None, typer.Option(
            "--method", help="Only this student method (repeatable; default: all that finished).")] = None,
        device: Annotated[str, typer.Option(help="Where features are extracted: cpu, cuda:N or auto.")] = "cpu",
    ) -> None:
        """Show a run: config, stage states, manifests with row counts, metrics, plots, teacher rounds.

        With --pictures, first draw each student method's ranked lists (query and top-k gallery, green =
        same identity, red = not) and t-SNE maps into the run's plots folder.

        Given a sweep id, show the sweep: its grid points, their runs and statuses, and one row per
        point and model (runs/SWEEP_ID/sweep.parquet).
        """
        from fat_distill.pipeline.inspect import inspect_run
        from fat_distill.pipeline.runs import find_run
        from fat_distill.pipeline.sweeps import find_sweep, inspect_sweep

        sweep_folder = None if run_id == "latest" else find_sweep(runs_root, run_id)
        if sweep_folder is not None:
            if pictures:
                _fail(ValueError(f"{run_id} is a sweep; draw pictures of one of its points: "
                                 f"fat-distill inspect {sweep_folder.name}-0 --pictures"))
            try:
                sweep_report = inspect_sweep(sweep_folder)
            except ValueError as exc:
                _fail(exc)
            if as_json:
                sys.stdout.write(json.dumps(sweep_report, indent=2, default=str) + "\n")
            else:
                _show_sweep(sweep_report)
            return
        drawn: dict[str, Any] | None = None
        try:
            run_dir = find_run(runs_root, run_id)
            if pictures:
                drawn = _draw_pictures(run_dir, runs_root, methods=methods, num_queries=queries,
                                       query_ids=query_ids, topk=topk, train_map=train_map, device=device,
                                       quiet=as_json)
            report = inspect_run(run_dir)
        except (FileNotFoundError, ValueError, RuntimeError) as exc:  # RuntimeError: unreadable image, checkpoint
            _fail(exc)
        if drawn is not None:
            report["pictures"] = drawn
        if as_json:
            sys.stdout.write(json.dumps(report, indent=2, default=str) + "\n")
            return
        console.rule(f"run {report['run_id']} — {report['status']}")
        console.print(f"config: {report['config_path']}\nmanifests: {report['manifest_dir']}\n"
                      f"run folder: {report['run_dir']}", highlight=False)
        _show_stages(Path(report["run_dir"]))
        t = Table(title="manifests")
        for col in ("file", "schema", "stage", "rows"):
            t.add_column(col)
        for m in report["manifests"]:
            t.add_row(Path(m["file"]).name, m["schema"], m["stage"], f"{m['rows']:,}")
        console.print(t)
        if report["teacher_rounds"]:
            t = Table(title="teacher rounds")
            for col in ("round", "train acc", "kept", "dropped", "changed", "noisy dropped", "clean kept"):
                t.add_column(col, justify="right")
            for r in report["teacher_rounds"]:
                accuracy = "" if r.get("train_accuracy") is None else f"{100 * r['train_accuracy']:.1f}%"
                t.add_row(str(r["round"]), f"[yellow]{accuracy}[/]" if r.get("warning") else accuracy,
                          f"{r['kept']:,}", f"{r['dropped']:,}",
                          "" if r.get("change") is None else f"{100 * r['change']:.1f}%",
                          "" if r.get("noisy_dropped") is None else f"{r['noisy_dropped']:,} of {r['noisy']:,}",
                          "" if r.get("clean_kept") is None else f"{r['clean_kept']:,} of {r['clean']:,}")
            console.print(t)
        if report.get("metrics"):
            _show_metrics(report["metrics"])
        for plot in report["plots"]:
            console.print(f"plot: {plot}", highlight=False)
        if drawn is not None:
            console.print(f"pictures: {len(drawn['rows'])} ranked row(s) under "
                          f"{Path(report['run_dir']) / 'plots' / 'ranked'}; {drawn['attached']}", highlight=False)

    @config_app.command("show")
    def config_show(
        config: Annotated[Optional[Path], typer.Argument(help="YAML config (default: built-in defaults).")] = None,
        overrides: SetOption = None,
        demo: Annotated[bool, typer.Option(help="Start from the demo config.")] = False,
    ) -> None:
        """Print the resolved config as YAML (defaults filled in, overrides applied, validated).

        Training settings left unset (lr, epochs, warmup_epochs: null) follow the regime: from scratch
        (weights: null) or pretrained (weights: PATH); a comment on each gives the value used and its regime.
        """
        from fat_distill.pipeline.overrides import ConfigError
        from fat_distill.pipeline.show import show_yaml

        try:
            cfg = _load(config, overrides, demo=demo)
        except ConfigError as exc:
            _fail(exc)
        sys.stdout.write(show_yaml(cfg))
