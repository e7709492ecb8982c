"""`steerstrength run`: the stages wired together over a resumable run directory.

prompts -> vectors -> tokens -> logodds -> depth -> limit -> xent -> concept -> mmlu -> recommend -> figures -> report.
Each stage has a key: the hash of its config and of its upstream keys. A stage whose key and outputs
are in the manifest is skipped; sweeps keep finished chunks, so a killed run resumes where it stopped
and ends with the same tables as an uninterrupted one.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from steerstrength.config import ConceptConfig, RunConfig, resolve_layers, to_toml, wants_auto
from steerstrength.errors import InputError
from steerstrength.io import atomic_path, json_digest, write_jsonl
from steerstrength.runs import RunDir, package_versions

STAGES = ("prompts", "vectors", "tokens", "logodds", "depth", "limit", "xent", "concept", "mmlu", "recommend", "figures",
          "report")


def _hash(*parts) -> str:
    return json_digest(parts)


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
    one_vector: tuple | None = None  # (concept, layer): compute that vector's resumable chunks only, write no table

    @property
    def concepts(self) -> list[str]:
        return [self.one_vector[0]] if self.one_vector else list(self.cfg.concepts)

    def labels(self, concept: str, layer: int | None = None) -> dict:
        """The columns every table row starts with (stages.row_labels), and the layer when given."""
        from steerstrength.stages import row_labels

        out = row_labels(self.model.name, concept, self.cfg.setting, self.cfg.positions)
        return out if layer is None else dict(out, layer=layer)

    def chunk_fn(self, stage: str):
        """The stage's resumable pieces: chunk(name, compute) over RunDir.chunk with this stage's key."""
        return lambda name, compute: self.chunked(stage, name, compute)

    def vectors(self, concept: str):
        import dataclasses

        from steerstrength.vectors import SteeringVectors

        sv = SteeringVectors.load(self.run.path("vectors", f"{concept}.safetensors"))
        if self.one_vector is None:
            return sv
        layer = self.one_vector[1]
        sv[layer]  # one line for a layer the vectors lack
        return dataclasses.replace(sv, vectors={layer: sv.vectors[layer]},
                                   resamples={k: v for k, v in sv.resamples.items() if k == layer})

    def steered(self, concept: str, stage: str) -> list:
        """The vectors a stage steers: v at every layer, each followed by its random directions (the stage's count in
        the controls section; vectors.random_controls, seeded from the run seed)."""
        from steerstrength.vectors import random_controls

        out = []
        for sv in self.vectors(concept).values():
            out += [sv, *random_controls(sv, self.n_controls(stage), seed=self.cfg.seed)]
        return out

    def n_controls(self, stage: str) -> int:
        """Random directions per vector in `stage` (the controls section)."""
        c = self.cfg.controls
        n = {"xent": c.n_xent, "concept": c.n_concept, "depth": c.n_depth, "mmlu": c.n_mmlu}.get(stage)
        return c.n_random if n is None else n

    def prompt_texts(self, concept: str) -> tuple[list[str], list[str]]:
        """The P and N the vectors are made of: the training split (user files hold every third text out)."""
        pos, neg = self.prompt_rows(concept)
        return ([r["text"] for r in pos if r.get("split") != "heldout"],
                [r["text"] for r in neg if r.get("split") != "heldout"])

    def prompt_rows(self, concept: str) -> tuple[list[dict], list[dict]]:
        from steerstrength.prompts import load_prompts

        return (load_prompts(self.run.path("prompts", f"{concept}.positive.jsonl")),
                load_prompts(self.run.path("prompts", f"{concept}.negative.jsonl")))

    def split_texts(self, concept: str) -> tuple[tuple[list[str], list[str]], tuple[list[str], list[str]]]:
        """((train P, train N), (held-out P, held-out N)) of the run's texts (prompts.split_texts)."""
        from steerstrength.prompts import split_texts

        (p_train, p_held), (n_train, n_held) = (split_texts(rows) for rows in self.prompt_rows(concept))
        return (p_train, n_train), (p_held, n_held)

    def source(self, concept: str):
        from steerstrength.preflight import prompt_sources

        return prompt_sources(self.cfg)[concept]

    def curated(self, concept: str) -> bool:
        """Whether the concept's P and N are our curated pairs (its held-out pairs then measure the scan and judge)."""
        from steerstrength.preflight import has_curated

        return self.source(concept).kind == "curated" and has_curated(concept)

    def chunked(self, stage: str, name: str, compute: Callable[[], dict]) -> dict:
        """A finished chunk ({part: DataFrame}) of this stage's key, read back or computed (RunDir.chunk)."""
        return self.run.chunk(stage, self.keys[stage], name, compute, log=self.log)


