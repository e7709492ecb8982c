"""`steerstrength sweep tokens | logodds | limit | xent`: parse options (defaults: the preset's config section), call
the stage (stages.py) the run calls too, write its tables (runs.write_result)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer

from steerstrength.cli.common import (BlocksPathOpt, DeviceOpt, DtypeOpt, ModelOpt, check_at_least, check_seed, load, log,
                                      progress_bar, sweep_app)
from steerstrength.errors import InputError
from steerstrength.stages import check_token_memory

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


def grid_size(alphas: Optional[str], n_alphas: int) -> int:
    """How many alphas the grid will hold (0 included, at most), without building it."""
    if alphas is not None:
        from steerstrength.grid import parse_alphas

        values = parse_alphas(alphas)
        return len(values) + (0.0 not in values)
    if n_alphas < 1:
        raise InputError(f"--n-alphas must be at least 1, not {n_alphas}")
    return n_alphas + 1


def preset_section(preset: str, name: str, **given):
    """The preset's config section `name` (config.py: the only defaults) with the options the user gave (not None)."""
    import dataclasses

    from steerstrength.config import preset as run_preset

    cfg = run_preset(preset)
    return cfg, dataclasses.replace(getattr(cfg, name), **{k: v for k, v in given.items() if v is not None})


def command_grid(alphas, alpha_min, alpha_max, n_alphas, *, section, unit: Optional[str], cfg, zero: bool = True,
                 spacing: str = "linear"):
    """(grid, unit) of a sweep command: grid.AlphaGrid.from_options over the preset's section; a note when 0 was
    inserted into a user's --alphas."""
    from steerstrength.grid import AlphaGrid, check_unit

    unit = check_unit(unit or cfg.alpha_unit)
    grid = AlphaGrid.from_options(alphas, alpha_min, alpha_max, n_alphas, section=section, unit=unit,
                                  section_unit=cfg.alpha_unit, zero=zero, spacing=spacing)
    if alphas is not None and grid.inserted_zero:
        log("note: the alpha grid had no 0; inserted alpha = 0 (the baseline of every Delta)")
    return grid


