"""The layer where a concept lives (`--layers auto`, `steerstrength vectors scan`): one forward pass per text, no generation.

Per layer l, from the token-averaged residual streams of P and N (Eq. 3, first token left out):
- `heldout_auc`: the difference of means v_l computed on the training texts, and the held-out P and N texts
  projected on it; the AUC of P against N (0.5: v_l does not separate the concept; 1: it does perfectly);
- `lens_share`: the fraction of the `top_k` tokens of the unembedded direction LN(v_l) W^T (Prop. 4.1's limit
  distribution, what steering at large alpha converges to) whose log-odds M (Def. 3.2, measured on the same
  pass from the last layer) are in the top `extremal_fraction` of the vocabulary: does v_l point at concept words?
- `score` = (2 AUC - 1) * lens_share; the chosen layer maximizes it over [n/6, n - 1] (ties: the earlier layer),
  the last block included: steering its output acts through the final norm and the unembedding only, and that is
  where a concept's words can dominate most. Measured on SmolLM2-135M: the 48 anger pairs of docs/examples score 0.659
  at layer 29 (lens share 0.76) against 0.284 at 28 and 0.265 at 27, and the run's top-8 tokens at alpha_max there are
  all anger words (fury, screaming, rage, hatred); joy scores 0.545 at 29 against 0.402 at 28.
  `runners_up` in the summary: the next best eligible layers with their scores.

On SmolLM2-135M the lens share is ~0 up to layer ~18 and grows to 0.4-1.0 at layers 22-29 (docs/fidelity.md):
the middle layer separates P from N (AUC ~1) without pointing at concept words, which is why the paper's middle
layer shows function words there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from steerstrength.config import LogOddsConfig, VectorsConfig
from steerstrength.errors import InputError
from steerstrength.models import Model

RUNNERS_UP = 3  # the next best layers the summary (and the report) show beside the pick
DEFAULT_EXTREMAL_FRACTION = LogOddsConfig.extremal_fraction
RULE = ("score = (2 * held-out AUC - 1) * lens share; lens share = fraction of the top-{k} tokens of LN(v) W^T "
        "with log-odds M in the top {f:.0%} of the vocabulary; argmax over layers {lo}..{hi}")


@dataclass
class LayerScan:
    """The per-layer table and the chosen layer."""

    table: "object"  # pandas DataFrame, one row per layer
    chosen: int
    rule: str
    log_odds: torch.Tensor | None = None  # [V] float64: M of Def. 3.2 on the training texts, from the same pass

    def tables(self) -> dict:
        return {"layer_scan": self.table}

    def summary(self) -> dict:
        cols = ["layer", "heldout_auc", "lens_share", "score", "vector_norm", "residual_norm"]
        eligible = self.table[self.table["eligible"]] if "eligible" in self.table else self.table
        ranked = eligible.sort_values(["score", "layer"], ascending=[False, True], kind="stable")
        runners = [dict(layer=int(r.layer), score=float(r.score), lens_share=float(r.lens_share),
                        heldout_auc=float(r.heldout_auc)) for r in ranked.itertuples() if int(r.layer) != self.chosen]
        return dict(chosen=self.chosen, rule=self.rule, runners_up=runners[:RUNNERS_UP],
                    per_layer=self.table[cols].to_dict(orient="list"),
                    lens_top=dict(zip(self.table["layer"].tolist(), self.table["lens_top"].tolist())))


@torch.inference_mode()
def _pass(model: Model, texts: Sequence[str], layers: list[int], batch_size: int, progress, text_options: dict):
    """Per layer [n, d] float64 token means (first token out), per-token norms, and [V] sum of last-token log p;
    `text_options`: layer_states' max_length and skip_first_token, as the vectors read the texts."""
    from steerstrength.steering import layer_states, token_means, token_norms

    last = model.n_layers - 1
    want = sorted(set(layers) | {last})
    means = {layer: torch.empty((len(texts), model.d_model), dtype=torch.float64) for layer in want}
    norms: dict[int, list] = {layer: [] for layer in want}
    log_p = torch.zeros(model.vocab_size, dtype=torch.float64)
    for start, mask, hidden in layer_states(model, texts, want, batch_size=batch_size, **text_options):
        for layer in want:
            means[layer][start:start + mask.shape[0]] = token_means(hidden[layer], mask)
            norms[layer].append(token_norms(hidden[layer], mask))
        # M's next-token distributions come from the same pass: the last block's state at each text's last token
        # (right padding: the last counted position of a row).
        ends = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)
        top = hidden[last][torch.arange(mask.shape[0], device=hidden[last].device), ends.to(hidden[last].device)]
        log_p += torch.log_softmax(model.logits_of(top), dim=-1).double().sum(0).cpu()
        if progress is not None:
            progress(mask.shape[0])
    return means, {layer: torch.cat(v) for layer, v in norms.items()}, log_p


