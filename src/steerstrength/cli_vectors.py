"""`steerstrength prompts`, `steerstrength vectors`, `steerstrength export-gguf`: parse, call, print."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from steerstrength.cli_common import DeviceOpt, DtypeOpt, load, log, progress_bar
from steerstrength.errors import InputError

app = typer.Typer()


@app.command("prompts")
def prompts(
    concept: str = typer.Option(..., "--concept", "-c", help="The concept, e.g. joy (the paper's 8: docs/vectors.md)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output JSONL: one row per text."),
    kind: str = typer.Option("positive", "--kind", help="positive (P) or negative (N)."),
    setting: str = typer.Option("contrastive", "--setting",
                                help="For N: contrastive (opposite concept) or random (samples from BOS)."),
    n: int = typer.Option(500, "--n", help="Number of texts to sample (empty ones are dropped and counted)."),
    max_new_tokens: int = typer.Option(300, "--max-new-tokens", help="New tokens per text at most."),
    temperature: float = typer.Option(1.0, "--temperature"),
    top_p: float = typer.Option(0.9, "--top-p", help="Nucleus sampling mass; 1 turns it off."),
    top_k: int = typer.Option(0, "--top-k", help="Top-k sampling; 0 turns it off."),
    seed: int = typer.Option(0, "--seed", help="Base seed; each text gets its own seed, recorded in its row."),
    batch_size: int = typer.Option(8, "--batch-size"),
    opposite: Optional[str] = typer.Option(None, "--opposite",
                                           help="Opposite concept for contrastive N; default: ask the generator."),
    generator: Optional[str] = typer.Option(None, "--generator", help="Instruct model writing P and contrastive N; "
                                            "default: --model, else the embedded model."),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="The model to be steered: random N is sampled from it."),
    from_file: Optional[Path] = typer.Option(None, "--from-file", help="Use your own texts (JSONL with 'text', "
                                             "or one per line) instead of generating."),
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
) -> None:
    """Write a prompt set (P, or N contrastive / random) as JSONL."""
    from steerstrength.io import write_jsonl
    from steerstrength.prompts import (KINDS, SETTINGS, check_concept, check_sampling, generate_prompts, load_prompts,
                                       rows_from_texts)

    concept = check_concept(concept)
    if kind not in KINDS:
        raise InputError(f"--kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if setting not in SETTINGS:
        raise InputError(f"--setting must be one of {', '.join(SETTINGS)}, not {setting!r}")
    row_setting = setting if kind == "negative" else None
    if from_file is not None:
        texts = [r["text"] for r in load_prompts(from_file, min_count=1)]
        write_jsonl(out, rows_from_texts(texts, concept, kind, row_setting))
        log(f"wrote {len(texts)} texts from {from_file} to {out}")
        return
    check_sampling(n, max_new_tokens, temperature, top_p, top_k, batch_size)
    random_n = kind == "negative" and setting == "random"
    if random_n and generator is not None and model is None:
        raise InputError("the random setting samples from the model to be steered: pass it with --model, "
                         "not --generator")
    spec = model if random_n else (generator if generator is not None else model)
    lm = load(spec, dtype=dtype, device=device)
    what = "P" if kind == "positive" else f"N ({setting})"
    with progress_bar(f"{what} for {concept}", n) as advance:
        rows = generate_prompts(lm, concept, kind, n, setting=setting, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, batch_size=batch_size,
                                opposite=opposite, progress=advance)
    if len(rows) < 1:
        raise InputError(f"all {n} sampled texts were empty; raise --max-new-tokens or change the generator")
    write_jsonl(out, rows)
    stopped = sum(r["finish"] == "stop" for r in rows)
    note = f"; opposite: {rows[0]['opposite']} ({rows[0]['opposite_source']})" if "opposite" in rows[0] else ""
    log(f"wrote {len(rows)} texts to {out} ({n - len(rows)} empty dropped, {stopped} ended at EOS, "
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
            v = sv[layer].double()
            cos = (r @ v) / (r.norm(dim=-1) * v.norm()).clamp_min(1e-300)
            cells += [f"{float(r.norm(dim=-1).std()):.3g}", f"{float(cos.mean()):.4f}"]
        table.add_row(*cells)
    Console().print(table)


@app.command("vectors")
def vectors(
    positive: Path = typer.Option(..., "--positive", "-p", help="P: JSONL with a 'text' field, or one text per line."),
    negative: Path = typer.Option(..., "--negative", "-n", help="N: same formats."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .safetensors."),
    layers: str = typer.Option("middle", "--layers", "-l", help="e.g. 5,15,25, 'middle' (n_layers // 2) or 'all'."),
    resamples: int = typer.Option(0, "--resamples", help="K bootstrap resamples of P and N, for error bars."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap."),
    normalize: bool = typer.Option(False, "--normalize", help="Scale each vector to unit norm."),
    skip_first_token: bool = typer.Option(True, "--skip-first-token/--no-skip-first-token",
                                          help="Leave position 0 (attention sink) out of each text's average."),
    gguf_out: Optional[Path] = typer.Option(None, "--gguf-out",
                                            help="Also write a llama.cpp control vector (layers >= 1)."),
    concept: Optional[str] = typer.Option(None, "--concept", help="Recorded in the metadata; default: from P's rows."),
    setting: Optional[str] = typer.Option(None, "--setting", help="Recorded in the metadata; default: from N's rows."),
    batch_size: int = typer.Option(8, "--batch-size"),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Truncate each text to this many tokens."),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="The model to be steered (HF id, directory, .gguf, embedded name)."),
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
) -> None:
    """Difference-of-means steering vectors (Eq. 3) from P and N, one per layer."""
    from steerstrength.prompts import load_prompts
    from steerstrength.vectors import difference_of_means, parse_layers, save_vectors

    if resamples < 0:
        raise InputError(f"--resamples must be 0 or more, not {resamples}")
    if batch_size < 1 or (max_length is not None and max_length < 2):
        raise InputError("--batch-size must be >= 1 and --max-length >= 2")
    pos_rows = load_prompts(positive, what="positive prompt file")
    neg_rows = load_prompts(negative, what="negative prompt file")
    lm = load(model, dtype=dtype, device=device)
    chosen = parse_layers(layers, lm.n_layers)
    if gguf_out is not None and chosen == [0]:
        raise InputError("llama.cpp cannot steer layer 0; pick layers >= 1 for --gguf-out")
    with progress_bar(f"activations at {len(chosen)} layer(s)", len(pos_rows) + len(neg_rows)) as advance:
        sv = difference_of_means(lm, pos_rows, neg_rows, chosen, skip_first_token=skip_first_token,
                                 normalize=normalize, batch_size=batch_size, max_length=max_length,
                                 concept=concept or _common_field(pos_rows, "concept"),
                                 setting=setting or _common_field(neg_rows, "setting"),
                                 resamples=resamples, seed=seed, progress=advance)
    save_vectors(sv, out, gguf_out)
    print_norms(sv)
    log(f"wrote {out}" + (f" and {gguf_out} (direction.N = layer N; layer 0 is not exported)" if gguf_out else ""))


@app.command("export-gguf")
def export_gguf(
    vectors_file: Path = typer.Argument(..., help="A .safetensors written by `steerstrength vectors`."),
    out: Path = typer.Argument(..., help="Output .gguf for llama.cpp's --control-vector."),
    layers: Optional[str] = typer.Option(None, "--layers", "-l", help="Layers to export (default: all >= 1)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Check the vectors against this model first."),
    model_hint: Optional[str] = typer.Option(None, "--model-hint",
                                             help="controlvector.model_hint; default: the model type."),
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
) -> None:
    """Convert steering vectors to a llama.cpp control vector (direction.N = output of block N)."""
    from steerstrength.vectors import SteeringVectors, parse_layers

    sv = SteeringVectors.load(vectors_file)
    if model is not None:
        sv.check(load(model, dtype=dtype, device=device))
    chosen = None if layers is None else parse_layers(layers, max(sv.layers) + 1)
    sv.to_gguf(out, chosen, model_hint=model_hint)
    print_norms(sv)
    log(f"wrote {out} with layers {', '.join(str(x) for x in sv.gguf_layers(chosen))}")