class Steering:
    """What every sweep command shares: the model, one SteeringVector per layer, the labels of every table row."""

    def __init__(self, model_spec, dtype, device, blocks_path, vectors_path: Path, layers: Optional[str],
                 concept: Optional[str], setting: Optional[str], normalize: bool, positions: str,
                 alpha_unit: str = "raw"):
        from steerstrength.grid import check_unit
        from steerstrength.stages import row_labels
        from steerstrength.steering import check_positions
        from steerstrength.vectors import SteeringVectors, parse_layers

        check_positions(positions)
        self.alpha_unit = check_unit(alpha_unit)
        self.sv = SteeringVectors.load(vectors_path)
        self.model = load(model_spec, dtype=dtype, device=device, blocks_path=blocks_path)
        self.layers = self.sv.layers if layers is None else parse_layers(layers, self.model.n_layers)
        fp = self.sv.meta.get("model_fingerprint")
        if fp and fp != self.model.fingerprint():
            log(f"warning: {vectors_path} was made with model {self.sv.meta.get('model')!r} (fingerprint {fp}), "
                f"not with {self.model.name}")
        chosen = self.sv.select(self.layers, self.model)
        self.vectors = {v.layer: v.normalized() if normalize else v for v in chosen}
        self.normalize = normalize
        self.positions = positions
        self.labels = row_labels(self.model.name, concept or self.sv.meta.get("concept") or "",
                                 setting or self.sv.meta.get("setting") or "", positions)
        self.vectors_path = str(vectors_path)

    def steered(self, cfg, stage: str, n_controls: Optional[int], seed: Optional[int] = None) -> list:
        """v at every layer, each followed by its random directions (vectors.random_controls): --controls, or the
        preset's count for the stage, seeded from the run seed, exactly as `steerstrength run` steers them."""
        from steerstrength.vectors import random_controls

        n = controls_count(cfg, stage, n_controls)
        out = []
        for sv in self.vectors.values():
            out += [sv, *random_controls(sv, n, seed=cfg.seed if seed is None else seed)]
        return out

    def header(self, start: float | None = None, **extra) -> dict:
        """What the summary JSON says besides the stage's own summary: the inputs, and the seconds it took."""
        out = dict(self.labels, model_fingerprint=self.model.fingerprint(), vectors_file=self.vectors_path,
                   layers=self.layers, vector="normalized" if self.normalize else "raw",
                   vector_norms={str(k): float(v.vector.double().norm()) for k, v in self.vectors.items()},
                   alpha_unit=self.alpha_unit, resid_scales={str(k): self.scale(k) for k in self.layers}, **extra)
        if start is not None:
            out["seconds"] = round(time.perf_counter() - start, 2)
        return out

    def scale(self, layer: int) -> float:
        """alpha_resid per unit of raw alpha at `layer` (grid.py)."""
        return self.vectors[layer].resid_scale(self.model)

    def raw(self, layer: int, grid):
        """The grid, given in --alpha-unit, as the raw alphas steered at `layer`."""
        from steerstrength.grid import to_raw

        return to_raw(grid, self.alpha_unit, self.scale(layer))

    def with_resid(self, frame, layer: int):
        """Add alpha_resid next to alpha."""
        from steerstrength.grid import add_resid_column

        return add_resid_column(frame, self.scale(layer))

    def contexts(self, path: Optional[Path], chat: bool, n_contexts: Optional[int] = None,
                 preset_n: Optional[int] = None):
        """--contexts, or the built-in ones the run uses (metrics.contexts.stage_contexts), checked on the model:
        the first --n-contexts of them; without it, all of a user's file, or the preset's count of the built-in."""
        from steerstrength.metrics.contexts import as_contexts, builtin_concepts, stage_contexts

        concept = self.labels["concept"]
        if path is None and concept and concept.lower() not in builtin_concepts():
            log(f"note: no built-in contexts for concept {concept!r}; using the 44 neutral ones")
        n = n_contexts if n_contexts is not None or path is not None else preset_n
        return as_contexts(self.model, stage_contexts(concept, path, n), chat=chat)


def controls_count(cfg, stage: str, given: Optional[int]) -> int:
    """--controls, or the preset's controls.n_sweep (0: v alone; `steerstrength run` steers controls.n_random)."""
    if given is not None:
        check_at_least(("--controls", given, 0))
        return given
    return cfg.controls.n_sweep


def _done(out: Path, paths, start: float, what: str = "") -> None:
    log(f"wrote {', '.join(str(p) for p in paths)}{' (' + what + ')' if what else ''} "
        f"in {time.perf_counter() - start:.1f} s")


PresetOpt = typer.Option("demo", "--preset", help="Where the defaults come from: that preset's section of "
                                                  "`steerstrength config show --preset NAME` (demo or paper).")
GridUnitOpt = typer.Option(None, "--alpha-unit", help="raw: alpha multiplies the stored vector; resid: the added "
                                                      "alpha * v has alpha times the layer's median residual norm "
                                                      "(the same strength at any layer); default: the preset's "
                                                      "(resid). Tables carry both columns.")
AlphaMinOpt = typer.Option(None, "--alpha-min", help="default: -alpha_max.")
NContextsOpt = typer.Option(None, "--n-contexts", help="Keep the first N contexts (of the built-in ones, half the "
                                                       "concept's own); default: all of --contexts, or the preset's "
                                                       "count of the built-in ones.")
ControlsOpt = typer.Option(None, "--controls", help="Random directions of v's norm, orthogonal to v, steered beside "
                                                   "each vector (rows with direction random-0, ...), as a run steers "
                                                   "controls.n_random of them; default: the preset's "
                                                   "controls.n_sweep (0: v alone).")


