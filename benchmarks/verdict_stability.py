"""Benchmark: do the demo's verdicts survive a change of seed? (docs/fidelity.md, "Verdict stability").

Runs the demo preset (or --preset) once per seed, with the stages the verdicts read (prompts, vectors, tokens,
logodds, xent, concept, mmlu, report), and prints one table: per (layer, claim, direction) the verdict and estimate
[95% interval] under each seed, and whether the verdict is the same under all of them. The seed moves the random
control directions, the generation seeds, the bootstrap resamples, and with --null the random split of P and N
itself (the curated P and N of a concept are fixed texts: the seed does not move them).

    PYTHONPATH=src taskset -c 0,1 env OMP_NUM_THREADS=2 .venv/bin/python benchmarks/verdict_stability.py \\
        --out /tmp/stability [--seeds 0,1,2] [--null] [--preset demo] [--set key=value ...] [--json out.json]

Each seed's run directory is kept under --out (a rerun resumes it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

STAGES = ["prompts", "vectors", "tokens", "logodds", "xent", "concept", "mmlu", "report"]


@contextlib.contextmanager
def quiet(description: str, total: int):
    yield lambda n=1: None


def cell(row) -> str:
    if math.isfinite(row.low) and math.isfinite(row.high):
        return f"{row.verdict} {row.estimate:+.2f} [{row.low:+.2f}, {row.high:+.2f}]"
    return row.verdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="a folder for one run directory per seed")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--null", action="store_true", help="the null concept: P and N a random split of P + N")
    parser.add_argument("--set", action="append", default=[], help="config overrides, key=value (repeatable)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import pandas as pd

    from steerstrength.config import build_config
    from steerstrength.pipeline import run_pipeline
    from steerstrength.run_tables import RunTables
    from steerstrength.verdicts import run_verdicts

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    frames, seconds = [], {}
    for seed in seeds:
        overrides = list(args.set) + [f"seed={seed}"] + (["prompts.null_split=true"] if args.null else [])
        cfg = build_config(args.preset, None, overrides)
        out = Path(args.out) / f"{'null-' if args.null else ''}seed-{seed}"
        start = time.perf_counter()
        run_pipeline(cfg, out, progress=quiet, log=lambda m: print(f"[seed {seed}] {m}", flush=True), only=STAGES)
        seconds[seed] = round(time.perf_counter() - start, 1)
        frames.append(run_verdicts(RunTables(out)).assign(seed=seed))
    table = pd.concat(frames, ignore_index=True)
    table["cell"] = [cell(r) for r in table.itertuples(index=False)]
    wide = table.pivot_table(index=["concept", "layer", "kind", "claim", "direction"], columns="seed", values="cell",
                             aggfunc="first")
    same = table.groupby(["concept", "layer", "kind", "claim", "direction"])["verdict"].nunique() == 1
    wide["stable"] = same.reindex(wide.index).map({True: "yes", False: "NO"})
    with pd.option_context("display.width", 250, "display.max_colwidth", 60, "display.max_rows", 500):
        print(wide.to_string())
    specific = table[table["kind"] == "concept-specific"]
    print(f"\n{int(same.sum())} of {len(same)} verdicts are the same under seeds {seeds}; "
          f"concept-specific 'agrees': {int((specific['verdict'] == 'agrees').sum())} of {len(specific)} "
          f"(null concept: {args.null}); seconds per seed: {seconds}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(seeds=seeds, null=args.null, preset=args.preset, seconds=seconds,
                                                   overrides=args.set,
                                                   verdicts=table.drop(columns=["cell"]).to_dict("records")),
                                              indent=1, default=str))


if __name__ == "__main__":
    main()
