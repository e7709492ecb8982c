"""Benchmark: the Delta CE sweep (`cross_entropy_sums`) against the straightforward code, same run, same machine.

Default: 32,768 scored tokens (256 windows of 128), 129 alphas (linspace(-100, 100, 128) plus 0), the
default model's middle layer (15), float32. The straightforward code is what the paper's authors' code
and today's steering libraries do: a forward hook adding alpha * v (one alpha per row), a full forward
per alpha batch, logits at every position, F.cross_entropy. Both use the same rows per forward, and
they alternate window block by window block, so a busy machine slows both alike.

    .venv/bin/python benchmarks/bench_xent.py [--tokens 32768] [--n-alphas 128] [--scaling] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import torch
import torch.nn.functional as F

from steerstrength import load_model
from steerstrength.corpus import cached_samples, load_corpus
from steerstrength.metrics.contexts import builtin_contexts
from steerstrength.grid import AlphaGrid
from steerstrength.metrics.xent import _rows_per_forward, cross_entropy_sums, windows
from steerstrength.steering import DEFAULT_LOGIT_BUDGET, DEFAULT_TOKEN_BUDGET, alpha_chunks, steer
from steerstrength.vectors import difference_of_means


@torch.inference_mode()
def straightforward_sums(model, v, layer, ids, alphas, *, token_budget, logit_budget):
    """A hook with per-row alphas, a full forward per alpha batch, logits at every position, F.cross_entropy."""
    T = ids.shape[1] - 1
    batch = min(ids.shape[0], _rows_per_forward(model, T, token_budget, logit_budget))
    sums = torch.zeros(alphas.numel(), dtype=torch.float64)
    for start in range(0, ids.shape[0], batch):
        w = ids[start:start + batch]
        x, y = w[:, :-1], w[:, 1:]
        for sl in alpha_chunks(alphas.numel(), w.shape[0], T, token_budget=token_budget, logit_positions=T,
                               vocab=model.vocab_size, logit_budget=logit_budget):
            n = sl.stop - sl.start
            rows = alphas[sl].repeat_interleave(w.shape[0])
            with steer(model, v, layer, rows):
                logits = model.hf(input_ids=x.repeat(n, 1)).logits
            ce = F.cross_entropy(logits.flatten(0, 1).float(), y.repeat(n, 1).flatten(), reduction="none")
            sums[sl] += ce.view(n, -1).double().sum(1)
            del logits
    return sums


def corpus_windows(model, args):
    n_windows = math.ceil(args.tokens / args.seq_len)
    if args.corpus:
        texts = load_corpus(args.corpus)
    else:  # the offline default: the model's own samples, one window each (cached between runs)
        print(f"sampling {n_windows + 16} texts of {args.seq_len + 16} tokens from the model (cached in {args.cache})")
        texts = cached_samples(model, args.cache, n_windows + 16, args.seq_len + 16, seed=0)
    ids = windows(model, texts, args.seq_len)
    if ids.shape[0] < n_windows:
        raise SystemExit(f"the corpus gives {ids.shape[0]} windows; {n_windows} needed")
    return ids[:n_windows]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def head_to_head(model, v, layer, ids, alphas, args):
    """Alternate the two codes over blocks of windows; total times and the per-alpha sums of each."""
    budgets = dict(token_budget=args.token_budget, logit_budget=args.logit_budget)
    ours_t = base_t = 0.0
    ours = torch.zeros(alphas.numel(), dtype=torch.float64)
    base = torch.zeros_like(ours)
    # Untimed warm-up of both codes on the first window: the first call of each pays one-off costs
    # (allocator growth, oneDNN kernel selection) that are not part of a sweep's steady cost.
    warm = ids[:1]
    t_warm_ours, _ = timed(lambda: cross_entropy_sums(model, v, warm, alphas, **budgets))
    t_warm_base, _ = timed(lambda: straightforward_sums(model, v, layer, warm, alphas, **budgets))
    print(f"  warm-up (untimed in the totals): ours {t_warm_ours:.1f} s, straightforward {t_warm_base:.1f} s",
          flush=True)
    ratios = []
    for i, start in enumerate(range(0, ids.shape[0], args.block)):
        block = ids[start:start + args.block]
        run_ours = lambda: cross_entropy_sums(model, v, block, alphas, **budgets)  # noqa: E731
        run_base = lambda: straightforward_sums(model, v, layer, block, alphas, **budgets)  # noqa: E731
        order = [(run_ours, "ours"), (run_base, "base")] if i % 2 == 0 else [(run_base, "base"), (run_ours, "ours")]
        step = {}
        for fn, name in order:
            t, s = timed(fn)
            step[name] = t
            if name == "ours":
                ours_t, ours = ours_t + t, ours + s
            else:
                base_t, base = base_t + t, base + s
        ratios.append(step["base"] / step["ours"])
        done = start + block.shape[0]
        print(f"  {done}/{ids.shape[0]} windows: ours {ours_t:.1f} s, straightforward {base_t:.1f} s, "
              f"ratio {base_t / ours_t:.3f}", flush=True)
    n = ids.shape[0] * (ids.shape[1] - 1)
    ce_ours, ce_base = ours / n, base / n
    rel = ((ce_ours - ce_base).abs() / ce_base.abs()).max().item()
    units = n * alphas.numel()
    return dict(tokens=n, alphas=int(alphas.numel()), seconds_ours=ours_t, seconds_straightforward=base_t,
                ratio=base_t / ours_t, ratio_per_block_median=float(torch.tensor(ratios).median()),
                ratio_per_block_min=min(ratios), ratio_per_block_max=max(ratios),
                warmup_seconds=dict(ours=t_warm_ours, straightforward=t_warm_base), token_alphas_per_s_ours=units / ours_t,
                token_alphas_per_s_straightforward=units / base_t, max_relative_difference=rel,
                ce0=float(ce_ours[(alphas == 0).nonzero()[0, 0]]))


def scaling(model, v_for, ids, args):
    """Seconds of the sweep alone as the number of alphas, tokens and the steered layer grow."""
    middle = model.n_layers // 2
    budgets = dict(token_budget=args.token_budget, logit_budget=args.logit_budget)
    rows = []
    base_tokens, base_alphas = 2048, 33
    cases = [("alphas", n, base_tokens, middle) for n in (9, 33, 129)]
    cases += [("tokens", base_alphas, t, middle) for t in (1024, 4096)]
    cases += [("layer", base_alphas, base_tokens, layer) for layer in (0, model.n_layers // 4, 3 * model.n_layers // 4,
                                                                        model.n_layers - 1)]
    for what, n_alphas, tokens, layer in cases:
        alphas = AlphaGrid.linspace(-100.0, 100.0, n_alphas - 1).values
        block = ids[: tokens // args.seq_len]
        t, _ = timed(lambda: cross_entropy_sums(model, v_for(layer), block, alphas, **budgets))
        rows.append(dict(vary=what, alphas=n_alphas, tokens=tokens, layer=layer, seconds=t,
                         token_alphas_per_s=tokens * n_alphas / t))
        print(f"  vary {what:6s}: alphas {n_alphas:4d}  tokens {tokens:5d}  layer {layer:2d}  {t:8.2f} s  "
              f"{tokens * n_alphas / t:9.0f} token-alphas/s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768, help="scored tokens")
    parser.add_argument("--n-alphas", type=int, default=128, help="linspace points; 0 is added")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--layer", type=int, default=None, help="default: n_layers // 2")
    parser.add_argument("--block", type=int, default=1,
                        help="windows per alternation block (small: both codes see the same machine load)")
    parser.add_argument("--corpus", default=None, help="a corpus file; default: the model's own samples")
    parser.add_argument("--cache", default="benchmarks/.cache", help="where the sampled corpus is cached")
    parser.add_argument("--token-budget", type=int, default=DEFAULT_TOKEN_BUDGET)
    parser.add_argument("--logit-budget", type=int, default=DEFAULT_LOGIT_BUDGET)
    parser.add_argument("--scaling", action="store_true", help="also the cost table (alphas, tokens, layer)")
    parser.add_argument("--skip-head-to-head", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model = load_model(None, dtype="float32", device="cpu")
    layer = model.n_layers // 2 if args.layer is None else args.layer
    ctx = builtin_contexts("joy")
    positive = [c["text"] for c in ctx if c["kind"] == "concept"]
    negative = [c["text"] for c in ctx if c["kind"] == "neutral"]
    sv = difference_of_means(model, positive, negative, list(range(model.n_layers)))
    alphas = AlphaGrid.linspace(-100.0, 100.0, args.n_alphas).values
    ids = corpus_windows(model, args)
    rows = _rows_per_forward(model, args.seq_len, args.token_budget, args.logit_budget)
    print(f"model {model.name}  layer {layer}  |v| {float(sv[layer].norm()):.1f}  windows {ids.shape[0]} x "
          f"{args.seq_len}  alphas {alphas.numel()}  rows/forward {rows}  threads {torch.get_num_threads()}  "
          f"cpu {platform.processor() or platform.machine()}", flush=True)
    out = dict(model=model.name, layer=layer, dtype="float32", threads=torch.get_num_threads(), seq_len=args.seq_len,
               rows_per_forward=rows, token_budget=args.token_budget, logit_budget=args.logit_budget,
               load_average_start=os.getloadavg())
    if not args.skip_head_to_head:
        out["head_to_head"] = h = head_to_head(model, sv[layer], layer, ids, alphas, args)
        print(f"tokens x alphas: {h['tokens']} x {h['alphas']}\n"
              f"ours            {h['seconds_ours']:9.1f} s  {h['token_alphas_per_s_ours']:9.0f} token-alphas/s\n"
              f"straightforward {h['seconds_straightforward']:9.1f} s  "
              f"{h['token_alphas_per_s_straightforward']:9.0f} token-alphas/s\n"
              f"ratio {h['ratio']:.3f} (target >= 1.6; per window block: median {h['ratio_per_block_median']:.3f}, "
              f"min {h['ratio_per_block_min']:.3f}, max {h['ratio_per_block_max']:.3f})\n"
              f"   max relative difference of CE {h['max_relative_difference']:.2e}"
              f" (target < 1e-6)", flush=True)
    if args.scaling:
        out["scaling"] = scaling(model, lambda l: sv[l], ids, args)
    out["load_average_end"] = os.getloadavg()  # other processes on the machine slow both codes alike
    print(f"load average (1, 5, 15 min) at start {out['load_average_start']}, at end {out['load_average_end']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