@sweep_app.command("tokens")
def sweep_tokens(
    vectors: Path = VectorsOpt,
    layers: Optional[str] = LayersOpt,
    contexts: Optional[Path] = ContextsOpt,
    n_contexts: Optional[int] = NContextsOpt,
    alpha_min: Optional[float] = AlphaMinOpt,
    alpha_max: Optional[float] = typer.Option(None, "--alpha-max", help="default: the preset's tokens.alpha_max."),
    n_alphas: Optional[int] = typer.Option(None, "--n-alphas", help="linspace points (0 is added); default: the "
                                                                    "preset's."),
    alphas: Optional[str] = AlphasOpt,
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Tokens stored at alpha_max and at alpha_min."),
    top_each: Optional[int] = typer.Option(None, "--top-each", help="Also store the top N tokens at every alpha (0: off)."),
    certify: Optional[bool] = typer.Option(None, "--certify/--no-certify",
                                           help="bfloat16 / float16: re-run the tracked tokens in float32 at 11 "
                                                "alphas of the grid and 0, and report max |p - p_float32| "
                                                "(p_error_bound); default: the preset's tokens.certify (on)."),
    positions: str = PositionsOpt,
    normalize: bool = NormalizeOpt,
    alpha_unit: Optional[str] = GridUnitOpt,
    chat: bool = ChatOpt,
    concept: Optional[str] = ConceptOpt,
    setting: Optional[str] = SettingOpt,
    controls: Optional[int] = ControlsOpt,
    preset: str = PresetOpt,
    out: Path = OutOpt,
    model: Optional[str] = ModelOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    blocks_path: Optional[str] = BlocksPathOpt,
) -> None:
    """Next-token curves Delta p(z, alpha) (Def. 3.1), peaks and shapes (Thm 3.3): tokens.parquet, tokens_top.parquet."""
    from steerstrength.grid import check_unit
    from steerstrength.io import check_output_dir
    from steerstrength.runs import output_folder, write_result
    from steerstrength.stages import tokens_stage

    start = time.perf_counter()
    check_at_least(("--n-alphas", n_alphas, 1), ("--top-k", top_k, 1), ("--top-each", top_each, 0),
                   ("--n-contexts", n_contexts, 1))
    check_output_dir(out, names=("tokens.parquet", "tokens_top.parquet", "tokens.json"))
    cfg, section = preset_section(preset, "tokens", n_alphas=n_alphas, top_k=top_k, top_each=top_each,
                                  n_contexts=n_contexts, certify=certify)
    unit = check_unit(alpha_unit or cfg.alpha_unit)
    st = Steering(model, dtype, device, blocks_path, vectors, layers, concept, setting, normalize, positions, unit)
    ctxs = st.contexts(contexts, chat, n_contexts, section.n_contexts)
    check_token_memory(grid_size(alphas, section.n_alphas), "--alphas" if alphas is not None else "--n-alphas",
                       st.model.vocab_size, len(ctxs), len(st.layers), section.top_k)
    grid = command_grid(alphas, alpha_min, alpha_max, n_alphas, section=section, unit=unit, cfg=cfg)
    with output_folder(out):  # one writer; its tables are one set (runs.check_result_set)
        result = tokens_stage(st.model, st.steered(cfg, "tokens", controls), section, contexts=ctxs, labels=st.labels,
                              positions=positions, grid=grid, chat=chat, progress=progress_bar)
        paths = write_result(out, result, extra=st.header(start, preset=preset))
    bound = (result.summary()["p_error_bound"].get(st.labels["concept"]) or {}).get("max")
    _done(out, paths, start, f"{len(ctxs)} contexts x {len(st.layers)} layer(s) x {len(grid)} alphas"
          + (f"; |p - p_float32| <= {bound:.2g} at the checked alphas" if bound is not None else ""))


