"""`steerstrength sweep tokens | logodds | limit | xent`: parse, call the metrics, write Parquet + JSON."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer

from steerstrength.cli_common import BlocksPathOpt, DeviceOpt, DtypeOpt, ModelOpt, load, log, progress_bar, sweep_app
from steerstrength.errors import InputError

VectorsOpt = typer.Option(..., "--vectors", "-v", help="Steering vectors (.safetensors from `steerstrength vectors`).")
LayersOpt = typer.Option(None, "--layers", "-l", help="e.g. 15 or 5,15,25, 'middle', 'all'; default: every layer in the vector file.")
ConceptOpt = typer.Option(None, "--concept", help="Concept label; default: from the vector file.")
SettingOpt = typer.Option(None, "--setting", help="Setting label (random / contrastive); default: from the vector file.")
NormalizeOpt = typer.Option(False, "--normalize", help="Steer with v / ||v|| instead of the raw vector.")
PositionsOpt = typer.Option("all", "--positions", help="Steer all positions or only the last one.")
OutOpt = typer.Option(Path("."), "--out", "-o", help="Output directory.")
AlphasOpt = typer.Option(None, "--alphas", help="Explicit comma-separated alphas (overrides the linspace), e.g. --alphas=-5,0,5.")
ContextsOpt = typer.Option(None, "--contexts", help="Contexts: JSONL with 'text' (and optional 'id'), or one per line; "
                                                   "default: 44 neutral + the concept's 4 built-in contexts.")
ChatOpt = typer.Option(False, "--chat", help="Wrap contexts in the model's chat template.")
PromptChatOpt = typer.Option(None, "--chat/--no-chat", help="Chat template on prompts; default: on for chat models.")
UnitOpt = typer.Option("raw", "--alpha-unit", help="raw: alpha multiplies the stored vector; resid: the added "
                                                  "alpha * v has alpha times the layer's median residual norm "
                                                  "(the same strength at any layer). Tables carry both columns.")


def parse_alphas(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise InputError(f"--alphas {text!r} must be numbers separated by commas, e.g. --alphas=-5,0,5") from None
    if not values:
        raise InputError("--alphas is empty; give at least one alpha")
    return values


def alpha_grid(alphas: Optional[str], alpha_min: float, alpha_max: float, n_alphas: int):
    """The --alphas list (0 inserted, with a note) or linspace(min, max, n) plus 0; and whether 0 was inserted."""
    from steerstrength.metrics.grid import linspace_grid, with_zero

    if alphas is not None:
        grid, inserted = with_zero(parse_alphas(alphas), warn=False)
        if inserted:
            log("note: the alpha grid had no 0; inserted alpha = 0 (the baseline of every Delta)")
        return grid, inserted
    return linspace_grid(alpha_min, alpha_max, n_alphas), False


def grid_size(alphas: Optional[str], n_alphas: int) -> int:
    """How many alphas the grid will hold (0 included, at most), without building it."""
    if alphas is not None:
        values = parse_alphas(alphas)
        return len(values) + (0.0 not in values)
    if n_alphas < 1:
        raise InputError(f"--n-alphas must be at least 1, not {n_alphas}")
    return n_alphas + 1


TOKEN_ROW_BYTES = 200  # one row of tokens.parquet at the peak (the frames and their concatenation): measured
                       # ~204 on a tiny model, 1,000 to 8,000 alphas


def check_token_memory(n_grid: int, option: str, vocab_size: int, n_contexts: int, n_layers: int, top_k: int) -> None:
    """Refuse, before computing, a token sweep that cannot fit in memory: one line naming `option` and a size that fits.

    The estimate errs low: one context's next-token probabilities [alphas, vocab] in float32, and for every (context,
    layer, alpha) the table rows of top_k tracked tokens (a sweep tracks top_k or more)."""
    top_k = min(top_k, vocab_size)
    per_alpha = 4 * vocab_size + TOKEN_ROW_BYTES * top_k * n_contexts * n_layers
    need, have = n_grid * per_alpha, available_memory()
    if have is None or need <= have:
        return
    fits = max(int(0.8 * have) // per_alpha - 1, 0)
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


class Steering:
    """What every sweep shares: the model, the vectors per layer, the labels of every table row."""

    def __init__(self, model_spec, dtype, device, blocks_path, vectors_path: Path, layers: Optional[str],
                 concept: Optional[str], setting: Optional[str], normalize: bool, positions: str,
                 alpha_unit: str = "raw"):
        from steerstrength.metrics.grid import check_unit
        from steerstrength.steering import check_positions
        from steerstrength.vectors import SteeringVectors, parse_layers

        check_positions(positions)
        self.alpha_unit = check_unit(alpha_unit)
        self.sv = SteeringVectors.load(vectors_path)
        self.model = load(model_spec, dtype=dtype, device=device, blocks_path=blocks_path)
        self.layers = self.sv.layers if layers is None else parse_layers(layers, self.model.n_layers)
        for layer in self.layers:
            self.sv[layer]  # raises a one-line error for a layer the file lacks
        fp = self.sv.meta.get("model_fingerprint")
        if fp and fp != self.model.fingerprint():
            log(f"warning: {vectors_path} was made with model {self.sv.meta.get('model')!r} (fingerprint {fp}), "
                f"not with {self.model.name}")
        self.vectors = {}
        for layer in self.layers:
            v = self.sv[layer].double()
            if normalize:
                if v.norm() == 0:
                    raise InputError(f"the layer-{layer} vector is zero; it cannot be normalized")
                v = v / v.norm()
            self.vectors[layer] = v.float()
        self.positions = positions
        self.labels = dict(model=self.model.name, concept=concept or self.sv.meta.get("concept") or "",
                           setting=setting or self.sv.meta.get("setting") or "",
                           vector="normalized" if normalize else "raw", positions=positions)
        self.vectors_path = str(vectors_path)

    def header(self) -> dict:
        return dict(self.labels, model_fingerprint=self.model.fingerprint(), vectors_file=self.vectors_path,
                    layers=self.layers, vector_norms={str(k): float(v.double().norm()) for k, v in self.vectors.items()},
                    alpha_unit=self.alpha_unit, resid_scales={str(k): self.scale(k) for k in self.layers})

    def scale(self, layer: int) -> float:
        """alpha_resid per unit of raw alpha at `layer` (metrics/grid.py)."""
        from steerstrength.metrics.grid import resid_scale

        return resid_scale(self.vectors[layer], self.sv.residual_norm(layer, self.model))

    def raw(self, layer: int, grid):
        """The grid, given in --alpha-unit, as the raw alphas steered at `layer`."""
        from steerstrength.metrics.grid import to_raw

        return to_raw(grid, self.alpha_unit, self.scale(layer))

    def with_resid(self, frame, layer: int | None = None):
        """Add alpha_resid next to alpha (per row's layer when `layer` is None)."""
        from steerstrength.metrics.grid import add_resid_column

        if layer is not None:
            return add_resid_column(frame, self.scale(layer))
        parts = [add_resid_column(g.copy(), self.scale(int(ly))) for ly, g in frame.groupby("layer", sort=False)]
        import pandas as pd

        return pd.concat(parts).loc[frame.index] if parts else frame

    def contexts(self, path: Optional[Path], chat: bool):
        from steerstrength.metrics.contexts import as_contexts, builtin_concepts, builtin_contexts, read_contexts

        if path is not None:
            return as_contexts(self.model, read_contexts(path), chat=chat)
        concept = self.labels["concept"]
        if concept and concept.lower() not in builtin_concepts():
            log(f"note: no built-in contexts for concept {concept!r}; using the 44 neutral ones")
        return as_contexts(self.model, builtin_contexts(concept), chat=chat)


def _write(out: Path, tables: dict, summary: dict) -> None:
    from steerstrength.io import write_json, write_parquet

    for name, frame in tables.items():
        write_parquet(out / name, frame)
    write_json(out / summary.pop("_file"), summary)


def _token_sweep(st: Steering, contexts, grid, top_k: int, chat: bool, extra=(), **curve_options) -> dict:
    """{layer: TokenCurves}, each layer on the grid in --alpha-unit converted to its raw alphas."""
    from steerstrength.metrics.tokens import token_curves

    out = {}
    with progress_bar("next-token curves", len(contexts) * len(st.layers)) as advance:
        for layer in st.layers:
            out[layer] = token_curves(st.model, st.vectors[layer], layer, contexts, st.raw(layer, grid),
                                      positions=st.positions, top_k=top_k, tokens=extra, chat=chat, progress=advance,
                                      **curve_options)
    return out


def _token_tables(st: Steering, results: dict) -> dict:
    import pandas as pd

    return {"tokens.parquet": pd.concat([st.with_resid(r.curves_frame(st.model, **st.labels), layer)
                                         for layer, r in results.items()], ignore_index=True),
            "tokens_top.parquet": pd.concat([st.with_resid(r.top_frame(st.model, **st.labels), layer)
                                             for layer, r in results.items()], ignore_index=True)}


def _token_summary(st: Steering, results: dict) -> dict:
    first = next(iter(results.values()))
    summary = first.summary(st.model)
    for r in list(results.values())[1:]:
        summary["per_layer"].update(r.summary(st.model)["per_layer"])
    summary["layers"] = list(results)
    summary["alpha_unit"] = st.alpha_unit
    return summary


@sweep_app.command("tokens")
def sweep_tokens(
    vectors: Path = VectorsOpt,
    layers: Optional[str] = LayersOpt,
    contexts: Optional[Path] = ContextsOpt,
    alpha_min: float = typer.Option(-200.0, "--alpha-min"),
    alpha_max: float = typer.Option(200.0, "--alpha-max"),
    n_alphas: int = typer.Option(1024, "--n-alphas", help="linspace points; 0 is added."),
    alphas: Optional[str] = AlphasOpt,
    top_k: int = typer.Option(100, "--top-k", help="Tokens stored at alpha_max and at alpha_min."),
    top_each: int = typer.Option(10, "--top-each", help="Also store the top N tokens at every alpha (0: off)."),
    positions: str = PositionsOpt,
    normalize: bool = NormalizeOpt,
    alpha_unit: str = UnitOpt,
    chat: bool = ChatOpt,
    concept: Optional[str] = ConceptOpt,
    setting: Optional[str] = SettingOpt,
    out: Path = OutOpt,
    model: Optional[str] = ModelOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    blocks_path: Optional[str] = BlocksPathOpt,
) -> None:
    """Next-token curves Delta p(z, alpha) (Def. 3.1), peaks and shapes (Thm 3.3): tokens.parquet, tokens_top.parquet."""
    from steerstrength.io import check_output_dir

    start = time.perf_counter()
    check_output_dir(out, names=("tokens.parquet", "tokens_top.parquet", "tokens.json"))
    n_grid = grid_size(alphas, n_alphas)
    st = Steering(model, dtype, device, blocks_path, vectors, layers, concept, setting, normalize, positions,
                  alpha_unit)
    ctxs = st.contexts(contexts, chat)
    check_token_memory(n_grid, "--alphas" if alphas is not None else "--n-alphas", st.model.vocab_size, len(ctxs),
                       len(st.layers), top_k)
    grid, inserted = alpha_grid(alphas, alpha_min, alpha_max, n_alphas)
    results = _token_sweep(st, ctxs, grid, top_k, chat, top_each=top_each)
    summary = dict(st.header(), **_token_summary(st, results), seconds=round(time.perf_counter() - start, 2),
                   _file="tokens.json")
    summary["inserted_zero"] = inserted
    _write(out, _token_tables(st, results), summary)
    log(f"wrote {out / 'tokens.parquet'}, {out / 'tokens_top.parquet'} and {out / 'tokens.json'} "
        f"({len(ctxs)} contexts x {len(st.layers)} layer(s) x {grid.numel()} alphas)")


@sweep_app.command("logodds")
def sweep_logodds(
    positive: Path = typer.Option(..., "--positive", "-p", help="P: JSONL with a 'text' field, or one text per line."),
    negative: Path = typer.Option(..., "--negative", "-n", help="N: same formats."),
    tokens_dir: Optional[Path] = typer.Option(None, "--tokens-dir", help="Reuse tokens.parquet / tokens_top.parquet of "
                                                                         "`sweep tokens` from this directory."),
    vectors: Optional[Path] = typer.Option(None, "--vectors", "-v", help="Without --tokens-dir: vectors for the token sweep."),
    layers: Optional[str] = LayersOpt,
    contexts: Optional[Path] = ContextsOpt,
    alpha_min: float = typer.Option(-200.0, "--alpha-min"),
    alpha_max: float = typer.Option(200.0, "--alpha-max"),
    n_alphas: int = typer.Option(1024, "--n-alphas", help="linspace points; 0 is added."),
    alphas: Optional[str] = AlphasOpt,
    top_k: int = typer.Option(100, "--top-k"),
    max_tokens: int = typer.Option(100, "--max-tokens", help="Each P/N text is cut to its first N tokens."),
    batch_size: int = typer.Option(8, "--batch-size"),
    n_dominant: int = typer.Option(8, "--n-dominant", help="Top tokens at alpha_max / alpha_min that 'dominate'."),
    extremal_fraction: float = typer.Option(0.01, "--extremal-fraction", help="Extremal M: top / bottom fraction of the vocabulary."),
    n_target: int = typer.Option(100, "--n-target", help="Target tokens: the n tokens of largest M."),
    positions: str = PositionsOpt,
    normalize: bool = NormalizeOpt,
    alpha_unit: str = UnitOpt,
    chat: bool = ChatOpt,
    concept: Optional[str] = ConceptOpt,
    setting: Optional[str] = SettingOpt,
    out: Path = OutOpt,
    model: Optional[str] = ModelOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    blocks_path: Optional[str] = BlocksPathOpt,
) -> None:
    """Log-odds M(z) (Def. 3.2) from P and N, and the theory-vs-practice analysis: logodds.parquet, logodds.json."""
    import pandas as pd
    import torch

    from steerstrength.io import check_output_dir, read_texts
    from steerstrength.metrics.logodds import log_odds_analysis, log_odds_frame, mean_log_probs

    start = time.perf_counter()
    check_output_dir(out, names=("logodds.parquet", "logodds.json") +
                     (("tokens.parquet", "tokens_top.parquet") if tokens_dir is None else ()))
    pos = [r["text"] for r in read_texts(positive, what="positive prompt file")]
    neg = [r["text"] for r in read_texts(negative, what="negative prompt file")]
    if tokens_dir is None and vectors is None:
        raise InputError("give --tokens-dir (output of `sweep tokens`) or --vectors to run the token sweep here")
    if tokens_dir is not None:
        for name in ("tokens.parquet", "tokens_top.parquet"):
            if not (tokens_dir / name).is_file():
                raise InputError(f"{tokens_dir / name} does not exist; run `steerstrength sweep tokens --out {tokens_dir}`")
    if vectors is not None:
        st = Steering(model, dtype, device, blocks_path, vectors, layers, concept, setting, normalize, positions,
                      alpha_unit)
        lm, labels, header = st.model, st.labels, st.header()
        if tokens_dir is None:  # the token sweep runs here: refuse one that cannot fit before computing log p
            ctxs = st.contexts(contexts, chat)
            check_token_memory(grid_size(alphas, n_alphas), "--alphas" if alphas is not None else "--n-alphas",
                               lm.vocab_size, len(ctxs), len(st.layers), top_k)
    else:
        lm = load(model, dtype=dtype, device=device, blocks_path=blocks_path)
        labels = dict(model=lm.name, concept=concept or "", setting=setting or "")
        header = dict(labels, model_fingerprint=lm.fingerprint())
    with progress_bar("log p after P and N", len(pos) + len(neg)) as advance:
        lp_pos = mean_log_probs(lm, pos, max_tokens=max_tokens, batch_size=batch_size, chat=False, progress=advance)
        lp_neg = mean_log_probs(lm, neg, max_tokens=max_tokens, batch_size=batch_size, chat=False, progress=advance)
    M = lp_pos - lp_neg
    tables = {}
    if tokens_dir is not None:
        top = pd.read_parquet(tokens_dir / "tokens_top.parquet")
        curves = pd.read_parquet(tokens_dir / "tokens.parquet",
                                 columns=["layer", "context_id", "token_id", "peak_alpha", "shape"])
        for key in ("concept", "setting"):
            if not labels.get(key) and key in top.columns and top[key].nunique() == 1:
                labels[key] = header[key] = str(top[key].iloc[0])
    else:
        grid, _ = alpha_grid(alphas, alpha_min, alpha_max, n_alphas)
        ranked = torch.argsort(M, descending=True, stable=True)
        extra = torch.cat([ranked[:n_target], ranked[-n_target:]]).tolist()  # so target tokens have curves
        results = _token_sweep(st, ctxs, grid, top_k, chat, extra)
        tables = _token_tables(st, results)
        top, curves = tables["tokens_top.parquet"], tables["tokens.parquet"]
    analysis = log_odds_analysis(M, top, curves, n_dominant=n_dominant, extremal_fraction=extremal_fraction,
                                 n_target=n_target)
    vocab_labels = dict(model=labels["model"], concept=labels["concept"], setting=labels["setting"])
    frame = log_odds_frame(lm, M, positive=lp_pos, negative=lp_neg, extremal_fraction=extremal_fraction, **vocab_labels)
    frame.insert(3, "layer", pd.array([None] * len(frame), dtype="Int64"))  # M does not depend on the layer
    frame.insert(4, "alpha", 0.0)  # M comes from the unsteered model
    tables["logodds.parquet"] = frame
    top_m = frame.nsmallest(20, "rank")
    bottom_m = frame.nlargest(20, "rank")
    summary = dict(header, n_positive=len(pos), n_negative=len(neg), max_tokens=max_tokens,
                   tokens_from=str(tokens_dir) if tokens_dir is not None else "computed here",
                   top_M_tokens=top_m["token"].tolist(), bottom_M_tokens=bottom_m["token"].tolist(),
                   **analysis, seconds=round(time.perf_counter() - start, 2), _file="logodds.json")
    _write(out, tables, summary)
    log(f"wrote {', '.join(str(out / n) for n in tables)} and {out / 'logodds.json'}")


@sweep_app.command("limit")
def sweep_limit(
    vectors: Path = VectorsOpt,
    layers: Optional[str] = LayersOpt,
    contexts: Optional[Path] = ContextsOpt,
    alphas: str = typer.Option("-1e4,-1e3,-1e2,1e2,1e3,1e4", "--alphas", help="Nonzero alphas, comma-separated."),
    positions: str = PositionsOpt,
    normalize: bool = NormalizeOpt,
    alpha_unit: str = UnitOpt,
    chat: bool = ChatOpt,
    concept: Optional[str] = ConceptOpt,
    setting: Optional[str] = SettingOpt,
    out: Path = OutOpt,
    model: Optional[str] = ModelOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    blocks_path: Optional[str] = BlocksPathOpt,
) -> None:
    """Large-alpha limit (Prop. 4.1): TV(p_alpha, softmax(LN(+/-v) W^T)) per context and alpha: limit.parquet."""
    import pandas as pd

    from steerstrength.io import check_output_dir
    from steerstrength.metrics.limits import limit_check

    start = time.perf_counter()
    check_output_dir(out, names=("limit.parquet", "limit.json"))
    grid = parse_alphas(alphas)
    st = Steering(model, dtype, device, blocks_path, vectors, layers, concept, setting, normalize, positions,
                  alpha_unit)
    ctxs = st.contexts(contexts, chat)
    frames, per_layer = [], {}
    with progress_bar("large-alpha limit", len(ctxs) * len(st.layers)) as advance:
        for layer in st.layers:
            check = limit_check(st.model, st.vectors[layer], layer, ctxs, st.raw(layer, grid).tolist(),
                                positions=positions, chat=chat, progress=advance)
            frames.append(st.with_resid(check.frame(st.model, **st.labels, layer=layer), layer))
            per_layer[str(layer)] = check.summary()
    summary = dict(st.header(), per_layer=per_layer, seconds=round(time.perf_counter() - start, 2), _file="limit.json")
    _write(out, {"limit.parquet": pd.concat(frames, ignore_index=True)}, summary)
    for layer, s in per_layer.items():
        tv = ", ".join(f"{r['alpha']:g}: {r['tv_mean']:.3g}" for r in s["per_alpha"])
        log(f"layer {layer}: mean TV to the limit by alpha: {tv}")
    log(f"wrote {out / 'limit.parquet'} and {out / 'limit.json'}")


@sweep_app.command("xent")
def sweep_xent(
    vectors: Path = VectorsOpt,
    layers: Optional[str] = LayersOpt,
    corpus: Optional[str] = typer.Option(None, "--corpus", help="A .txt/.jsonl/.parquet file, a Parquet directory, or "
                                                                 "hf:NAME[:CONFIG]; default: samples of the unsteered model."),
    field: str = typer.Option("text", "--field", help="The text column / field of the corpus."),
    split: str = typer.Option("train", "--split", help="Split of a hf: dataset or of a local dataset directory."),
    data_files: Optional[List[str]] = typer.Option(None, "--data-files", help="Files of a hf: dataset (paths or "
                                                   "globs; repeatable)."),
    max_texts: Optional[int] = typer.Option(None, "--max-texts", help="Use the first N texts (hf: default 1000)."),
    n_samples: int = typer.Option(64, "--n-samples", help="Model-samples corpus: number of texts."),
    sample_tokens: int = typer.Option(256, "--sample-tokens", help="Model-samples corpus: tokens per text."),
    seed: int = typer.Option(0, "--seed", help="Model-samples corpus: sampling seed."),
    seq_len: int = typer.Option(128, "--seq-len", help="Scored tokens per window (windows have seq_len + 1 tokens)."),
    packing: bool = typer.Option(False, "--packing", help="Concatenate texts before windowing."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Score at most this many tokens."),
    alpha_min: float = typer.Option(-100.0, "--alpha-min"),
    alpha_max: float = typer.Option(100.0, "--alpha-max"),
    n_alphas: int = typer.Option(128, "--n-alphas", help="linspace points; 0 is added."),
    alphas: Optional[str] = AlphasOpt,
    curvature: bool = typer.Option(True, "--curvature/--no-curvature", help="d2 CE/d alpha2 at 0 by jvp-of-jvp."),
    curvature_tokens: Optional[int] = typer.Option(None, "--curvature-tokens", help="Tokens for the curvature (default: all)."),
    positions: str = PositionsOpt,
    normalize: bool = NormalizeOpt,
    alpha_unit: str = UnitOpt,
    concept: Optional[str] = ConceptOpt,
    setting: Optional[str] = SettingOpt,
    out: Path = OutOpt,
    model: Optional[str] = ModelOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    blocks_path: Optional[str] = BlocksPathOpt,
) -> None:
    """Delta CE(alpha) on a corpus (Def. 3.7), curvature at 0 (Thm 3.8), plateau (Prop. 4.1): xent.parquet, xent.json."""
    import pandas as pd

    from steerstrength.corpus import load_corpus
    from steerstrength.io import check_output_dir
    from steerstrength.metrics.xent import windows, xent_sweep

    start = time.perf_counter()
    check_output_dir(out, names=("xent.parquet", "xent.json", "corpus_samples.jsonl"))
    grid, inserted = alpha_grid(alphas, alpha_min, alpha_max, n_alphas)
    st = Steering(model, dtype, device, blocks_path, vectors, layers, concept, setting, normalize, positions,
                  alpha_unit)
    if corpus is None:
        with progress_bar("sampling the corpus from the model", n_samples) as advance:
            texts = load_corpus(None, model=st.model, n_samples=n_samples, sample_tokens=sample_tokens, seed=seed,
                                cache_dir=out, progress=advance)
    else:
        texts = load_corpus(corpus, model=st.model, field=field, split=split, max_texts=max_texts,
                            data_files=data_files)
    n_windows = windows(st.model, texts, seq_len, packing=packing).shape[0]
    if max_tokens is not None:
        n_windows = min(n_windows, max_tokens // seq_len)
    frames, per_layer = [], {}
    for layer in st.layers:
        with progress_bar(f"Delta CE, layer {layer} (windows x alphas)", n_windows * grid.numel()) as advance:
            result = xent_sweep(st.model, st.vectors[layer], layer, texts, st.raw(layer, grid), seq_len=seq_len,
                                positions=positions,
                                packing=packing, max_tokens=max_tokens, curvature=curvature,
                                curvature_tokens=curvature_tokens, progress=advance)
        result.inserted_zero = inserted
        frames.append(st.with_resid(result.frame(**st.labels, layer=layer), layer))
        per_layer[str(layer)] = result.summary()
        c = per_layer[str(layer)].get("curvature")
        if c:
            log(f"layer {layer}: CE''(0) jvp {c['jvp']:.4g}, quadratic fit {c['fit']:.4g}; CE'(0) {c['slope_jvp']:.3g}")
    source = corpus or f"samples of {st.model.name} (seed {seed}; Delta CE estimates the mean KL(unsteered || steered))"
    summary = dict(st.header(), corpus=source, packing=packing, per_layer=per_layer,
                   seconds=round(time.perf_counter() - start, 2), _file="xent.json")
    _write(out, {"xent.parquet": pd.concat(frames, ignore_index=True)}, summary)
    log(f"wrote {out / 'xent.parquet'} and {out / 'xent.json'}")