# ----------------------------------------------------------------------------- stages


def stage_prompts(ctx: Context) -> list[str]:
    import pandas as pd

    from steerstrength.loading import load_model
    from steerstrength.prompts import generate_prompts, load_prompts, rows_from_texts, texts_of

    p = ctx.cfg.prompts
    outputs = []
    for concept in ctx.concepts:
        src = ctx.source(concept)
        sets = {}
        for kind in ("positive", "negative"):
            user = src.positive if kind == "positive" else src.negative

            def compute(kind=kind, user=user) -> dict:
                if user:
                    from steerstrength.prompts import tag_splits

                    given = tag_splits(load_prompts(user))  # every third held out: the judge's test, the contexts
                    rows = rows_from_texts(texts_of(given), concept, kind,
                                           ctx.cfg.setting if kind == "negative" else None)
                    for r, g in zip(rows, given):
                        r["split"], r["source"] = g["split"], str(user)
                elif src.kind == "curated" and (kind == "positive" or ctx.cfg.setting == "contrastive"):
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
                return {"rows": pd.DataFrame([{"json": json.dumps(rows)}])}  # rows as written: types intact

            # A finished file is a chunk: a run killed between P and N keeps P.
            sets[kind] = json.loads(ctx.chunked("prompts", f"{concept}.{kind}", compute)["rows"]["json"].iloc[0])
        if p.null_split:
            sets = null_split(sets["positive"], sets["negative"], seed=ctx.cfg.seed)
        for kind in ("positive", "negative"):
            outputs.append(write_jsonl(ctx.run.path("prompts", f"{concept}.{kind}.jsonl"), sets[kind]))
    return outputs


def null_split(positive: list, negative: list, *, seed: int) -> dict:
    """The null concept (prompts.null_split): P + N shuffled (seeded) and cut in two halves, so that both sets come
    from one distribution and carry no concept between them."""
    import random

    rows = list(positive) + list(negative)
    random.Random(seed).shuffle(rows)
    half = len(rows) // 2
    tag = lambda part, kind: [r if isinstance(r, str) else dict(r, kind=kind, null_split=True)  # noqa: E731
                              for r in part]
    return dict(positive=tag(rows[:half], "positive"), negative=tag(rows[half:], "negative"))


def _generator(ctx: Context, load_model):
    if getattr(ctx, "_generator_model", None) is None:
        m = ctx.cfg.model
        ctx._generator_model = load_model(ctx.cfg.prompts.generator, dtype=m.dtype, device=m.device)
    return ctx._generator_model


def stage_vectors(ctx: Context) -> list:
    from steerstrength.runs import StageResult, write_result
    from steerstrength.stages import judge_texts, scan_stage, vectors_stage

    outputs, scans = [], []
    for concept in ctx.concepts:
        pos, neg = ctx.prompt_texts(concept)
        scan = None
        if wants_auto(ctx.cfg.layers):
            curated = ctx.curated(concept) and ctx.cfg.setting == "contrastive"
            held = ctx.split_texts(concept)[1] if ctx.source(concept).kind == "files" else None
            result, scan = scan_stage(ctx.model, pos, neg, ctx.cfg.vectors, concept=concept,
                                      heldout=judge_texts(concept) if curated else held, progress=ctx.progress)
            scans.append(result)
            ctx.log(f"[vectors] {concept}: the layer scan picks layer {scan.chosen} ({scan.rule})")
        sv = vectors_stage(ctx.model, pos, neg, ctx.cfg.vectors, layers=ctx.layers, concept=concept,
                           setting=ctx.cfg.setting, seed=ctx.cfg.seed, scan=scan, progress=ctx.progress)
        outputs.append(sv.save(ctx.run.path("vectors", f"{concept}.safetensors")))
    if scans:
        outputs += write_result(ctx.run.path("tables"), StageResult.combine(scans))
    return outputs


