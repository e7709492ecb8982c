"""Benchmark: held-out accuracy of the degeneration detector (issue 24 item 3; docs/concept.md).

The detector marks a completion degenerate when the repetition / non-word rules do (metrics.concept.degeneration)
or when the unsteered model reads its first `fluency_tokens` tokens with a mean NLL above a threshold fit on the
train split's fluent texts (curated P, N, neutral) against their token shuffles. Measured here, on the embedded model:
  - balanced accuracy on the held-out split: fluent texts vs their token shuffles (NLL alone, and with the rules);
  - the share flagged among steered-to-collapse completions (the joy vector at 3x and 6x the residual norm, at the
    demo's two layers), by the rules alone and by rules + NLL;
  - the share flagged among the model's own unsteered completions of the evaluation prompts (false alarms).

    steerstrength vectors --concept joy --layers 15,28 --normalize --out /tmp/joy.safetensors
    taskset -c 1 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_degeneration.py --vectors /tmp/joy.safetensors \\
        [--n-texts 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from steerstrength import SteeringVectors, load_model
from steerstrength.config import preset
from steerstrength.grid import AlphaGrid
from steerstrength.metrics.concept import (SamplingSettings, calibrate_fluency, completion_seed, degeneration,
                                           fluency_texts, generate_rows, mean_nll, shuffled_tokens)
from steerstrength.prompts import evaluation_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", required=True)
    parser.add_argument("--layers", default="15,28")
    parser.add_argument("--n-texts", type=int, default=64, help="held-out fluent texts (and as many shuffles)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    section = preset("demo").concept
    model = load_model(None, dtype="float32", device="cpu")
    tokens = section.fluency_tokens
    # The stage's calibration (config sizes), then its accuracy on a larger held-out sample.
    cal = calibrate_fluency(model, chat=True, n_texts=section.fluency_texts, max_tokens=tokens)

    rng = np.random.default_rng(1)
    held = fluency_texts("heldout")
    held = [held[i] for i in sorted(rng.choice(len(held), min(args.n_texts, len(held)), replace=False))]
    shuffled = [shuffled_tokens(model, t, rng) for t in held]
    prompt = ["Write a few sentences about your day."] * len(held)
    nll_f = mean_nll(model, prompt, held, chat=True, max_tokens=tokens)
    nll_s = mean_nll(model, prompt, shuffled, chat=True, max_tokens=tokens)
    rules_f = np.array([degeneration(t)["degenerate"] for t in held])
    rules_s = np.array([degeneration(t)["degenerate"] for t in shuffled])
    thr = cal["threshold"]
    acc_nll = ((nll_f <= thr).mean() + (nll_s > thr).mean()) / 2
    acc_both = ((~rules_f & (nll_f <= thr)).mean() + (rules_s | (nll_s > thr)).mean()) / 2
    acc_rules = ((~rules_f).mean() + rules_s.mean()) / 2
    out = dict(threshold=thr, calibration=cal, n_heldout=2 * len(held), fluency_tokens=tokens,
               heldout_balanced_accuracy=dict(nll=acc_nll, rules=acc_rules, rules_or_nll=acc_both),
               fluent_false_alarm=float((rules_f | (nll_f > thr)).mean()),
               shuffled_caught=float((rules_s | (nll_s > thr)).mean()))
    print(f"threshold {thr:.2f} nats/token (first {tokens} tokens; fit on {cal['n_train']} train texts)")
    print(f"held-out, {2 * len(held)} texts: balanced accuracy NLL {acc_nll:.3f}, rules {acc_rules:.3f}, "
          f"rules or NLL {acc_both:.3f}; fluent flagged {out['fluent_false_alarm']:.3f}, shuffled caught "
          f"{out['shuffled_caught']:.3f}")

    vectors = SteeringVectors.load(args.vectors)
    prompts = evaluation_prompts("train")[:6]
    settings = SamplingSettings(max_new_tokens=32)
    for layer in [int(x) for x in args.layers.split(",")]:
        sv = vectors[layer]
        scales = [0.0, 3.0, 6.0]
        raw = sv.raw_alphas(AlphaGrid(np.array(scales), unit="resid"), model).tolist()
        rows = [(p, a, completion_seed(0, p, c)) for p in prompts for a in raw for c in range(2)]
        done = generate_rows(model, sv, rows, settings)
        texts = [d["completion"] for d in done]
        nll = mean_nll(model, [r[0] for r in rows], texts, chat=True, max_tokens=tokens)
        rules = np.array([degeneration(t)["degenerate"] for t in texts])
        for s, a in zip(scales, raw):
            m = np.array([r[1] == a for r in rows])
            key = f"layer {layer}, alpha {s:g} x r_l"
            out[key] = dict(rules=float(rules[m].mean()), rules_or_nll=float((rules[m] | (nll[m] > thr)).mean()),
                            nll_median=float(np.nanmedian(nll[m])), example=texts[int(np.argmax(m))][:100])
            print(f"{key}: flagged by rules {out[key]['rules']:.2f}, by rules or NLL {out[key]['rules_or_nll']:.2f} "
                  f"(median NLL {out[key]['nll_median']:.2f}); e.g. {out[key]['example']!r}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=float)


if __name__ == "__main__":
    main()
