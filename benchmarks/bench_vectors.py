"""Benchmark: prompt generation and vector extraction (Eq. 3), against the `steering-vectors` package.

Default model, float32, CPU. Three measurements, all in one run on one machine:
1. Generating 16 positive prompts of 64 new tokens (our per-text-seeded sampler), next to plain
   `generate(do_sample=True)` with the same settings, to show what per-text seeds cost.
2. Extracting vectors at 3 layers from 64 texts (|P| = |N| = 32, generated in step 1's way).
3. The same vectors from `steering-vectors` 0.12.2, like for like: same texts, same token ids (no chat
   template, no BOS on this model), same layers (its "decoder_block" l = our block l output),
   mean-difference aggregation. Its trainer reads one token per text (the last); to average tokens as
   the paper does we use its `record_activations` hooks and apply our mask (padding out, position 0
   out or in). Cosine with our vectors and times are reported for both, and for each tool's default.

This script installs nothing. The comparison needs (torch stays as it is; tqdm and scikit-learn,
its other dependencies, are already installed with the project):

    .venv/bin/pip install --no-deps steering-vectors==0.12.2
    .venv/bin/python benchmarks/bench_vectors.py [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from steerstrength import difference_of_means, generate_prompts, load_model
from steerstrength.prompts import concept_prompt, generator_prompt_ids, stop_ids


def best_times(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Best-of-`repeats` seconds and the result of each function, run in turn within each repeat
    so that a change in the machine's load affects every contender alike."""
    times = {name: [] for name in fns}
    results = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}, results


def gflop(fn) -> float:
    """Floating-point operations of one call, in GFLOP (torch's counter: matmuls and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def has_steering_vectors() -> bool:
    try:
        import steering_vectors  # noqa: F401
    except ImportError:
        print("steering-vectors is not installed: .venv/bin/pip install --no-deps steering-vectors==0.12.2")
        return False
    return True


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def plain_sampling(model, n, max_new_tokens, seed):
    """`generate(do_sample=True)`: one RNG for the whole batch, so texts depend on the batch."""
    ids = generator_prompt_ids(model, concept_prompt("joy"))
    enc = model.pad([ids] * n)
    torch.manual_seed(seed)
    with torch.inference_mode():
        return model.hf.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, do_sample=True,
                                 temperature=1.0, top_p=0.9, top_k=0, max_new_tokens=max_new_tokens,
                                 eos_token_id=stop_ids(model), pad_token_id=model.pad_id)


def sv_token_means(model, texts, layers, skip_first_token, batch_size):
    """Per-text token means from steering-vectors' hooks, with our mask (padding, position 0)."""
    from steering_vectors import record_activations

    tok = model.tokenizer
    tok.padding_side = "right"
    out = {layer: [] for layer in layers}
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tok(texts[start:start + batch_size], return_tensors="pt", padding=True)
            with record_activations(model.hf, "decoder_block", layer_nums=layers) as acts:
                model.hf(**batch)  # the package's own extraction runs the full model, logits included
            mask = batch["attention_mask"].clone()
            if skip_first_token:
                mask[:, 0] = 0
            w = mask.double().unsqueeze(-1)
            for layer in layers:
                h = acts[layer][-1].double()
                out[layer].append((h * w).sum(1) / w.sum(1))
    return {layer: torch.cat(chunks) for layer, chunks in out.items()}


def sv_vectors_token_average(model, pos, neg, layers, skip_first_token, batch_size):
    p = sv_token_means(model, pos, layers, skip_first_token, batch_size)
    n = sv_token_means(model, neg, layers, skip_first_token, batch_size)
    return {layer: p[layer].mean(0) - n[layer].mean(0) for layer in layers}


