"""Pieces the CLI modules share: options, the `sweep` group, model loading, progress bars."""

from __future__ import annotations

from typing import Optional

import typer

from steerstrength.progress import console, progress_bar, state  # noqa: F401 - the CLI modules import them from here

sweep_app = typer.Typer(help="Alpha sweeps on a real model; each writes a Parquet table and a JSON summary.",
                        no_args_is_help=True)

ModelOpt = typer.Option(None, "--model", "-m", help="HF id, model directory, .gguf file or embedded name.")
DtypeOpt = typer.Option("float32", "--dtype", help="float32 (reference), bfloat16 or float16.")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps.")
BlocksPathOpt = typer.Option(None, "--blocks-path", help="Dotted path of the decoder blocks, for unknown architectures.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars; log lines only.")


def check_at_least(*checks: tuple[str, Optional[int], int]) -> None:
    """Each (option, value, smallest) before any work: a value below its smallest is one line naming the option (a
    size of 0 is not "use the default", and a negative count does not slice from the end)."""
    from steerstrength.errors import InputError

    for option, value, low in checks:
        if value is not None and value < low:
            raise InputError(f"{option} must be at least {low}, not {value}")


def refuse_given(ctx, because: str, names) -> None:
    """One line for the first option among parameter `names` given on the command line, which `because` makes
    unused (an option is honoured or refused, never ignored)."""
    from steerstrength.errors import InputError

    for param in ctx.command.params:
        if param.name in names and ctx.get_parameter_source(param.name).name in ("COMMANDLINE", "ENVIRONMENT"):
            raise InputError(f"{param.opts[0]} has no effect with {because}; drop one of them")


def check_seed(seed: int, option: str = "--seed") -> None:
    """A seed every generator takes (config.SEED_MAX): one line, not numpy's or torch's overflow traceback."""
    from steerstrength.config import SEED_MAX
    from steerstrength.errors import InputError

    if not 0 <= seed <= SEED_MAX:
        raise InputError(f"{option} must be in [0, {SEED_MAX}], not {seed}")


def load(spec: Optional[str], dtype: str = "float32", device: str = "auto", blocks_path: Optional[str] = None):
    from steerstrength.loading import load_model

    return load_model(spec, dtype=dtype, device=device, blocks_path=blocks_path)


def log(message: str) -> None:
    from rich.markup import escape

    console.print(escape(message), highlight=False, soft_wrap=True)
