"""Benchmark: peak memory of `steerstrength sweep tokens` on a large grid, and the two token-curve paths compared.

1. The command itself in a child process: its maximum resident set size (getrusage of the child, what
   `/usr/bin/time -v` prints) and wall time.
2. `--compare N`: in this process, `token_curves` on N alphas with the full matrix (one pass) and with a budget of
   1 byte (two passes of blocks): the time ratio, and whether the tables are identical.

    steerstrength vectors --concept joy --layers 15 --out /tmp/v.safetensors
    taskset -c 0 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_tokens_memory.py \\
        --vectors /tmp/v.safetensors --n-alphas 16384 [--compare 1024] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time


def sweep_peak(vectors: str, n_alphas: int, layer: int, out: str) -> dict:
    """Run the command in a child; its peak RSS (getrusage of children, kB on Linux) and wall time."""
    code = ("import sys; from steerstrength.cli import main; "
            f"sys.argv = ['steerstrength', '--quiet', 'sweep', 'tokens', '-v', {vectors!r}, '--n-alphas', "
            f"'{n_alphas}', '--n-contexts', '1', '--layers', '{layer}', '--out', {out!r}]; main()")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    seconds = time.perf_counter() - start
    return dict(n_alphas=n_alphas + 1, peak_rss_mb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                seconds=seconds)


def compare_paths(vectors: str, n_alphas: int, layer: int) -> dict:
    from steerstrength import SteeringVectors, load_model, token_curves
    from steerstrength.grid import AlphaGrid
    from steerstrength.metrics.contexts import stage_contexts

    model = load_model(None, dtype="float32", device="cpu")
    sv = SteeringVectors.load(vectors)[layer]
    alphas = sv.raw_alphas(AlphaGrid.symmetric(1.5, n_alphas, unit="resid"), model)
    contexts = stage_contexts("joy", n_contexts=1)
    times, frames = {}, {}
    for name, budget in (("one pass", 1 << 40), ("two passes", 1)):
        start = time.perf_counter()
        res = token_curves(model, sv, contexts, alphas, memory_budget=budget)
        times[name] = time.perf_counter() - start
        frames[name] = res.curves_frame(model), res.top_frame(model)
    identical = all(a.equals(b) for a, b in zip(frames["one pass"], frames["two passes"]))
    return dict(n_alphas=len(alphas), seconds=times, ratio=times["two passes"] / times["one pass"],
                identical=identical)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", required=True)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--n-alphas", type=int, default=16384, help="the command's --n-alphas (0 is added)")
    parser.add_argument("--compare", type=int, default=0, help="also compare the two paths on this many alphas")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as out:
        results["sweep"] = sweep_peak(args.vectors, args.n_alphas, args.layer, out)
    s = results["sweep"]
    print(f"sweep tokens, {s['n_alphas']} alphas, 1 context, layer {args.layer}: peak RSS {s['peak_rss_mb']:.0f} MB, "
          f"{s['seconds']:.1f} s")
    if args.compare:
        c = results["compare"] = compare_paths(args.vectors, args.compare, args.layer)
        print(f"token_curves on {c['n_alphas']} alphas: one pass {c['seconds']['one pass']:.1f} s, two passes "
              f"{c['seconds']['two passes']:.1f} s ({c['ratio']:.2f}x); identical tables: {c['identical']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
