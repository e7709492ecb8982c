"""GPU timing, one prepared script (a few minutes on one H100/H200-class GPU): steerstrength's sweeps against the
straightforward code on a randomly initialised model with Llama-3-8B's configuration, in bfloat16.

Times, each against the straightforward code (a hook, a full forward per batch of alphas, logits everywhere):
  1. the 1025-alpha next-token curve, positions="all" and "last", on a ~128-token context;
  2. the Delta CE sweep, 129 alphas on 8 windows of 128 tokens.
Reports seconds, the ratio, the FLOP/s of our call (torch.utils.flop_counter counts its FLOPs) and that as a fraction
of the GPU's dense bf16 peak (--peak-tflops: 989 for H100 SXM and H200).

    python benchmarks/gpu_timing.py --json benchmarks/results/gpu.json     # on the GPU machine
    python benchmarks/gpu_timing.py --tiny --device cpu                     # a 2-layer stand-in: the script runs

Weights are random and the tokenizer is a word-level one built here (no download): timing does not depend on values.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

WORDS = ("the a i you we they it is was happy sad kitchen morning friend note table walked saw left on in at of and "
         "to my today sun rain smile good bad very so").split()


def build(tiny: bool, device: str, dtype: torch.dtype):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from steerstrength.models import wrap

    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<unk>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", unk_token="<unk>")
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=512) if tiny else \
        dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128256)  # Llama-3-8B
    config = LlamaConfig(max_position_embeddings=8192, rope_theta=500000.0, **size)
    torch.manual_seed(0)
    with torch.device(device):
        hf = LlamaForCausalLM(config).to(dtype)
    return wrap(hf, tokenizer, name="random-llama-3-8b" if not tiny else "random-tiny-llama", source="random")


def timed(fn, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def plain_curve(model, v, layer, context, alphas, positions, batch=64):
    ids = model.encode([context]).input_ids
    out = []
    from steerstrength.steering import steer

    with torch.inference_mode():
        for s in range(0, len(alphas), batch):
            a = alphas[s:s + batch]
            with steer(model, v, layer, a, positions=positions):
                out.append(torch.softmax(model.hf(input_ids=ids.repeat(len(a), 1)).logits[:, -1].float(), -1))
    return torch.cat(out)


def plain_xent(model, v, layer, ids, alphas, batch=8):
    """Mean CE per alpha: a hook and a full forward of every window at every alpha."""
    out = []
    from steerstrength.steering import steer

    with torch.inference_mode():
        for a in alphas.tolist():
            total = 0.0
            for s in range(0, ids.shape[0], batch):
                w = ids[s:s + batch]
                with steer(model, v, layer, a):
                    logits = model.hf(input_ids=w[:, :-1]).logits.float()
                total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                                 w[:, 1:].reshape(-1), reduction="sum"))
            out.append(total / (ids.shape[0] * (ids.shape[1] - 1)))
    return torch.tensor(out, dtype=torch.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer stand-in (checks that the script runs)")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from steerstrength.metrics.xent import cross_entropy_sums, windows
    from steerstrength.steering import next_token_probs
    from steerstrength.vectors import SteeringVector

    dtype = torch.float32 if args.tiny else torch.bfloat16
    model = build(args.tiny, args.device, dtype)
    layer = model.n_layers // 2
    v = SteeringVector(torch.randn(model.d_model, generator=torch.Generator().manual_seed(1)).to(args.device), layer)
    context = " ".join(WORDS[i % len(WORDS)] for i in range(127))
    alphas = torch.linspace(-8.0, 8.0, 1025, dtype=torch.float64)
    results = dict(model=model.name, dtype=str(dtype), device=torch.cuda.get_device_name() if
                   args.device.startswith("cuda") else args.device, peak_tflops=args.peak_tflops)
    for positions in ("all", "last"):
        ours = lambda: next_token_probs(model, v, context, alphas, positions=positions)  # noqa: E731
        ours()  # warm-up
        p_ours, t_ours = timed(ours, args.device)
        p_plain, t_plain = timed(lambda: plain_curve(model, v.vector, layer, context, alphas, positions), args.device)
        f = flops(ours)
        results[f"curve_{positions}"] = dict(ours_s=t_ours, plain_s=t_plain, speedup=t_plain / t_ours,
                                             ours_tflops=f / t_ours / 1e12,
                                             peak_fraction=f / t_ours / 1e12 / args.peak_tflops,
                                             max_abs_dp=float((p_ours.cpu() - p_plain.cpu()).abs().max()))
        print(f"curve, positions={positions}: {results[f'curve_{positions}']}", flush=True)
    text = " ".join(WORDS[(7 * i) % len(WORDS)] for i in range(8 * 129 + 8))
    ids = windows(model, [text], 128)[:8].to(args.device)
    xa = torch.linspace(-8.0, 8.0, 129, dtype=torch.float64)
    ours = lambda: cross_entropy_sums(model, v, ids, xa)  # noqa: E731
    ours()
    s_ours, t_ours = timed(ours, args.device)
    ce_plain, t_plain = timed(lambda: plain_xent(model, v.vector, layer, ids, xa), args.device)
    f = flops(ours)
    ce_ours = s_ours.cpu() / (ids.shape[0] * (ids.shape[1] - 1))
    results["delta_ce"] = dict(ours_s=t_ours, plain_s=t_plain, speedup=t_plain / t_ours,
                               ours_tflops=f / t_ours / 1e12, peak_fraction=f / t_ours / 1e12 / args.peak_tflops,
                               max_rel_ce_diff=float(((ce_ours - ce_plain) / ce_plain).abs().max()))
    print(f"Delta CE: {results['delta_ce']}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
