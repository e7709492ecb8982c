"""Where steering works, against depth (in the spirit of App. A's layer comparisons): one row per layer.

For each layer l, v_l is the difference of means (Eq. 3) of P and N, normalized, and the next-token curves
(Def. 3.1) are swept on the same grid in residual units (alpha_resid = alpha / r_l, grid.py), so every layer is
steered with the same relative strength. Per layer, of the top-8 tokens at alpha_max over the contexts:
- `concept_word_share`: the fraction that are concept words, i.e. whose log-odds M (Def. 3.2) are in the top
  `CONCEPT_WORD_FRACTION` of the vocabulary (chance level: that fraction);
- `unimodal_share` and `bump_share`: Thm 3.3's shapes (metrics.tokens' classes);
- `spearman_M_peak` (median over contexts) and `target_later` (target bumps peaking after off-target ones),
  from metrics.logodds.log_odds_analysis, the same rules as the log-odds stage.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from steerstrength.errors import InputError
from steerstrength.models import Model

CONCEPT_WORD_FRACTION = 0.05
N_DOMINANT = 8


def concept_word_threshold(M: torch.Tensor, fraction: float = CONCEPT_WORD_FRACTION) -> float:
    """The M above which a token counts as a concept word (the top `fraction` of the vocabulary)."""
    from steerstrength.metrics.logodds import extremal_thresholds

    return extremal_thresholds(M, fraction)[0]


def concept_word_share(M: torch.Tensor, token_ids: Sequence[int], fraction: float = CONCEPT_WORD_FRACTION) -> float:
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    if ids.numel() == 0:
        return float("nan")
    return float((M.double()[ids] >= concept_word_threshold(M, fraction)).double().mean())


def depth_profile(model: Model, positive: Sequence[str], negative: Sequence[str], layers: Sequence[int],
                  contexts: Sequence[dict], alphas_resid, M: torch.Tensor, *, positions: str = "all",
                  progress: Callable[[int], None] | None = None, labels: dict | None = None, n_controls: int = 0,
                  seed: int = 0):
    """Thm 3.3 against depth: (table, one row per layer; curves_top, the top-8 rows per layer and context).

    Each layer is steered with its own unit difference of means (Eq. 3) on the same grid in residual units; the
    module doc has the columns.

    Args:
        positive, negative: P and N texts for the vectors.
        layers: the layers to steer, one row each.
        contexts: {id, text, kind} dicts (metrics.contexts.builtin_contexts).
        alphas_resid: the grid in multiples of each layer's residual norm r_l (0 included).
        M: the log-odds (Def. 3.2) over the vocabulary, [V] (ss.log_odds).
        n_controls: random directions of each layer's v norm, orthogonal to it (vectors.random_controls, seeded by
            `seed`), swept beside v: rows with `direction` random-0, ... (v's rows: "v").

    Example::

        from steerstrength.grid import AlphaGrid
        from steerstrength.metrics.contexts import builtin_contexts
        table, top = ss.depth_profile(model, P, N, [15, 28], builtin_contexts()[:3],
                                      AlphaGrid.symmetric(1.5, 48).values, ss.log_odds(model, P, N))
    """
    import pandas as pd

    from steerstrength.grid import to_raw
    from steerstrength.metrics.logodds import log_odds_analysis
    from steerstrength.metrics.tokens import token_curves
    from steerstrength.vectors import difference_of_means, direction_of, random_controls

    if M.numel() != model.vocab_size:
        raise InputError(f"M has {M.numel()} entries but the model's vocabulary has {model.vocab_size}")
    layers = sorted(set(int(x) for x in layers))
    sv = difference_of_means(model, positive, negative, layers, normalize=True)
    rows, tops = [], []
    steered = [(layer, d) for layer in layers
               for d in [sv[layer], *random_controls(sv[layer], n_controls, seed=seed)]]
    for layer, direction in steered:
        scale = sv.resid_scale(layer, model)
        res = token_curves(model, direction, list(contexts), to_raw(alphas_resid, "resid", scale),
                           positions=positions, top_k=N_DOMINANT, top_each=0)
        top = res.top_frame(model)
        curves = res.curves_frame(model)[["layer", "context_id", "token_id", "peak_alpha", "shape"]]
        analysis = log_odds_analysis(M, top, curves, n_dominant=N_DOMINANT)["per_layer"][str(layer)]
        dom = top[(top["side"] == "alpha_max") & (top["rank"] < N_DOMINANT)]
        rows.append(dict(labels or {}, layer=layer, direction=direction_of(direction),
                         residual_norm=sv.residual_norm(layer, model),
                         alpha_resid_max=float(torch.as_tensor(alphas_resid).max()),
                         concept_word_share=concept_word_share(M, dom["token_id"].tolist()),
                         unimodal_share=float((dom["shape"] != "other").mean()),
                         bump_share=float((dom["shape"] == "bump").mean()),
                         spearman_M_peak=analysis["spearman_M_peak_alpha"]["median"],
                         target_later=analysis["peak_position"]["fraction_target_later"],
                         top_words=" | ".join(dom["token"].value_counts().head(8).index.tolist())))
        tops.append(dom.assign(**(labels or {}), direction=direction_of(direction)))
        if progress is not None and direction_of(direction) == "v":
            progress(1)
    return pd.DataFrame(rows), pd.concat(tops, ignore_index=True)
