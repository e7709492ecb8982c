"""Def. 3.2 on a real LLM: log-odds M(z) = mean_P log p(z | text) - mean_N log p(z | text), and how it meets Thm 3.3.

p(. | text) is the unsteered model's next-token distribution after each text's first `max_tokens`
tokens (left padding with explicit position ids, so padding changes nothing).

Theory vs practice (`log_odds_analysis`), definitions:
- extremal log-odds: M(z) in the top `extremal_fraction` of M over the vocabulary (high), or in the
  bottom one (low); the quantiles are taken over all V tokens;
- dominating tokens: the `n_dominant` most probable tokens at alpha_max (compared with high
  extremal M) and at alpha_min (compared with low extremal M), per (layer, context);
- target tokens: the `n_target` tokens of largest M (the top-M set); the others are off-target;
- peak position (Thm 3.3): over pairs (target bump, off-target bump) of the same (layer, context),
  the fraction where the target peaks at the larger alpha; and the rank correlation of M with the
  peak alpha over bump tokens (in the UFM the peak sits where E_alpha[M] = M(z), so it is 1).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from steerstrength.config import LogOddsConfig
from steerstrength.errors import InputError
from steerstrength.models import Model

# The defaults are the logodds section's (config.py).
DEFAULT_MAX_TOKENS = LogOddsConfig.max_tokens
DEFAULT_EXTREMAL_FRACTION = LogOddsConfig.extremal_fraction
DEFAULT_N_DOMINANT = LogOddsConfig.n_dominant
DEFAULT_N_TARGET = LogOddsConfig.n_target


@torch.inference_mode()
def mean_log_probs(model: Model, texts: Sequence[str], *, max_tokens: int = DEFAULT_MAX_TOKENS, batch_size: int = LogOddsConfig.batch_size,
                   chat: bool = False, progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """[V] float64: mean over texts of log p(. | first max_tokens tokens of the text), unsteered."""
    if isinstance(texts, str) or not texts:
        raise InputError("give a non-empty list of texts")
    if max_tokens < 1:
        raise InputError(f"max_tokens must be at least 1, not {max_tokens}")
    total = torch.zeros(model.vocab_size, dtype=torch.float64)
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start:start + batch_size])
        enc = model.encode(chunk, chat=chat, max_length=max_tokens, padding_side="left")
        empty = (enc.lengths == 0).nonzero()
        if empty.numel():
            raise InputError(f"text {start + int(empty[0])} is empty after tokenization; remove it")
        logits = model.hf(input_ids=enc.input_ids, attention_mask=enc.attention_mask, position_ids=enc.position_ids,
                          logits_to_keep=1).logits[:, -1]
        total += torch.log_softmax(logits.float(), dim=-1).double().sum(0).cpu()
        if progress is not None:
            progress(len(chunk))
    return total / len(texts)


def log_odds(model: Model, positive: Sequence[str], negative: Sequence[str], *, max_tokens: int = DEFAULT_MAX_TOKENS,
             batch_size: int = LogOddsConfig.batch_size, chat: bool = False, progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Def. 3.2: M(z) = mean_{P} log p(z | text) - mean_{N} log p(z | text), [V] float64.

    Args:
        positive, negative: P and N texts; p(. | text) is the unsteered next-token distribution after each text.
        max_tokens: each text is cut to its first max_tokens tokens.
        batch_size: texts per forward (left padded, explicit position ids).
        chat: wrap the texts in the model's chat template.

    Example::

        M = ss.log_odds(model, ss.curated_texts("joy", "positive"), ss.curated_texts("joy", "negative"))
        model.token_strings(M.topk(5).indices.tolist())     # the tokens most favoured after P
    """
    if not positive or not negative:
        raise InputError(f"log-odds need texts in both sets; P has {len(positive)}, N has {len(negative)}")
    pos = mean_log_probs(model, positive, max_tokens=max_tokens, batch_size=batch_size, chat=chat, progress=progress)
    neg = mean_log_probs(model, negative, max_tokens=max_tokens, batch_size=batch_size, chat=chat, progress=progress)
    return pos - neg


