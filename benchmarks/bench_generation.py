"""Benchmark: steered sampling throughput against the FLOP floor and the usual alternatives (issue 29; docs/steering.md).

Columns, for the embedded model (SmolLM2-135M, float32, CPU) at batch sizes B and prompt lengths T, in one process:
  floor     one decode step of the batch (B rows, one token each, over a T-token KV cache): the cost per new token
            no sampler can beat on this hardware;
  ours      sampling.sample_steered: B rows = alphas x directions x completions of one prompt, one decode loop, the
            prompt's blocks shared (new tokens/s over all rows, and its per-token cost / floor);
  hooked    a hooked Hugging Face `generate` per (direction, alpha) (the steering-vectors / repeng way: `with steer(...)`
            around `generate`, batch = the completions of that alpha);
  llama.cpp the llama.cpp way, through the xllamacpp wheel's C API (benchmarks/llamacpp.py): per (direction, alpha),
            one context with the control vector loaded at that alpha (`--control-vector-scaled FILE alpha`) and set
            over the layers, its completions decoded as parallel sequences in one llama_batch per step (prompt
            prefilled once, shared with llama_memory_seq_cp), one thread, no stop token; sampled in numpy from the
            full logits (the sampler's cost is not what is compared). On the F32 GGUF of the model (our weights in
            float32: the fair comparison) and on its own Q4_1 GGUF (llama.cpp's native quantized speed). Checked
            first: at alpha 0 and at alpha_resid 0.5, the batched sequences' distributions against a one-sequence
            llama.cpp decode and against ours (total variation). --llamacpp-bound B adds a bound that is not the
            llama.cpp way: all B rows in ONE llama.cpp context at one alpha (as if a control vector could differ per
            sequence), against ours.
With --concept, the demo preset's concept stage per completion (9 alphas x 8 prompts x 8 completions x 24 tokens at
each of its two layers, 29 and 15, the probe judge; --concept-prompts N for fewer prompts) the former way (v alone,
hooked `generate` in batches, rule-based degeneration) and now (v with the preset's 2 random directions in one batched
decode loop, 2 completions each, + the unsteered-NLL fluency check), same process, same core, alternating layer by
layer.

    steerstrength vectors --concept joy --layers 15,28 --normalize --out /tmp/joy.safetensors
    taskset -c 1 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_generation.py --vectors /tmp/joy.safetensors \\
        [--quick] [--new-tokens 32] [--no-llamacpp] [--llamacpp-bound 64] [--concept] [--interleaved 2] [--no-throughput] [--json out.json]
Speed is reported as ratios within this process (the machine is shared): compare columns, not seconds across runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from steerstrength import SteeringVectors, load_model, prefix, sampling, steer, steering
from steerstrength.models import Encoded


def prompt_of_length(model, T: int) -> list[int]:
    base = model.token_ids("Tell me about your day, and then about the weather, the city and the people you met.")
    return (base * (T // len(base) + 1))[:T]


def floor_step(model, ids: list[int], B: int, repeats: int = 3) -> float:
    """Seconds of one decode forward of B rows over a len(ids)-token cache (no sampling, no steering)."""
    enc = model.pad([ids] * B)
    cache = prefix.prefix_cache(model)
    with torch.inference_mode():
        steering._forward(model, enc, use_cache=True, past_key_values=cache, logits_to_keep=1)
        kv = prefix.cache_snapshot(cache, range(model.n_layers))
        best = float("inf")
        for _ in range(repeats):
            c = prefix.prefix_cache(model, dict(kv))
            tok = Encoded(enc.input_ids[:, -1:], torch.cat([enc.attention_mask, enc.attention_mask[:, :1]], 1),
                          enc.position_ids[:, -1:] + 1, "left")
            t = time.perf_counter()
            steering._forward(model, tok, use_cache=True, past_key_values=c, logits_to_keep=1)
            best = min(best, time.perf_counter() - t)
    return best


def plan(B: int) -> tuple[int, int, int]:
    """(directions, alphas, completions) with product B: many alphas and two directions where B allows."""
    if B == 1:
        return 1, 1, 1
    directions = 2 if B >= 16 else 1
    completions = 4
    return directions, B // (directions * completions), completions


def run_ours(model, ids, vectors, layer, B, new_tokens) -> float:
    nd, na, nc = plan(B)
    alphas = torch.linspace(-1.0, 1.0, na).tolist() if na > 1 else [0.5]
    rows = [(0, d, a * 8.0, 1000 * d + 10 * i + c) for d in range(nd) for i, a in enumerate(alphas) for c in range(nc)]
    t = time.perf_counter()
    sampling.sample_steered(model, [ids], rows, max_new_tokens=new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                            stops=[], vectors=vectors[:nd], layer=layer)
    return time.perf_counter() - t


def run_hooked(model, ids, vectors, layer, B, new_tokens) -> float:
    nd, na, nc = plan(B)
    alphas = torch.linspace(-1.0, 1.0, na).tolist() if na > 1 else [0.5]
    enc = model.pad([ids] * nc)
    t = time.perf_counter()
    for d in range(nd):
        for a in alphas:
            with steer(model, vectors[d], layer, a * 8.0), torch.inference_mode():
                model.hf.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, do_sample=True,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=model.pad_id)
    return time.perf_counter() - t


def llama_cpp_engines(model, workdir) -> tuple[list, str | None]:
    """[(label, LlamaCpp)] for the F32 GGUF of the model (our weights in float32: the fair comparison) and its own
    GGUF (llama.cpp's native quantized speed), one thread each; or ([], why not)."""
    try:
        import xllamacpp  # noqa: F401
    except ImportError:
        return [], "xllamacpp is not installed"
    from llamacpp import LlamaCpp, f32_gguf, gguf_quantization

    if not str(model.source).startswith("gguf:"):
        return [], f"{model.name} was not loaded from a GGUF"
    src = Path(str(model.source).removeprefix("gguf:"))
    workdir.mkdir(parents=True, exist_ok=True)
    f32 = f32_gguf(src, workdir / f"{model.name}.f32.gguf")
    return [(f"llama.cpp {gguf_quantization(path)}", LlamaCpp(path, threads=1)) for path in (f32, src)], None


def control_vector_files(vectors, layer, workdir) -> list[Path]:
    """Each direction as a llama.cpp control vector (direction.{layer} = v): loaded at strength alpha, as
    `--control-vector-scaled FILE alpha` (or `export-gguf --alpha` then `--control-vector`) would steer."""
    return [SteeringVectors({layer: v}).to_gguf(workdir / f"direction{d}.{layer}.gguf") for d, v in enumerate(vectors)]


def run_llamacpp(cpp, ids, cvec_files, B, new_tokens) -> tuple[float, dict]:
    """The llama.cpp way: per (direction, alpha), one context with the control vector at that alpha set over the
    layers, its completions decoded as parallel sequences in one llama_batch per step (the prompt prefilled once,
    copied to the others' sequences), sampled in numpy from the full logits."""
    nd, na, nc = plan(B)
    alphas = torch.linspace(-1.0, 1.0, na).tolist() if na > 1 else [0.5]
    rng = np.random.default_rng(0)
    split = dict(setup_s=0.0, prefill_s=0.0, decode_s=0.0)
    t = time.perf_counter()
    for d in range(nd):
        for a in alphas:
            out = cpp.sample_parallel(ids, nc, new_tokens, rng, cvec=cpp.control_vector(cvec_files[d], a * 8.0))
            for k in split:
                split[k] += out[k]
    return time.perf_counter() - t, split


def check_llamacpp(model, cpp, ids, vector, cvec_file, layer, alphas) -> list[dict]:
    """The timed path is the steered path: per alpha, the distributions of the batch/sequence setup (prefill, then
    one decode step of 4 sequences fed different tokens after llama_memory_seq_cp) against llama.cpp's plain
    one-sequence decode of the same tokens and against ours (a hooked forward), by total variation."""
    from llamacpp import total_variation

    feed = [int(x) for x in model.token_ids(" the day was good")[-4:]]
    rows = []
    for alpha in alphas:
        out = cpp.sample_parallel(ids, 4, 2, np.random.default_rng(0), cvec=cpp.control_vector(cvec_file, alpha),
                                  feed=feed)
        contexts = [ids] + [ids + [f] for f in feed]
        batched = [out["probs"][0][0]] + list(out["probs"][1])
        single = [cpp.next_token_probs(c, cvec_file, alpha) for c in contexts]
        x = torch.tensor([ids + [f] for f in feed])
        with torch.inference_mode():
            with steer(model, vector, layer, alpha):
                logits = model.hf(input_ids=x).logits[:, -2:].double()
            plain = model.hf(input_ids=x[:1]).logits[0, -2].double()
        ours = [torch.softmax(logits[0, 0], -1)] + [torch.softmax(logits[i, 1], -1) for i in range(4)]
        rows.append(dict(alpha_raw=alpha,
                         tv_batched_vs_single=max(total_variation(b, s) for b, s in zip(batched, single)),
                         tv_batched_vs_ours=max(total_variation(b, o.numpy()) for b, o in zip(batched, ours)),
                         tv_ours_alpha_vs_0=total_variation(ours[0].numpy(), torch.softmax(plain, -1).numpy())))
    return rows


def throughput(model, vectors, layer, sizes, lengths, new_tokens, engines=(), cvec_files=()) -> list[dict]:
    out = []
    for T in lengths:
        ids = prompt_of_length(model, T)
        for B in sizes:
            floor = floor_step(model, ids, B)
            n = B * new_tokens
            runs = [("ours", lambda: (run_ours(model, ids, vectors, layer, B, new_tokens), None)),
                    *[(label, lambda cpp=cpp: run_llamacpp(cpp, ids, cvec_files, B, new_tokens))
                      for label, cpp in engines],
                    ("hooked", lambda: (run_hooked(model, ids, vectors, layer, B, new_tokens), None))]
            if len(out) % 2:  # alternate the order from one cell to the next: no engine always runs first
                runs.reverse()
            seconds, splits = {}, {}
            for label, go in runs:
                seconds[label], splits[label] = go()
            ours, hooked = seconds["ours"], seconds["hooked"]
            row = dict(T=T, B=B, new_tokens=new_tokens, floor_ms_per_token=1e3 * floor / B,
                       ours_tok_s=n / ours, hooked_tok_s=n / hooked, ours_over_floor=(ours / n) / (floor / B),
                       hooked_over_floor=(hooked / n) / (floor / B), ours_speedup_vs_hooked=hooked / ours)
            print(f"T={T:4d} B={B:3d}  floor {row['floor_ms_per_token']:6.2f} ms/token  ours {row['ours_tok_s']:7.1f} "
                  f"tok/s ({row['ours_over_floor']:.2f}x floor)  hooked {row['hooked_tok_s']:7.1f} tok/s "
                  f"({row['hooked_over_floor']:.2f}x floor)  ours/hooked speed {row['ours_speedup_vs_hooked']:.2f}x",
                  flush=True)
            for label, _ in engines:
                key = label.replace(".", "").replace(" ", "_")  # "llama.cpp F32" -> "llamacpp_F32"
                row[f"{key}_tok_s"] = n / seconds[label]
                row[f"ours_over_{key}"] = seconds[label] / ours  # ours' tok/s over llama.cpp's
                row[f"{key}_seconds"] = {k: round(v, 3) for k, v in splits[label].items()}
                print(f"{'':13}{label}: {row[f'{key}_tok_s']:7.1f} tok/s  ours/llama.cpp speed "
                      f"{row[f'ours_over_{key}']:.2f}x  (setup {splits[label]['setup_s']:.1f} s, prefill "
                      f"{splits[label]['prefill_s']:.1f} s, decode {splits[label]['decode_s']:.1f} s)", flush=True)
            out.append(row)
    return out


def llamacpp_bound(model, vectors, layer, engines, cvec_files, B, lengths, new_tokens) -> list[dict]:
    """A bound, not the llama.cpp way: llama.cpp with all B rows as parallel sequences of ONE context at one alpha
    (what it could do if a control vector could differ per sequence), against ours with its B rows over
    alphas x directions as in the throughput grid; each run twice, the order reversed the second time."""
    out = []
    for T in lengths:
        ids = prompt_of_length(model, T)
        runs = [("ours", lambda: run_ours(model, ids, vectors, layer, B, new_tokens)),
                *[(label, lambda cpp=cpp: _one_context(cpp, ids, cvec_files[0], B, new_tokens))
                  for label, cpp in engines]]
        seconds = {label: 0.0 for label, _ in runs}
        for order in (runs, runs[::-1]):
            for label, go in order:
                seconds[label] += go()
        n = 2 * B * new_tokens
        row = dict(T=T, B=B, new_tokens=new_tokens, ours_tok_s=n / seconds["ours"])
        for label, _ in engines:
            key = label.replace(".", "").replace(" ", "_")
            row[f"{key}_one_context_tok_s"] = n / seconds[label]
            row[f"ours_over_{key}_one_context"] = seconds[label] / seconds["ours"]
        print(f"bound T={T:4d} B={B:3d}  ours {row['ours_tok_s']:7.1f} tok/s  " + "  ".join(
            f"{label} one context {n / seconds[label]:7.1f} tok/s (ours/it {seconds[label] / seconds['ours']:.2f}x)"
            for label, _ in engines), flush=True)
        out.append(row)
    return out


def _one_context(cpp, ids, cvec_file, B, new_tokens) -> float:
    t = time.perf_counter()
    cpp.sample_parallel(ids, B, new_tokens, np.random.default_rng(0), cvec=cpp.control_vector(cvec_file, 8.0))
    return time.perf_counter() - t


def concept_demo(model, vectors, layers, n_controls: int | None = None, n_prompts: int | None = None) -> dict:
    """The demo preset's concept stage over its layers (one judge object for all, as the stage), the former way and
    now, per completion: before, v alone per call through a hooked `generate` with the rule-based degeneration check;
    now, v and the preset's random controls (controls.n_concept) sampled in one decode loop per layer, with the
    unsteered-NLL fluency check."""
    import dataclasses

    from steerstrength.config import preset
    from steerstrength.grid import AlphaGrid
    from steerstrength.judges import judge_for
    from steerstrength.metrics.concept import concept_probability
    from steerstrength.prompts import curated_texts, evaluation_prompts
    from steerstrength.vectors import random_controls

    cfg = preset("demo")
    section = cfg.concept
    n_controls = cfg.controls.n_concept if n_controls is None else n_controls
    grid = AlphaGrid.symmetric(section.alpha_max, section.n_alphas, zero=False, unit="resid")
    prompts = evaluation_prompts("train")[:n_prompts or section.n_prompts]
    P, N = curated_texts("joy", "positive"), curated_texts("joy", "negative")
    ways = (("before", "hf", 0, dataclasses.replace(section, fluency_tokens=0)),
            ("after", "batched", n_controls, section))
    out = {name: dict(seconds=0.0, n=0, directions=1 + controls, parts=[]) for name, _, controls, _ in ways}
    for i, layer in enumerate(layers):  # layer by layer, the two ways alternating: both see the same load
        sv = vectors[layer]
        for name, engine, controls, sec in (ways if i % 2 == 0 else ways[::-1]):
            sampling.GENERATION_ENGINE = engine
            judge = judge_for("joy", section.judge)  # fresh for each run: nothing carried over between them
            group = [sv, *random_controls(sv, controls, seed=0)]
            t = time.perf_counter()
            res = concept_probability(model, group, "joy", sec, alphas=grid, prompts=prompts, judges=[judge],
                                      positive=P, negative=N)
            out[name]["seconds"] += time.perf_counter() - t
            out[name]["n"] += len(res.completions)
            out[name]["parts"].append(dict(layer=layer, n=len(res.completions), **res.summary["seconds"]))
    for name, o in out.items():
        o["per_completion"] = o["seconds"] / o["n"]
        print(f"concept stage {name}: layers {layers}, {o['directions']} direction(s), {o['n']} completions, "
              f"{o['seconds']:.1f} s ({o['per_completion']:.3f} s per completion); parts "
              f"{json.dumps(o['parts'], default=lambda x: round(x, 2))}", flush=True)
    sampling.GENERATION_ENGINE = "batched"
    out["after_over_before"] = out["after"]["per_completion"] / out["before"]["per_completion"]
    print(f"per completion, after / before: {out['after_over_before']:.2f}")
    return out


def concept_interleaved(model, vectors, layers, n_prompts: int) -> dict:
    """The demo concept stage's generation (with the fluency reading where the engine does it), the former and the
    batched engine alternating prompt by prompt, so both see the same load on a shared machine."""
    from steerstrength.config import preset
    from steerstrength.grid import AlphaGrid
    from steerstrength.metrics.concept import SamplingSettings, completion_seed, generate_rows
    from steerstrength.prompts import evaluation_prompts

    section = preset("demo").concept
    grid = AlphaGrid.symmetric(section.alpha_max, section.n_alphas, zero=False, unit="resid")
    settings = SamplingSettings(max_new_tokens=section.max_new_tokens)
    seconds, n, same = {"hf": 0.0, "batched": 0.0}, 0, 0
    for i, prompt in enumerate(evaluation_prompts("train")[:n_prompts]):
        for layer in layers:
            sv = vectors[layer]
            rows = [(prompt, a, completion_seed(0, prompt, c)) for a in sv.raw_alphas(grid, model).tolist()
                    for c in range(section.completions)]
            texts = {}
            for engine in (("hf", "batched") if i % 2 == 0 else ("batched", "hf")):
                sampling.GENERATION_ENGINE = engine
                t = time.perf_counter()
                done = generate_rows(model, sv, rows, settings, batch_size=section.batch_size,
                                     read_tokens=section.fluency_tokens if engine == "batched" else 0)
                seconds[engine] += time.perf_counter() - t
                texts[engine] = [d["completion"] for d in done]
            n += len(rows)
            same += sum(a == b for a, b in zip(texts["hf"], texts["batched"]))
    sampling.GENERATION_ENGINE = "batched"
    ratio = seconds["batched"] / seconds["hf"]
    print(f"interleaved generation, {n} completions per engine: former {seconds['hf']:.1f} s, batched (with the "
          f"fluency reading) {seconds['batched']:.1f} s: ratio {ratio:.2f}; identical texts {same}/{n}", flush=True)
    return dict(seconds=seconds, n=n, ratio=ratio, identical=same)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", required=True, help="`steerstrength vectors` output holding --layer")
    parser.add_argument("--layer", type=int, default=28)
    parser.add_argument("--quick", action="store_true", help="B in 1, 16; T = 16; 8 new tokens")
    parser.add_argument("--concept", action="store_true", help="also the demo's concept stage before/after")
    parser.add_argument("--no-throughput", action="store_true")
    parser.add_argument("--interleaved", type=int, default=0, help="N prompts: generation, engines alternating")
    parser.add_argument("--concept-layers", default="29,15", help="the demo's layers (auto = 29 on SmolLM2, middle)")
    parser.add_argument("--new-tokens", type=int, default=32, help="new tokens per row (the full grid)")
    parser.add_argument("--no-llamacpp", action="store_true", help="leave out the llama.cpp columns")
    parser.add_argument("--llamacpp-bound", type=int, default=0,
                        help="B: also llama.cpp with all B rows in one context at one alpha (a bound), against ours")
    parser.add_argument("--workdir", default="/tmp/steerstrength-llamacpp", help="the F32 GGUF and control vectors")
    parser.add_argument("--concept-prompts", type=int, default=None, help="--concept: fewer prompts than the demo's")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model = load_model(None, dtype="float32", device="cpu")
    sv = SteeringVectors.load(args.vectors)[args.layer]
    torch.manual_seed(0)
    control = torch.randn(model.d_model)
    control = control / control.norm() * sv.vector.norm()
    vectors = torch.stack([sv.vector.float(), control])
    print(f"model {model.name}  layer {args.layer}  threads {torch.get_num_threads()}  "
          f"cpu {platform.processor() or platform.machine()}")
    results = {}
    if not args.no_throughput or args.llamacpp_bound:
        engines, note = ([], "--no-llamacpp") if args.no_llamacpp else llama_cpp_engines(model, Path(args.workdir))
        print(f"llama.cpp columns: {'skipped: ' + note if note else ', '.join(label for label, _ in engines)} "
              "(one thread; sampling in numpy from the full logits: the sampler's cost is not what is compared)")
        results["llama_cpp"] = note or [dict(label=label, gguf=str(cpp.path)) for label, cpp in engines]
        cvec_files = control_vector_files(vectors, args.layer, Path(args.workdir)) if engines else []
        if engines and not args.no_throughput:
            strong = 0.5 * sv.r(model) / float(sv.vector.norm())  # alpha_resid 0.5: far from alpha = 0
            ids = prompt_of_length(model, 16)
            results["llama_cpp_check"] = {}
            for label, cpp in engines:
                rows = check_llamacpp(model, cpp, ids, vectors[0], cvec_files[0], args.layer, [0.0, strong])
                results["llama_cpp_check"][label] = rows
                for r in rows:
                    print(f"check {label} alpha {r['alpha_raw']:.4g}: max TV batched/single sequence "
                          f"{r['tv_batched_vs_single']:.1e}, batched/ours {r['tv_batched_vs_ours']:.1e} "
                          f"(ours alpha vs 0: {r['tv_ours_alpha_vs_0']:.3f})", flush=True)
        sizes, lengths, new = ((1, 16), (16,), 8) if args.quick else ((1, 16, 64), (16, 512), args.new_tokens)
        if not args.no_throughput:
            results["throughput"] = throughput(model, vectors, args.layer, sizes, lengths, new, engines, cvec_files)
        if args.llamacpp_bound and engines:
            results["llamacpp_bound"] = llamacpp_bound(model, vectors, args.layer, engines, cvec_files,
                                                       args.llamacpp_bound, lengths, new)
    if args.concept:
        everything = SteeringVectors.load(args.vectors)
        results["concept"] = concept_demo(model, everything, [int(x) for x in args.concept_layers.split(",")],
                                          n_prompts=args.concept_prompts)
    if args.interleaved:
        everything = SteeringVectors.load(args.vectors)
        results["interleaved"] = concept_interleaved(model, everything, [int(x) for x in args.concept_layers.split(",")],
                                                     args.interleaved)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
