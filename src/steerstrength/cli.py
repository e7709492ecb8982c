"""The `steerstrength` command line: parse, call the library, print. No logic lives here."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer
from rich.console import Console

from steerstrength.errors import SteerStrengthError

app = typer.Typer(
    help="Measure what the steering strength alpha does to a language model, and recommend one.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="Inspect models.", no_args_is_help=True)
app.add_typer(models_app, name="models")

console = Console(stderr=True)

ModelOpt = typer.Option(None, "--model", "-m", help="HF id, model directory, .gguf file or embedded name.")
DtypeOpt = typer.Option("float32", "--dtype", help="float32 (reference), bfloat16 or float16.")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps.")
BlocksPathOpt = typer.Option(None, "--blocks-path", help="Dotted path of the decoder blocks, for unknown architectures.")


@models_app.command("show")
def models_show(
    spec: Optional[str] = typer.Argument(None, help="Model spec; default: the embedded SmolLM2-135M-Instruct."),
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    blocks_path: Optional[str] = BlocksPathOpt,
) -> None:
    """Load a model and print its facts as JSON."""
    from steerstrength.models import load_model

    model = load_model(spec, dtype=dtype, device=device, blocks_path=blocks_path)
    print(json.dumps(model.describe(), indent=2))


@app.command("demo-generate")
def demo_generate(
    model_spec: Optional[str] = ModelOpt,
    prompt: str = typer.Option("Tell me about your weekend.", "--prompt"),
    concept: str = typer.Option("joy", "--concept"),
    alpha: float = typer.Option(8.0, "--alpha"),
    layer: Optional[int] = typer.Option(None, "--layer", help="Default: the middle layer."),
    max_new_tokens: int = typer.Option(40, "--max-new-tokens"),
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
) -> None:
    """Print an unsteered and a steered greedy generation side by side."""
    from steerstrength.demo import steered_vs_unsteered

    result = steered_vs_unsteered(
        model_spec, prompt=prompt, concept=concept, alpha=alpha, layer=layer,
        max_new_tokens=max_new_tokens, dtype=dtype, device=device,
    )
    out = Console()
    out.print(f"[bold]model[/] {result['model']}  [bold]concept[/] {concept}  "
              f"[bold]layer[/] {result['layer']}  [bold]alpha[/] {alpha}")
    out.print(f"[bold]prompt[/] {prompt}")
    out.print(f"[bold cyan]unsteered (alpha=0)[/] {result['unsteered']}")
    out.print(f"[bold magenta]steered (alpha={alpha:g})[/] {result['steered']}")


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2 (`--debug` shows the traceback)."""
    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")
    try:
        app()
    except SteerStrengthError as exc:
        if debug:
            raise
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