def log_odds_frame(model: Model, M: torch.Tensor, /, *, positive: torch.Tensor | None = None,
                   negative: torch.Tensor | None = None, extremal_fraction: float = DEFAULT_EXTREMAL_FRACTION,
                   **labels):
    """One row per vocabulary token: M(z), its rank (0 = largest) and extremal flag."""
    import pandas as pd

    hi, lo = extremal_thresholds(M, extremal_fraction)
    order = torch.argsort(M, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(M.numel())
    extremal = ["high" if m >= hi else "low" if m <= lo else "" for m in M.tolist()]
    frame = pd.DataFrame(dict(token_id=range(M.numel()), token=model.token_strings(range(M.numel())),
                              M=M.numpy(), rank=rank.numpy(), extremal=extremal))
    if positive is not None:
        frame["log_p_positive"] = positive.numpy()
    if negative is not None:
        frame["log_p_negative"] = negative.numpy()
    for key, value in reversed(list(labels.items())):
        frame.insert(0, key, value)
    return frame


def extremal_thresholds(M: torch.Tensor, fraction: float) -> tuple[float, float]:
    """(high, low): M >= high is in the top `fraction` of the vocabulary, M <= low in the bottom one."""
    if not 0 < fraction < 0.5:
        raise InputError(f"extremal_fraction must be in (0, 0.5), not {fraction}")
    k = max(1, int(round(fraction * M.numel())))
    ordered = torch.sort(M.double()).values
    return float(ordered[-k]), float(ordered[k - 1])


def _fraction(hit: int, total: int) -> dict:
    return dict(count=hit, total=total, fraction=hit / total if total else None)


def log_odds_analysis(M: torch.Tensor, top, curves, *, n_dominant: int = DEFAULT_N_DOMINANT,
                      extremal_fraction: float = DEFAULT_EXTREMAL_FRACTION, n_target: int = DEFAULT_N_TARGET) -> dict:
    """Theory vs practice (module doc): dominating tokens vs extremal M; target vs off-target peak positions.

    `top`: the tokens_top table (layer, context_id, side, rank, token_id); `curves`: per-curve rows
    (layer, context_id, token_id, peak_alpha, shape), e.g. the tokens table (deduplicated here).
    """
    from scipy.stats import spearmanr

    M = M.double()
    hi, lo = extremal_thresholds(M, extremal_fraction)
    argmax_set = set((M == M.max()).nonzero().flatten().tolist())
    argmin_set = set((M == M.min()).nonzero().flatten().tolist())
    target = set(torch.argsort(M, descending=True, stable=True)[:n_target].tolist())
    Ml = M.tolist()
    for need, frame in (({"layer", "context_id", "side", "rank", "token_id"}, top),
                        ({"layer", "context_id", "token_id", "peak_alpha", "shape"}, curves)):
        missing = need - set(frame.columns)
        if missing:
            raise InputError(f"the tokens table lacks columns {sorted(missing)}; use the output of `sweep tokens`")
    if int(top["token_id"].max()) >= M.numel() or int(curves["token_id"].max()) >= M.numel():
        raise InputError("the tokens table has token ids beyond this model's vocabulary; was it made with another model?")
    per_layer = {}
    for layer, top_l in top.groupby("layer"):
        dom = top_l[top_l["rank"] < n_dominant]
        at_max = dom[dom["side"] == "alpha_max"]["token_id"].tolist()
        at_min = dom[dom["side"] == "alpha_min"]["token_id"].tolist()
        cur = curves[curves["layer"] == layer].drop_duplicates(["context_id", "token_id"])
        pairs = dict(target_later=0, tie=0, target_earlier=0)
        rhos, bump_target, bump_off = [], [], []
        for _, ctx in cur[cur["shape"] == "bump"].groupby("context_id"):
            peaks = list(zip(ctx["token_id"].tolist(), ctx["peak_alpha"].tolist()))
            tgt = [p for t, p in peaks if t in target]
            off = [p for t, p in peaks if t not in target]
            bump_target += tgt
            bump_off += off
            for pt in tgt:
                for po in off:
                    pairs["target_later" if pt > po else "tie" if pt == po else "target_earlier"] += 1
            ms, ps = [Ml[t] for t, _ in peaks], [p for _, p in peaks]
            if len(peaks) >= 3 and len(set(ms)) > 1 and len(set(ps)) > 1:  # undefined for a constant side
                rhos.append(float(spearmanr(ms, ps).statistic))
        n_pairs = sum(pairs.values())
        per_layer[str(int(layer))] = dict(
            dominant_at_alpha_max_extremal_high=_fraction(sum(Ml[t] >= hi for t in at_max), len(at_max)),
            dominant_at_alpha_max_argmax_M=_fraction(sum(t in argmax_set for t in at_max), len(at_max)),
            dominant_at_alpha_min_extremal_low=_fraction(sum(Ml[t] <= lo for t in at_min), len(at_min)),
            dominant_at_alpha_min_argmin_M=_fraction(sum(t in argmin_set for t in at_min), len(at_min)),
            peak_position=dict(pairs=pairs, n_pairs=n_pairs,
                               fraction_target_later=pairs["target_later"] / n_pairs if n_pairs else None,
                               n_target_bumps=len(bump_target), n_off_target_bumps=len(bump_off),
                               mean_peak_alpha_target=sum(bump_target) / len(bump_target) if bump_target else None,
                               mean_peak_alpha_off_target=sum(bump_off) / len(bump_off) if bump_off else None),
            spearman_M_peak_alpha=dict(n_contexts=len(rhos), median=float(torch.tensor(rhos).median()) if rhos else None,
                                       mean=sum(rhos) / len(rhos) if rhos else None),
        )
    return dict(definitions=dict(extremal_fraction=extremal_fraction, extremal_high=hi, extremal_low=lo,
                                 n_dominant=n_dominant, n_target=n_target, M_max=float(M.max()), M_min=float(M.min())),
                per_layer=per_layer)
