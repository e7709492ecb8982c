"""What the model shows at which layer, per concept: the layer scan and the depth profile (docs/fidelity.md).

    .venv/bin/python benchmarks/fidelity.py --concepts joy,evil --out benchmarks/results/fidelity.json

For each concept: the scan's pick (scan.py) on the curated pairs, and the depth profile (metrics/depth.py): every
listed layer steered with its own unit difference of means on the same grid in residual units, on neutral contexts.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import steerstrength as ss
from steerstrength.config import PAPER_CONCEPTS
from steerstrength.metrics.contexts import builtin_contexts
from steerstrength.grid import AlphaGrid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concepts", default=",".join(PAPER_CONCEPTS))
    ap.add_argument("--layers", default="3,9,15,20,22,24,26,27,28,29")
    ap.add_argument("--alpha-max", type=float, default=1.5, help="in residual units")
    ap.add_argument("--n-alphas", type=int, default=48)
    ap.add_argument("--n-contexts", type=int, default=4)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default="benchmarks/results/fidelity.json")
    args = ap.parse_args()
    model = ss.load_model(args.model)
    layers = [int(x) for x in args.layers.split(",")]
    contexts = [c for c in builtin_contexts() if c["kind"] == "neutral"][12:12 + args.n_contexts]
    grid = AlphaGrid.linspace(-args.alpha_max, args.alpha_max, args.n_alphas).values
    out = dict(model=model.name, layers=layers, alpha_resid_max=args.alpha_max, n_alphas=args.n_alphas,
               contexts=[c["id"] for c in contexts], machine="2-core CPU, float32", per_concept={})
    for concept in args.concepts.split(","):
        start = time.perf_counter()
        pos, neg = ss.curated_texts(concept, "positive"), ss.curated_texts(concept, "negative")
        scan = ss.scan_layers(model, pos, neg, heldout_positive=ss.curated_texts(concept, "positive", "heldout"),
                              heldout_negative=ss.curated_texts(concept, "negative", "heldout"))
        table, _ = ss.depth_profile(model, pos, neg, sorted(set(layers) | {scan.chosen}), contexts, grid,
                                    scan.log_odds.to(torch.float64))
        out["per_concept"][concept] = dict(
            chosen=scan.chosen, seconds=round(time.perf_counter() - start, 1),
            scan=scan.table[["layer", "heldout_auc", "lens_share", "score"]].round(4).to_dict(orient="list"),
            depth=table.drop(columns=["alpha_resid_max"]).round(4).to_dict(orient="records"))
        best = table.set_index("layer").loc[scan.chosen]
        print(f"{concept}: scan picks {scan.chosen}; there concept words {best['concept_word_share']:.2f}, "
              f"unimodal {best['unimodal_share']:.2f}, bumps {best['bump_share']:.2f}, "
              f"Spearman {best['spearman_M_peak']}, target later {best['target_later']}; {best['top_words']}", flush=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
