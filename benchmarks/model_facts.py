"""Facts about the embedded models that docs/models.md quotes, measured here.

    python benchmarks/model_facts.py [--models smollm2-135m-instruct,gemma3-270m] [--vectors RUN/models]

Per model: the Wikipedia corpus in its tokens; Delta CE windows with and without BOS leading every window (models with
a BOS convention); and, when RUN/models/<name>/vectors/joy.safetensors exists (a run over several models), per
steered layer the median token norm r_l, the median norm without the mean, and the largest mean |h| dimension.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from steerstrength import load_model
from steerstrength.corpus import wikipedia_texts
from steerstrength.metrics.xent import cross_entropy_curve
from steerstrength.prompts import builtin_contexts
from steerstrength.steering import layer_states
from steerstrength.vectors import SteeringVector, SteeringVectors


def ce_first_window_bos_only(model, texts, seq_len: int, packing: bool) -> float:
    """The former windowing: BOS only where a text starts (each text tokenized with BOS, cut into windows)."""
    rows = [model.token_ids(t) for t in texts]
    if packing:
        eos = [] if model.tokenizer.eos_token_id is None else [int(model.tokenizer.eos_token_id)]
        rows = [[tok for row in rows for tok in row + eos]]
    ids = torch.tensor([r[k * seq_len: k * seq_len + seq_len + 1] for r in rows for k in range((len(r) - 1) // seq_len)])
    with torch.inference_mode():
        logits = model.hf(input_ids=ids.to(model.device)).logits.float()
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                   ids[:, 1:].reshape(-1).to(model.device)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m-instruct,gemma3-270m")
    parser.add_argument("--vectors", type=Path, default=None, help="a run over several models (RUN/models/<name>)")
    args = parser.parse_args()
    texts = wikipedia_texts()
    test = wikipedia_texts("test")[:40]
    for spec in args.models.split(","):
        model = load_model(spec, device="cpu")
        n = sum(len(x) for x in model.tokenizer(texts, add_special_tokens=False)["input_ids"])
        print(f"{spec}: Wikipedia corpus {n:,} tokens ({len(texts):,} paragraphs)")
        if model.add_bos:
            zero = SteeringVector(torch.zeros(model.d_model), layer=0)
            for packing in (False, True):
                led = float(cross_entropy_curve(model, zero, test, [0.0], seq_len=64, packing=packing)[0])
                first = ce_first_window_bos_only(model, test, 64, packing)
                print(f"  CE on 40 test paragraphs, windows of 64, packing={packing}: BOS on each text's first window "
                      f"only {first:.2f}, BOS leading every window {led:.2f} nats/token")
        path = None if args.vectors is None else args.vectors / spec / "vectors" / "joy.safetensors"
        if path is not None and path.is_file():
            layers = SteeringVectors.load(path).layers
            states = {layer: [] for layer in layers}
            for _, mask, hidden in layer_states(model, [c["text"] for c in builtin_contexts()], layers,
                                                batch_size=16, require_tokens=False):
                for layer in layers:
                    states[layer].append(hidden[layer][mask.bool()].float())
            for layer in layers:
                h = torch.cat(states[layer])
                mean = h.mean(0)
                top = h.abs().mean(0).topk(1)
                print(f"  layer {layer}: median |h| {float(h.norm(dim=-1).median()):,.0f}, median |h - mean| "
                      f"{float((h - mean).norm(dim=-1).median()):,.0f}, largest dimension {int(top.indices[0])} "
                      f"(mean |h| {float(top.values[0]):,.0f})")


if __name__ == "__main__":
    main()
