"""Benchmark: certified bfloat16 token sweeps against float32, same run, same machine (docs/steering.md).

`token_curves` on the default model in float32, in bfloat16, and in bfloat16 with `certify` (the tracked tokens
re-run in float32 at 9 evenly spaced alphas plus both ends and 0), timed in one process, in rotating order, best of
`--repeats`. Then, per context: the reported bound (max |p_bf16 - p_fp32| at the checked alphas) against the
error over the whole grid (the float32 sweep at every alpha), and the top-1 agreement over the vocabulary.

    steerstrength vectors --concept joy --layers 15 --out /tmp/v.safetensors
    taskset -c 0 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_bf16.py --vectors /tmp/v.safetensors \\
        [--n-alphas 256] [--n-contexts 6] [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from steerstrength import SteeringVectors, load_model, next_token_probs, token_curves
from steerstrength.grid import AlphaGrid
from steerstrength.metrics.contexts import stage_contexts
from steerstrength.metrics.tokens import check_alphas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", required=True, help="`steerstrength vectors` output holding --layer")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--concept", default="joy", help="whose built-in contexts are swept")
    parser.add_argument("--alpha-max", type=float, default=1.5, help="in residual units (the demo preset's)")
    parser.add_argument("--n-alphas", type=int, default=256)
    parser.add_argument("--n-contexts", type=int, default=6)
    parser.add_argument("--positions", default="all")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    fp32 = load_model(None, dtype="float32", device="cpu")
    bf16 = load_model(None, dtype="bfloat16", device="cpu")
    sv = SteeringVectors.load(args.vectors)[args.layer]
    alphas = sv.raw_alphas(AlphaGrid.symmetric(args.alpha_max, args.n_alphas, unit="resid"), fp32)
    contexts = stage_contexts(args.concept, n_contexts=args.n_contexts)
    print(f"model {fp32.name}  layer {args.layer}  alphas {len(alphas)} (+/-{args.alpha_max} r_l)  "
          f"contexts {len(contexts)}  positions {args.positions}  threads {torch.get_num_threads()}  "
          f"cpu {platform.processor() or platform.machine()}")

    start = time.perf_counter()
    bf16.in_dtype(torch.float32)  # the float32 reference: loaded once per model, then cached
    reference_s = time.perf_counter() - start
    kw = dict(positions=args.positions)
    runs = {
        "fp32": lambda: token_curves(fp32, sv, contexts, alphas, **kw),
        "bf16": lambda: token_curves(bf16, sv, contexts, alphas, certify=False, **kw),
        "bf16+certify": lambda: token_curves(bf16, sv, contexts, alphas, certify=True, **kw),
    }
    times, results = {name: [] for name in runs}, {}
    names = list(runs)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order: no run always goes first
            t = time.perf_counter()
            results[name] = runs[name]()
            times[name].append(time.perf_counter() - t)
    best = {name: min(ts) for name, ts in times.items()}
    print(f"float32 reference loaded once in {reference_s:.2f} s")
    for name in names:
        print(f"{name:13s} {best[name]:7.2f} s   fp32 / this = {best['fp32'] / best[name]:.2f}x")

    per_context = []
    certified = results["bf16+certify"]
    for s in certified.sets:
        text = s.context["text"]
        p_bf = s.delta_p + s.p0
        full32 = next_token_probs(fp32, sv, text, alphas, positions=args.positions)
        full16 = next_token_probs(bf16, sv, text, alphas, positions=args.positions)
        err = (p_bf - full32[:, s.token_ids]).abs()
        idx = check_alphas(len(alphas), alphas.tolist().index(0.0))
        row = dict(context_id=s.context["id"], tracked=len(s.token_ids), p_error_bound=s.p_error_bound,
                   bound_recomputed=float(err[idx].max()), max_error_all_alphas=float(err.max()),
                   max_error_vocab=float((full16 - full32).abs().max()),
                   top1_agreement=float((full16.argmax(-1) == full32.argmax(-1)).double().mean()))
        per_context.append(row)
        print(f"{row['context_id']:28s} bound {row['p_error_bound']:.4f}  (re-check {row['bound_recomputed']:.4f})  "
              f"max over all alphas {row['max_error_all_alphas']:.4f}  over the vocabulary "
              f"{row['max_error_vocab']:.4f}  top-1 agreement {row['top1_agreement']:.3f}")
    covered = sum(r["max_error_all_alphas"] <= r["p_error_bound"] + 1e-7 for r in per_context)
    print(f"the bound covers the whole grid's error in {covered} of {len(per_context)} contexts; "
          f"largest bound {max(r['p_error_bound'] for r in per_context):.4f}, largest error anywhere "
          f"{max(r['max_error_all_alphas'] for r in per_context):.4f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(model=fp32.name, layer=args.layer, n_alphas=len(alphas), positions=args.positions,
                           threads=torch.get_num_threads(), reference_load_s=reference_s, seconds=best,
                           all_seconds=times, contexts=per_context), fh, indent=2)


if __name__ == "__main__":
    main()
