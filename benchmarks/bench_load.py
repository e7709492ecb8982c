"""Benchmark: loading the embedded model from its converted cache, and training the default UFM.

Timings that used to be test assertions (`load_seconds < 3`, UFM training `< 30 s`) live here, where a
slow shared machine makes a number to read instead of a failing test. Exits 1 when a budget is exceeded.

    .venv/bin/python benchmarks/bench_load.py [--repeats 3] [--load-budget 3] [--ufm-budget 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time


def cli_load_seconds() -> float:
    """`steerstrength models show` in a fresh process: the load_seconds it reports (weights and tokenizer only)."""
    out = subprocess.run([sys.executable, "-m", "steerstrength.cli", "models", "show", "--device", "cpu"],
                         capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout)["load_seconds"])


def ufm_seconds() -> float:
    """Train the UFM of App. B.1 to the dataset entropy (tests/theory checks that it gets there)."""
    from steerstrength.theory.dataset import concept_dataset
    from steerstrength.theory.ufm import train_ufm

    ds = concept_dataset()
    start = time.perf_counter()
    train_ufm(ds)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--load-budget", type=float, default=3.0, help="seconds allowed for the cached model load")
    parser.add_argument("--ufm-budget", type=float, default=30.0, help="seconds allowed for the default UFM")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    cli_load_seconds()  # the first run may convert the GGUF into the cache; not timed
    load = min(cli_load_seconds() for _ in range(args.repeats))
    ufm = min(ufm_seconds() for _ in range(args.repeats))
    result = dict(machine=platform.platform(), python=platform.python_version(), repeats=args.repeats,
                  load_seconds=round(load, 3), load_budget=args.load_budget,
                  ufm_seconds=round(ufm, 3), ufm_budget=args.ufm_budget)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    over = [name for name, value, budget in (("load", load, args.load_budget), ("ufm", ufm, args.ufm_budget))
            if value > budget]
    if over:
        print(f"over budget: {', '.join(over)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
