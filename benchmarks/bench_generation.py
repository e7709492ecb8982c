"""Benchmark: steered sampling throughput against the FLOP floor and the usual alternatives (issue 29; docs/steering.md).

Columns, for the embedded model (SmolLM2-135M, float32, CPU) at batch sizes B and prompt lengths T, in one process:
  floor     one decode step of the batch (B rows, one token each, over a T-token KV cache): the cost per new token
            no sampler can beat on this hardware;
  ours      steering.sample_steered: B rows = alphas x directions x completions of one prompt, one decode loop, the
            prompt's blocks shared (new tokens/s over all rows, and its per-token cost / floor);
  hooked    a hooked Hugging Face `generate` per (direction, alpha) (the steering-vectors / repeng way: `with steer(...)`
            around `generate`, batch = the completions of that alpha);
  llama.cpp xllamacpp with a control vector per alpha: skipped when the wheel exposes no control-vector list (said
            in the output).
With --concept, the demo preset's concept stage per completion (9 alphas x 6 prompts x 4 completions x 32 tokens at
each of its two layers, 28 and 15, the probe judge) the former way (hooked `generate` in batches, rule-based degeneration) and now (batched
engine + the unsteered-NLL fluency check), same process, same core.

    steerstrength vectors --concept joy --layers 15,28 --normalize --out /tmp/joy.safetensors
    taskset -c 1 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_generation.py --vectors /tmp/joy.safetensors \\
        [--quick] [--new-tokens 32] [--concept] [--interleaved 2] [--no-throughput] [--json out.json]
Speed is reported as ratios within this process (the machine is shared): compare columns, not seconds across runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from steerstrength import SteeringVectors, load_model, steer, steering
from steerstrength.models import Encoded


def prompt_of_length(model, T: int) -> list[int]:
    base = model.token_ids("Tell me about your day, and then about the weather, the city and the people you met.")
    return (base * (T // len(base) + 1))[:T]


def floor_step(model, ids: list[int], B: int, repeats: int = 3) -> float:
    """Seconds of one decode forward of B rows over a len(ids)-token cache (no sampling, no steering)."""
    enc = model.pad([ids] * B)
    cache = steering.prefix_cache(model)
    with torch.inference_mode():
        steering._forward(model, enc, use_cache=True, past_key_values=cache, logits_to_keep=1)
        kv = steering.cache_snapshot(cache, range(model.n_layers))
        best = float("inf")
        for _ in range(repeats):
            c = steering.prefix_cache(model, dict(kv))
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
    steering.sample_steered(model, [ids], rows, max_new_tokens=new_tokens, temperature=1.0, top_p=1.0, top_k=0,
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


def llama_cpp_note() -> str | None:
    try:
        import xllamacpp
    except ImportError:
        return "xllamacpp is not installed"
    if not any("control_vectors" == n for n in dir(xllamacpp.CommonParams())):
        return ("this xllamacpp wheel exposes control_vector_layer_start/end but no control-vector list in "
                "CommonParams: a control vector cannot be loaded through it")
    return None


def throughput(model, vectors, layer, sizes, lengths, new_tokens) -> list[dict]:
    out = []
    for T in lengths:
        ids = prompt_of_length(model, T)
        for B in sizes:
            floor = floor_step(model, ids, B)
            ours = run_ours(model, ids, vectors, layer, B, new_tokens)
            hooked = run_hooked(model, ids, vectors, layer, B, new_tokens)
            n = B * new_tokens
            row = dict(T=T, B=B, new_tokens=new_tokens, floor_ms_per_token=1e3 * floor / B,
                       ours_tok_s=n / ours, hooked_tok_s=n / hooked, ours_over_floor=(ours / n) / (floor / B),
                       hooked_over_floor=(hooked / n) / (floor / B), ours_speedup_vs_hooked=hooked / ours)
            out.append(row)
            print(f"T={T:4d} B={B:3d}  floor {row['floor_ms_per_token']:6.2f} ms/token  ours {row['ours_tok_s']:7.1f} "
                  f"tok/s ({row['ours_over_floor']:.2f}x floor)  hooked {row['hooked_tok_s']:7.1f} tok/s "
                  f"({row['hooked_over_floor']:.2f}x floor)  ours/hooked speed {row['ours_speedup_vs_hooked']:.2f}x",
                  flush=True)
    return out


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
            steering.GENERATION_ENGINE = engine
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
    steering.GENERATION_ENGINE = "batched"
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
                steering.GENERATION_ENGINE = engine
                t = time.perf_counter()
                done = generate_rows(model, sv, rows, settings, batch_size=section.batch_size,
                                     read_tokens=section.fluency_tokens if engine == "batched" else 0)
                seconds[engine] += time.perf_counter() - t
                texts[engine] = [d["completion"] for d in done]
            n += len(rows)
            same += sum(a == b for a, b in zip(texts["hf"], texts["batched"]))
    steering.GENERATION_ENGINE = "batched"
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
    note = llama_cpp_note()
    print(f"llama.cpp column: {'skipped: ' + note if note else 'available'}")
    results = dict(llama_cpp=note or "available")
    if not args.no_throughput:
        sizes, lengths, new = ((1, 16), (16,), 8) if args.quick else ((1, 16, 64), (16, 512), args.new_tokens)
        results["throughput"] = throughput(model, vectors, args.layer, sizes, lengths, new)
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
