"""`steerstrength run`, `steerstrength config show`, `steerstrength plot`: the main job and its tools."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer

from steerstrength.cli_common import console, log, progress_bar

config_app = typer.Typer(help="Show the run configuration.", no_args_is_help=True)

PresetOpt = typer.Option("demo", "--preset", help="demo (2 CPU cores, minutes) or paper (the paper's sizes, GPUs).")
ConfigOpt = typer.Option(None, "--config", "-c", help="A TOML file (see `steerstrength config show`).")


def run(
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. concepts=joy,evil "
                                                               "xent.n_tokens=4096 model.spec=Qwen/Qwen2.5-0.5B"),
    preset: str = PresetOpt,
    config: Optional[Path] = ConfigOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default: runs/<preset>)."),
    only: Optional[str] = typer.Option(None, "--only", help="Comma-separated stages to run (others untouched)."),
) -> None:
    """Run the pipeline: prompts, vectors, sweeps, figures and report.html in a resumable run directory."""
    from rich.table import Table

    from steerstrength.config import build_config
    from steerstrength.io import check_output_dir
    from steerstrength.pipeline import STAGES, run_pipeline

    cfg = build_config(preset, str(config) if config else None, overrides or [])
    out = check_output_dir(out or Path("runs") / preset, names=("manifest.json", "config.toml", "report.html"))
    stages = None
    if only:
        stages = [s.strip() for s in only.split(",") if s.strip()]
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            from steerstrength.errors import InputError

            raise InputError(f"unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGES)}")
    start = time.perf_counter()
    log(f"run directory {out} (preset {preset})")
    from steerstrength.crossmodel import is_multi_model

    if is_multi_model(out) and not cfg.models:
        from steerstrength.errors import InputError

        raise InputError(f"{out} holds a run over several models; rerun it with its models=[...] or give another --out")
    if cfg.models:
        from steerstrength.crossmodel import run_models

        per_model = run_models(cfg, out, progress=progress_bar, log=log, only=stages)
    else:
        per_model = {"": run_pipeline(cfg, out, progress=progress_bar, log=log, only=stages)}
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
    log(f"total {time.perf_counter() - start:.1f} s; open {out / 'report.html'}")


@config_app.command("show")
def config_show(preset: str = PresetOpt, config: Optional[Path] = ConfigOpt,
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
    from steerstrength.runs import resume_command

    from steerstrength.crossmodel import draw_models, is_multi_model, model_runs, write_models_report

    if not run_dir.is_dir():
        what = "is a file" if run_dir.exists() else "does not exist"
        raise InputError(f"run directory {run_dir} {what}; give the --out of a `steerstrength run`")
    if is_multi_model(run_dir):  # a run over several models: each model's run, then the comparison
        check_output_dir(run_dir, names=("report.html",), option="run directory")
        for info in model_runs(run_dir):
            sub = run_dir / "models" / info["folder"]
            if (sub / "tables").is_dir():
                draw_all(sub)
                write_report(sub)
        drawn = draw_models(run_dir)
        log(f"drew {len(drawn)} comparison files and {write_models_report(run_dir)}")
        return
    if not (run_dir / "tables").is_dir():
        raise InputError(f"{run_dir} has no tables/ directory (no stage has finished); `{resume_command(run_dir)}` "
                         "runs it")
    check_output_dir(run_dir, names=("report.html",), option="run directory")
    paths = draw_all(run_dir)
    report = write_report(run_dir)
    log(f"drew {len(paths)} figure files and {report}")
