"""Benchmark: `next_token_probs(..., positions="last")` at long context, shared-prefix attention against the
concatenating cache, same process, interleaved runs.

Default model, layer 15, float32, 513 alphas in [-200, 200], contexts of 16, 256 and 1024 tokens. With
positions="last" the first T-1 tokens run once into a KV cache and each alpha pushes only the last token
through blocks l+1..; the question is what a longer cache costs per alpha. The former path (a cache that
concatenates the broadcast batch-1 prefix with each chunk's new keys) copies the prefix per chunk and
layer; the shared-prefix path attends to it uncopied. Reported: min and median seconds per path and length,
the per-alpha cost relative to the shortest context, and max |dp| between the two paths.

Two per-alpha costs: the total time / #alphas, which includes the one-time prefix forward (T-1 tokens
through every block, the same for both paths and growing with T), and the steered-forward time / #alphas:
the time inside the per-chunk forwards (blocks l+1.. for the last token of every alpha, attending to the
cached prefix), what each further alpha costs once the prefix is cached.

    taskset -c 1 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_last_token.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from steerstrength import load_model, steering
from steerstrength.steering import next_token_probs
from steerstrength.vectors import SteeringVector

TEXT = ("I walked into the kitchen this morning and saw that my old friend had left a note on the table. "
        "It said that she had gone to the market to buy bread, apples and a small bunch of flowers, and that "
        "she would be back before noon. The sun was already warm on the window sill, the cat was asleep on "
        "the chair by the door, and somewhere down the street a dog was barking at the postman. ")
PATHS = ("shared", "concat")


def context_of(model, n_tokens: int) -> str:
    """A context that encodes to exactly n_tokens tokens (the text repeated, cut, decoded)."""
    ids = model.tokenizer(TEXT * (n_tokens // 40 + 2), add_special_tokens=False).input_ids
    for cut in range(n_tokens, 0, -1):
        text = model.decode(ids[:cut])
        if model.encode([text]).input_ids.shape[1] == n_tokens:
            return text
    raise SystemExit(f"could not build a context of {n_tokens} tokens")


class ForwardTimer:
    """Seconds spent in the per-chunk steered forwards (the outermost of the wrapped steering functions)."""

    NAMES = ("forward_over_shared_prefix", "forward_from")

    def __init__(self):
        self.seconds, self.depth, self.originals = 0.0, 0, {}

    def __enter__(self):
        for name in self.NAMES:
            self.originals[name] = fn = getattr(steering, name)
            setattr(steering, name, self.timed(fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self.originals.items():
            setattr(steering, name, fn)

    def timed(self, fn):
        def wrapper(*args, **kwargs):
            self.depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
                if self.depth == 0:
                    self.seconds += time.perf_counter() - start
        return wrapper


def run(model, sv, context, alphas, path) -> tuple[float, float, torch.Tensor]:
    """(total seconds, seconds in the steered forwards, probabilities) of one sweep on `path`."""
    steering.SHARED_PREFIX_ATTENTION = path == "shared"
    try:
        with ForwardTimer() as timer:
            start = time.perf_counter()
            probs = next_token_probs(model, sv, context, alphas, positions="last")
            total = time.perf_counter() - start
        return total, timer.seconds, probs
    finally:
        steering.SHARED_PREFIX_ATTENTION = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--n-alphas", type=int, default=513)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 256, 1024])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path and length (interleaved)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = load_model(None, dtype="float32", device="cpu")
    sv = SteeringVector(torch.randn(model.d_model) * 3.0, args.layer)
    alphas = torch.linspace(-200, 200, args.n_alphas)
    print(f"model {model.name}  layer {args.layer}  alphas {len(alphas)}  threads {torch.get_num_threads()}  "
          f"cpu {platform.processor() or platform.machine()}  torch {torch.__version__}")

    # The shared path must be the one taken (no fallback to the concatenating cache).
    fallbacks = []
    concat = steering._last_token_probs_concat

    def counting(*a, **k):
        fallbacks.append(steering.SHARED_PREFIX_ATTENTION)
        return concat(*a, **k)

    steering._last_token_probs_concat = counting
    results = {}
    try:
        for n in args.lengths:
            context = context_of(model, n)
            times = {p: [] for p in PATHS}
            steered = {p: [] for p in PATHS}  # of which in the per-chunk steered forwards
            probs = {}
            for p in PATHS:  # warm-up, also the probabilities compared
                probs[p] = run(model, sv, context, alphas, p)[2]
            for _ in range(args.repeats):
                for p in PATHS:
                    total, forwards, _ = run(model, sv, context, alphas, p)
                    times[p].append(total)
                    steered[p].append(forwards)
            dp = float((probs["shared"] - probs["concat"]).abs().max())
            results[n] = dict(times=times, steered_times=steered, max_abs_dp=dp,
                              min={p: min(t) for p, t in times.items()},
                              median={p: statistics.median(t) for p, t in times.items()},
                              steered_min={p: min(t) for p, t in steered.items()},
                              steered_median={p: statistics.median(t) for p, t in steered.items()})
            print(f"  {n:5d} tokens: shared min {results[n]['min']['shared']:.2f} s "
                  f"(steered forwards {results[n]['steered_min']['shared']:.2f} s), concat min "
                  f"{results[n]['min']['concat']:.2f} s ({results[n]['steered_min']['concat']:.2f} s), "
                  f"max |dp| {dp:.1e}", flush=True)
    finally:
        steering._last_token_probs_concat = concat
    if any(fallbacks):
        raise SystemExit("the shared-prefix path fell back to the concatenating cache")

    base, A = args.lengths[0], len(alphas)
    rows = []
    print(f"\n| tokens | path | total s, min / median | total ms/alpha (min) "
          f"| total per-alpha cost / {base} tokens (min, median) | steered forwards s, min / median "
          f"| steered ms/alpha (min) | steered per-alpha cost / {base} tokens (min, median) "
          f"| speedup vs concat, total (min) | max abs dp |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in args.lengths:
        r, b = results[n], results[base]
        for p in PATHS:
            row = dict(tokens=n, path=p, min_s=r["min"][p], median_s=r["median"][p],
                       total_ms_per_alpha=1e3 * r["min"][p] / A,
                       total_ratio_min=r["min"][p] / b["min"][p], total_ratio_median=r["median"][p] / b["median"][p],
                       steered_min_s=r["steered_min"][p], steered_median_s=r["steered_median"][p],
                       steered_ms_per_alpha=1e3 * r["steered_min"][p] / A,
                       steered_ratio_min=r["steered_min"][p] / b["steered_min"][p],
                       steered_ratio_median=r["steered_median"][p] / b["steered_median"][p],
                       speedup=r["min"]["concat"] / r["min"][p], max_abs_dp=r["max_abs_dp"],
                       times=r["times"][p], steered_times=r["steered_times"][p])
            rows.append(row)
            print(f"| {n} | {p} | {row['min_s']:.2f} / {row['median_s']:.2f} | {row['total_ms_per_alpha']:.2f} "
                  f"| {row['total_ratio_min']:.2f}x, {row['total_ratio_median']:.2f}x "
                  f"| {row['steered_min_s']:.2f} / {row['steered_median_s']:.2f} | {row['steered_ms_per_alpha']:.2f} "
                  f"| {row['steered_ratio_min']:.2f}x, {row['steered_ratio_median']:.2f}x | {row['speedup']:.2f}x "
                  f"| {row['max_abs_dp']:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=model.name, layer=args.layer, n_alphas=len(alphas), threads=torch.get_num_threads(),
                           repeats=args.repeats, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
