"""`steerstrength run`, `steerstrength config show`, `steerstrength plot`: the main job and its tools."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import List, Optional

import typer

from steerstrength.cli.common import console, log, progress_bar, state
from steerstrength.cli.options import PresetOpt

config_app = typer.Typer(help="Show the run configuration.", no_args_is_help=True)

RunPresetOpt = PresetOpt("demo (2 CPU cores, minutes) or paper (the paper's sizes, GPUs).")
ConfigOpt = typer.Option(None, "--config", "-c", help="A TOML file (see `steerstrength config show`).")


def run(
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. concepts=joy,evil "
                                                               "xent.n_tokens=4096 model.spec=Qwen/Qwen2.5-0.5B"),
    preset: str = RunPresetOpt,
    config: Optional[Path] = ConfigOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default: runs/<preset>)."),
    only: Optional[str] = typer.Option(None, "--only", help="Comma-separated stages to run (others untouched)."),
    executor: Optional[str] = typer.Option(None, "--executor", help="local (here, one model after another) or ray "
                                           "(one Ray actor per model, docs/scale.md); default: the config's executor."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="The Ray cluster to run on (auto, "
                                              "HOST:6379, ray://HOST:10001); implies --executor ray. Default: a "
                                              "local Ray instance."),
) -> None:
    """Run the pipeline: prompts, vectors, sweeps, figures and report.html in a resumable run directory.

    A concept of your own, from your files (README: Your own concept):
    steerstrength run concepts=anger prompts.files.anger=P.jsonl,N.jsonl --out runs/anger
    """
    from rich.table import Table

    from steerstrength.config import build_config
    from steerstrength.errors import InputError
    from steerstrength.io import check_output_dir
    from steerstrength.pipeline import STAGES

    extra = []
    if ray_address is not None:
        if executor == "local":
            raise InputError("--ray-address runs on Ray; drop --executor local or --ray-address")
        executor = executor or "ray"
        extra.append(f"ray.address={ray_address}")
    if executor is not None:
        extra.append(f"executor={executor}")
    cfg = build_config(preset, str(config) if config else None, (overrides or []) + extra)
    from steerstrength.preflight import check_run

    check_run(cfg)  # every concept's files, judge and contexts: one line before anything else is printed or written
    if cfg.executor == "ray":
        from steerstrength.executors import require_ray

        require_ray()  # one line naming the extra to install, before anything is written
    out = check_output_dir(out or Path("runs") / preset, names=("manifest.json", "config.toml", "report.html"))
    stages = None
    if only is not None:
        stages = [s.strip() for s in only.split(",") if s.strip()]
        if not stages:
            raise InputError(f"--only {only!r} names no stage; give e.g. --only vectors,tokens (stages: "
                             f"{', '.join(STAGES)})")
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise InputError(f"unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGES)}")
    start = time.perf_counter()  # no banner line: an error is then the only line a failed run prints
    from steerstrength.crossmodel import is_multi_model

    if is_multi_model(out) and not cfg.models:
        raise InputError(f"{out} holds a run over several models; rerun it with its models=[...] or give another --out")
    with cell_view(cfg) as watch:
        if cfg.models:
            from steerstrength.crossmodel import run_models

            per_model = run_models(cfg, out, progress=progress_bar, log=log, only=stages, watch=watch)
        else:  # one model: one cell (on Ray, one actor)
            from steerstrength.crossmodel import model_dir_name
            from steerstrength.executors import Cell, run_cells
            from steerstrength.loading import DEFAULT_MODEL

            name = model_dir_name(cfg.model.spec or DEFAULT_MODEL)
            per_model = {"": run_cells(cfg, [Cell(name, cfg, out)], progress=progress_bar, log=log, only=stages,
                                       watch=watch)[name]}
    table = Table(title=f"steerstrength run: {out}")
    if cfg.models:
        table.add_column("model")
    table.add_column("stage")
    table.add_column("status")
    table.add_column("seconds", justify="right")
    table.add_column("note")
    for name, results in per_model.items():
        for stage, (status, seconds, note) in results.items():
            table.add_row(*([name] if cfg.models else []), stage, status, f"{seconds:.1f}", note)
    console.print(table)
    report = out / "report.html"
    log(f"total {time.perf_counter() - start:.1f} s (preset {preset}, run directory {out})"
        + (f"; open {report}" if report.is_file() else ""))


@contextlib.contextmanager
def cell_view(cfg):
    """The cells of a Ray run, live: each model's stages done, the stage it is in, and cells done / running / failed
    (with --quiet, a log line per change). Yields the `watch(states)` callback executors.run_cells calls."""
    if cfg.executor != "ray":
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    seen = {}

    def summary(states) -> str:
        count = {s: sum(1 for c in states if c.state == s) for s in ("done", "running", "waiting", "failed")}
        return (f"cells: {count['done']} done, {count['running']} running, {count['waiting']} waiting, "
                f"{count['failed']} failed of {len(states)}")

    if state["quiet"]:
        def watch(states):
            for c in states:
                now = (c.state, c.stage)
                if seen.get(c.name) != now:
                    seen[c.name] = now
                    log(f"[ray] {c.name}: {c.state}{' ' + c.stage if c.stage else ''} "
                        f"({c.stages_done}/{c.n_stages} stages); {summary(states)}")
        yield watch
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[note]}"), TimeElapsedColumn(), console=console) as bar:
        tasks = {}

        def watch(states):
            if "" not in tasks:
                tasks[""] = bar.add_task("cells", total=len(states), note="")
            bar.update(tasks[""], completed=sum(1 for c in states if c.state == "done"), note=summary(states))
            for c in states:
                if c.name not in tasks:
                    tasks[c.name] = bar.add_task(c.name, total=c.n_stages, note="")
                note = {"running": f"running {c.stage}", "failed": f"failed: {c.error}"}.get(c.state, c.state)
                bar.update(tasks[c.name], completed=c.stages_done, note=note)
        yield watch


@config_app.command("show")
def config_show(preset: str = RunPresetOpt, config: Optional[Path] = ConfigOpt,
                overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides")) -> None:
    """Print the configuration a run would use, as TOML (every key can be overridden with key=value)."""
    from steerstrength.config import build_config, to_toml

    print(to_toml(build_config(preset, str(config) if config else None, overrides or [])), end="")


def plot(run_dir: Path = typer.Argument(..., help="A run directory.")) -> None:
    """Redraw every figure and report.html from the run's tables, without recomputing."""
    from steerstrength.errors import InputError
    from steerstrength.io import check_output_dir
    from steerstrength.plots import draw_all
    from steerstrength.report import write_report
    from steerstrength.runs import RunDir, resume_command

    from steerstrength.crossmodel import draw_models, is_multi_model, model_runs, write_models_report

    if not run_dir.is_dir():
        what = "is a file" if run_dir.exists() else "does not exist"
        raise InputError(f"run directory {run_dir} {what}; give the --out of a `steerstrength run`")
    if is_multi_model(run_dir):  # a run over several models: each model's run, then the comparison
        check_output_dir(run_dir, names=("report.html",), option="run directory")
        with RunDir(run_dir).lock():  # no run writes it meanwhile; no link in it leads outside
            for info in model_runs(run_dir):
                sub = run_dir / "models" / info["folder"]
                if (sub / "tables").is_dir():
                    draw_all(sub)
                    write_report(sub)
            drawn = draw_models(run_dir)
            report = write_models_report(run_dir)
        log(f"drew {len(drawn)} comparison files and {report}")
        return
    if not (run_dir / "tables").is_dir():
        raise InputError(f"{run_dir} has no tables/ directory (no stage has finished); `{resume_command(run_dir)}` "
                         "runs it")
    check_output_dir(run_dir, names=("report.html",), option="run directory")
    with RunDir(run_dir).lock():  # no run writes it meanwhile; no link in it leads outside
        paths = draw_all(run_dir)
        report = write_report(run_dir)
    log(f"drew {len(paths)} figure files and {report}")
