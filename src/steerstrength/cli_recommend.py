"""`steerstrength recommend`: an alpha per prompt by one or more methods; table, curves, JSON, texts, figure."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer

from steerstrength.cli_common import (BlocksPathOpt, DeviceOpt, DtypeOpt, ModelOpt, check_at_least, console, load, log,
                                      progress_bar)
from steerstrength.cli_sweeps import (
    ConceptOpt,
    NormalizeOpt,
    OutOpt,
    PositionsOpt,
    PromptChatOpt,
    SettingOpt,
    Steering,
    VectorsOpt,
    parse_alphas,
)
from steerstrength.errors import InputError


def _texts(path: Optional[Path], what: str, min_count: int = 1) -> Optional[list[str]]:
    from steerstrength.io import read_texts

    return [r["text"] for r in read_texts(path, min_count=min_count, what=what)] if path else None


def _grid(alphas: Optional[str], alpha_max: Optional[float], n_alphas: Optional[int], default_points: int):
    """The user's grid (0 added), or None for the default grid scaled to the vector."""
    import torch

    if alphas is not None:
        return parse_alphas(alphas)
    if alpha_max is None:
        if n_alphas is not None:
            raise InputError("--n-alphas needs --alpha-max (the default grid is scaled to the vector)")
        return None
    if not alpha_max > 0 or (n_alphas is not None and n_alphas < 2):
        raise InputError("--alpha-max must be positive and --n-alphas at least 2")
    return torch.linspace(0.0, alpha_max, n_alphas or default_points, dtype=torch.float64)


COLUMNS = {  # per method: (title suffix, {column: header}) for each printed table
    "sweet-spot": [("", {"target_mass": "target mass", "kl": "next-token KL", "entropy": "entropy",
                         "status": "status"}),
                   (": Thm 3.3 in the loop (median bump peaks)",
                    {"off_target_peak_alpha": "off-target", "target_peak_alpha": "target",
                     "between_peaks": "between"})],
    "iso-kl": [("", {"p95_kl": "p95 KL", "status": "status"})],
    "grid-judge": [("", {"concept_p": "concept p", "p95_kl": "p95 KL", "status": "status"})],
    "global": [("", {"concept_p": "concept p", "p95_kl": "p95 KL", "status": "status"})],
}


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.2e}" if 0 < abs(value) < 1e-2 else f"{value:.3g}"
    return str(value)


def _print(recs) -> None:
    from rich.table import Table

    for rec in recs:
        for suffix, cols in COLUMNS[rec.method]:
            title = (f"{rec.method}: budget {rec.summary['budget']:g} nats, layer {rec.summary['layer']} "
                     f"({rec.summary['seconds']:.1f} s)") if not suffix else rec.method + suffix
            table = Table(title=title)
            table.add_column("prompt", no_wrap=True, max_width=30)
            for header in ["alpha"] + list(cols.values()):
                table.add_column(header, justify="left" if header == "status" else "right")
            for _, row in rec.table.iterrows():
                table.add_row(str(row["prompt"]), f"{row['alpha']:.3g}", *[_cell(row[c]) for c in cols])
            console.print(table)
        theory = rec.summary.get("theory")
        if theory and theory["fraction_between"] is not None:
            log(f"alpha between the off-target and target peaks on {theory['fraction_between']:.0%} of "
                f"{theory['n_prompts_known']} prompts; target tokens peak later on "
                f"{theory['fraction_target_peaks_later']:.0%}")
        acc = rec.summary.get("judge_accuracy")
        if acc:
            log(f"judge {acc['judge']}: held-out P-vs-N accuracy {acc['accuracy']:.2f}")


