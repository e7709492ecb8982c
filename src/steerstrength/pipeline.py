"""`steerstrength run`: the stages wired together over a resumable run directory.

prompts -> vectors -> tokens -> logodds -> depth -> limit -> xent -> concept -> mmlu -> recommend -> figures -> report.
Each stage has a key: the hash of its config and of its upstream keys. A stage whose key and outputs
are in the manifest is skipped; sweeps keep finished chunks, so a killed run resumes where it stopped
and ends with the same tables as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from steerstrength.config import RunConfig, resolve_layers, to_toml, wants_auto
from steerstrength.errors import InputError
from steerstrength.io import atomic_path, write_json, write_jsonl, write_parquet
from steerstrength.runs import RunDir, file_record, is_intact, package_versions

STAGES = ("prompts", "vectors", "tokens", "logodds", "depth", "limit", "xent", "concept", "mmlu", "recommend", "figures",
          "report")


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Context:
    """What the stages share: config, run directory, the loaded model, the reporter."""

    cfg: RunConfig
    run: RunDir
    progress: Callable  # progress(description, total) -> context manager yielding advance(n)
    log: Callable[[str], None]
    model: object  # the loaded Model (loaded before the run directory is made)
    layers: list[int]  # cfg.layers resolved against the model's depth
    keys: dict = field(default_factory=dict)

    def labels(self, concept: str, layer: int) -> dict:
        return dict(model=self.model.name, concept=concept, layer=layer, setting=self.cfg.setting,
                    positions=self.cfg.positions)

    def vectors(self, concept: str):
        from steerstrength.vectors import SteeringVectors

        return SteeringVectors.load(self.run.path("vectors", f"{concept}.safetensors"))

    def raw_alphas(self, sv, layer: int, alphas) -> "torch.Tensor":
        """A grid given in cfg.alpha_unit as the raw alphas `steer` adds at this layer (grid.py's residual units)."""
        from steerstrength.metrics.grid import to_raw

        return to_raw(alphas, self.cfg.alpha_unit, sv.resid_scale(layer, self.model))

    def prompt_texts(self, concept: str) -> tuple[list[str], list[str]]:
        from steerstrength.prompts import load_prompts, texts_of

        pos = texts_of(load_prompts(self.run.path("prompts", f"{concept}.positive.jsonl")))
        neg = texts_of(load_prompts(self.run.path("prompts", f"{concept}.negative.jsonl")))
        return pos, neg

    def chunked(self, stage: str, name: str, compute: Callable[[], dict]) -> dict:
        """A finished chunk ({part: DataFrame}) of this stage's key, read back or computed (RunDir.chunk)."""
        return self.run.chunk(stage, self.keys[stage], name, compute, log=self.log)


# ----------------------------------------------------------------------------- stages


def stage_prompts(ctx: Context) -> list[str]:
    from steerstrength.models import load_model
    from steerstrength.prompts import generate_prompts, load_prompts, rows_from_texts, texts_of

    p = ctx.cfg.prompts
    outputs = []
    for concept in ctx.cfg.concepts:
        for kind in ("positive", "negative"):
            path = ctx.run.path("prompts", f"{concept}.{kind}.jsonl")
            outputs.append(path)
            user = p.positive_file if kind == "positive" else p.negative_file
            done = ctx.run.manifest.get("prompt_keys", {}).get(ctx.run.relative(path))
            if isinstance(done, dict) and done.get("key") == ctx.keys["prompts"] and is_intact(path, done):
                continue  # this file was finished before an interruption
            if user:
                rows = rows_from_texts(texts_of(load_prompts(user)), concept, kind,
                                       ctx.cfg.setting if kind == "negative" else None)
            elif p.source == "curated" and (kind == "positive" or ctx.cfg.setting == "contrastive"):
                from steerstrength.prompts import curated_texts

                rows = rows_from_texts(curated_texts(concept, kind, "train"), concept, kind,
                                       ctx.cfg.setting if kind == "negative" else None)
                for r in rows:
                    r["generator"] = "curated"
            else:
                random_n = kind == "negative" and ctx.cfg.setting == "random"
                model = ctx.model if (random_n or p.generator is None) else _generator(ctx, load_model)
                with ctx.progress(f"{concept}: {kind} prompts", p.n) as advance:
                    rows = generate_prompts(model, concept, kind, p.n, setting=ctx.cfg.setting,
                                            max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                                            top_p=p.top_p, top_k=p.top_k, seed=ctx.cfg.seed,
                                            batch_size=p.batch_size, opposite=p.opposite, progress=advance)
                if len(rows) < 2:
                    raise InputError(f"only {len(rows)} non-empty {kind} texts were generated for {concept}; "
                                     "raise prompts.n or prompts.max_new_tokens")
            write_jsonl(path, rows)
            ctx.run.manifest.setdefault("prompt_keys", {})[ctx.run.relative(path)] = dict(key=ctx.keys["prompts"],
                                                                                        **file_record(path))
            ctx.run.save()
    return outputs


def _generator(ctx: Context, load_model):
    if getattr(ctx, "_generator_model", None) is None:
        m = ctx.cfg.model
        ctx._generator_model = load_model(ctx.cfg.prompts.generator, dtype=m.dtype, device=m.device)
    return ctx._generator_model


def stage_vectors(ctx: Context) -> list[str]:
    from steerstrength.vectors import difference_of_means

    v = ctx.cfg.vectors
    outputs, scans = [], []
    for concept in ctx.cfg.concepts:
        pos, neg = ctx.prompt_texts(concept)
        layers = list(ctx.layers)
        if wants_auto(ctx.cfg.layers):
            scan = _scan(ctx, concept, pos, neg)
            scans.append(scan)
            layers = sorted(set(layers) | {scan.chosen})
            ctx.log(f"[vectors] {concept}: the layer scan picks layer {scan.chosen} ({scan.rule})")
        with ctx.progress(f"{concept}: activations", len(pos) + len(neg)) as advance:
            sv = difference_of_means(ctx.model, pos, neg, layers, skip_first_token=v.skip_first_token,
                                     normalize=v.normalize, batch_size=v.batch_size, max_length=v.max_length,
                                     concept=concept, setting=ctx.cfg.setting, resamples=v.resamples,
                                     seed=ctx.cfg.seed, progress=advance)
        if scans and scans[-1].table["concept"].iloc[0] == concept:
            sv.meta["auto_layer"] = scans[-1].chosen
        outputs.append(sv.save(ctx.run.path("vectors", f"{concept}.safetensors")))
    if scans:
        import pandas as pd

        outputs += [write_parquet(ctx.run.path("tables", "layer_scan.parquet"),
                                  pd.concat([s.table for s in scans], ignore_index=True)),
                    write_json(ctx.run.path("tables", "layer_scan.json"),
                               {s.table["concept"].iloc[0]: s.summary() for s in scans})]
    return outputs


def _scan(ctx: Context, concept: str, pos: list[str], neg: list[str]):
    """The layer scan (scan.py) on the training texts, held-out curated pairs when the concept has them."""
    from steerstrength.prompts import curated_concepts, curated_texts
    from steerstrength.scan import scan_layers

    held = {}
    if ctx.cfg.prompts.source == "curated" and concept.lower() in curated_concepts() and ctx.cfg.setting == "contrastive":
        held = dict(heldout_positive=curated_texts(concept, "positive", "heldout"),
                    heldout_negative=curated_texts(concept, "negative", "heldout"))
    n = len(pos) + len(neg) + sum(len(t) for t in held.values())
    with ctx.progress(f"{concept}: layer scan", n) as advance:
        return scan_layers(ctx.model, pos, neg, top_k=ctx.cfg.vectors.scan_top_k, batch_size=ctx.cfg.vectors.batch_size,
                           progress=advance, labels=dict(model=ctx.model.name, concept=concept), **held)


def _contexts(ctx: Context, concept: str) -> list[dict]:
    from steerstrength.metrics.contexts import builtin_contexts, read_contexts

    t = ctx.cfg.tokens
    if t.contexts_file:
        items = read_contexts(t.contexts_file)
    else:
        items = builtin_contexts(concept)
        if t.n_contexts is not None:
            own = [c for c in items if c["kind"] == "concept"]
            neutral = [c for c in items if c["kind"] != "concept"]
            keep_own = own[: min(len(own), max(1, t.n_contexts // 2))]
            items = neutral[: max(0, t.n_contexts - len(keep_own))] + keep_own
    return items if t.n_contexts is None else items[: t.n_contexts]


def stage_tokens(ctx: Context) -> list[str]:
    import pandas as pd

    from steerstrength.metrics.grid import add_resid_column, linspace_grid
    from steerstrength.metrics.tokens import token_curves

    t = ctx.cfg.tokens
    grid = linspace_grid(-t.alpha_max, t.alpha_max, t.n_alphas)
    curves, tops, summaries = [], [], {}
    for concept in ctx.cfg.concepts:
        sv = ctx.vectors(concept)
        contexts = _contexts(ctx, concept)
        with ctx.progress(f"{concept}: next-token curves", len(contexts) * len(sv.layers)) as advance:
            for layer in sv.layers:
                scale = sv.resid_scale(layer, ctx.model)
                for c in contexts:
                    def compute(layer=layer, c=c, scale=scale):
                        res = token_curves(ctx.model, sv[layer], layer, [c], ctx.raw_alphas(sv, layer, grid),
                                           positions=ctx.cfg.positions, top_k=t.top_k, top_each=t.top_each)
                        labels = {k: v for k, v in ctx.labels(concept, layer).items() if k != "layer"}
                        return {"curves": add_resid_column(res.curves_frame(ctx.model, **labels).assign(layer=layer),
                                                           scale),
                                "top": add_resid_column(res.top_frame(ctx.model, **labels).assign(layer=layer), scale)}

                    parts = ctx.chunked("tokens", f"{concept}.{layer}.{c['id']}", compute)
                    curves.append(parts["curves"])
                    tops.append(parts["top"])
                    advance(1)
    curves_df = pd.concat(curves, ignore_index=True)
    tops_df = pd.concat(tops, ignore_index=True)
    for concept in ctx.cfg.concepts:
        summaries[concept] = _shape_summary(curves_df[curves_df["concept"] == concept],
                                            tops_df[tops_df["concept"] == concept])
    out = [write_parquet(ctx.run.path("tables", "tokens.parquet"), curves_df),
           write_parquet(ctx.run.path("tables", "tokens_top.parquet"), tops_df),
           write_json(ctx.run.path("tables", "tokens.json"), dict(alphas=grid.tolist(), alpha_unit=ctx.cfg.alpha_unit,
                                                                  per_concept=summaries))]
    return out


def _shape_summary(curves, tops) -> dict:
    """Per layer: how many of the top-8 tokens at alpha_max bump / increase / decrease (Thm 3.3)."""
    out = {}
    for layer, top_l in tops.groupby("layer"):
        dominant = top_l[(top_l["side"] == "alpha_max") & (top_l["rank"] < 8)]
        shapes = curves[(curves["layer"] == layer)].drop_duplicates(["context_id", "token_id"])
        keys = ["context_id", "token_id"]
        merged = dominant[keys].merge(shapes[keys + ["shape", "peak_alpha"]], on=keys)
        out[str(layer)] = dict(merged["shape"].value_counts().to_dict(), n=int(len(merged)))
    return out


def stage_logodds(ctx: Context) -> list[str]:
    import pandas as pd

    from steerstrength.metrics.logodds import log_odds_analysis, log_odds_frame, mean_log_probs

    lo = ctx.cfg.logodds
    tokens_top = pd.read_parquet(ctx.run.path("tables", "tokens_top.parquet"))
    curves = pd.read_parquet(ctx.run.path("tables", "tokens.parquet"),
                             columns=["concept", "layer", "context_id", "token_id", "peak_alpha", "shape"])
    frames, analysis = [], {}
    for concept in ctx.cfg.concepts:
        pos, neg = ctx.prompt_texts(concept)
        with ctx.progress(f"{concept}: log p after P and N", len(pos) + len(neg)) as advance:
            lp_pos = mean_log_probs(ctx.model, pos, max_tokens=lo.max_tokens, progress=advance)
            lp_neg = mean_log_probs(ctx.model, neg, max_tokens=lo.max_tokens, progress=advance)
        M = lp_pos - lp_neg
        frame = log_odds_frame(ctx.model, M, positive=lp_pos, negative=lp_neg, model=ctx.model.name,
                               concept=concept, setting=ctx.cfg.setting)
        frames.append(frame)
        analysis[concept] = log_odds_analysis(M, tokens_top[tokens_top["concept"] == concept],
                                              curves[curves["concept"] == concept])
    return [write_parquet(ctx.run.path("tables", "logodds.parquet"), pd.concat(frames, ignore_index=True)),
            write_json(ctx.run.path("tables", "logodds.json"), analysis)]


def stage_depth(ctx: Context) -> list[str]:
    """Concept words, bumps and Spearman(M, peak) against the steered layer (metrics/depth.py)."""
    import pandas as pd
    import torch

    from steerstrength.metrics.depth import depth_profile
    from steerstrength.metrics.grid import linspace_grid

    d = ctx.cfg.depth
    grid = linspace_grid(-d.alpha_max, d.alpha_max, d.n_alphas)
    logodds = pd.read_parquet(ctx.run.path("tables", "logodds.parquet"), columns=["concept", "token_id", "M"])
    tables, tops = [], []
    for concept in ctx.cfg.concepts:
        sv = ctx.vectors(concept)
        layers = sorted(set(range(0, ctx.model.n_layers, d.every)) | set(sv.layers))
        lo = logodds[logodds["concept"] == concept].sort_values("token_id")
        M = torch.tensor(lo["M"].to_numpy(), dtype=torch.float64)
        pos, neg = ctx.prompt_texts(concept)
        contexts = [c for c in _contexts(ctx, concept) if c["kind"] == "neutral"][: d.n_contexts]
        with ctx.progress(f"{concept}: depth profile", len(layers)) as advance:
            table, top = depth_profile(ctx.model, pos, neg, layers, contexts, grid, M, positions=ctx.cfg.positions,
                                       progress=advance, labels=dict(model=ctx.model.name, concept=concept))
        tables.append(table.assign(steered=table["layer"].isin(sv.layers)))
        tops.append(top)
    return [write_parquet(ctx.run.path("tables", "depth.parquet"), pd.concat(tables, ignore_index=True)),
            write_parquet(ctx.run.path("tables", "depth_top.parquet"), pd.concat(tops, ignore_index=True))]


def stage_limit(ctx: Context) -> list[str]:
    import pandas as pd

    from steerstrength.metrics.grid import add_resid_column
    from steerstrength.metrics.limits import limit_check

    alphas = sorted({float(s * a) for a in ctx.cfg.limit.alphas for s in (1, -1)})
    frames, summary = [], {}
    for concept in ctx.cfg.concepts:
        sv = ctx.vectors(concept)
        contexts = _contexts(ctx, concept)
        for layer in sv.layers:
            check = limit_check(ctx.model, sv[layer], layer, contexts, ctx.raw_alphas(sv, layer, alphas).tolist(),
                                positions=ctx.cfg.positions)
            frames.append(add_resid_column(check.frame(ctx.model, **ctx.labels(concept, layer)),
                                           sv.resid_scale(layer, ctx.model)))
            summary[f"{concept}/{layer}"] = check.summary()
    return [write_parquet(ctx.run.path("tables", "limit.parquet"), pd.concat(frames, ignore_index=True)),
            write_json(ctx.run.path("tables", "limit.json"), summary)]


def stage_xent(ctx: Context) -> list[str]:
    import pandas as pd

    from steerstrength.corpus import load_corpus
    from steerstrength.metrics.grid import add_resid_column, stage_grid
    from steerstrength.metrics.xent import sweep_units, xent_sweep

    x = ctx.cfg.xent
    grid = stage_grid(x.alpha_max, x.n_alphas, x.spacing)
    if x.corpus == "model":
        n_texts = max(1, -(-x.n_tokens // x.seq_len))  # one window of seq_len + 1 tokens per text
        with ctx.progress("corpus: samples of the unsteered model", n_texts) as advance:
            texts = load_corpus(None, model=ctx.model, n_samples=n_texts, sample_tokens=x.seq_len + 8,
                                seed=ctx.cfg.seed, cache_dir=ctx.run.path("corpus", "x").parent, progress=advance)
        source = f"samples of {ctx.model.name} (Delta CE estimates the mean KL(unsteered || steered))"
    else:
        texts = load_corpus(x.corpus, model=ctx.model)
        source = x.corpus
    units = sweep_units(ctx.model, texts, grid, seq_len=x.seq_len, max_tokens=x.n_tokens)  # windows x alphas
    frames, summary = [], {}
    for concept in ctx.cfg.concepts:
        sv = ctx.vectors(concept)
        for layer in sv.layers:
            chunk_dir = ctx.run.chunk_dir("xent", ctx.keys["xent"]) / f"{concept}.{layer}"
            with ctx.progress(f"{concept}: Delta CE, layer {layer}", units) as advance:
                res = xent_sweep(ctx.model, sv[layer], layer, texts, ctx.raw_alphas(sv, layer, grid), seq_len=x.seq_len,
                                 positions=ctx.cfg.positions, max_tokens=x.n_tokens, checkpoint_dir=chunk_dir,
                                 chunk_windows=x.chunk_windows, curvature_tokens=x.curvature_tokens,
                                 progress=advance)
            frames.append(add_resid_column(res.frame(**ctx.labels(concept, layer)), sv.resid_scale(layer, ctx.model)))
            summary[f"{concept}/{layer}"] = dict(res.summary(), resid_scale=sv.resid_scale(layer, ctx.model))
    return [write_parquet(ctx.run.path("tables", "xent.parquet"), pd.concat(frames, ignore_index=True)),
            write_json(ctx.run.path("tables", "xent.json"), dict(corpus=source, per_vector=summary))]


def stage_concept(ctx: Context) -> list[str]:
    import pandas as pd

    from steerstrength.metrics.concept import concept_probability
    from steerstrength.metrics.grid import add_resid_column, linspace_grid

    c = ctx.cfg.concept
    alphas = linspace_grid(-c.alpha_max, c.alpha_max, c.n_alphas, zero=False)
    from steerstrength.prompts import evaluation_prompts

    # Neutral requests (data/eval_prompts.jsonl, training half): the unsteered answers carry no concept.
    prompts = evaluation_prompts("train")[: c.n_prompts]
    if c.prompts_file:
        from steerstrength.io import read_texts

        prompts = [r["text"] for r in read_texts(c.prompts_file, what="concept prompt file")]
    judge_model = None
    if c.judge == "llm" and c.judge_model is not None:
        from steerstrength.models import load_model

        judge_model = load_model(c.judge_model, dtype=ctx.cfg.model.dtype, device=ctx.cfg.model.device)
    parts = {"completions": [], "scores": [], "curve": []}
    summary = {}
    for concept in ctx.cfg.concepts:
        sv = ctx.vectors(concept)
        pos, neg = _judge_texts(ctx, concept)
        for layer in sv.layers:
            def compute(layer=layer):
                with ctx.progress(f"{concept}: steered generations, layer {layer}", 1) as advance:
                    res = concept_probability(
                        ctx.model, sv[layer], layer, concept, alphas=ctx.raw_alphas(sv, layer, alphas), prompts=prompts,
                        n_completions=c.completions, max_new_tokens=c.max_new_tokens, judges=(c.judge,),
                        judge_model=judge_model if c.judge == "llm" else None, positive=pos, negative=neg,
                        seed=ctx.cfg.seed, positions=ctx.cfg.positions, setting=ctx.cfg.setting)
                    advance(1)
                summary_frame = pd.DataFrame([{"json": json.dumps(res.summary, default=str)}])
                return {"completions": res.completions, "scores": res.scores, "curve": res.curve,
                        "summary": summary_frame}

            chunk = ctx.chunked("concept", f"{concept}.{layer}", compute)
            for name in parts:
                parts[name].append(add_resid_column(chunk[name].assign(layer=layer), sv.resid_scale(layer, ctx.model)))
            summary[f"{concept}/{layer}"] = json.loads(chunk["summary"]["json"].iloc[0])
    out = [write_jsonl(ctx.run.path("tables", "concept_completions.jsonl"),
                       pd.concat(parts["completions"], ignore_index=True).to_dict(orient="records")),
           write_parquet(ctx.run.path("tables", "concept_scores.parquet"), pd.concat(parts["scores"], ignore_index=True)),
           write_parquet(ctx.run.path("tables", "concept_curve.parquet"), pd.concat(parts["curve"], ignore_index=True)),
           write_json(ctx.run.path("tables", "concept.json"), summary)]
    return out


def _judge_texts(ctx: Context, concept: str) -> tuple[list[str], list[str]]:
    """Texts to measure the judge on: held-out curated pairs when the run uses them (the probe is trained on the
    training pairs), else the run's own P and N (the judges hold part of them out themselves)."""
    from steerstrength.prompts import curated_concepts, curated_texts

    if ctx.cfg.prompts.source == "curated" and concept.lower() in curated_concepts():
        return curated_texts(concept, "positive", "heldout"), curated_texts(concept, "negative", "heldout")
    return ctx.prompt_texts(concept)


def mmlu_source(source: str | None) -> str | None:
    """`sample`: the toy MMLU-format questions shipped with the package (not MMLU)."""
    if source == "sample":
        from importlib.resources import files

        return str(files("steerstrength") / "data" / "mmlu_sample")
    return source


def stage_mmlu(ctx: Context) -> list[str]:
    import pandas as pd

    from steerstrength.metrics.grid import add_resid_column, linspace_grid
    from steerstrength.metrics.mmlu import mmlu_accuracy

    m = ctx.cfg.mmlu
    alphas = linspace_grid(-m.alpha_max, m.alpha_max, m.n_alphas)
    per_q, per_subject, summary = [], [], {}
    for concept in ctx.cfg.concepts:
        sv = ctx.vectors(concept)
        for layer in sv.layers:
            res = mmlu_accuracy(ctx.model, sv[layer], layer, alphas=ctx.raw_alphas(sv, layer, alphas),
                                subjects=m.subjects or None,
                                source=mmlu_source(m.source), k_shots=m.k_shot, limit=m.max_questions, chat=m.chat,
                                positions=ctx.cfg.positions, concept=concept, setting=ctx.cfg.setting)
            scale = sv.resid_scale(layer, ctx.model)
            per_q.append(add_resid_column(res.table.assign(layer=layer), scale))
            per_subject.append(add_resid_column(res.accuracy.assign(layer=layer), scale))
            summary[f"{concept}/{layer}"] = res.summary
    return [write_parquet(ctx.run.path("tables", "mmlu_questions.parquet"), pd.concat(per_q, ignore_index=True)),
            write_parquet(ctx.run.path("tables", "mmlu.parquet"), pd.concat(per_subject, ignore_index=True)),
            write_json(ctx.run.path("tables", "mmlu.json"), dict(source=m.source, per_vector=summary))]


def stage_recommend(ctx: Context) -> list[str]:
    from steerstrength.recommend import pipeline_recommend

    return pipeline_recommend(ctx)


def stage_figures(ctx: Context) -> list[str]:
    from steerstrength.plots import draw_all

    return draw_all(ctx.run.root)


def stage_report(ctx: Context) -> list[str]:
    from steerstrength.report import write_report

    return [write_report(ctx.run.root)]


STAGE_FUNCS = {
    "prompts": stage_prompts, "vectors": stage_vectors, "tokens": stage_tokens, "logodds": stage_logodds,
    "depth": stage_depth,
    "limit": stage_limit, "xent": stage_xent, "concept": stage_concept, "mmlu": stage_mmlu,
    "recommend": stage_recommend, "figures": stage_figures, "report": stage_report,
}


def stage_keys(cfg: RunConfig) -> dict[str, str]:
    """Each stage's key: its own config and its upstream keys (a change invalidates what follows)."""
    d = cfg.to_dict()
    base = _hash(d["model"], cfg.concepts, cfg.setting, cfg.seed)
    k = {"prompts": _hash(base, d["prompts"])}
    k["vectors"] = _hash(k["prompts"], d["vectors"], cfg.layers)
    steer = _hash(k["vectors"], cfg.positions, cfg.alpha_unit)
    k["tokens"] = _hash(steer, d["tokens"])
    k["logodds"] = _hash(k["tokens"], d["logodds"])
    k["depth"] = _hash(k["logodds"], d["depth"], d["tokens"]["contexts_file"])
    k["limit"] = _hash(steer, d["limit"], d["tokens"]["contexts_file"], d["tokens"]["n_contexts"])
    k["xent"] = _hash(steer, d["xent"])
    k["concept"] = _hash(steer, d["concept"])
    k["mmlu"] = _hash(steer, d["mmlu"])
    k["recommend"] = _hash(k["tokens"], k["logodds"], k["xent"], k["concept"], d["recommend"])
    k["figures"] = _hash(*(k[s] for s in STAGES if s in k))
    k["report"] = _hash(k["figures"])
    return k


def enabled(cfg: RunConfig, stage: str) -> tuple[bool, str]:
    """Whether a stage runs, and why not."""
    section = getattr(cfg, stage, None)
    if section is not None and hasattr(section, "enabled") and not section.enabled:
        return False, f"disabled ({stage}.enabled=false)"
    if stage == "mmlu" and cfg.mmlu.source is None:
        return False, "no MMLU data: set mmlu.source to an MMLU CSV directory, a Parquet file, 'cais/mmlu' or 'sample'"
    return True, ""


def check_names(cfg: RunConfig) -> None:
    """Concept names and context ids name files: checked (safe, distinct) before the model loads or anything is
    written."""
    from steerstrength.metrics.contexts import read_contexts
    from steerstrength.prompts import check_concept

    seen: dict[str, str] = {}
    for concept in cfg.concepts:
        if check_concept(concept) != concept:
            raise InputError(f"concept {concept!r} has spaces around it; write {concept.strip()!r}")
        if concept.casefold() in seen:
            first = seen[concept.casefold()]
            also = f" (as {first!r} too: one file name on some disks)" if first != concept else ""
            raise InputError(f"concept {concept!r} is named twice{also}; name each concept once")
        seen[concept.casefold()] = concept
    if cfg.tokens.contexts_file:
        read_contexts(cfg.tokens.contexts_file)  # checks its ids: safe and distinct


def run_pipeline(cfg: RunConfig, out: str | Path, *, progress, log, only: list[str] | None = None) -> dict:
    """Run (or resume) every stage; returns {stage: (status, seconds)}."""
    from steerstrength.models import load_model

    # The model and the layers are checked before anything is written: a wrong model spec or a layer
    # index past the model's depth is one error line, not a half-made run directory.
    check_names(cfg)
    m = cfg.model
    model = load_model(m.spec, dtype=m.dtype, device=m.device, blocks_path=m.blocks_path)
    layers = resolve_layers(cfg.layers, model.n_layers)  # "auto" is resolved per concept by the vectors stage
    run = RunDir(out)
    with run.lock():
        for note in run.notes:
            log(f"[run] {note}")
        keys = stage_keys(cfg)
        ctx = Context(cfg=cfg, run=run, progress=progress, log=log, model=model, layers=layers, keys=keys)
        with atomic_path(run.root / "config.toml") as tmp:
            tmp.write_text(to_toml(cfg))
        run.manifest.update(config=cfg.to_dict(), versions=package_versions(), seed=cfg.seed,
                            started=run.manifest.get("started", time.time()), model_fingerprint=model.fingerprint(),
                            model=model.describe())
        run.save()
        results = {}
        for stage in STAGES:
            if only and stage not in only:
                continue
            ok, why = enabled(cfg, stage)
            if not ok:
                run.mark(stage, "skipped", why)
                results[stage] = ("skipped", 0.0, why)
                log(f"[{stage}] skipped: {why}")
                continue
            status, seconds = run.run_stage(stage, keys[stage], lambda s=stage: [str(p) for p in STAGE_FUNCS[s](ctx)],
                                            log=log)
            results[stage] = (status, seconds, "")
            log(f"[{stage}] {status} in {seconds:.1f} s")
        run.manifest["finished"] = time.time()
        run.save()
    return results
