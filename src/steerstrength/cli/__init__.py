"""The `steerstrength` command line: parse, call the library, print. No logic lives here."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from steerstrength.cli.common import console, state, sweep_app
from steerstrength.cli.options import BlocksPathOpt, DeviceOpt, DtypeOpt
from steerstrength.errors import SteerStrengthError

app = typer.Typer(
    help="Measure what the steering strength alpha does to a language model, and recommend one.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="Inspect models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(sweep_app, name="sweep")
# Command groups, one line each:
app.add_typer(__import__("steerstrength.cli.vectors", fromlist=["app"]).app)  # prompts, export-gguf
app.add_typer(__import__("steerstrength.cli.vectors", fromlist=["vectors_app"]).vectors_app, name="vectors")
import steerstrength.cli.sweeps  # noqa: F401,E402  (sweep tokens, logodds, limit, xent)
import steerstrength.cli.concept  # noqa: F401,E402  (sweep concept, mmlu)
app.command("recommend")(__import__("steerstrength.cli.recommend", fromlist=["recommend"]).recommend)  # which alpha?
app.command("generate")(__import__("steerstrength.cli.use", fromlist=["generate"]).generate)  # steered text
app.command("serve")(__import__("steerstrength.cli.use", fromlist=["serve"]).serve)  # the live steering page
app.command("train-tiny")(__import__("steerstrength.cli.train", fromlist=["train_tiny"]).train_tiny)  # 1-layer GPT
from steerstrength.cli.theory import app as theory_app  # noqa: E402

app.add_typer(theory_app, name="theory")
from steerstrength.cli import run as cli_run  # noqa: E402  (run, config show, plot)

app.command("run")(cli_run.run)
app.command("plot")(cli_run.plot)
app.add_typer(cli_run.config_app, name="config")


@models_app.command("show")
def models_show(
    spec: Optional[str] = typer.Argument(None, help="Model spec; default: the embedded SmolLM2-135M-Instruct."),
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    blocks_path: Optional[str] = BlocksPathOpt,
) -> None:
    """Load a model and print its facts as JSON."""
    from steerstrength.loading import load_model

    model = load_model(spec, dtype=dtype, device=device, blocks_path=blocks_path)
    print(json.dumps(model.describe(), indent=2))




def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2 (`--debug` shows the traceback)."""
    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")
    if "--quiet" in sys.argv:  # global: no progress bars, log lines only
        sys.argv.remove("--quiet")
        state["quiet"] = True
    try:
        app()
    except SystemExit as exc:
        if exc.code == 130:  # typer turns Ctrl-C (KeyboardInterrupt) into a silent exit 130
            _interrupted()
        raise
    except KeyboardInterrupt:
        _interrupted()
        sys.exit(130)
    except (SteerStrengthError, OSError, UnicodeDecodeError) as exc:
        if debug:
            raise
        _error(exc)
        sys.exit(2)


def _error(exc: Exception) -> None:
    """One line: ours as they are; a file-system error (disk full, a permission changed mid-run) with its path."""
    from rich.markup import escape

    if isinstance(exc, OSError):
        where = exc.filename2 if exc.filename2 is not None else exc.filename  # a rename: its destination
        message = (f"{f'{where}: ' if where is not None else ''}{exc.strerror or exc}; check the path, its "
                   "permissions and free space")
    elif isinstance(exc, UnicodeDecodeError):
        message = f"an input file is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
    else:
        message = str(exc)
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _interrupted() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    what = ("finished stages and chunks are kept: the same command resumes" if command == "run"
            else "outputs are written at the end, so nothing was left half-written")
    console.print(f"interrupted (Ctrl-C); {what}", highlight=False, soft_wrap=True)


if __name__ == "__main__":
    main()
