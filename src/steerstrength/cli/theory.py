"""`steerstrength theory ...`: train the UFM world, check every claim, draw the paper's figures."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Optional

import typer

from steerstrength.cli.options import Group, SeedOpt, grouped
from steerstrength.theory.verify import TheoryConfig

app = typer.Typer(
    help="The UFM world of Sec. 2-3 and App. B: train, steer, check every claim, draw the figures (no LLM).",
    no_args_is_help=True,
)

_DEFAULT = TheoryConfig()
# One UFM world: the options are TheoryConfig's fields (its defaults are theirs); the command gets a TheoryConfig.
WORLD = Group(TheoryConfig, dict(
    family=typer.Option(_DEFAULT.family, "--family", help="b1 (App. B.1), b3 (App. B.3, random weights) or context "
                        "(a_z depends on the context, App. B.1)."),
    groups=typer.Option(_DEFAULT.groups, "--groups", help="G, the number of concepts."),
    size=typer.Option(_DEFAULT.size, "--size", help="s, tokens per concept (V = G*s)."),
    context_length=typer.Option(_DEFAULT.context_length, "--context-length", help="T: contexts hold T-1 tokens of one "
                                "concept."),
    eps=typer.Option(_DEFAULT.eps, "--eps", help="Smoothing eps in (0, (G-1)/G)."),
    d=typer.Option(None, "--d", help="Embedding dimension d; default rank(log p), just large enough to fit the data."),
    negatives=typer.Option(_DEFAULT.negatives, "--negatives", help="random (any contexts outside the target) or "
                           "contrastive (one opposite concept)."),
    q=typer.Option(_DEFAULT.q, "--q", help="|P| = |N| = q contexts for the steering vector."),
    target=typer.Option(_DEFAULT.target, "--target", help="Index of the target concept T."),
    seed=SeedOpt("Seed for weights, P and N, and the UFM initialisation.", default=_DEFAULT.seed),
    alpha_max=typer.Option(_DEFAULT.alpha_max, "--alpha-max", help="The alpha grid spans [-alpha_max, alpha_max]."),
    alpha_points=typer.Option(_DEFAULT.alpha_points, "--alpha-points", help="Grid points (odd, so alpha = 0 is on "
                              "it)."),
    steps=typer.Option(_DEFAULT.steps, "--steps", help="Adam steps (full batch)."),
    lr=typer.Option(_DEFAULT.lr, "--lr", help="Adam step size (cosine-decayed to 0)."),
))
QuietOpt = typer.Option(False, "--quiet", help="No progress bar.")


def _trained(config: TheoryConfig, quiet: bool, check: bool = True):
    """verify() (or only build_world() when not checking), with a training progress bar.

    The bar opens at the first training step, so a bad setting (checked while the world is built) is one error
    line with no bar before it."""
    import contextlib

    from steerstrength.cli.common import progress_bar, state
    from steerstrength.theory.verify import build_world, verify

    with contextlib.ExitStack() as stack:
        bar = {"advance": None, "done": 0}

        def progress(step: int, loss: float) -> None:
            """Advance the bar to `step` (opening it at the first report)."""
            if bar["advance"] is None:
                bar["advance"] = stack.enter_context(progress_bar("training UFM", total=config.steps,
                                                                  quiet=quiet or state["quiet"]))
            bar["advance"](step - bar["done"])
            bar["done"] = step

        return verify(config, progress=progress) if check else build_world(config, progress=progress)


def _format_value(check) -> str:
    """'err 1.2e-15', 'margin 3.64', 'margin +inf' or '-'."""
    if check.value is None:
        return "-"
    word = "err" if check.kind == "error" else "margin"
    if check.value in (float("inf"), float("-inf")):
        return f"{word} {'+' if check.value > 0 else '-'}inf"
    return f"{word} {check.value:.3g}"


def format_table(result) -> str:
    """The verify table as plain text: claim, reference, side, result, measured, tolerance, note."""
    header = ("claim", "ref", "side", "result", "measured", "tol", "note")
    rows = [header]
    for c in result.checks:
        tol = "-" if c.tolerance is None else f"{c.tolerance:.0e}" if c.tolerance < 1e-2 else f"{c.tolerance:.3g}"
        rows.append((c.claim, c.reference, c.side, c.status.upper(), _format_value(c), tol, c.note))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = []
    for n, r in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[-1])
        if n == 0:
            lines.append("-" * (sum(widths) + 2 * len(widths) + 4))
    return "\n".join(line.rstrip() for line in lines)


@app.command("verify")
@grouped
def verify_cmd(
    world: TheoryConfig = WORLD,
    all_contexts: bool = typer.Option(False, "--all-contexts", help="Check (and write) every context, not one per role and concept."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write config, curves and checks here (atomically)."),
    quiet: bool = QuietOpt,
) -> None:
    """Train a UFM, steer it, check every claim against the closed forms; exit 1 if any fails."""
    from steerstrength.io import check_output_file
    from steerstrength.theory.verify import write_verification_json

    if json_path is not None:
        check_output_file(json_path, option="--json", example="verify.json")
    config = dataclasses.replace(world, all_contexts=all_contexts)
    result = _trained(config, quiet)
    w = result.world
    print(f"UFM world: family={config.family} V={config.vocab_size} G={config.groups} s={config.size} "
          f"T={config.context_length} eps={config.eps:g} d={w.ufm.d} m={w.dataset.m} negatives={config.negatives} "
          f"q={config.q} target={config.target} seed={config.seed}")
    print(f"P={w.P.tolist()} N={w.N.tolist()} checked contexts={w.checked.tolist()}")
    print(f"dataset entropy {w.entropy:.6f}   final CE {w.ufm.final_loss:.6f}   "
          f"training {w.ufm.seconds:.2f} s ({config.steps} steps)   total {result.seconds:.2f} s")
    print(format_table(result))
    counts = {s: sum(c.status == s for c in result.checks) for s in ("pass", "fail", "skip")}
    print(f"{counts['pass']} pass, {counts['fail']} fail, {counts['skip']} skip")
    if json_path is not None:
        write_verification_json(result, json_path)
        print(f"wrote {json_path}", file=sys.stderr)
    raise typer.Exit(0 if result.passed else 1)


@app.command("figures")
@grouped
def figures_cmd(
    out: Path = typer.Option(..., "--out", help="Directory for the PNG and PDF files."),
    world: TheoryConfig = WORLD.but(family=typer.Option("b3", "--family", help="b3 by default: random weights give "
                                                                                "the target bumps of Fig. 3.")),
    context: Optional[int] = typer.Option(None, "--context", help="Context index j for Fig. 3, B.1 and 4; default: one outside T."),
    quiet: bool = QuietOpt,
) -> None:
    """Draw Fig. 2, 3, B.1, 4 and 5 from a trained UFM (PNG and PDF)."""
    from steerstrength.io import check_output_dir
    from steerstrength.theory.figures import make_figures

    check_output_dir(out)
    trained = _trained(world, quiet, check=False)
    for path in make_figures(trained, out, context=context):
        print(path)