def _contexts(ctx: Context, concept: str) -> list[dict]:
    """The tokens file's, or the built-in ones; a concept without built-in contexts gets its own from its held-out P
    (metrics.contexts.derive_contexts)."""
    from steerstrength.config import CONTEXT_WORDS, DERIVED_CONTEXTS
    from steerstrength.metrics.contexts import derive_contexts, stage_contexts
    from steerstrength.prompts import builtin_concepts

    own = None
    if not ctx.cfg.tokens.contexts_file and concept.lower() not in builtin_concepts():
        own = derive_contexts(concept, ctx.split_texts(concept)[1][0], DERIVED_CONTEXTS, CONTEXT_WORDS)
    return stage_contexts(concept, ctx.cfg.tokens.contexts_file, ctx.cfg.tokens.n_contexts, own=own)


def contexts_note(ctx: Context, concept: str, contexts: list[dict]) -> dict:
    """What contexts a stage swept, for its summary and the report."""
    from steerstrength.prompts import builtin_concepts

    if ctx.cfg.tokens.contexts_file:
        origin = f"the contexts file {ctx.cfg.tokens.contexts_file}"
    elif concept.lower() in builtin_concepts():
        origin = "built-in contexts (data/contexts.json): neutral and the concept's own"
    elif any(c["kind"] == "concept" for c in contexts):
        from steerstrength.config import CONTEXT_WORDS

        origin = (f"built-in neutral contexts and the concept's own, derived from its held-out P texts (their opening "
                  f"{CONTEXT_WORDS} words)")
    else:
        origin = "built-in neutral contexts only (no held-out P text to derive the concept's own from)"
    return dict(origin=origin, contexts=[{k: c[k] for k in ("id", "kind", "text")} for c in contexts])


def _write(ctx: Context, results: list) -> list:
    """The concepts' results as one set of tables (runs.write_result); nothing for one vector (its chunks are written)."""
    from steerstrength.runs import StageResult, write_result

    if ctx.one_vector is not None:
        return []
    return write_result(ctx.run.path("tables"), StageResult.combine(results))


def stage_tokens(ctx: Context) -> list:
    from steerstrength.stages import tokens_stage

    results = []
    for c in ctx.concepts:
        contexts = _contexts(ctx, c)
        res = tokens_stage(ctx.model, ctx.steered(c, "tokens"), ctx.cfg.tokens, contexts=contexts,
                           labels=ctx.labels(c), unit=ctx.cfg.alpha_unit, positions=ctx.cfg.positions,
                           chunk=ctx.chunk_fn("tokens"), progress=ctx.progress)
        res.info.setdefault("contexts", {})[c] = contexts_note(ctx, c, contexts)
        ctx.log(f"[tokens] {c}: {contexts_note(ctx, c, contexts)['origin']}")
        results.append(res)
    return _write(ctx, results)


def stage_logodds(ctx: Context) -> list:
    import pandas as pd

    from steerstrength.stages import logodds_stage

    # v's rows: the random directions' are read by verdicts.py
    tokens_top = pd.read_parquet(ctx.run.path("tables", "tokens_top.parquet"), filters=[("direction", "==", "v")])
    curves = pd.read_parquet(ctx.run.path("tables", "tokens.parquet"),
                             columns=["concept", "layer", "context_id", "token_id", "peak_alpha", "shape"],
                             filters=[("direction", "==", "v")])
    results = []
    for concept in ctx.concepts:
        pos, neg = ctx.prompt_texts(concept)
        results.append(logodds_stage(ctx.model, pos, neg, ctx.cfg.logodds,
                                     tokens_top=tokens_top[tokens_top["concept"] == concept],
                                     curves=curves[curves["concept"] == concept], labels=ctx.labels(concept),
                                     heldout=_heldout_texts(ctx, concept), progress=ctx.progress))
    return _write(ctx, results)


