"""Where ours spends a steered-sampling call (steering.sample_steered on bench_generation.py's B rows).

The prefill, the decode forwards split into their matmuls (attention projections, MLP, unembedding), attention over
the cache, the other ops and the Python between ops, and the sampler (docs/steering.md, issue 29).

    taskset -c 1 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/profile_generation.py \\
        --vectors /tmp/joy.safetensors [--B 64] [--T 16,512] [--new-tokens 8] [--json out.json]

torch.profiler around one call; the phases are marked by wrapping steering's own _prefill, _forward and _draw in
record_function here (src is not changed). A decode forward's "Python between ops" is its wall time minus the time
inside the aten ops it calls directly (the interpreter running the model's modules, the hooks, the dispatcher). The
profiler's own cost per op inflates that share a little: read the split, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.autograd.profiler import record_function

from bench_generation import prompt_of_length, run_ours
from steerstrength import SteeringVectors, load_model, steering


def marked(name, fn):
    def wrapper(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)
    return wrapper


def linear_role(model, weight_shape) -> str:
    d, V = model.d_model, model.vocab_size
    if weight_shape[0] == V:
        return "unembedding (lm_head)"
    if weight_shape[0] > d or weight_shape[1] > d:
        return "MLP matmuls"
    return "attention projections (q, k, v, o)"


def split(model, prof) -> dict:
    """Seconds per part of one profiled call."""
    events = prof.events()
    totals = {name: sum(e.cpu_time_total for e in events if e.name == name) / 1e6
              for name in ("prefill", "decode forward", "sampling")}
    forwards = [e for e in events if e.name == "decode forward" and not _inside(e, "prefill")]
    totals["decode forward"] = sum(e.cpu_time_total for e in forwards) / 1e6
    parts: dict[str, float] = {}
    for fwd in forwards:
        for op in _ops_under(fwd):
            if op.name == "aten::linear":
                role = linear_role(model, op.input_shapes[1])
            elif "attention" in op.name:
                role = "attention over the cache (sdpa)"
            else:
                role = "other ops (norms, rope, cache writes, adds, steering)"
            parts[role] = parts.get(role, 0.0) + op.cpu_time_total / 1e6
    parts["Python between ops"] = totals["decode forward"] - sum(parts.values())
    outside: dict[str, float] = {}  # the aten ops of the rest of the loop (the per-row KV cache, the masks)
    for e in events:
        if e.cpu_parent is None and e.name.startswith("aten::"):
            outside[e.name] = outside.get(e.name, 0.0) + e.cpu_time_total / 1e6
    top = dict(sorted(outside.items(), key=lambda kv: -kv[1])[:4])
    return dict(totals=totals, decode_forward=parts, rest_top_ops=top)


def _inside(e, name) -> bool:
    p = e.cpu_parent
    while p is not None:
        if p.name == name:
            return True
        p = p.cpu_parent
    return False


def _ops_under(e):
    """The aten ops called from Python under `e` (their children are inside their time)."""
    for c in e.cpu_children:
        if c.name.startswith("aten::"):
            yield c
        else:
            yield from _ops_under(c)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vectors", required=True)
    ap.add_argument("--layer", type=int, default=28)
    ap.add_argument("--B", type=int, default=64)
    ap.add_argument("--T", default="16,512")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    model = load_model(None, dtype="float32", device="cpu")
    sv = SteeringVectors.load(args.vectors)[args.layer]
    torch.manual_seed(0)
    control = torch.randn(model.d_model)
    vectors = torch.stack([sv.vector.float(), control / control.norm() * sv.vector.norm()])
    steering._prefill = marked("prefill", steering._prefill)
    steering._forward = marked("decode forward", steering._forward)
    steering._draw = marked("sampling", steering._draw)
    out = []
    for T in (int(x) for x in args.T.split(",")):
        ids = prompt_of_length(model, T)
        run_ours(model, ids, vectors, args.layer, args.B, 2)  # warm up
        plain = run_ours(model, ids, vectors, args.layer, args.B, args.new_tokens)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            t = time.perf_counter()
            run_ours(model, ids, vectors, args.layer, args.B, args.new_tokens)
            wall = time.perf_counter() - t
        row = dict(T=T, B=args.B, new_tokens=args.new_tokens, seconds_unprofiled=plain, seconds_profiled=wall,
                   **split(model, prof))
        row["totals"]["rest of the loop"] = wall - sum(row["totals"].values())
        out.append(row)
        print(f"T={T} B={args.B}, {args.new_tokens} new tokens: {plain:.2f} s unprofiled, {wall:.2f} s profiled")
        for name, s in row["totals"].items():
            print(f"  {name:58} {s:7.3f} s  {100 * s / wall:5.1f}%")
        print("    rest of the loop, top aten ops: " + ", ".join(f"{k} {v:.2f} s" for k, v in row["rest_top_ops"].items()))
        fwd = row["totals"]["decode forward"]
        for name, s in sorted(row["decode_forward"].items(), key=lambda kv: -kv[1]):
            print(f"    decode forward: {name:42} {s:7.3f} s  {100 * s / fwd:5.1f}% of the forwards")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
