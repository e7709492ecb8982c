"""`steerstrength recommend`: an alpha per prompt by one or more methods; table, curves, JSON, texts, figure."""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import typer

from steerstrength.cli.common import Steering, check_at_least, check_seed, console, load, log, progress_bar
from steerstrength.cli.options import (MODEL, STEERED, SWEEP, AlphaMaxOpt, CorpusOptions, AlphasOpt, GridOptions, ModelOptions,
                                       NAlphasOpt, PromptOptions, SectionOptions, SeedOpt, SteeredOptions, SweepRun,
                                       TextsOptions, grouped, option_group, prompts_group, section_group, texts_group)
from steerstrength.errors import InputError


def _grids(grid: GridOptions, generation_points: int):
    """(sweet-spot's grid, the generation methods' grid): --alphas for both (0 added), linspace(0, --alpha-max, n)
    (n: --n-alphas, else 41 and the preset's recommend.n_alphas), or (None, None): the grids scaled to the vector."""
    from steerstrength.grid import AlphaGrid, refuse_with_explicit
    from steerstrength.recommend import SWEEP_POINTS

    refuse_with_explicit(grid.alphas, **{"--alpha-max": grid.alpha_max, "--n-alphas": grid.n_alphas})
    if grid.alphas is not None:
        made = AlphaGrid.parse(grid.alphas)
        return made, made
    if grid.alpha_max is None:
        if grid.n_alphas is not None:
            raise InputError("--n-alphas needs --alpha-max (the default grid is scaled to the vector)")
        return None, None
    if not grid.alpha_max > 0 or (grid.n_alphas is not None and grid.n_alphas < 2):
        raise InputError("--alpha-max must be positive and --n-alphas at least 2")
    return (AlphaGrid.from_zero(grid.alpha_max, grid.n_alphas or SWEEP_POINTS),
            AlphaGrid.from_zero(grid.alpha_max, grid.n_alphas or generation_points))


COLUMNS = {  # per method: (title suffix, {column: header}) for each printed table
    "sweet-spot": [("", {"target_mass": "target mass", "kl": "next-token KL", "entropy": "entropy",
                         "status": "status"}),
                   (": Thm 3.3 in the loop (median bump peaks)",
                    {"off_target_peak_alpha": "off-target", "target_peak_alpha": "target",
                     "between_peaks": "between"})],
    "curvature": [("", {"kappa": "kappa", "measured": "measured", "quadratic_up_to": "quadratic up to",
                        "departs_at": "departs at"})],
    "iso-kl": [("", {"p95_kl": "p95 KL", "status": "status"})],
    "grid-judge": [("", {"concept_p": "concept p", "p95_kl": "p95 KL", "status": "status"})],
    "global": [("", {"concept_p": "concept p", "p95_kl": "p95 KL", "status": "status"})],
}


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.2e}" if 0 < abs(value) < 1e-2 else f"{value:.3g}"
    return str(value)


def _print(result) -> None:
    """Per vector and method (recommend.json's per_vector), its rows of recommend.parquet."""
    from rich.table import Table

    rows = result.tables()["recommend.parquet"]
    for summary in result.summary()["per_vector"].values():
        method, layer = summary["method"], summary["layer"]
        own = rows[(rows["method"] == method) & (rows["layer"] == layer)]
        for suffix, cols in COLUMNS[method]:
            title = (f"{method}: budget {summary['budget']:g} nats, layer {layer} "
                     f"({summary['seconds']:.1f} s)") if not suffix else method + suffix
            table = Table(title=title)
            table.add_column("prompt", no_wrap=True, max_width=30)
            for header in ["alpha"] + list(cols.values()):
                table.add_column(header, justify="left" if header == "status" else "right")
            for _, row in own.iterrows():
                table.add_row(str(row["prompt"]), f"{row['alpha']:.3g}", *[_cell(row[c]) for c in cols])
            console.print(table)
        theory = summary.get("theory")
        if theory and theory["fraction_between"] is not None:
            log(f"alpha between the off-target and target peaks on {theory['fraction_between']:.0%} of "
                f"{theory['n_prompts_known']} prompts; target tokens peak later on "
                f"{theory['fraction_target_peaks_later']:.0%}")
        acc = summary.get("judge_accuracy")
        if acc:
            log(f"judge {acc['judge']}: held-out P-vs-N accuracy {acc['accuracy']:.2f}")