def sv_vectors_default(model, pos, neg, layers, batch_size):
    """The package's trainer as documented: pairs (P_i, N_i), last token, mean of differences."""
    from steering_vectors import train_steering_vector

    model.tokenizer.padding_side = "right"
    sv = train_steering_vector(model.hf, model.tokenizer, list(zip(pos, neg)), layers=layers,
                               layer_type="decoder_block", batch_size=batch_size, show_progress=False)
    return {layer: sv.layer_activations[layer] for layer in layers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", default="5,15,25")
    parser.add_argument("--gen-texts", type=int, default=16)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--texts", type=int, default=64, help="|P| + |N| for the extraction benchmark")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model = load_model(None, dtype="float32", device="cpu")
    layers = [int(x) for x in args.layers.split(",")]
    results = {"model": model.name, "threads": torch.get_num_threads(), "load_avg_start": os.getloadavg()[0],
               "cpu": platform.processor() or platform.machine(), "layers": layers}
    print(f"model {model.name}  threads {torch.get_num_threads()}  load average {os.getloadavg()[0]:.1f}")

    # 1. Prompt generation: ours (per-text seeds) and plain generate(do_sample=True), in turn.
    t, out = best_times({
        "ours": lambda: generate_prompts(model, "joy", "positive", args.gen_texts, max_new_tokens=args.gen_tokens,
                                         seed=0, batch_size=args.gen_texts),
        "plain": lambda: plain_sampling(model, args.gen_texts, args.gen_tokens, 0),
    }, args.repeats)
    rows = out["ours"]
    new_tokens = sum(r["n_tokens"] for r in rows)
    results["generation"] = {"texts": args.gen_texts, "max_new_tokens": args.gen_tokens, "seconds": t["ours"],
                             "plain_generate_seconds": t["plain"], "new_tokens": new_tokens,
                             "kept_texts": len(rows), "ended_at_eos": sum(r["finish"] == "stop" for r in rows)}
    print(f"generate {args.gen_texts} positive prompts x {args.gen_tokens} tokens: {t['ours']:.2f} s "
          f"({new_tokens} tokens, {new_tokens / t['ours']:.0f} tok/s); plain generate(do_sample) {t['plain']:.2f} s")

    # 2. Texts for extraction: P for joy, N random (samples from BOS), 64 new tokens each.
    half = args.texts // 2
    pos = [r["text"] for r in generate_prompts(model, "joy", "positive", half, max_new_tokens=args.gen_tokens,
                                               seed=100, batch_size=16)]
    neg = [r["text"] for r in generate_prompts(model, "joy", "negative", half, setting="random",
                                               max_new_tokens=args.gen_tokens, seed=100, batch_size=16)]
    k = min(len(pos), len(neg))
    pos, neg = pos[:k], neg[:k]  # the package pairs P_i with N_i
    n_tokens = sum(len(model.token_ids(t)) for t in pos + neg)
    same_ids = all(model.token_ids(t) == model.tokenizer(t)["input_ids"] for t in pos + neg)
    results["extraction"] = {"n_positive": k, "n_negative": k, "tokens": n_tokens, "same_token_ids": same_ids}
    print(f"extraction texts: |P| = |N| = {k}, {n_tokens} tokens; identical token ids in both tools: {same_ids}")

    # 3. Like for like (token averages, position 0 out, then in), and each tool's default.
    compare = has_steering_vectors()
    for skip in (True, False):
        fns = {"ours": lambda: difference_of_means(model, pos, neg, layers, skip_first_token=skip,
                                                   batch_size=args.batch_size)}
        if compare:
            fns["theirs"] = lambda: sv_vectors_token_average(model, pos, neg, layers, skip, args.batch_size)
        t, out = best_times(fns, args.repeats)
        results["extraction"][f"ours_s_skip_first_{skip}"] = t["ours"]
        print(f"ours (skip_first_token={skip}): {t['ours']:.2f} s for {len(layers)} layers")
        if not compare:
            continue
        ours, theirs = out["ours"], out["theirs"]
        cos = {layer: cosine(ours[layer].vector, theirs[layer]) for layer in layers}
        rel = {layer: float((ours[layer].vector.double() - theirs[layer]).norm() / theirs[layer].norm())
               for layer in layers}
        row = {"seconds": t["theirs"], "cosine": cos, "relative_difference": rel}
        if skip:  # the work done, independent of the machine's load
            row["gflop"], row["ours_gflop"] = gflop(fns["theirs"]), gflop(fns["ours"])
        results["extraction"][f"sv_token_average_skip_first_{skip}"] = row
        print(f"steering-vectors hooks + token average (position 0 {'out' if skip else 'in'}): {t['theirs']:.2f} s; "
              + "  ".join(f"layer {layer}: cos {cos[layer]:.7f}, |diff|/|v| {rel[layer]:.1e}" for layer in layers))
        if skip:
            print(f"  work: ours {row['ours_gflop']:.0f} GFLOP, steering-vectors {row['gflop']:.0f} GFLOP")

    if compare:
        t, out = best_times({
            "ours": lambda: difference_of_means(model, pos, neg, layers, batch_size=args.batch_size),
            "theirs": lambda: sv_vectors_default(model, pos, neg, layers, args.batch_size),
        }, args.repeats)
        cos = {layer: cosine(out["ours"][layer], out["theirs"][layer]) for layer in layers}
        results["extraction"]["sv_default_last_token"] = {"seconds": t["theirs"], "ours_seconds": t["ours"],
                                                          "cosine_to_ours_default": cos}
        print(f"steering-vectors default (last token, paired means): {t['theirs']:.2f} s (ours {t['ours']:.2f} s); "
              "cosine to our default " + "  ".join(f"layer {layer}: {cos[layer]:.3f}" for layer in layers))

    results["load_avg_end"] = os.getloadavg()[0]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