def _heldout_texts(ctx: Context, concept: str) -> tuple | None:
    """P and N texts v was not built from (the curated held-out pairs; a user file's held-out third; None for
    generated texts), split at random like P and N themselves under prompts.null_split."""
    from steerstrength.stages import judge_texts

    if ctx.curated(concept):
        pos, neg = judge_texts(concept)
    elif ctx.source(concept).kind != "files":
        return None  # generated P / N: nothing was held out
    else:
        _, (pos, neg) = ctx.split_texts(concept)
    if len(pos) < 2 or len(neg) < 2:
        return None
    if ctx.cfg.prompts.null_split:
        halves = null_split(pos, neg, seed=ctx.cfg.seed + 1)
        pos, neg = halves["positive"], halves["negative"]
    return list(pos), list(neg)


def stage_depth(ctx: Context) -> list:
    """Concept words, bumps and Spearman(M, peak) against the steered layer (metrics/depth.py)."""
    import pandas as pd
    import torch

    from steerstrength.stages import depth_stage

    logodds = pd.read_parquet(ctx.run.path("tables", "logodds.parquet"), columns=["concept", "token_id", "M"])
    results = []
    for concept in ctx.concepts:
        lo = logodds[logodds["concept"] == concept].sort_values("token_id")
        pos, neg = ctx.prompt_texts(concept)
        results.append(depth_stage(ctx.model, pos, neg, ctx.cfg.depth, steered=ctx.vectors(concept).layers,
                                   contexts=_contexts(ctx, concept),
                                   M=torch.tensor(lo["M"].to_numpy(), dtype=torch.float64),
                                   labels=dict(model=ctx.model.name, concept=concept), positions=ctx.cfg.positions,
                                   controls=ctx.n_controls("depth"), seed=ctx.cfg.seed, progress=ctx.progress))
    return _write(ctx, results)


def stage_limit(ctx: Context) -> list:
    from steerstrength.stages import limit_stage

    return _write(ctx, [limit_stage(ctx.model, ctx.steered(c, "limit"), ctx.cfg.limit, contexts=_contexts(ctx, c),
                                    labels=ctx.labels(c), unit=ctx.cfg.alpha_unit, positions=ctx.cfg.positions)
                        for c in ctx.concepts])


def run_corpus(ctx: Context) -> tuple[list[str], str]:
    """The run's Delta CE corpus (xent section; model samples cached in RUN/corpus/): (texts, what they are)."""
    from steerstrength.stages import corpus_texts

    return corpus_texts(ctx.model, ctx.cfg.xent, seed=ctx.cfg.seed, cache_dir=ctx.run.path("corpus", "x").parent,
                        progress=ctx.progress)


def stage_xent(ctx: Context) -> list:
    from steerstrength.stages import xent_stage

    x = ctx.cfg.xent
    texts, source = run_corpus(ctx)
    return _write(ctx, [xent_stage(ctx.model, ctx.steered(c, "xent"), x, texts=texts, corpus=source,
                                   labels=ctx.labels(c), unit=ctx.cfg.alpha_unit, positions=ctx.cfg.positions,
                                   chunk=ctx.chunk_fn("xent"), progress=ctx.progress)
                        for c in ctx.concepts])


