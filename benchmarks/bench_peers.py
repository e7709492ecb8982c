"""Benchmark: a next-token alpha sweep with steerstrength, the straightforward code, steering-vectors and repeng.

The same curve for every tool: p(. | context) of the token after a ~20-token context, steered at block 15 of the
embedded SmolLM2-135M with a difference-of-means vector (curated joy pairs), at 1025 alphas in [-200, 200],
float32, one process, runs interleaved (tool A, B, C, D, then again), min and median of the repeats, and the
largest |p - p_ours| over the whole [alphas x vocab] matrix.

- steerstrength: `next_token_probs(model, sv, context, alphas, positions)` (alphas in the batch, blocks 0..15 once).
- straightforward: a forward hook adding alpha * v, a full forward per batch of 64 alphas, softmax of the last
  position (what steering code usually looks like).
- steering-vectors 0.12.2, as its README teaches: `with vec.apply(model, multiplier=alpha): model(...)`, one
  alpha at a time.
- repeng 0.4.0, as its README teaches: `ControlModel(model, [15])`, `set_control(vector, coeff=alpha)`, one alpha at
  a time (its ControlModel mutates the model: unwrapped afterwards). repeng 0.4.0 uses `np.float_`, removed in
  NumPy 2: the benchmark restores that alias before importing it.

The peers are not project dependencies; without them their rows are skipped. To include them:

    .venv/bin/pip install --no-deps steering-vectors==0.12.2 repeng==0.4.0
    .venv/bin/python benchmarks/bench_peers.py [--alphas 1025] [--repeats 3] [--json benchmarks/results/peers.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch

import steerstrength as ss
from steerstrength.steering import next_token_probs, steer

CONTEXT = "I walked into the kitchen this morning and saw that my old friend had left a note on the"
LAYER = 15


def straightforward(model, v, ids, alphas, positions, batch_size=64):
    out = []
    with torch.inference_mode():
        for start in range(0, len(alphas), batch_size):
            a = alphas[start:start + batch_size]
            with steer(model, v, LAYER, a, positions=positions):
                logits = model.hf(input_ids=ids.repeat(len(a), 1)).logits
            out.append(torch.softmax(logits[:, -1].float(), -1))
    return torch.cat(out)


def with_steering_vectors(model, v, ids, alphas):
    from steering_vectors import SteeringVector

    vec = SteeringVector({LAYER: v}, "decoder_block")
    out = []
    with torch.inference_mode():
        for a in alphas.tolist():
            with vec.apply(model.hf, multiplier=a):
                out.append(torch.softmax(model.hf(input_ids=ids).logits[0, -1].float(), -1))
    return torch.stack(out)


def with_repeng(model, v, ids, alphas):
    if not hasattr(np, "float_"):
        np.float_ = np.float64  # repeng 0.4.0 names it in an annotation; NumPy 2 removed it
    from repeng import ControlModel, ControlVector

    vector = ControlVector(model.hf.config.model_type, {LAYER: v.numpy()})
    wrapped = ControlModel(model.hf, [LAYER])
    out = []
    try:
        with torch.inference_mode():
            for a in alphas.tolist():
                wrapped.set_control(vector, coeff=a)
                out.append(torch.softmax(wrapped(input_ids=ids).logits[0, -1].float(), -1))
    finally:
        wrapped.unwrap()
    return torch.stack(out)


def available(module: str) -> bool:
    try:
        if module == "repeng" and not hasattr(np, "float_"):
            np.float_ = np.float64
        __import__(module)
        return True
    except ImportError:
        print(f"{module} is not installed: its rows are skipped (see this file's docstring)")
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alphas", type=int, default=1025)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model = ss.load_model(None, device="cpu")
    pos, neg = ss.curated_texts("joy", "positive", "train"), ss.curated_texts("joy", "negative", "train")
    sv = ss.difference_of_means(model, pos, neg, [LAYER])[LAYER]
    v = sv.vector.float()
    ids = model.encode([CONTEXT]).input_ids
    alphas = torch.linspace(-200.0, 200.0, args.alphas, dtype=torch.float64)

    tools = {
        "steerstrength, positions=all": lambda: next_token_probs(model, sv, CONTEXT, alphas, positions="all"),
        "straightforward, all": lambda: straightforward(model, v, ids, alphas, "all"),
        "steerstrength, positions=last": lambda: next_token_probs(model, sv, CONTEXT, alphas, positions="last"),
        "straightforward, last": lambda: straightforward(model, v, ids, alphas, "last"),
    }
    if available("steering_vectors"):
        tools["steering-vectors (README), all"] = lambda: with_steering_vectors(model, v, ids, alphas)
    if available("repeng"):
        tools["repeng (README), all"] = lambda: with_repeng(model, v, ids, alphas)

    times: dict[str, list[float]] = {name: [] for name in tools}
    results: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):  # interleaved: each repeat runs every tool once
        for name, fn in tools.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
            print(f"  {name}: {times[name][-1]:.2f} s", flush=True)

    reference = {"all": results["steerstrength, positions=all"], "last": results["steerstrength, positions=last"]}
    ours = {"all": min(times["steerstrength, positions=all"]), "last": min(times["steerstrength, positions=last"])}
    rows = []
    for name, t in times.items():
        side = "last" if name.endswith("last") else "all"
        dp = float((results[name] - reference[side]).abs().max())
        top1 = float((results[name].argmax(-1) == reference[side].argmax(-1)).double().mean())
        rows.append(dict(tool=name, min_s=min(t), median_s=statistics.median(t), vs_ours=min(t) / ours[side],
                         max_abs_dp=dp, top1_agreement=top1))
    print(f"\n{args.alphas} alphas, layer {LAYER}, {ids.shape[1]} tokens, float32, {torch.get_num_threads()} threads, "
          f"{args.repeats} interleaved repeats")
    print(f"{'tool':34s} {'min s':>8s} {'median s':>9s} {'x ours':>7s} {'max |dp|':>9s} {'top-1':>6s}")
    for r in rows:
        print(f"{r['tool']:34s} {r['min_s']:8.2f} {r['median_s']:9.2f} {r['vs_ours']:7.2f} {r['max_abs_dp']:9.1e} "
              f"{r['top1_agreement']:6.3f}")
    if args.json:
        from steerstrength.io import write_json

        write_json(args.json, dict(rows=rows, alphas=args.alphas, layer=LAYER, tokens=int(ids.shape[1]),
                                   threads=torch.get_num_threads(), repeats=args.repeats,
                                   machine=dict(platform=platform.platform(), processor=platform.processor(),
                                                torch=torch.__version__)))


if __name__ == "__main__":
    main()
