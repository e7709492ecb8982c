"""`steerstrength sweep tokens | logodds | limit | xent`: parse options (defaults: the preset's config section), call
the stage (stages.py) the run calls too, write its tables (runs.write_result)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from steerstrength.cli.common import Steering, check_at_least, check_seed, command_grid, done, grid_size, log, \
    progress_bar, sweep_command
from steerstrength.cli.options import (CONTEXTS, MODEL, STEERED, SWEEP, AlphasOpt, ContextOptions, CorpusOptions,
                                       GridOptions, ModelOptions, NAlphasOpt, SectionOptions, SteeredOptions,
                                       SweepRun, TextsOptions, grid_group, preset_section, read_texts,
                                       section_group, texts_group)
from steerstrength.errors import InputError
from steerstrength.stages import check_token_memory

TOKENS = section_group(
    "tokens",
    top_k=typer.Option(None, "--top-k", help="Tokens stored at alpha_max and at alpha_min."),
    top_each=typer.Option(None, "--top-each", help="Also store the top N tokens at every alpha (0: off)."),
    certify=typer.Option(None, "--certify/--no-certify", help="bfloat16 / float16: re-run the tracked tokens in "
                         "float32 at 11 alphas of the grid and 0, and report max |p - p_float32| (p_error_bound); "
                         "default: the preset's tokens.certify (on)."),
)
LOGODDS = section_group(
    "logodds",
    max_tokens=typer.Option(None, "--max-tokens", help="Each P/N text is cut to its first N tokens."),
    batch_size=typer.Option(None, "--batch-size"),
    n_dominant=typer.Option(None, "--n-dominant", help="Top tokens at alpha_max / alpha_min that 'dominate'."),
    extremal_fraction=typer.Option(None, "--extremal-fraction", help="Extremal M: top / bottom fraction of the "
                                                                     "vocabulary."),
    n_target=typer.Option(None, "--n-target", help="Target tokens: the n tokens of largest M."),
)


@sweep_command("tokens")
def sweep_tokens(
    steered: SteeredOptions = STEERED,
    context: ContextOptions = CONTEXTS,
    grid: GridOptions = grid_group("tokens"),
    tokens: SectionOptions = TOKENS,
    run: SweepRun = SWEEP,
    model: ModelOptions = MODEL,
) -> None:
    """Next-token curves Delta p(z, alpha) (Def. 3.1), peaks and shapes (Thm 3.3): tokens.parquet, tokens_top.parquet."""
    from steerstrength.grid import check_unit
    from steerstrength.stages import tokens_stage

    check_at_least(("--n-alphas", grid.n_alphas, 1), ("--top-k", tokens.top_k, 1), ("--top-each", tokens.top_each, 0),
                   ("--n-contexts", context.n_contexts, 1))
    run.check_out("tokens.parquet", "tokens_top.parquet", "tokens.json")
    cfg, section = tokens.of(run.preset, n_alphas=grid.n_alphas, n_contexts=context.n_contexts)
    unit = check_unit(grid.alpha_unit or cfg.alpha_unit)
    st = Steering(model, steered, unit)
    ctxs = st.contexts(context, section.n_contexts)
    check_token_memory(grid_size(grid, section.n_alphas), "--alphas" if grid.alphas is not None else "--n-alphas",
                       st.model.vocab_size, len(ctxs), len(st.layers), section.top_k)
    alphas = command_grid(grid, section=section, cfg=cfg, unit=unit)
    with run.folder():
        result = tokens_stage(st.model, st.steered(cfg, run.controls), section, contexts=ctxs, labels=st.labels,
                              positions=steered.positions, grid=alphas, chat=context.chat, progress=progress_bar)
        paths = run.write(result, st.header(run.start, preset=run.preset))
    bound = (result.summary()["p_error_bound"].get(st.labels["concept"]) or {}).get("max")
    done(paths, run, f"{len(ctxs)} contexts x {len(st.layers)} layer(s) x {len(alphas)} alphas"
         + (f"; |p - p_float32| <= {bound:.2g} at the checked alphas" if bound is not None else ""))


@sweep_command("logodds")
def sweep_logodds(
    texts: TextsOptions = texts_group("P: JSONL with a 'text' field, or one text per line.", "N: same formats.",
                                      required=True),
    tokens_dir: Optional[Path] = typer.Option(None, "--tokens-dir", help="Reuse tokens.parquet / tokens_top.parquet of "
                                                                         "`sweep tokens` from this directory."),
    steered: SteeredOptions = STEERED.but(vectors=typer.Option(None, "--vectors", "-v", help="Without --tokens-dir: "
                                                                "vectors for the token sweep.")),
    context: ContextOptions = CONTEXTS,
    grid: GridOptions = grid_group("tokens").but(n_alphas=NAlphasOpt("linspace points (0 is added).")),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    logodds: SectionOptions = LOGODDS,
    heldout_positive: Optional[Path] = typer.Option(None, "--heldout-positive", help="P texts the vector was not "
                                                    "built from (with --heldout-negative): their M is the table's "
                                                    "M_heldout, which the concept-specific verdicts read."),
    heldout_negative: Optional[Path] = typer.Option(None, "--heldout-negative", help="N texts the vector was not "
                                                    "built from."),
    run: SweepRun = SWEEP.but(controls=None),
    model: ModelOptions = MODEL,
) -> None:
    """Log-odds M(z) (Def. 3.2) from P and N, and the theory-vs-practice analysis: logodds.parquet, logodds.json."""
    import pandas as pd

    from steerstrength.grid import check_unit
    from steerstrength.runs import check_result_set
    from steerstrength.stages import log_probs_after, logodds_stage, row_labels, target_tokens, tokens_stage

    check_at_least(("--n-alphas", grid.n_alphas, 1), ("--top-k", top_k, 1), ("--max-tokens", logodds.max_tokens, 1),
                   ("--batch-size", logodds.batch_size, 1), ("--n-dominant", logodds.n_dominant, 1),
                   ("--n-target", logodds.n_target, 1), ("--n-contexts", context.n_contexts, 1))
    run.check_out("logodds.parquet", "logodds.json",
                  *(("tokens.parquet", "tokens_top.parquet", "tokens.json") if tokens_dir is None else ()))
    cfg, section = logodds.of(run.preset)
    if not 0 < section.extremal_fraction <= 1:
        raise InputError(f"--extremal-fraction must be in (0, 1], not {section.extremal_fraction}")
    pos, neg = texts.read("prompt file")
    if tokens_dir is None and steered.vectors is None:
        raise InputError("give --tokens-dir (output of `sweep tokens`) or --vectors to run the token sweep here")
    if tokens_dir is not None:  # the set one `sweep tokens` finished, never a mix of two or a killed one's
        check_result_set(tokens_dir, "tokens", ("tokens.parquet", "tokens_top.parquet"),
                         f"steerstrength sweep tokens --out {tokens_dir}")
    if steered.vectors is not None:
        _, tokens_section = preset_section(run.preset, "tokens", n_alphas=grid.n_alphas, top_k=top_k,
                                           n_contexts=context.n_contexts)
        unit = check_unit(grid.alpha_unit or cfg.alpha_unit)
        st = Steering(model, steered, unit)
        lm, labels, header = st.model, dict(st.labels), st.header(preset=run.preset)
        if tokens_dir is None:  # the token sweep runs here: refuse one that cannot fit before computing log p
            ctxs = st.contexts(context, tokens_section.n_contexts)
            check_token_memory(grid_size(grid, tokens_section.n_alphas),
                               "--alphas" if grid.alphas is not None else "--n-alphas", lm.vocab_size, len(ctxs),
                               len(st.layers), tokens_section.top_k)
            alphas = command_grid(grid, section=tokens_section, cfg=cfg, unit=unit)
    else:
        lm = model.load()
        labels = row_labels(lm.name, steered.concept or "", steered.setting or "", steered.positions)
        header = dict(labels, model_fingerprint=lm.fingerprint(), preset=run.preset)
    with run.folder():
        log_probs = log_probs_after(lm, pos, neg, section, concept=labels["concept"], progress=progress_bar)
        tables = {}
        if tokens_dir is not None:
            import pyarrow.parquet as pq

            # a run's tables hold the random directions too (`direction`): M is analysed against v's curves
            v_only = [("direction", "==", "v")] if "direction" in pq.read_schema(tokens_dir / "tokens_top.parquet").names \
                else None
            top = pd.read_parquet(tokens_dir / "tokens_top.parquet", filters=v_only)
            curves = pd.read_parquet(tokens_dir / "tokens.parquet",
                                     columns=["layer", "context_id", "token_id", "peak_alpha", "shape"], filters=v_only)
            for key in ("concept", "setting"):
                if not labels.get(key) and key in top.columns and top[key].nunique() == 1:
                    labels[key] = header[key] = str(top[key].iloc[0])
        else:
            M = log_probs[0] - log_probs[1]
            swept = tokens_stage(lm, list(st.vectors.values()), tokens_section, contexts=ctxs, labels=st.labels,
                                 positions=steered.positions, grid=alphas, tokens=target_tokens(M, section.n_target),
                                 chat=context.chat, progress=progress_bar)
            tables = swept.tables()
            top, curves = tables["tokens_top.parquet"], tables["tokens.parquet"]
            run.write(swept, st.header(preset=run.preset))
        if (heldout_positive is None) != (heldout_negative is None):
            raise InputError("give both --heldout-positive and --heldout-negative, or neither")
        heldout = None if heldout_positive is None else (
            read_texts(heldout_positive, "held-out positive file", 2),
            read_texts(heldout_negative, "held-out negative file", 2))
        result = logodds_stage(lm, pos, neg, section, tokens_top=top, curves=curves, labels=labels, log_probs=log_probs,
                               heldout=heldout)
        frame = result.tables()["logodds.parquet"]
        extra = dict(header, n_positive=len(pos), n_negative=len(neg), max_tokens=section.max_tokens,
                     tokens_from=str(tokens_dir) if tokens_dir is not None else "computed here",
                     top_M_tokens=frame.nsmallest(20, "rank")["token"].tolist(),
                     bottom_M_tokens=frame.nlargest(20, "rank")["token"].tolist(),
                     seconds=round(run.seconds(), 2))
        paths = run.write(result, extra)
    done(paths, run)


@sweep_command("limit")
def sweep_limit(
    steered: SteeredOptions = STEERED,
    context: ContextOptions = CONTEXTS,
    grid: GridOptions = GridOptions.group.but(
        alpha_min=None, alpha_max=None, n_alphas=None,
        alphas=AlphasOpt("Nonzero alphas, comma-separated; default: +/- each of the preset's limit.alphas.")),
    run: SweepRun = SWEEP,
    model: ModelOptions = MODEL,
) -> None:
    """Large-alpha limit (Prop. 4.1): TV(p_alpha, softmax(LN(+/-v) W^T)) per context and alpha: limit.parquet."""
    from steerstrength.grid import AlphaGrid, check_unit
    from steerstrength.stages import limit_stage

    check_at_least(("--n-contexts", context.n_contexts, 1))
    run.check_out("limit.parquet", "limit.json")
    cfg, section = preset_section(run.preset, "limit")
    unit = check_unit(grid.alpha_unit or cfg.alpha_unit)
    if grid.alphas is None and unit != cfg.alpha_unit:
        raise InputError(f"the preset's limit.alphas are in {cfg.alpha_unit} units; with --alpha-unit {unit} give "
                         "--alphas")
    alphas = AlphaGrid.parse(grid.alphas, unit=unit, zero=False) if grid.alphas is not None else \
        AlphaGrid.both_signs(section.alphas, unit=unit)
    st = Steering(model, steered, unit)
    ctxs = st.contexts(context)
    with run.folder():
        result = limit_stage(st.model, st.steered(cfg, run.controls), section, contexts=ctxs, labels=st.labels,
                             positions=steered.positions, grid=alphas, chat=context.chat, progress=progress_bar)
        paths = run.write(result, st.header(run.start, preset=run.preset))
    for key, s in result.summary().items():
        tv = ", ".join(f"{r['alpha']:g}: {r['tv_mean']:.3g}" for r in s["per_alpha"])
        log(f"{key}: mean TV to the limit by alpha: {tv}")
    done(paths, run)


XENT = section_group(
    "xent",
    seq_len=typer.Option(None, "--seq-len", help="Scored tokens per window (windows have seq_len + 1 tokens); "
                         "default: the preset's."),
    n_tokens=typer.Option(None, "--max-tokens", help="Score at most this many tokens; default: the preset's "
                          "xent.n_tokens."),
    spacing=typer.Option(None, "--spacing", help="linear, or log (dense near 0); default: the preset's."),
    curvature_tokens=typer.Option(None, "--curvature-tokens", help="Tokens for the curvature (default: all)."),
)


@sweep_command("xent")
def sweep_xent(
    steered: SteeredOptions = STEERED,
    corpus: CorpusOptions = CorpusOptions.group,
    xent: SectionOptions = XENT,
    grid: GridOptions = grid_group("xent").but(n_alphas=NAlphasOpt("Grid points (0 is added); default: the preset's.")),
    curvature: bool = typer.Option(True, "--curvature/--no-curvature", help="d2 CE/d alpha2 at 0 by jvp-of-jvp."),
    run: SweepRun = SWEEP,
    model: ModelOptions = MODEL,
) -> None:
    """Delta CE(alpha) on a corpus (Def. 3.7), curvature at 0 (Thm 3.8), plateau (Prop. 4.1): xent.parquet, xent.json."""
    from steerstrength.corpus import check_corpus_options
    from steerstrength.grid import refuse_with_explicit
    from steerstrength.stages import corpus_texts, packs, xent_stage

    check_at_least(("--n-alphas", grid.n_alphas, 2), ("--seq-len", xent.seq_len, 1), ("--max-tokens", xent.n_tokens, 1),
                   ("--n-samples", corpus.n_samples, 1), ("--sample-tokens", corpus.sample_tokens, 1),
                   ("--curvature-tokens", xent.curvature_tokens, 1))
    if corpus.seed is not None:
        check_seed(corpus.seed)
    if xent.spacing not in (None, "linear", "log"):
        raise InputError(f"--spacing must be linear or log, not {xent.spacing!r}")
    refuse_with_explicit(grid.alphas, **{"--spacing": xent.spacing, "--alpha-min": grid.alpha_min,
                                         "--alpha-max": grid.alpha_max, "--n-alphas": grid.n_alphas})
    run.check_out("xent.parquet", "xent.json", "corpus_samples.jsonl")
    cfg, section = xent.of(run.preset, n_alphas=grid.n_alphas)
    check_corpus_options(corpus.corpus or section.corpus, field=corpus.field, split=corpus.split, seed=corpus.seed)
    alphas = command_grid(grid, section=section, cfg=cfg, spacing=section.spacing)
    st = Steering(model, steered, alphas.unit)
    texts, source = corpus_texts(st.model, section, seed=corpus.seed or 0, cache_dir=run.out, source=corpus.corpus,
                                 field=corpus.field or "text", split=corpus.split or "train",
                                 max_texts=corpus.max_texts, data_files=corpus.data_files, n_samples=corpus.n_samples,
                                 sample_tokens=corpus.sample_tokens, progress=progress_bar)
    packing = packs(section, source) if corpus.packing is None else corpus.packing
    with run.folder():  # after the corpus is read: a bad corpus leaves no --out behind
        result = xent_stage(st.model, st.steered(cfg, run.controls, corpus.seed), section, texts=texts, corpus=source,
                            labels=st.labels, positions=steered.positions, grid=alphas, packing=packing,
                            curvature=curvature, progress=progress_bar)
        paths = run.write(result, st.header(run.start, preset=run.preset, packing=packing))
    for key, s in result.summary()["per_vector"].items():
        c = s.get("curvature")
        if c:
            log(f"{key}: CE''(0) jvp {c['jvp']:.4g}, quadratic fit {c['fit']:.4g}; CE'(0) {c['slope_jvp']:.3g}")
    done(paths, run)