def stage_concept(ctx: Context) -> list:
    from steerstrength.stages import concept_stage

    c = ctx.cfg.concept
    # Neutral requests (data/eval_prompts.jsonl, training half): the unsteered answers carry no concept.
    from steerstrength.prompts import evaluation_prompts

    prompts = evaluation_prompts("train")[: c.n_prompts]
    if c.prompts_file:
        from steerstrength.io import read_texts

        prompts = [r["text"] for r in read_texts(c.prompts_file, what="concept prompt file")]
    judge_model = None
    if c.judge == "llm" and c.judge_model is not None:
        from steerstrength.loading import load_model

        judge_model = load_model(c.judge_model, dtype=ctx.cfg.model.dtype, device=ctx.cfg.model.device)
    results = []
    for concept in ctx.concepts:
        judge, pos, neg = concept_judge(ctx, concept)
        results.append(concept_stage(ctx.model, ctx.steered(concept, "concept"), c, prompts=prompts,
                                     labels=ctx.labels(concept), unit=ctx.cfg.alpha_unit, positions=ctx.cfg.positions,
                                     judges=[judge], judge_model=judge_model, texts=(pos, neg),
                                     seed=ctx.cfg.seed, chunk=ctx.chunk_fn("concept"), progress=ctx.progress))
    return _write(ctx, results)


def concept_judge(ctx: Context, concept: str) -> tuple:
    """(judge, P, N to measure it on) for a concept: the run's concept.judge with our held-out curated pairs for a
    curated concept; for any other concept the probe is trained here on the run's P / N training split (plus the
    neutral train texts) and measured on the held-out split (judges.ProbeJudge.train_apart); other judges get the
    run's P and N (they calibrate on one half and are measured on the other)."""
    from steerstrength.stages import judge_texts

    from steerstrength.preflight import has_curated

    name = ctx.cfg.concept.judge
    if ctx.curated(concept):
        return (name, *judge_texts(concept, fallback=ctx.prompt_texts(concept)))
    (p_train, n_train), (p_held, n_held) = ctx.split_texts(concept)
    if name == "probe" and not has_curated(concept):
        from steerstrength.judges import ProbeJudge

        judge = ProbeJudge(device="cpu").train_apart(p_train, n_train, concept, source="the run's P/N train split")
        return judge, p_held, n_held
    return name, p_train + p_held, n_train + n_held


def stage_mmlu(ctx: Context) -> list:
    from steerstrength.stages import mmlu_questions, mmlu_stage

    m = ctx.cfg.mmlu
    questions = mmlu_questions(m.source, m.subjects, m.max_questions)
    return _write(ctx, [mmlu_stage(ctx.model, ctx.steered(c, "mmlu"), m, questions=questions, source=m.source,
                                   labels=ctx.labels(c), unit=ctx.cfg.alpha_unit, positions=ctx.cfg.positions,
                                   chunk=ctx.chunk_fn("mmlu"), progress=ctx.progress)
                        for c in ctx.concepts])


def stage_recommend(ctx: Context) -> list:
    """Sweet-spot and curvature per prompt (target tokens: the logodds stage's M), iso-kl, and global with several
    prompts; curvature with recommend.curvature_scope "corpus" reads the xent stage's corpus."""
    import pandas as pd
    import torch

    from steerstrength.preflight import has_curated
    from steerstrength.prompts import evaluation_prompts
    from steerstrength.recommend import METHODS, default_methods, method_options
    from steerstrength.stages import recommend_stage

    c = ctx.cfg.concept
    prompts = evaluation_prompts("train")[: ctx.cfg.recommend.n_prompts]
    if c.prompts_file:
        from steerstrength.io import read_texts

        prompts = [r["text"] for r in read_texts(c.prompts_file, what="concept prompt file")]
    judge_model = None
    if "global" in default_methods(ctx.cfg.positions, len(prompts))[0] and c.judge == "llm" and c.judge_model:
        from steerstrength.loading import load_model

        judge_model = load_model(c.judge_model, dtype=ctx.cfg.model.dtype, device=ctx.cfg.model.device)
    corpus = run_corpus(ctx)[0] if ctx.cfg.recommend.curvature_scope == "corpus" else None
    path = ctx.run.path("tables", "logodds.parquet")
    logodds = pd.read_parquet(path, columns=["concept", "token_id", "M"]) if path.is_file() else None
    results = []
    for concept in ctx.concepts:
        M = None
        lo = None if logodds is None else logodds[logodds["concept"] == concept].sort_values("token_id")
        if lo is not None and len(lo) == ctx.model.vocab_size:
            M = torch.tensor(lo["M"].to_numpy(), dtype=torch.float64)
        pos, neg = ctx.prompt_texts(concept)
        judge = c.judge
        if judge == "probe" and not has_curated(concept):
            judge, pos, neg = concept_judge(ctx, concept)  # trained on the train split, measured on the held-out one
        options = method_options(METHODS, ctx.cfg.recommend, log_odds=M, corpus=corpus, judge=judge,
                                 judge_model=judge_model)
        results.append(recommend_stage(ctx.model, ctx.vectors(concept).values(), ctx.cfg.recommend, prompts=prompts,
                                       labels=ctx.labels(concept), options=options, positive=pos, negative=neg,
                                       seed=ctx.cfg.seed, positions=ctx.cfg.positions, progress=ctx.progress,
                                       log=ctx.log))
    return _write(ctx, results)


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


