"""`steerstrength generate` and `steerstrength serve`: use an answer (steered text at chosen strengths; a live page)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from steerstrength.cli.common import check_at_least, log
from steerstrength.cli.options import (MODEL, AlphaUnitOpt, LayerOpt, MethodOpt, ModelOptions, PromptChatOpt,
                                       RecommendedOpt, SeedOpt, VectorsOpt, grouped, option_group)
from steerstrength.cli.vectors import load_with_strength
from steerstrength.config import USE
from steerstrength.errors import InputError


def pick_layer(sv, layer: Optional[int]) -> int:
    if layer is None:
        if len(sv.layers) != 1:
            raise InputError(f"the vector file has layers {', '.join(map(str, sv.layers))}; pick one with --layer")
        return sv.layers[0]
    sv[layer]  # one line naming the file's layers when it lacks this one
    return layer


def strengths(sv, layer: int, alpha: Optional[str], unit: str, method: Optional[str]) -> tuple[list[float], str,
                                                                                                list[str]]:
    """(alphas, their unit, a label per alpha): --alpha in --alpha-unit, else 0 and --recommended's alphas (raw)."""
    from steerstrength.grid import parse_alphas

    if alpha is not None:
        try:
            values = [float(x) for x in parse_alphas(alpha)]
        except InputError as exc:
            raise InputError(str(exc).replace("--alphas", "--alpha")) from None
        return values, unit, ["" for _ in values]
    from steerstrength.strength import recommended_strengths

    alphas, labels = recommended_strengths(sv.meta.get("strength"), layer, method)
    return alphas, "raw", labels


@option_group
class SamplingOptions:
    """How `generate` samples; not given: config.USE's."""

    completions: Optional[int] = typer.Option(None, "--n", help="Completions per prompt and alpha (default 1).")
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="default 48.")
    temperature: Optional[float] = typer.Option(None, "--temperature", help="default 1.0.")
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling mass (default 0.9; 1 = off).")
    seed: Optional[int] = SeedOpt("Base seed; the same for every alpha (default 0).", default=None)

    def settings(self):
        """metrics.concept.SamplingSettings, checked (one line for a bad value)."""
        from steerstrength.metrics.concept import SamplingSettings
        from steerstrength.prompts import check_sampling

        check_at_least(("--n", self.completions, 1), ("--max-new-tokens", self.max_new_tokens, 1))
        settings = SamplingSettings(max_new_tokens=self.max_new_tokens or USE.max_new_tokens,
                                    temperature=USE.temperature if self.temperature is None else self.temperature,
                                    top_p=USE.top_p if self.top_p is None else self.top_p, top_k=USE.top_k)
        check_sampling(1, settings.max_new_tokens, settings.temperature, settings.top_p, settings.top_k, 1)
        return settings


@grouped
def generate(
    prompts: List[str] = typer.Argument(..., help="One or more prompts (the chat template wraps them when the model "
                                        "has one)."),
    vectors: Path = VectorsOpt,
    layer: Optional[int] = LayerOpt,
    alpha: Optional[str] = typer.Option(None, "--alpha", "-a", help="Strengths, comma-separated, e.g. 0,0.25,0.5,1 "
                                        "(in --alpha-unit); default with --recommended: 0 and each method's alpha."),
    alpha_unit: Optional[str] = AlphaUnitOpt(),
    recommended: Optional[Path] = RecommendedOpt,
    method: Optional[str] = MethodOpt,
    sampling: SamplingOptions = SamplingOptions.group,
    chat: Optional[bool] = PromptChatOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON (one object per line) for scripts."),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="With one alpha and --n 1: print tokens as they "
                                "come."),
    model: ModelOptions = MODEL,
) -> None:
    """Steered completions side by side, one column per alpha, each with its per-token KL to the unsteered model and
    the degeneration flag; all alphas in one batched generation, seeded."""
    import dataclasses

    from steerstrength.grid import check_unit
    from steerstrength.use import generate_completions

    unit = check_unit(alpha_unit or USE.alpha_unit)
    if alpha_unit is not None and alpha is None:
        raise InputError("--alpha-unit says the unit of --alpha; the recommended alphas are the run's own (raw)")
    settings = sampling.settings()
    if any(not p.strip() for p in prompts):
        raise InputError("a prompt is empty; give non-empty prompts")
    if method is not None and recommended is None:
        raise InputError("--method picks among --recommended's alphas; give --recommended RUN too")
    sv = load_with_strength(vectors, recommended)
    layer = pick_layer(sv, layer)
    alphas, unit, labels = strengths(sv, layer, alpha, unit, method)
    lm = model.load()
    sv.check(lm)
    fp = sv.meta.get("model_fingerprint")
    if fp and fp != lm.fingerprint():
        log(f"warning: {vectors} was made with model {sv.meta.get('model')!r} (fingerprint {fp}), not {lm.name}")
    vec = sv.select([layer], lm)[0]
    settings = dataclasses.replace(settings, chat=lm.has_chat_template if chat is None else chat)
    n = USE.completions if sampling.completions is None else sampling.completions
    if stream and not as_json and len(alphas) == 1 and n == 1:
        return _stream(lm, vec, prompts, alphas[0], unit, settings, sampling.seed)
    frame = generate_completions(lm, vec, prompts, alphas, unit=unit, completions=n, settings=settings,
                                 seed=sampling.seed)
    if as_json:
        for row in frame.to_dict(orient="records"):
            print(json.dumps(row, default=float))
        return
    _table(frame, alphas, unit, labels, vec)