@option_group
class SweetSpotOptions:
    """sweet-spot's own (recommend.sweet_spot_rule, recommend.n_target; the entropy floor is this command's)."""

    sweet_spot_rule: Optional[str] = typer.Option(None, "--sweet-spot-rule", help="sweet-spot: mass (the alpha of "
                                                  "most target-token mass within the budget) or between (Thm 3.3's "
                                                  "midpoint of the off-target and target peaks, within the budget); "
                                                  "default: the preset's.")
    n_target: Optional[int] = typer.Option(None, "--n-target", help="sweet-spot: target tokens = the N of largest "
                                           "log-odds; default: the preset's recommend.n_target.")
    entropy_floor: Optional[float] = typer.Option(None, "--entropy-floor", help="sweet-spot: also keep the next-token "
                                                  "entropy at or above this (nats).")


@option_group
class JudgeOptions:
    """grid-judge's and global's judge; not given: the preset's concept.judge and concept.judge_model."""

    judge: Optional[str] = typer.Option(None, "--judge", "-j", help="grid-judge / global: probe, llm, lexicon or "
                                        "embedding; default: the preset's concept.judge (probe).")
    judge_model: Optional[str] = typer.Option(None, "--judge-model",
                                              help="The llm judge's model; default: the steered one.")


# The generation methods' sizes and the budget: fields of config.RecommendConfig.
SIZES = section_group(
    "recommend",
    kl_budget=typer.Option(None, "--budget", help="Distortion budget, nats: next-token KL (sweet-spot), the "
                           "quadratic's KL or Delta CE (curvature), p95 per-token KL of generations (the others); "
                           "default: the preset's recommend.kl_budget."),
    completions=typer.Option(None, "--completions", help="Completions per prompt and alpha; default: the preset's."),
    max_new_tokens=typer.Option(None, "--max-new-tokens", help="default: the preset's."),
    curvature_scope=typer.Option(None, "--curvature-scope", help="curvature: prompt (an alpha per prompt from its "
                                 "next-token curvature) or corpus (one alpha from Delta CE's curvature on --corpus); "
                                 "default: the preset's."),
    refine_steps=typer.Option(None, "--refine-steps", help="Bisection steps toward the budget boundary (sweet-spot "
                              "and iso-kl); default: the preset's recommend.sweet_spot_refine_steps and "
                              "recommend.refine_steps."),
    batch_size=typer.Option(None, "--batch-size", help="Rows per generate call; default: the preset's."),
)