@sweep_app.command("logodds")
def sweep_logodds(
    positive: Path = typer.Option(..., "--positive", "-p", help="P: JSONL with a 'text' field, or one text per line."),
    negative: Path = typer.Option(..., "--negative", "-n", help="N: same formats."),
    tokens_dir: Optional[Path] = typer.Option(None, "--tokens-dir", help="Reuse tokens.parquet / tokens_top.parquet of "
                                                                         "`sweep tokens` from this directory."),
    vectors: Optional[Path] = typer.Option(None, "--vectors", "-v", help="Without --tokens-dir: vectors for the token sweep."),
    layers: Optional[str] = LayersOpt,
    contexts: Optional[Path] = ContextsOpt,
    n_contexts: Optional[int] = NContextsOpt,
    alpha_min: Optional[float] = AlphaMinOpt,
    alpha_max: Optional[float] = typer.Option(None, "--alpha-max", help="default: the preset's tokens.alpha_max."),
    n_alphas: Optional[int] = typer.Option(None, "--n-alphas", help="linspace points (0 is added)."),
    alphas: Optional[str] = AlphasOpt,
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Each P/N text is cut to its first N tokens."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    n_dominant: Optional[int] = typer.Option(None, "--n-dominant", help="Top tokens at alpha_max / alpha_min that "
                                                                        "'dominate'."),
    extremal_fraction: Optional[float] = typer.Option(None, "--extremal-fraction", help="Extremal M: top / bottom "
                                                                                        "fraction of the vocabulary."),
    n_target: Optional[int] = typer.Option(None, "--n-target", help="Target tokens: the n tokens of largest M."),
    heldout_positive: Optional[Path] = typer.Option(None, "--heldout-positive", help="P texts the vector was not "
                                                    "built from (with --heldout-negative): their M is the table's "
                                                    "M_heldout, which the concept-specific verdicts read."),
    heldout_negative: Optional[Path] = typer.Option(None, "--heldout-negative", help="N texts the vector was not "
                                                    "built from."),
    positions: str = PositionsOpt,
    normalize: bool = NormalizeOpt,
    alpha_unit: Optional[str] = GridUnitOpt,
    chat: bool = ChatOpt,
    concept: Optional[str] = ConceptOpt,
    setting: Optional[str] = SettingOpt,
    preset: str = PresetOpt,
    out: Path = OutOpt,
    model: Optional[str] = ModelOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    blocks_path: Optional[str] = BlocksPathOpt,
) -> None:
    """Log-odds M(z) (Def. 3.2) from P and N, and the theory-vs-practice analysis: logodds.parquet, logodds.json."""
    import pandas as pd

    from steerstrength.grid import check_unit
    from steerstrength.io import check_output_dir, read_texts
    from steerstrength.runs import check_result_set, output_folder, write_result
    from steerstrength.stages import log_probs_after, logodds_stage, row_labels, target_tokens, tokens_stage

    start = time.perf_counter()
    check_at_least(("--n-alphas", n_alphas, 1), ("--top-k", top_k, 1), ("--max-tokens", max_tokens, 1),
                   ("--batch-size", batch_size, 1), ("--n-dominant", n_dominant, 1), ("--n-target", n_target, 1),
                   ("--n-contexts", n_contexts, 1))
    check_output_dir(out, names=("logodds.parquet", "logodds.json") +
                     (("tokens.parquet", "tokens_top.parquet", "tokens.json") if tokens_dir is None else ()))
    cfg, section = preset_section(preset, "logodds", max_tokens=max_tokens, batch_size=batch_size,
                                  n_dominant=n_dominant, extremal_fraction=extremal_fraction, n_target=n_target)
    if not 0 < section.extremal_fraction <= 1:
        raise InputError(f"--extremal-fraction must be in (0, 1], not {section.extremal_fraction}")
    pos = [r["text"] for r in read_texts(positive, what="positive prompt file")]
    neg = [r["text"] for r in read_texts(negative, what="negative prompt file")]
    if tokens_dir is None and vectors is None:
        raise InputError("give --tokens-dir (output of `sweep tokens`) or --vectors to run the token sweep here")
    if tokens_dir is not None:  # the set one `sweep tokens` finished, never a mix of two or a killed one's
        check_result_set(tokens_dir, "tokens", ("tokens.parquet", "tokens_top.parquet"),
                         f"steerstrength sweep tokens --out {tokens_dir}")
    if vectors is not None:
        _, tokens_section = preset_section(preset, "tokens", n_alphas=n_alphas, top_k=top_k, n_contexts=n_contexts)
        unit = check_unit(alpha_unit or cfg.alpha_unit)
        st = Steering(model, dtype, device, blocks_path, vectors, layers, concept, setting, normalize, positions, unit)
        lm, labels, header = st.model, dict(st.labels), st.header(preset=preset)
        if tokens_dir is None:  # the token sweep runs here: refuse one that cannot fit before computing log p
            ctxs = st.contexts(contexts, chat, n_contexts, tokens_section.n_contexts)
            check_token_memory(grid_size(alphas, tokens_section.n_alphas),
                               "--alphas" if alphas is not None else "--n-alphas", lm.vocab_size, len(ctxs),
                               len(st.layers), tokens_section.top_k)
            grid = command_grid(alphas, alpha_min, alpha_max, n_alphas, section=tokens_section, unit=unit, cfg=cfg)
    else:
        lm = load(model, dtype=dtype, device=device, blocks_path=blocks_path)
        labels = row_labels(lm.name, concept or "", setting or "", positions)
        header = dict(labels, model_fingerprint=lm.fingerprint(), preset=preset)
    with output_folder(out):  # one writer; the tables it writes are one set each
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
                                 positions=positions, grid=grid, tokens=target_tokens(M, section.n_target), chat=chat,
                                 progress=progress_bar)
            tables = swept.tables()
            top, curves = tables["tokens_top.parquet"], tables["tokens.parquet"]
            write_result(out, swept, extra=st.header(preset=preset))
        if (heldout_positive is None) != (heldout_negative is None):
            raise InputError("give both --heldout-positive and --heldout-negative, or neither")
        heldout = None if heldout_positive is None else (
            [r["text"] for r in read_texts(heldout_positive, min_count=2, what="held-out positive file")],
            [r["text"] for r in read_texts(heldout_negative, min_count=2, what="held-out negative file")])
        result = logodds_stage(lm, pos, neg, section, tokens_top=top, curves=curves, labels=labels, log_probs=log_probs,
                               heldout=heldout)
        frame = result.tables()["logodds.parquet"]
        extra = dict(header, n_positive=len(pos), n_negative=len(neg), max_tokens=section.max_tokens,
                     tokens_from=str(tokens_dir) if tokens_dir is not None else "computed here",
                     top_M_tokens=frame.nsmallest(20, "rank")["token"].tolist(),
                     bottom_M_tokens=frame.nlargest(20, "rank")["token"].tolist(),
                     seconds=round(time.perf_counter() - start, 2))
        paths = write_result(out, result, extra=extra)
    _done(out, paths, start)