# The config entries that name a user's file or directory a stage reads. Stage keys hash the bytes read, not only the
# path (DESIGN: caches are keyed on the bytes they read): a file edited in place recomputes the stages that read it.
USER_INPUTS = (("prompts", "positive_file"), ("prompts", "negative_file"), ("tokens", "contexts_file"),
               ("xent", "corpus"), ("concept", "prompts_file"), ("mmlu", "source"))
DATA_SUFFIXES = (".csv", ".parquet")  # what the readers of a directory (an MMLU or corpus directory) read in it


def user_path(section: str, value) -> Path | None:
    """The file or directory a USER_INPUTS entry names, or None (unset, packaged data, the model's samples, the hub)."""
    from steerstrength.corpus import is_wikipedia
    from steerstrength.metrics.mmlu import PACKAGED

    if not isinstance(value, str) or not value:
        return None
    if section == "xent" and (is_wikipedia(value) or value == "model" or value.startswith("hf:")):
        return None
    if section == "mmlu" and value in (*PACKAGED, "sample", "cais/mmlu", "hub", "hf:cais/mmlu"):
        return None
    path = Path(value).expanduser()
    return path if path.exists() else None


def with_input_digests(d: dict) -> dict:
    """The config dict with each user input (USER_INPUTS) that names a file or directory as {path, sha256}."""
    from steerstrength.runs import content_digest

    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    for section, key in USER_INPUTS:
        path = user_path(section, d[section][key])
        if path is not None:
            d[section][key] = {"path": d[section][key], "sha256": content_digest(path, DATA_SUFFIXES)}
    return d


def stage_keys(cfg: RunConfig, fingerprint: str | None = None) -> dict[str, str]:
    """Each stage's key: its own config, the bytes of the user files it reads, the model's weights (its
    `Model.fingerprint`, so a model directory changed in place is not taken for the same model), and its upstream
    keys (a change invalidates what follows)."""
    d = with_input_digests(cfg.to_dict())
    model = {k: v for k, v in d["model"].items() if not (k == "device_map" and v is None)}  # keys of earlier runs
    if fingerprint is not None:
        model["fingerprint"] = fingerprint
    base = _hash(model, cfg.concepts, cfg.setting, cfg.seed)
    prompts = {k: v for k, v in d["prompts"].items() if not (k == "files" and not v)}  # keys of earlier runs
    # the judge floor flags the report only
    d["concept"] = {k: v for k, v in d["concept"].items() if k != "judge_floor"}
    k = {"prompts": _hash(base, prompts)}
    k["vectors"] = _hash(k["prompts"], d["vectors"], cfg.layers)
    steer = _hash(k["vectors"], cfg.positions, cfg.alpha_unit, d["controls"])
    k["tokens"] = _hash(steer, d["tokens"])
    k["logodds"] = _hash(k["tokens"], d["logodds"])
    k["depth"] = _hash(k["logodds"], d["depth"], d["tokens"]["contexts_file"])
    k["limit"] = _hash(steer, d["limit"], d["tokens"]["contexts_file"], d["tokens"]["n_contexts"])
    k["xent"] = _hash(steer, d["xent"])
    k["concept"] = _hash(steer, d["concept"])
    k["mmlu"] = _hash(steer, d["mmlu"])
    k["recommend"] = _hash(k["tokens"], k["logodds"], k["xent"], k["concept"], d["recommend"])
    k["figures"] = _hash(*(k[s] for s in STAGES if s in k))
    floor = cfg.concept.judge_floor
    k["report"] = _hash(k["figures"], *([floor] if floor != ConceptConfig().judge_floor else []))  # earlier runs' keys
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
    from steerstrength.prompts import read_contexts
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


