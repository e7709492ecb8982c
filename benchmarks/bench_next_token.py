"""Benchmark: `next_token_probs` against the straightforward steering code, same run, same machine.

Default model, middle layer (15), one ~20-token context, 1025 alphas in [-200, 200], float32.
The straightforward code is what users of today's steering libraries write: a forward hook adding
alpha * v, a full forward per batch of alphas, logits at every position, softmax of the last one.

    .venv/bin/python benchmarks/bench_next_token.py [--repeats 3] [--json out.json] [--bf16]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from steerstrength import SteeringVector, load_model
from steerstrength.steering import next_token_probs, steer

CONTEXT = "I walked into the kitchen this morning and saw that my old friend had left a note on the"


def straightforward(model, v, layer, enc, alphas, positions, batch_size=64):
    """A hook, a full forward per alpha batch, logits at every position."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(alphas), batch_size):
            a = alphas[start:start + batch_size]
            with steer(model, v, layer, a, positions=positions):
                logits = model.hf(input_ids=enc.input_ids.repeat(len(a), 1)).logits
            out.append(torch.softmax(logits[:, -1].float(), -1))
    return torch.cat(out)


def best_time(fn, repeats):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--n-alphas", type=int, default=1024)
    parser.add_argument("--json", default=None)
    parser.add_argument("--bf16", action="store_true", help="also measure bfloat16 against float32")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = load_model(None, dtype="float32", device="cpu")
    v = torch.randn(model.d_model) * 3.0
    sv = SteeringVector(v, args.layer)
    enc = model.encode([CONTEXT])
    alphas = torch.cat([torch.linspace(-200, 200, args.n_alphas), torch.zeros(1)])
    tokens = enc.input_ids.shape[1]
    print(f"model {model.name}  layer {args.layer}  context tokens {tokens}  alphas {len(alphas)}  "
          f"threads {torch.get_num_threads()}  cpu {platform.processor() or platform.machine()}")

    # FLOP/s of a plain batched forward (no steering, batch of 64 copies), the machine's reference rate.
    batch = enc.input_ids.repeat(64, 1)
    plain = lambda: model.hf(input_ids=batch).logits  # noqa: E731
    with torch.inference_mode():
        plain()
        t_plain, _ = best_time(plain, args.repeats)
        plain_flops = count_flops(plain)
    plain_rate = plain_flops / t_plain
    print(f"plain batched forward: {plain_flops / 1e9:.1f} GFLOP in {t_plain:.3f} s = {plain_rate / 1e9:.1f} GFLOP/s")

    results = {"model": model.name, "layer": args.layer, "context_tokens": tokens, "n_alphas": len(alphas),
               "threads": torch.get_num_threads(), "plain_gflops_per_s": plain_rate / 1e9, "positions": {}}
    for positions in ("all", "last"):
        fast_fn = lambda: next_token_probs(model, sv, CONTEXT, alphas, positions=positions)  # noqa: E731
        slow_fn = lambda: straightforward(model, v, args.layer, enc, alphas, positions)  # noqa: E731
        t_fast, fast = best_time(fast_fn, args.repeats)
        t_slow, slow = best_time(slow_fn, args.repeats)
        fast_flops = count_flops(fast_fn)
        slow_flops = count_flops(slow_fn)
        row = {
            "fast_s": t_fast, "straightforward_s": t_slow, "speedup": t_slow / t_fast,
            "max_abs_diff": float((fast - slow).abs().max()),
            "fast_gflop": fast_flops / 1e9, "straightforward_gflop": slow_flops / 1e9,
            "fast_flops_fraction_of_plain": (fast_flops / t_fast) / plain_rate,
            "straightforward_flops_fraction_of_plain": (slow_flops / t_slow) / plain_rate,
        }
        results["positions"][positions] = row
        print(f"positions={positions:4s}  fast {t_fast:6.2f} s  straightforward {t_slow:6.2f} s  "
              f"speedup {row['speedup']:5.2f}x  max|dp| {row['max_abs_diff']:.2e}  "
              f"FLOPs {row['fast_gflop']:.0f} vs {row['straightforward_gflop']:.0f} GFLOP  "
              f"achieved rate {row['fast_flops_fraction_of_plain']:.2f} (fast) / "
              f"{row['straightforward_flops_fraction_of_plain']:.2f} (straightforward) of plain")

    if args.bf16:
        bf = load_model(None, dtype="bfloat16", device="cpu")
        for positions in ("all", "last"):
            ref = next_token_probs(model, sv, CONTEXT, alphas, positions=positions)
            t_bf, low = best_time(lambda: next_token_probs(bf, sv, CONTEXT, alphas, positions=positions), 1)
            t_fp, _ = best_time(lambda: next_token_probs(model, sv, CONTEXT, alphas, positions=positions), 1)
            diff = (low - ref).abs()
            tv = 0.5 * diff.sum(-1)
            row = {"bf16_s": t_bf, "fp32_s": t_fp, "speedup": t_fp / t_bf, "max_abs_diff": float(diff.max()),
                   "mean_tv": float(tv.mean()), "max_tv": float(tv.max()),
                   "top1_agreement": float((low.argmax(-1) == ref.argmax(-1)).double().mean())}
            results.setdefault("bfloat16", {})[positions] = row
            print(f"bfloat16 positions={positions:4s}  {t_bf:.2f} s vs fp32 {t_fp:.2f} s ({row['speedup']:.2f}x)  "
                  f"max|dp| {row['max_abs_diff']:.3e}  TV mean {row['mean_tv']:.3e} max {row['max_tv']:.3e}  "
                  f"top-1 agreement {row['top1_agreement']:.3f}")

    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