@sweep_app.command("limit")
def sweep_limit(
    vectors: Path = VectorsOpt,
    layers: Optional[str] = LayersOpt,
    contexts: Optional[Path] = ContextsOpt,
    n_contexts: Optional[int] = NContextsOpt,
    alphas: Optional[str] = typer.Option(None, "--alphas", help="Nonzero alphas, comma-separated; default: +/- each of "
                                                                "the preset's limit.alphas."),
    positions: str = PositionsOpt,
    normalize: bool = NormalizeOpt,
    alpha_unit: Optional[str] = GridUnitOpt,
    chat: bool = ChatOpt,
    concept: Optional[str] = ConceptOpt,
    setting: Optional[str] = SettingOpt,
    controls: Optional[int] = ControlsOpt,
    preset: str = PresetOpt,
    out: Path = OutOpt,
    model: Optional[str] = ModelOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    blocks_path: Optional[str] = BlocksPathOpt,
) -> None:
    """Large-alpha limit (Prop. 4.1): TV(p_alpha, softmax(LN(+/-v) W^T)) per context and alpha: limit.parquet."""
    from steerstrength.grid import AlphaGrid, check_unit
    from steerstrength.io import check_output_dir
    from steerstrength.runs import output_folder, write_result
    from steerstrength.stages import limit_stage

    start = time.perf_counter()
    check_at_least(("--n-contexts", n_contexts, 1))
    check_output_dir(out, names=("limit.parquet", "limit.json"))
    cfg, section = preset_section(preset, "limit")
    unit = check_unit(alpha_unit or cfg.alpha_unit)
    if alphas is None and unit != cfg.alpha_unit:
        raise InputError(f"the preset's limit.alphas are in {cfg.alpha_unit} units; with --alpha-unit {unit} give "
                         "--alphas")
    grid = AlphaGrid.parse(alphas, unit=unit, zero=False) if alphas is not None else \
        AlphaGrid.both_signs(section.alphas, unit=unit)
    st = Steering(model, dtype, device, blocks_path, vectors, layers, concept, setting, normalize, positions, unit)
    ctxs = st.contexts(contexts, chat, n_contexts)
    with output_folder(out):
        result = limit_stage(st.model, st.steered(cfg, "limit", controls), section, contexts=ctxs, labels=st.labels,
                             positions=positions, grid=grid, chat=chat, progress=progress_bar)
        paths = write_result(out, result, extra=st.header(start, preset=preset))
    for key, s in result.summary().items():
        tv = ", ".join(f"{r['alpha']:g}: {r['tv_mean']:.3g}" for r in s["per_alpha"])
        log(f"{key}: mean TV to the limit by alpha: {tv}")
    _done(out, paths, start)


