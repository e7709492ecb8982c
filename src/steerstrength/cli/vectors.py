"""`steerstrength prompts`, `steerstrength vectors`, `steerstrength export-gguf`: parse, call, print."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer

from steerstrength.cli.common import check_at_least, check_seed, console, log, progress_bar, refuse_given
from steerstrength.cli.options import (AlphaUnitOpt, MethodOpt, ModelOptions, OutOpt, PresetOpt, RecommendedOpt,
                                       SectionOptions, SeedOpt, TextsOptions, grouped, model_group, option_group,
                                       section_group, texts_group)
from steerstrength.config import PromptsConfig, RunConfig
from steerstrength.errors import InputError

app = typer.Typer()


_PROMPTS = PromptsConfig()
_RUN = RunConfig()


@option_group
class PromptSampling:
    """How `steerstrength prompts` samples P and N (config.PromptsConfig's keys and defaults)."""

    n: int = typer.Option(_PROMPTS.n, "--n", help="Number of texts to sample (empty ones are dropped and counted).")
    max_new_tokens: int = typer.Option(_PROMPTS.max_new_tokens, "--max-new-tokens", help="New tokens per text at most.")
    temperature: float = typer.Option(_PROMPTS.temperature, "--temperature")
    top_p: float = typer.Option(_PROMPTS.top_p, "--top-p", help="Nucleus sampling mass; 1 turns it off.")
    top_k: int = typer.Option(_PROMPTS.top_k, "--top-k", help="Top-k sampling; 0 turns it off.")
    seed: int = SeedOpt("Base seed; each text gets its own seed, recorded in its row.")
    batch_size: int = typer.Option(8, "--batch-size")  # a CPU-sized batch; a run's prompts.batch_size is larger


@app.command("prompts")
@grouped
def prompts(
    ctx: typer.Context,
    concept: str = typer.Option(..., "--concept", "-c", help="The concept, e.g. joy (the paper's 8: docs/vectors.md)."),
    out: Path = OutOpt("Output JSONL: one row per text.", default=...),
    kind: str = typer.Option("positive", "--kind", help="positive (P) or negative (N)."),
    setting: str = typer.Option(_RUN.setting, "--setting",
                                help="For N: contrastive (opposite concept) or random (samples from BOS)."),
    sampling: PromptSampling = PromptSampling.group,
    opposite: Optional[str] = typer.Option(None, "--opposite",
                                           help="Opposite concept for contrastive N; default: ask the generator."),
    generator: Optional[str] = typer.Option(None, "--generator", help="Instruct model writing P and contrastive N; "
                                            "default: --model, else the embedded model."),
    from_file: Optional[Path] = typer.Option(None, "--from-file", help="Use your own texts (JSONL with 'text', "
                                             "or one per line) instead of generating."),
    model: ModelOptions = model_group("The model to be steered: random N is sampled from it."),
) -> None:
    """Write a prompt set (P, or N contrastive / random) as JSONL."""
    from steerstrength.io import check_output_file, write_jsonl
    from steerstrength.prompts import (KINDS, SETTINGS, check_concept, check_sampling, generate_prompts, load_prompts,
                                       rows_from_texts)

    concept = check_concept(concept)
    check_seed(sampling.seed)
    check_output_file(out, example=f"{concept}.{kind}.jsonl")
    if kind not in KINDS:
        raise InputError(f"--kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if setting not in SETTINGS:
        raise InputError(f"--setting must be one of {', '.join(SETTINGS)}, not {setting!r}")
    row_setting = setting if kind == "negative" else None
    if from_file is not None:
        refuse_given(ctx, "--from-file", ("model", "generator", "n", "max_new_tokens", "temperature", "top_p", "top_k",
                                          "seed", "batch_size", "opposite", "dtype", "device"))
        texts = [r["text"] for r in load_prompts(from_file, min_count=1)]
        write_jsonl(out, rows_from_texts(texts, concept, kind, row_setting))
        log(f"wrote {len(texts)} texts from {from_file} to {out}")
        return
    s = sampling
    check_sampling(s.n, s.max_new_tokens, s.temperature, s.top_p, s.top_k, s.batch_size)
    random_n = kind == "negative" and setting == "random"
    if random_n and generator is not None and model.model is None:
        raise InputError("the random setting samples from the model to be steered: pass it with --model, "
                         "not --generator")
    spec = model.model if random_n else (generator if generator is not None else model.model)
    lm = dataclasses.replace(model, model=spec).load()
    what = "P" if kind == "positive" else f"N ({setting})"
    with progress_bar(f"{what} for {concept}", s.n) as advance:
        rows = generate_prompts(lm, concept, kind, s.n, setting=setting, max_new_tokens=s.max_new_tokens,
                                temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=s.seed,
                                batch_size=s.batch_size, opposite=opposite, progress=advance)
    if len(rows) < 1:
        raise InputError(f"all {s.n} sampled texts were empty; raise --max-new-tokens or change the generator")
    write_jsonl(out, rows)
    stopped = sum(r["finish"] == "stop" for r in rows)
    note = f"; opposite: {rows[0]['opposite']} ({rows[0]['opposite_source']})" if "opposite" in rows[0] else ""
    log(f"wrote {len(rows)} texts to {out} ({s.n - len(rows)} empty dropped, {stopped} ended at EOS, "
        f"{len(rows) - stopped} at --max-new-tokens){note}")


def _common_field(rows: list[dict], key: str) -> str:
    values = {r.get(key) for r in rows if r.get(key)}
    return values.pop() if len(values) == 1 else ""


def print_norms(sv) -> None:
    """A small table: layer, ||v||, and with resamples the bootstrap sd of ||v|| and mean cosine to v."""
    from rich.console import Console
    from rich.table import Table

    concept, setting = sv.meta.get("concept") or "concept ?", sv.meta.get("setting") or "setting ?"
    table = Table(title=f"steering vectors ({concept}, {setting})")
    table.add_column("layer", justify="right")
    table.add_column("norm", justify="right")
    if sv.resamples:
        table.add_column("norm sd (bootstrap)", justify="right")
        table.add_column("mean cos to v", justify="right")
    for layer, norm in sv.norms().items():
        cells = [str(layer), f"{norm:.4g}"]
        if layer in sv.resamples:
            r = sv.resamples[layer].double()
            v = sv[layer].vector.double()
            cos = (r @ v) / (r.norm(dim=-1) * v.norm()).clamp_min(1e-300)
            cells += [f"{float(r.norm(dim=-1).std()):.3g}", f"{float(cos.mean()):.4f}"]
        table.add_row(*cells)
    Console().print(table)


vectors_app = typer.Typer(help="Difference-of-means steering vectors (Eq. 3); `vectors scan` finds the layer.")


def _texts(concept: Optional[str], texts: TextsOptions):
    """(P rows, N rows, held-out P, held-out N): the user's files, or the concept's curated training pairs."""
    from steerstrength.prompts import curated_concepts, curated_texts, load_prompts, rows_from_texts

    if texts.given("give both --positive and --negative, or neither (then --concept's curated pairs are used)"):
        return (load_prompts(texts.positive, what="positive prompt file"),
                load_prompts(texts.negative, what="negative prompt file"), None, None)
    if not concept:
        raise InputError("give --positive and --negative files, or --concept NAME for the curated pairs "
                         f"({', '.join(curated_concepts())})")
    pos = rows_from_texts(curated_texts(concept, "positive", "train"), concept, "positive")
    neg = rows_from_texts(curated_texts(concept, "negative", "train"), concept, "negative", "contrastive")
    return pos, neg, curated_texts(concept, "positive", "heldout"), curated_texts(concept, "negative", "heldout")


VectorsPresetOpt = PresetOpt("Where the defaults come from: that preset's vectors section (`steerstrength config show "
                             "--preset NAME`).")
VectorsModel = model_group("The model to be steered (HF id, directory, .gguf, embedded name).")
VECTORS = section_group(
    "vectors",
    resamples=typer.Option(None, "--resamples", help="K bootstrap resamples of P and N, for error bars (default 0)."),
    normalize=typer.Option(None, "--normalize/--no-normalize", help="Scale each vector to unit norm; default: the "
                           "preset's vectors.normalize."),
    skip_first_token=typer.Option(None, "--skip-first-token/--no-skip-first-token",
                                  help="Leave position 0 (attention sink) out of each text's average."),
    batch_size=typer.Option(None, "--batch-size", help="Texts per forward (default 8)."),
    max_length=typer.Option(None, "--max-length", help="Truncate each text to this many tokens."),
)


@vectors_app.callback(invoke_without_command=True)
@grouped
def vectors(
    ctx: typer.Context,
    texts: TextsOptions = texts_group("P: JSONL with a 'text' field, or one text per line; default: --concept's "
                                      "curated training texts.", "N: same formats (contrastive or random)."),
    out: Optional[Path] = OutOpt("Output .safetensors.", default=None),
    layers: str = typer.Option(_RUN.layers[0], "--layers", "-l", help="e.g. 5,15,25, early/middle/late, 'all', or "
                               "'auto' (the layer scan's pick, plus any others listed: auto,middle)."),
    section: SectionOptions = VECTORS,
    seed: int = SeedOpt("Seed of the bootstrap."),
    gguf_out: Optional[Path] = typer.Option(None, "--gguf-out",
                                            help="Also write a llama.cpp control vector (layers >= 1)."),
    concept: Optional[str] = typer.Option(None, "--concept", help="Without -p/-n: use this concept's curated pairs; "
                                          "recorded in the metadata (default: from P's rows)."),
    setting: Optional[str] = typer.Option(None, "--setting", help="Recorded in the metadata; default: from N's rows."),
    model: ModelOptions = VectorsModel,
    preset: str = VectorsPresetOpt,
) -> None:
    """Difference-of-means steering vectors (Eq. 3) from P and N, one per layer."""
    from steerstrength.io import check_output_file
    from steerstrength.stages import scan_stage, vectors_stage
    from steerstrength.vectors import parse_layers, save_vectors

    if ctx.invoked_subcommand is not None:
        return
    if out is None:
        raise InputError("give the output file with --out (e.g. --out joy.safetensors)")
    check_output_file(out, example="vectors.safetensors")
    if gguf_out is not None:
        check_output_file(gguf_out, option="--gguf-out", example="vectors.gguf")
        if gguf_out.resolve() == out.resolve():
            raise InputError(f"--out and --gguf-out are both {out}; the second file would replace the first: give "
                             "the GGUF another name (e.g. vectors.gguf)")
    check_at_least(("--resamples", section.resamples, 0), ("--batch-size", section.batch_size, 1),
                   ("--max-length", section.max_length, 2))
    check_seed(seed)
    _, sizes = section.of(preset)
    pos_rows, neg_rows, held_pos, held_neg = _texts(concept, texts)
    lm = model.load()
    items = [x.strip() for x in layers.split(",") if x.strip()]
    auto = "auto" in [x.lower() for x in items]
    rest = ",".join(x for x in items if x.lower() != "auto")
    chosen = parse_layers(rest, lm.n_layers) if rest else []
    if not auto and not chosen:
        raise InputError("no layers given; use e.g. --layers 5,15,25, --layers middle or --layers auto")
    label = concept or _common_field(pos_rows, "concept")
    scan = None
    if auto:
        _, scan = scan_stage(lm, [r["text"] for r in pos_rows], [r["text"] for r in neg_rows], sizes,
                             concept=label or "", heldout=(held_pos, held_neg), progress=progress_bar)
        log(f"the layer scan picks layer {scan.chosen} ({scan.rule})")
    if gguf_out is not None and sorted(set(chosen) | ({scan.chosen} if scan else set())) == [0]:
        raise InputError("llama.cpp cannot steer layer 0; pick layers >= 1 for --gguf-out")
    sv = vectors_stage(lm, pos_rows, neg_rows, sizes, layers=chosen, concept=label or "",
                       setting=setting or _common_field(neg_rows, "setting") or "", seed=seed, scan=scan,
                       progress=progress_bar)
    save_vectors(sv, out, gguf_out)
    print_norms(sv)
    log(f"wrote {out}" + (f" and {gguf_out} (direction.N = layer N; layer 0 is not exported)" if gguf_out else ""))


@vectors_app.command("scan")
@grouped
def scan(
    concept: Optional[str] = typer.Option(None, "--concept", "-c", help="Use this concept's curated pairs (held-out "
                                          "pairs for the separation), or label your files."),
    texts: TextsOptions = texts_group("P texts (every third is held out).", "N texts."),
    out: Path = OutOpt("Output directory: layer_scan.parquet, .json, .png."),
    section: SectionOptions = section_group(
        "vectors",
        scan_top_k=typer.Option(None, "--top-k", help="Top tokens of LN(v) W^T checked against the log-odds M "
                                "(default: vectors.scan_top_k, 50)."),
        batch_size=VECTORS.options["batch_size"]),
    model: ModelOptions = model_group("The model to be steered."),
    preset: str = VectorsPresetOpt,
) -> None:
    """Score every layer for steering (one forward pass per text, no generation) and pick one: what --layers auto uses."""
    from rich.table import Table

    from steerstrength.io import check_output_dir
    from steerstrength.plots import fig_layer_scan, save_figure
    from steerstrength.runs import output_folder, write_result
    from steerstrength.stages import scan_stage

    check_output_dir(out, names=("layer_scan.parquet", "layer_scan.json", "layer_scan.png", "layer_scan.pdf"))
    pos_rows, neg_rows, held_pos, held_neg = _texts(concept, texts)
    lm = model.load()
    label = concept or _common_field(pos_rows, "concept")
    check_at_least(("--top-k", section.scan_top_k, 1), ("--batch-size", section.batch_size, 1))
    with output_folder(out):  # one writer; its tables are one set (runs.check_result_set)
        tables, result = scan_stage(lm, [r["text"] for r in pos_rows], [r["text"] for r in neg_rows],
                                    section.of(preset)[1], concept=label or "",
                                    heldout=(held_pos, held_neg), progress=progress_bar)
        write_result(out, tables)
        save_figure(fig_layer_scan(result.table, label), out, "layer_scan")
    table = Table(title=f"layer scan ({label or 'concept'}, {lm.name}): picks layer {result.chosen}")
    for col in ("layer", "held-out AUC", "lens share", "score", "‖v‖", "residual norm"):
        table.add_column(col, justify="right")
    table.add_column("top of LN(v)Wᵀ", no_wrap=True, overflow="ellipsis", max_width=44)
    for r in result.table.itertuples(index=False):
        mark = " ←" if r.chosen else ""
        table.add_row(f"{r.layer}{mark}", f"{r.heldout_auc:.3f}", f"{r.lens_share:.2f}", f"{r.score:.3f}",
                      f"{r.vector_norm:.3g}", f"{r.residual_norm:.4g}", r.lens_top[:60])
    console.print(table)
    log(f"rule: {result.rule}")
    log(f"wrote {out / 'layer_scan.parquet'}, {out / 'layer_scan.json'} and {out / 'layer_scan.png'}")


def load_with_strength(vectors_file: Path, recommended: Optional[Path]):
    """The vector file, its metadata carrying --recommended's alphas and fluent range when given (strength.py)."""
    from steerstrength.strength import strength_from, with_strength
    from steerstrength.vectors import SteeringVectors

    sv = SteeringVectors.load(vectors_file)
    return with_strength(sv, strength_from(recommended, sv)) if recommended is not None else sv


@app.command("export-gguf")
@grouped
def export_gguf(
    ctx: typer.Context,
    vectors_file: Path = typer.Argument(..., help="A .safetensors written by `steerstrength vectors`."),
    out: Path = typer.Argument(..., help="Output .gguf for llama.cpp's --control-vector."),
    layers: Optional[str] = typer.Option(None, "--layers", "-l", help="Layers to export (default: all >= 1)."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="Pre-scale the directions so that llama.cpp at scale "
                                          "1 steers at this alpha (in --alpha-unit)."),
    alpha_unit: Optional[str] = AlphaUnitOpt(),
    recommended: Optional[Path] = RecommendedOpt,
    method: Optional[str] = MethodOpt,
    model_hint: Optional[str] = typer.Option(None, "--model-hint",
                                             help="controlvector.model_hint; default: the model type."),
    model: ModelOptions = model_group("Check the vectors against this model first (and measure r_l for --alpha-unit "
                                      "resid when the file lacks it)."),
) -> None:
    """Convert steering vectors to a llama.cpp control vector (direction.N = output of block N), with their strength."""
    from steerstrength.grid import check_unit
    from steerstrength.io import check_output_file
    from steerstrength.strength import recommended_alpha
    from steerstrength.vectors import parse_layers

    from steerstrength.config import USE

    check_output_file(out, option="OUT", example="vectors.gguf")
    if model.model is None:
        refuse_given(ctx, "no --model (they load the model the vectors are checked against)", ("dtype", "device"))
    alpha_unit = check_unit(alpha_unit or USE.alpha_unit)
    if method is not None and recommended is None:
        raise InputError("--method picks among --recommended's alphas; give --recommended RUN too")
    sv = load_with_strength(vectors_file, recommended)
    lm = model.load() if model.model is not None else None
    if lm is not None:
        sv.check(lm)
    chosen = sv.gguf_layers(None if layers is None else parse_layers(layers, max(sv.layers) + 1))
    note = ""
    if alpha is not None:
        sv = sv.prescaled(alpha, alpha_unit, lm, chosen)
        note = f", pre-scaled at alpha = {alpha:g} ({alpha_unit})"
    elif recommended is not None:
        picked = {layer: recommended_alpha(sv.meta["strength"], layer, method) for layer in chosen}
        sv = sv.prescaled({layer: e["alpha"] for layer, e in picked.items()}, "raw", lm, chosen)
        note = ", pre-scaled at the recommended " + ", ".join(
            f"{e['method']} alpha {e['alpha']:.4g} (layer {layer})" for layer, e in picked.items())
    sv.to_gguf(out, chosen, model_hint=model_hint)
    print_norms(sv)
    log(f"wrote {out} with layers {', '.join(str(x) for x in chosen)}{note}"
        + ("; llama.cpp applies it at scale 1: --control-vector " + str(out) if note else ""))