@grouped
def recommend(
    steered: SteeredOptions = STEERED.but(layers=None),
    layer: Optional[int] = typer.Option(None, "--layer", "-l", help="Layer to steer; default: the file's only layer."),
    method: List[str] = typer.Option(["sweet-spot"], "--method", help="sweet-spot, curvature, iso-kl, grid-judge, "
                                                                     "global, or all; repeat for several."),
    sizes: SectionOptions = SIZES,
    sweet_spot: SweetSpotOptions = SweetSpotOptions.group,
    corpus: CorpusOptions = CorpusOptions.group.only(
        corpus=typer.Option(None, "--corpus", help="curvature --curvature-scope corpus: wikipedia[:train|:test], model, "
                            "a file or hf:NAME, as `sweep xent`; default: the preset's xent.corpus.")),
    prompts: PromptOptions = prompts_group("Prompts (JSONL 'text' or one per line), used whole; default: the "
                                           "preset's recommend.n_prompts neutral evaluation prompts (training half), "
                                           "as `steerstrength run`.", "Use the first N prompts."),
    texts: TextsOptions = texts_group("P texts: log-odds targets (sweet-spot), judge calibration and accuracy."),
    judge: JudgeOptions = JudgeOptions.group,
    grid: GridOptions = GridOptions.group.but(
        alpha_min=None, alpha_unit=None,
        alpha_max=AlphaMaxOpt("Grid linspace(0, alpha_max); default: scaled to the vector (see docs)."),
        n_alphas=NAlphasOpt("Grid points with --alpha-max (default 41 for sweet-spot, the preset's recommend.n_alphas "
                            "for the others)."),
        alphas=AlphasOpt("Explicit alphas >= 0, comma-separated (0 is added).")),
    seed: int = SeedOpt(),
    run: SweepRun = SWEEP.but(controls=None),
    model: ModelOptions = MODEL,
) -> None:
    """Which alpha? One per prompt, with the curve it came from: recommend.parquet, _curve.parquet, .json, .png."""
    from steerstrength.config import CURVATURE_SCOPES, SWEET_SPOT_RULES
    from steerstrength.judges import check_judge_name
    from steerstrength.plots import plot_recommendations
    from steerstrength.recommend import check_methods, method_options
    from steerstrength.stages import judge_texts, recommend_stage

    check_at_least(("--n-prompts", prompts.n_prompts, 1), ("--completions", sizes.completions, 1),
                   ("--max-new-tokens", sizes.max_new_tokens, 1), ("--refine-steps", sizes.refine_steps, 0),
                   ("--batch-size", sizes.batch_size, 1), ("--n-target", sweet_spot.n_target, 1))
    check_seed(seed)
    if sizes.kl_budget is not None and not 0 < sizes.kl_budget < float("inf"):
        raise InputError(f"--budget must be a positive finite number of nats, not {sizes.kl_budget}")
    for option, value, allowed in (("--curvature-scope", sizes.curvature_scope, CURVATURE_SCOPES),
                                   ("--sweet-spot-rule", sweet_spot.sweet_spot_rule, SWEET_SPOT_RULES)):
        if value is not None and value not in allowed:
            raise InputError(f"{option} must be {' or '.join(allowed)}, not {value!r}")
    # One preset system: the run's recommend section, so `recommend` and `run` measure with the same sizes.
    cfg, section = sizes.of(run.preset, n_prompts=prompts.n_prompts, sweet_spot_refine_steps=sizes.refine_steps,
                            n_target=sweet_spot.n_target, sweet_spot_rule=sweet_spot.sweet_spot_rule)
    run.check_out(*(f"recommend{x}" for x in (".parquet", "_curve.parquet", ".json", ".png", "_generations.jsonl")))
    methods = check_methods(method, steered.positions)
    texts.given()
    judged = [m for m in methods if m in ("grid-judge", "global")]
    judge_name = judge.judge or cfg.concept.judge
    if judged:
        check_judge_name(judge_name)
    pos, neg = texts.read("text file", min_count=2)
    if "sweet-spot" in methods and pos is None:
        raise InputError("sweet-spot finds its target tokens by log-odds: give --positive and --negative texts")
    prompt_list = prompts.texts(section.n_prompts)
    sweep_grid, gen_grid = _grids(grid, section.n_alphas)
    if layer is not None and layer < 0:
        raise InputError(f"--layer must be a block index >= 0, not {layer}")
    st = Steering(model, dataclasses.replace(steered, layers=None if layer is None else str(layer)))
    if len(st.layers) != 1:
        raise InputError(f"{steered.vectors} has layers {st.layers}; pick one with --layer")
    concept_name = st.labels["concept"]
    judge_lm = None
    if judged:
        if not concept_name:
            raise InputError(f"{steered.vectors} names no concept; pass --concept (e.g. --concept joy)")
        if pos is None:  # the held-out curated pairs, as `sweep concept` measures its judge on
            pos, neg = judge_texts(concept_name)
        judge_model = judge.judge_model or cfg.concept.judge_model
        if judge_name == "llm":
            judge_lm = st.model if judge_model is None else load(judge_model, dtype=model.dtype, device=model.device)
    evaluation = None
    if "curvature" in methods and section.curvature_scope == "corpus":
        from steerstrength.stages import corpus_texts

        evaluation, _ = corpus_texts(st.model, cfg.xent, seed=seed, cache_dir=run.out, source=corpus.corpus)
    elif corpus.corpus is not None:
        raise InputError("--corpus feeds curvature with --curvature-scope corpus only; drop it or add those")
    with run.folder():
        options = method_options(["sweet-spot"], section, alphas=None if sweep_grid is None else sweep_grid.values,
                                 entropy_floor=sweet_spot.entropy_floor)
        options += method_options(["curvature", "iso-kl", "grid-judge", "global"], section, corpus=evaluation,
                                  alphas=None if gen_grid is None else gen_grid.values, judge=judge_name,
                                  judge_model=judge_lm)
        result = recommend_stage(st.model, list(st.vectors.values()), section, prompts=prompt_list,
                                 labels=st.labels, methods=methods, options=options, positive=pos, negative=neg,
                                 seed=seed, positions=steered.positions, chat=prompts.chat, progress=progress_bar)
        _print(result)
        header = st.header(run.start, metric="recommend", preset=run.preset, judge=judge_name if judged else None,
                           judge_model=judge_lm.name if judge_lm is not None else None)
        paths = run.write(result, header)
        tables = result.tables()
        paths.append(plot_recommendations(tables["recommend.parquet"], tables["recommend_curve.parquet"],
                                          run.out / "recommend.png"))
    log(f"wrote {', '.join(str(p) for p in paths)} ({run.seconds():.1f} s)")
