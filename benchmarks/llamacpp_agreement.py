"""Does llama.cpp, given our pre-scaled control vector at scale 1, steer the way we do at that alpha?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/llamacpp_agreement.py --alpha 0.5 --json benchmarks/results/llamacpp.json

1. An F32 GGUF of the embedded model: every tensor of its GGUF dequantized to float32 (the same weights our loader
   dequantizes), the key-value metadata copied.
2. A steering vector (the run's file, or the difference of means of the curated joy pairs), exported with
   `export-gguf --alpha A --alpha-unit resid` (SteeringVectors.prescaled + to_gguf): direction.l = alpha_l v_l.
3. llama.cpp, through the C API of the xllamacpp wheel (benchmarks/llamacpp.py, ctypes; its Python API has none):
   the model loaded, the control vector loaded by llama.cpp's own `common_control_vector_load` (what
   `--control-vector FILE` calls, scale 1) and applied over layers 1..n_layer as llama-cli applies it, then the
   next-token distribution after each context (its full logits, softmax in float64).
4. Ours: `next_token_probs(model, sv, context, [alpha_raw])`, float32. The total variation between the two, per
   context, with and without steering, and how far steering moved ours (so agreement is not agreement on nothing).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from llamacpp import LlamaCpp, f32_gguf, total_variation  # the ctypes layer, shared with bench_generation.py

CONTEXTS = ("Tell me about your day.", "The weather today is", "My favourite food is", "I walked into the room and")


# ----------------------------------------------------------------------------- the comparison


def agreement(model, sv, layer: int, alpha: float, workdir, *, contexts=CONTEXTS, threads: int = 1) -> dict:
    """TV between llama.cpp with the pre-scaled control vector at scale 1 and ours at that alpha (resid units),
    per context; the same without steering; and how far steering moved ours."""
    from steerstrength.steering import next_token_probs

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if not str(model.source).startswith("gguf:"):
        raise ValueError(f"{model.name} was not loaded from a GGUF; llama.cpp needs one")
    gguf = f32_gguf(str(model.source).removeprefix("gguf:"), workdir / f"{model.name}.f32.gguf")
    pre = sv.prescaled(alpha, "resid", model, [layer])
    cvec = pre.to_gguf(workdir / f"prescaled.{layer}.gguf")
    raw = pre.meta["prescaled"]["raw_alpha"][str(layer)]
    cpp = LlamaCpp(gguf, threads=threads)
    rows = []
    for context in contexts:
        ids = model.token_ids(context)
        ours = next_token_probs(model, sv[layer], context, [raw, 0.0]).double().numpy()
        steered, plain = cpp.next_token_probs(ids, cvec), cpp.next_token_probs(ids)
        rows.append(dict(context=context, tv_steered=total_variation(steered, ours[0]),
                         tv_unsteered=total_variation(plain, ours[1]), tv_ours_alpha_vs_0=total_variation(ours[0], ours[1]),
                         top_ours=int(ours[0].argmax()), top_llamacpp=int(steered.argmax())))
    return dict(model=model.name, gguf=str(gguf), layer=layer, alpha_resid=alpha, alpha_raw=raw,
                llamacpp_layers=cpp.n_layer, rows=rows, max_tv_steered=max(r["tv_steered"] for r in rows),
                max_tv_unsteered=max(r["tv_unsteered"] for r in rows),
                min_tv_ours_alpha_vs_0=min(r["tv_ours_alpha_vs_0"] for r in rows))


def main() -> None:
    import steerstrength as ss

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vectors", default=None, help="a vector file; default: curated joy pairs' difference of means")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--alpha", type=float, default=0.5, help="in residual units")
    ap.add_argument("--workdir", default="/tmp/steerstrength-llamacpp")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    start = time.perf_counter()
    model = ss.load_model()
    if args.vectors:
        sv = ss.SteeringVectors.load(args.vectors)
    else:
        sv = ss.difference_of_means(model, ss.curated_texts("joy", "positive"), ss.curated_texts("joy", "negative"),
                                    [args.layer], concept="joy")
    out = agreement(model, sv, args.layer, args.alpha, args.workdir, threads=args.threads)
    out["seconds"] = round(time.perf_counter() - start, 1)
    for r in out["rows"]:
        print(f"{r['context']!r:40} TV steered {r['tv_steered']:.2e}  unsteered {r['tv_unsteered']:.2e}  "
              f"(ours alpha vs 0: {r['tv_ours_alpha_vs_0']:.3f})  top {r['top_ours']}/{r['top_llamacpp']}")
    print(f"max TV with the pre-scaled vector at scale 1: {out['max_tv_steered']:.2e} (layer {args.layer}, "
          f"alpha_resid {args.alpha}, raw {out['alpha_raw']:.4g})")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