@sweep_app.command("xent")
def sweep_xent(
    vectors: Path = VectorsOpt,
    layers: Optional[str] = LayersOpt,
    corpus: Optional[str] = typer.Option(None, "--corpus", help="wikipedia[:train|:test] (packaged), model (samples of "
                                         "the unsteered model), a .txt/.jsonl/.parquet file, a Parquet directory, or "
                                         "hf:NAME[:CONFIG]; default: the preset's xent.corpus (wikipedia)."),
    field: Optional[str] = typer.Option(None, "--field", help="The text column / field of a dataset or JSON corpus "
                                        "(default: text)."),
    split: Optional[str] = typer.Option(None, "--split", help="Split of a hf: dataset or of a local dataset directory "
                                        "(default: train)."),
    data_files: Optional[List[str]] = typer.Option(None, "--data-files", help="Files of a hf: dataset (paths or "
                                                   "globs; repeatable)."),
    max_texts: Optional[int] = typer.Option(None, "--max-texts", help="Use the first N texts (hf: default 1000)."),
    n_samples: Optional[int] = typer.Option(None, "--n-samples", help="Model-samples corpus: number of texts; default: "
                                                                      "enough for --max-tokens."),
    sample_tokens: Optional[int] = typer.Option(None, "--sample-tokens", help="Model-samples corpus: tokens per text; "
                                                                              "default: seq_len + 8."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Model-samples corpus: sampling seed (default 0)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Scored tokens per window (windows have seq_len + 1 "
                                                                  "tokens); default: the preset's."),
    packing: Optional[bool] = typer.Option(None, "--packing/--no-packing", help="Concatenate texts before windowing; "
                                           "default: the preset's xent.packing (on for wikipedia)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Score at most this many tokens; default: the "
                                                                        "preset's xent.n_tokens."),
    alpha_min: Optional[float] = AlphaMinOpt,
    alpha_max: Optional[float] = typer.Option(None, "--alpha-max", help="default: the preset's xent.alpha_max."),
    n_alphas: Optional[int] = typer.Option(None, "--n-alphas", help="Grid points (0 is added); default: the preset's."),
    spacing: Optional[str] = typer.Option(None, "--spacing", help="linear, or log (dense near 0); default: the preset's."),
    alphas: Optional[str] = AlphasOpt,
    curvature: bool = typer.Option(True, "--curvature/--no-curvature", help="d2 CE/d alpha2 at 0 by jvp-of-jvp."),
    curvature_tokens: Optional[int] = typer.Option(None, "--curvature-tokens", help="Tokens for the curvature (default: all)."),
    positions: str = PositionsOpt,
    normalize: bool = NormalizeOpt,
    alpha_unit: Optional[str] = GridUnitOpt,
    concept: Optional[str] = ConceptOpt,
    setting: Optional[str] = SettingOpt,
    controls: Optional[int] = ControlsOpt,
    preset: str = PresetOpt,
    out: Path = OutOpt,
    model: Optional[str] = ModelOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    blocks_path: Optional[str] = BlocksPathOpt,
) -> None:
    """Delta CE(alpha) on a corpus (Def. 3.7), curvature at 0 (Thm 3.8), plateau (Prop. 4.1): xent.parquet, xent.json."""
    from steerstrength.corpus import check_corpus_options
    from steerstrength.grid import refuse_with_explicit
    from steerstrength.io import check_output_dir
    from steerstrength.runs import output_folder, write_result
    from steerstrength.stages import corpus_texts, packs, xent_stage

    start = time.perf_counter()
    check_at_least(("--n-alphas", n_alphas, 2), ("--seq-len", seq_len, 1), ("--max-tokens", max_tokens, 1),
                   ("--n-samples", n_samples, 1), ("--sample-tokens", sample_tokens, 1),
                   ("--curvature-tokens", curvature_tokens, 1))
    if seed is not None:
        check_seed(seed)
    if spacing not in (None, "linear", "log"):
        raise InputError(f"--spacing must be linear or log, not {spacing!r}")
    refuse_with_explicit(alphas, **{"--spacing": spacing, "--alpha-min": alpha_min, "--alpha-max": alpha_max,
                                    "--n-alphas": n_alphas})
    check_output_dir(out, names=("xent.parquet", "xent.json", "corpus_samples.jsonl"))
    cfg, section = preset_section(preset, "xent", n_alphas=n_alphas, seq_len=seq_len, n_tokens=max_tokens,
                                  spacing=spacing, curvature_tokens=curvature_tokens)
    check_corpus_options(corpus or section.corpus, field=field, split=split, seed=seed)
    grid = command_grid(alphas, alpha_min, alpha_max, n_alphas, section=section, unit=alpha_unit, cfg=cfg,
                        spacing=section.spacing)
    st = Steering(model, dtype, device, blocks_path, vectors, layers, concept, setting, normalize, positions, grid.unit)
    texts, source = corpus_texts(st.model, section, seed=seed or 0, cache_dir=out, source=corpus,
                                 field=field or "text", split=split or "train", max_texts=max_texts,
                                 data_files=data_files, n_samples=n_samples, sample_tokens=sample_tokens,
                                 progress=progress_bar)
    packing = packs(section, source) if packing is None else packing
    with output_folder(out):  # after the corpus is read: a bad corpus leaves no --out behind
        result = xent_stage(st.model, st.steered(cfg, "xent", controls, seed), section, texts=texts, corpus=source,
                            labels=st.labels, positions=positions, grid=grid, packing=packing, curvature=curvature,
                            progress=progress_bar)
        paths = write_result(out, result, extra=st.header(start, preset=preset, packing=packing))
    for key, s in result.summary()["per_vector"].items():
        c = s.get("curvature")
        if c:
            log(f"{key}: CE''(0) jvp {c['jvp']:.4g}, quadratic fit {c['fit']:.4g}; CE'(0) {c['slope_jvp']:.3g}")
    _done(out, paths, start)