def recommend(
    vectors: Path = VectorsOpt,
    layer: Optional[int] = typer.Option(None, "--layer", "-l", help="Layer to steer; default: the file's only layer."),
    method: List[str] = typer.Option(["sweet-spot"], "--method", help="sweet-spot, iso-kl, grid-judge, global, or "
                                                                     "all; repeat for several."),
    budget: float = typer.Option(1.0, "--budget", help="Distortion budget, nats: next-token KL (sweet-spot), p95 "
                                                       "per-token KL of generations (the others)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Prompts (JSONL 'text' or one per line); default: "
                                                                   "the 12 built-in prompts of `sweep concept`."),
    n_prompts: Optional[int] = typer.Option(None, "--n-prompts", help="Use the first N prompts."),
    positive: Optional[Path] = typer.Option(None, "--positive", "-p", help="P texts: log-odds targets (sweet-spot), "
                                                                          "judge calibration and accuracy."),
    negative: Optional[Path] = typer.Option(None, "--negative", "-n", help="N texts, same formats."),
    judge: str = typer.Option("lexicon", "--judge", "-j", help="grid-judge / global: probe, llm, lexicon or embedding."),
    judge_model: Optional[str] = typer.Option(None, "--judge-model",
                                              help="The llm judge's model; default: the steered one."),
    alpha_max: Optional[float] = typer.Option(None, "--alpha-max", help="Grid linspace(0, alpha_max); default: "
                                                                        "scaled to the vector (see docs)."),
    n_alphas: Optional[int] = typer.Option(None, "--n-alphas", help="Grid points with --alpha-max (default 41 for "
                                                                    "sweet-spot, 6 for the others)."),
    alphas: Optional[str] = typer.Option(None, "--alphas", help="Explicit alphas >= 0, comma-separated (0 is added)."),
    n_target: int = typer.Option(100, "--n-target", help="sweet-spot: target tokens = the N of largest log-odds."),
    entropy_floor: Optional[float] = typer.Option(None, "--entropy-floor", help="sweet-spot: also keep the next-token "
                                                                                "entropy at or above this (nats)."),
    completions: int = typer.Option(4, "--completions", help="Completions per prompt and alpha."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens"),
    refine_steps: int = typer.Option(2, "--refine-steps", help="Bisection steps toward the budget boundary."),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(64, "--batch-size", help="Rows per generate call."),
    chat: Optional[bool] = PromptChatOpt,
    positions: str = PositionsOpt,
    normalize: bool = NormalizeOpt,
    concept: Optional[str] = ConceptOpt,
    setting: Optional[str] = SettingOpt,
    out: Path = OutOpt,
    model: Optional[str] = ModelOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    blocks_path: Optional[str] = BlocksPathOpt,
) -> None:
    """Which alpha? One per prompt, with the curve it came from: recommend.parquet, _curve.parquet, .json, .png."""
    from steerstrength.judges import check_judge_name, make_judge
    from steerstrength.metrics.concept import DEFAULT_PROMPTS
    from steerstrength.recommend import (
        GRID_POINTS,
        METHODS,
        SWEEP_POINTS,
        recommend_alpha,
        save_recommendations,
    )

    from steerstrength.io import check_output_dir

    start = time.perf_counter()
    check_at_least(("--n-prompts", n_prompts, 1), ("--completions", completions, 1), ("--max-new-tokens", max_new_tokens, 1),
                   ("--refine-steps", refine_steps, 0), ("--batch-size", batch_size, 1), ("--n-target", n_target, 1))
    if not 0 < budget < float("inf"):
        raise InputError(f"--budget must be a positive finite number of nats, not {budget}")
    check_output_dir(out, names=tuple(f"recommend{x}" for x in (".parquet", "_curve.parquet", ".json", ".png",
                                                                 "_generations.jsonl")))
    methods = list(METHODS) if "all" in method else list(dict.fromkeys(method))
    for m in methods:
        if m not in METHODS:
            raise InputError(f"unknown method {m!r}; pick from {', '.join(METHODS)} or all")
    if (positive is None) != (negative is None):
        raise InputError("give both --positive and --negative (P and N texts), or neither")
    judged = [m for m in methods if m in ("grid-judge", "global")]
    if judged:
        check_judge_name(judge)
    pos = _texts(positive, "positive text file", 2)
    neg = _texts(negative, "negative text file", 2)
    if "sweet-spot" in methods and pos is None:
        raise InputError("sweet-spot finds its target tokens by log-odds: give --positive and --negative texts")
    prompt_list = (_texts(prompts, "prompt file") or list(DEFAULT_PROMPTS))[:n_prompts]
    if not prompt_list:
        raise InputError("no prompts: --n-prompts must be at least 1")
    sweep_grid = _grid(alphas, alpha_max, n_alphas, SWEEP_POINTS)
    gen_grid = _grid(alphas, alpha_max, n_alphas, GRID_POINTS)
    if layer is not None and layer < 0:
        raise InputError(f"--layer must be a block index >= 0, not {layer}")
    st = Steering(model, dtype, device, blocks_path, vectors, None if layer is None else str(layer), concept, setting,
                  normalize, positions)
    if len(st.layers) != 1:
        raise InputError(f"{vectors} has layers {st.layers}; pick one with --layer")
    lay = st.layers[0]
    concept_name = st.labels["concept"]
    base = dict(budget=budget, concept=concept_name, setting=st.labels["setting"], positive=pos, negative=neg,
                seed=seed, chat=chat, positions=positions, refine_steps=refine_steps, n_completions=completions,
                max_new_tokens=max_new_tokens, batch_size=batch_size)
    judge_obj = None
    if judged:
        if not concept_name:
            raise InputError(f"{vectors} names no concept; pass --concept (e.g. --concept joy)")
        judge_lm = None
        if judge == "llm":
            judge_lm = st.model if judge_model is None else load(judge_model, dtype=dtype, device=device)
        judge_obj = make_judge(judge, model=judge_lm)
    recs, shared, accuracy = [], None, None
    if "sweet-spot" in methods:
        with progress_bar("sweet spot: one sweep per prompt", len(prompt_list)) as advance:
            recs.append(recommend_alpha(st.model, st.vectors[lay], lay, prompt_list, method="sweet-spot",
                                        alphas=sweep_grid, progress=advance, **base))
    # The judged methods first: their grid of judged generations then serves the others (iso-kl reads its KL).
    for m in judged + [m for m in methods if m == "iso-kl"]:
        n_grid = GRID_POINTS if gen_grid is None else len({float(a) for a in gen_grid} | {0.0})
        steps = (n_grid if shared is None else 0) + (refine_steps if m == "iso-kl" else 0)
        total = len(prompt_list) * completions * steps
        with progress_bar(f"{m}: steered generations and their KL", max(total, 1)) as advance:
            rec = recommend_alpha(st.model, st.vectors[lay], lay, prompt_list, method=m, alphas=gen_grid,
                                  judge=judge_obj, generations=shared, progress=advance, **base)
        if shared is None:
            shared, accuracy = rec.generations, rec.summary.get("judge_accuracy")
        elif accuracy is not None:
            rec.summary["judge_accuracy"] = accuracy
        recs.append(rec)
    recs.sort(key=lambda r: METHODS.index(r.method))
    _print(recs)
    paths = save_recommendations(recs, out)
    log(f"wrote {', '.join(str(p) for p in paths.values())} ({time.perf_counter() - start:.1f} s)")