def _stream(lm, vec, prompts, alpha, unit, settings, seed) -> None:
    """One alpha: each prompt's completion printed token by token, then its KL and degeneration line."""
    from rich.markup import escape
    from transformers import TextStreamer

    from steerstrength.cli.common import console
    from steerstrength.use import generate_completions

    for prompt in prompts:
        print(f"\n>>> {prompt}  [layer {vec.layer}, alpha {alpha:g} {unit}]", flush=True)
        streamer = TextStreamer(lm.tokenizer, skip_prompt=True, skip_special_tokens=True)
        row = generate_completions(lm, vec, [prompt], [alpha], unit=unit, completions=1, settings=settings, seed=seed,
                                   streamer=streamer).iloc[0]
        console.print(escape(f"KL {row.kl_mean:.3g} nats/token (max {row.kl_max:.3g})"
                             + (", degenerate" if row.degenerate else "")), highlight=False)


def _table(frame, alphas, unit, labels, vec) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"steered completions ({vec.meta.get('concept') or 'vector'}, layer {vec.layer})",
                  show_lines=True)
    table.add_column("prompt", max_width=28, overflow="fold")
    keys = sorted(frame["alpha"].unique().tolist(), key=lambda a: frame.index[frame["alpha"] == a][0])
    for a, given, label in zip(keys, alphas, labels):
        sub = frame[frame["alpha"] == a].iloc[0]
        resid = "" if sub["alpha_resid"] is None else f"α_resid {sub['alpha_resid']:.3g}"
        head = f"α = {given:g} ({unit})" if unit != "raw" else f"α = {given:.4g}"
        table.add_column("\n".join(x for x in (label, head, resid if unit == "raw" else f"raw {a:.4g}") if x),
                         ratio=1, overflow="fold")
    for (pi, c), group in frame.groupby(["prompt_index", "completion_index"], sort=True):
        cells = [group["prompt"].iloc[0] + (f" #{c + 1}" if frame["completion_index"].max() > 0 else "")]
        for a in keys:
            r = group[group["alpha"] == a].iloc[0]
            flag = " · [bold red]degenerate[/]" if r["degenerate"] else ""
            from rich.markup import escape

            cells.append(f"{escape(r['completion'])}\n[dim]KL {r['kl_mean']:.3g} nats/token[/]{flag}")
        table.add_row(*cells)
    Console().print(table)


@grouped
def serve(
    run: Optional[Path] = typer.Argument(None, help="A run directory: its vectors, model, recommended alphas, fluent "
                                         "ranges and concept curves."),
    vectors: Optional[List[Path]] = typer.Option(None, "--vectors", "-v", help="Vector file(s) to serve (instead of "
                                                 "or besides a run's)."),
    recommended: Optional[Path] = RecommendedOpt,
    port: Optional[int] = typer.Option(None, "--port", help="Port on 127.0.0.1 (default 8765); the page is never "
                                       "served on another interface."),
    model: ModelOptions = MODEL,
) -> None:
    """A local page to steer live: pick a vector, type a prompt, move alpha (residual units) and watch the next-token
    distribution and sampled completions change."""
    import dataclasses

    from steerstrength.serve import serve as run_server
    from steerstrength.serve import steerable

    if port is not None and not 1 <= port <= 65535:
        raise InputError(f"--port must be in 1..65535, not {port}")
    files = list(vectors or [])
    spec = model.model
    if run is not None:
        if not run.is_dir():
            raise InputError(f"run directory {run} does not exist; give a run made by `steerstrength run`, or -v FILE")
        found = sorted((run / "vectors").glob("*.safetensors")) if (run / "vectors").is_dir() else []
        if not found and not files:
            raise InputError(f"{run} has no vectors/*.safetensors; finish its vectors stage or give -v FILE")
        files = found + files
        if spec is None and (run / "config.toml").is_file():
            from steerstrength.config import build_config

            spec = build_config("demo", str(run / "config.toml")).model.spec
    if not files:
        raise InputError("give a run directory or a vector file (-v FILE)")
    lm = dataclasses.replace(model, model=spec).load()
    s = steerable(lm, files, run, recommended)
    run_server(s, port, print_fn=log)