def scan_layers(model: Model, positive: Sequence[str], negative: Sequence[str], *,
                heldout_positive: Sequence[str] | None = None, heldout_negative: Sequence[str] | None = None,
                layers: Sequence[int] | None = None, top_k: int = VectorsConfig.scan_top_k,
                extremal_fraction: float = DEFAULT_EXTREMAL_FRACTION, batch_size: int = 8,
                max_length: int | None = None, skip_first_token: bool = True,
                progress: Callable[[int], None] | None = None, labels: dict | None = None) -> LayerScan:
    """Where Eq. (3)'s v carries the concept: per layer, held-out AUC x the share of LN(v) W^T's top tokens with
    extremal log-odds M (Def. 3.2); the best layer is what `--layers auto` steers (module doc).

    Args:
        positive, negative: P and N texts; without held-out texts, every third one is held out.
        heldout_positive, heldout_negative: the texts the separation (AUC) is measured on.
        layers: the layers scored (default: all); the pick is among layers n/6 .. n - 1 (the last block included).
        top_k: tokens of LN(v) W^T checked against M; extremal_fraction: M's top fraction that counts.
        max_length, skip_first_token: how each text is read, as for the vectors (`mean_activations`).

    Example::

        scan = ss.scan_layers(model, ss.curated_texts("joy", "positive"), ss.curated_texts("joy", "negative"))
        scan.chosen, scan.table                  # 29 on SmolLM2-135M; one row per layer
    """
    import pandas as pd

    from steerstrength.judges import roc_auc
    from steerstrength.metrics.logodds import extremal_thresholds

    positive, negative = list(positive), list(negative)
    if heldout_positive is None or heldout_negative is None:
        positive, heldout_positive = [t for i, t in enumerate(positive) if i % 3 != 2], positive[2::3]
        negative, heldout_negative = [t for i, t in enumerate(negative) if i % 3 != 2], negative[2::3]
    for name, texts in (("P", positive), ("N", negative), ("held-out P", heldout_positive),
                        ("held-out N", heldout_negative)):
        if len(texts) < 2:
            raise InputError(f"the layer scan needs at least 2 {name} texts, not {len(texts)}; give more texts")
    if top_k < 1:
        raise InputError(f"top_k must be at least 1, not {top_k}")
    n = model.n_layers
    lo, hi = max(0, n // 6), n - 1
    layers = list(range(n)) if layers is None else sorted(set(int(x) for x in layers))
    runs = {}
    for name, texts in (("P", positive), ("N", negative), ("hP", heldout_positive), ("hN", heldout_negative)):
        runs[name] = _pass(model, texts, layers, batch_size, progress,
                           dict(max_length=max_length, skip_first_token=skip_first_token))
    M = runs["P"][2] / len(positive) - runs["N"][2] / len(negative)
    high, _ = extremal_thresholds(M, extremal_fraction)
    rows = []
    for layer in layers:
        v = runs["P"][0][layer].mean(0) - runs["N"][0][layer].mean(0)
        auc = roc_auc((runs["hP"][0][layer] @ v).numpy(), (runs["hN"][0][layer] @ v).numpy())
        norm_v = float(v.norm())
        if norm_v == 0:
            share, top = 0.0, []
        else:
            from steerstrength.metrics.limits import limit_logits

            ids = limit_logits(model, v.float()).topk(min(top_k, model.vocab_size)).indices
            share = float((M[ids] >= high).double().mean())
            top = model.token_strings(ids[:10].tolist())
        all_norms = torch.cat([runs[k][1][layer] for k in runs])
        rows.append(dict(labels or {}, layer=layer, heldout_auc=auc, lens_share=share, score=max(0.0, 2 * auc - 1) * share,
                         vector_norm=norm_v, residual_norm=float(all_norms.double().median()),
                         lens_top=" | ".join(top), eligible=lo <= layer <= hi))
    table = pd.DataFrame(rows)
    eligible = table[table["eligible"]]
    if eligible.empty:
        eligible = table
    best = eligible["score"].to_numpy()
    chosen = int(eligible["layer"].to_numpy()[int(np.argmax(best))])  # argmax: the first (earlier) on ties
    table["chosen"] = table["layer"] == chosen
    return LayerScan(table, chosen, RULE.format(k=top_k, f=extremal_fraction, lo=lo, hi=hi), M)