def load_run_model(cfg: RunConfig):
    """The model of a run's `model` section (spec, dtype, device, blocks path, device map)."""
    from steerstrength.loading import load_model

    m = cfg.model
    return load_model(m.spec, dtype=m.dtype, device=m.device, blocks_path=m.blocks_path, device_map=m.device_map)


def run_pipeline(cfg: RunConfig, out: str | Path, *, progress, log, only: list[str] | None = None,
                 model=None) -> dict:
    """Run (or resume) every stage, from P, N (Sec. 5) and v (Eq. 3) to report.html: {stage: (status, seconds)}.

    Args:
        cfg: the run configuration (build_config).
        out: the run directory; finished stages and chunks in it are reused (docs/pipeline.md).
        progress: progress(description, total), a context manager yielding advance(n).
        log: called with one line of text per event.
        only: run these stages only (names of pipeline.STAGES).
        model: the model of cfg.model, already loaded (a Ray actor's); None: loaded here.

    Example::

        from steerstrength.progress import progress_bar        # or stages.no_progress
        ss.run_pipeline(ss.build_config("demo"), "runs/demo", progress=progress_bar, log=print)
    """
    # The model and the layers are checked before anything is written: a wrong model spec or a layer
    # index past the model's depth is one error line, not a half-made run directory.
    check_names(cfg)
    from steerstrength.preflight import check_run

    check_run(cfg)  # every concept's files, texts, judge and contexts: one line now, not a failure stages later
    model = model or load_run_model(cfg)
    layers = resolve_layers(cfg.layers, model.n_layers)  # "auto" is resolved per concept by the vectors stage
    run = RunDir(out)
    with run.lock():
        for note in run.notes:
            log(f"[run] {note}")
        keys = stage_keys(cfg, model.fingerprint())
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


# ----------------------------------------------------------------------------- one vector's share of a run (executors.py)

# The stages whose work is kept in resumable chunks named per (concept, layer): each steering vector's share of a run
# can be computed apart.
PER_VECTOR_STAGES = ("tokens", "xent", "concept", "mmlu")


def run_vectors(cfg: RunConfig, out: str | Path) -> list[tuple[str, int]]:
    """The (concept, layer) of every steering vector of a run directory whose vectors stage is done."""
    from steerstrength.vectors import SteeringVectors

    run = RunDir(out)
    return [(c, layer) for c in cfg.concepts
            for layer in SteeringVectors.load(run.path("vectors", f"{c}.safetensors")).layers]


def run_vector(cfg: RunConfig, out: str | Path, concept: str, layer: int, *, progress, log, model=None) -> list[str]:
    """Compute (or find) one vector's (concept, layer) chunks of the long stages (PER_VECTOR_STAGES) in a run directory
    whose prompts and vectors are done, writing no table and no manifest entry: `run_pipeline` then builds those stages'
    tables from the chunks, exactly as if it had computed them. Vectors of one run may run at once, in other processes
    or on other nodes (each chunk is written atomically under its own name). Returns the stages it filled."""
    model = model or load_run_model(cfg)
    run = RunDir(out)
    ctx = Context(cfg=cfg, run=run, progress=progress, log=log, model=model,
                  layers=resolve_layers(cfg.layers, model.n_layers), keys=stage_keys(cfg, model.fingerprint()),
                  one_vector=(concept, layer))
    filled = []
    for stage in PER_VECTOR_STAGES:
        if enabled(cfg, stage)[0]:
            STAGE_FUNCS[stage](ctx)
            filled.append(stage)
    return filled
