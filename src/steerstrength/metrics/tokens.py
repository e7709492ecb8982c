"""Def. 3.1 on a real model: next-token curves Delta p(z, alpha) = p(z, alpha) - p(z, 0), their peaks and shapes (Thm 3.3).

Shape classes of a curve p_i = Delta p(z, alpha_i) on the sorted grid (R = max p - min p, tol = rel_tol * R):
- unimodal: before the argmax i* the curve never drops more than tol below its running maximum, and
  from i* on it never rises more than tol above its running minimum;
- "increasing": unimodal and the last value is within tol of the maximum (still at its top at alpha_max);
- "decreasing": unimodal and the first value is within tol of the maximum;
- "bump": unimodal with an interior peak: it falls by more than tol on both sides (Thm 3.3's bump);
- "other": not unimodal, or flat (R = 0).
The peak alpha is the grid alpha of the (first) maximum of Delta p.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from steerstrength.errors import InputError
from steerstrength.metrics.contexts import as_contexts
from steerstrength.grid import linspace_grid, with_zero, zero_index
from steerstrength.models import Model
from steerstrength.steering import takes_vector, as_vector, check_layer, check_positions, next_token_probs

SHAPES = ("bump", "increasing", "decreasing", "other")
DEFAULT_TOP_K = 100
DEFAULT_TOP_EACH = 10  # the top tokens at every alpha are kept too (the explorer shows them)
DEFAULT_REL_TOL = 0.01


def default_alphas() -> torch.Tensor:
    """linspace(-200, 200, 1024) plus 0: 1025 alphas."""
    return linspace_grid(-200.0, 200.0, 1024)


def shape_classes(curves: torch.Tensor, *, rel_tol: float = DEFAULT_REL_TOL) -> tuple[torch.Tensor, list[str]]:
    """(peak index [U], shape class per curve) for curves [A, U] on a sorted alpha grid (module doc)."""
    if curves.ndim != 2 or curves.shape[0] < 2:
        raise InputError("shape classes need curves of shape [n_alphas >= 2, n_tokens]")
    p = curves.double()
    n = p.shape[0]
    top, bottom = p.max(0).values, p.min(0).values
    tol = rel_tol * (top - bottom)
    peak = p.argmax(0)
    idx = torch.arange(n)[:, None]
    rising = ((p >= torch.cummax(p, 0).values - tol) | (idx > peak)).all(0)
    after = torch.where(idx >= peak, p, torch.full_like(p, torch.inf))
    falling = ((p <= torch.cummin(after, 0).values + tol) | (idx < peak)).all(0)
    unimodal = rising & falling & (top > bottom)
    ends_high_last = p[-1] >= top - tol
    ends_high_first = p[0] >= top - tol
    shapes = []
    for u in range(p.shape[1]):
        if not unimodal[u]:
            shapes.append("other")
        elif ends_high_last[u]:
            shapes.append("increasing")
        elif ends_high_first[u]:
            shapes.append("decreasing")
        else:
            shapes.append("bump")
    return peak, shapes


@dataclass
class CurveSet:
    """Delta p curves of one (layer, context): the stored tokens and the top-k at both ends of the grid."""

    layer: int
    context: dict
    token_ids: torch.Tensor  # [U]
    delta_p: torch.Tensor  # [A, U] float32
    p0: torch.Tensor  # [U]
    top_max: torch.Tensor  # [k] token ids by probability at alpha_max
    top_min: torch.Tensor  # [k] at alpha_min
    peak_index: torch.Tensor  # [U]
    shapes: list[str]


@dataclass
class TokenCurves:
    """Next-token curves over an alpha grid for each (layer, context); the full [A, V] matrix is not kept."""

    alphas: torch.Tensor  # [A] float64, sorted, contains 0
    sets: list[CurveSet]
    top_k: int
    inserted_zero: bool = False

    def curves_frame(self, model: Model, /, **labels):
        """Long table: one row per (layer, context, token, alpha) with p, Delta p, the peak alpha and shape."""
        import pandas as pd

        frames = []
        alphas = self.alphas.numpy()
        for s in self.sets:
            A, U = s.delta_p.shape
            strings = model.token_strings(s.token_ids.tolist())
            frame = pd.DataFrame({
                "layer": s.layer,
                "context_id": s.context["id"],
                "context_kind": s.context.get("kind", "user"),
                "token_id": np.tile(s.token_ids.numpy(), A),
                "token": pd.Categorical(np.tile(np.array(strings, dtype=object), A)),
                "alpha": np.repeat(alphas, U),
                "p": (s.delta_p + s.p0[None, :]).reshape(-1).numpy(),
                "delta_p": s.delta_p.reshape(-1).numpy(),
                "peak_alpha": np.tile(alphas[s.peak_index.numpy()], A),
                "shape": pd.Categorical(np.tile(np.array(s.shapes, dtype=object), A), categories=SHAPES),
            })
            frames.append(frame)
        out = pd.concat(frames, ignore_index=True)
        for key, value in reversed(list(labels.items())):
            out.insert(0, key, value)
        return out

    def top_frame(self, model: Model, /, **labels):
        """One row per (layer, context, side, rank): the top-k tokens at alpha_max and at alpha_min, with strings."""
        import pandas as pd

        rows = []
        alphas = self.alphas.tolist()
        for s in self.sets:
            col = {int(t): u for u, t in enumerate(s.token_ids.tolist())}
            for side, ids, a_idx in (("alpha_max", s.top_max, len(alphas) - 1), ("alpha_min", s.top_min, 0)):
                strings = model.token_strings(ids.tolist())
                for rank, (tid, text) in enumerate(zip(ids.tolist(), strings)):
                    u = col[tid]
                    rows.append(dict(labels, layer=s.layer, context_id=s.context["id"],
                                     context_kind=s.context.get("kind", "user"), side=side, alpha=alphas[a_idx],
                                     rank=rank, token_id=tid, token=text,
                                     p=float(s.delta_p[a_idx, u] + s.p0[u]), p0=float(s.p0[u]),
                                     delta_p=float(s.delta_p[a_idx, u]), peak_alpha=alphas[int(s.peak_index[u])],
                                     shape=s.shapes[u]))
        return pd.DataFrame(rows)

    def summary(self, model: Model, *, n_show: int = 8) -> dict:
        """Shape counts of the top-k (and top n_show) tokens at alpha_max / alpha_min per layer; top strings per context."""
        layers = sorted({s.layer for s in self.sets})
        per_layer = {}
        for layer in layers:
            sets = [s for s in self.sets if s.layer == layer]
            entry = {}
            for side in ("alpha_max", "alpha_min"):
                for n in (self.top_k, n_show):
                    counts = dict.fromkeys(SHAPES, 0)
                    for s in sets:
                        col = {int(t): u for u, t in enumerate(s.token_ids.tolist())}
                        ids = (s.top_max if side == "alpha_max" else s.top_min)[:n]
                        for tid in ids.tolist():
                            counts[s.shapes[col[tid]]] += 1
                    total = sum(counts.values())
                    entry[f"top{n}_at_{side}"] = dict(counts=counts, total=total,
                                                      bump_fraction=counts["bump"] / total if total else None)
            entry["contexts"] = [
                dict(context_id=s.context["id"], kind=s.context.get("kind", "user"),
                     top_at_alpha_max=model.token_strings(s.top_max[:n_show].tolist()),
                     top_at_alpha_min=model.token_strings(s.top_min[:n_show].tolist()))
                for s in sets]
            per_layer[str(layer)] = entry
        return dict(n_alphas=int(self.alphas.numel()), alpha_min=float(self.alphas[0]),
                    alpha_max=float(self.alphas[-1]), inserted_zero=self.inserted_zero, top_k=self.top_k,
                    n_contexts=len({s.context["id"] for s in self.sets}), layers=layers, per_layer=per_layer)


def _vector_for(vector, layer: int):
    if isinstance(vector, Mapping) or hasattr(vector, "vectors"):
        return vector[layer]
    return vector


@takes_vector
def token_curves(model: Model, vector, layers: int | Sequence[int], contexts: Sequence[str | dict] | str,
                 alphas=None, *, positions: str = "all", top_k: int = DEFAULT_TOP_K, tokens: Sequence[int] = (),
                 top_each: int = DEFAULT_TOP_EACH, chat: bool = False, rel_tol: float = DEFAULT_REL_TOL,
                 progress: Callable[[int], None] | None = None) -> TokenCurves:
    """Def. 3.1 / Thm 3.3: Delta p(z, alpha) for the top-k tokens at alpha_max and alpha_min (plus `tokens`).

    Also kept: the top `top_each` tokens at every alpha of the grid (0 turns this off), so that the
    distribution at a middle alpha (what report.html's explorer shows) is not missing its leaders.

    `vector`: one [d_model] tensor, or a SteeringVectors / {layer: tensor} for several layers.
    Without 0 in `alphas`, 0 is inserted (with a warning): Delta p is measured against alpha = 0.
    """
    layers = [layers] if isinstance(layers, int) else list(layers)
    if not layers:
        raise InputError("no layer given; pass at least one layer")
    for layer in layers:
        check_layer(model, layer)
        as_vector(model, _vector_for(vector, layer))
    check_positions(positions)
    a, inserted = with_zero(default_alphas() if alphas is None else alphas)
    if a.numel() < 3:
        raise InputError("a curve needs at least 3 alphas (including 0)")
    if top_k < 1:
        raise InputError(f"top_k must be at least 1, not {top_k}")
    if top_each < 0:
        raise InputError(f"top_each must be 0 (off) or more, not {top_each}")
    top_k, top_each = min(top_k, model.vocab_size), min(top_each, model.vocab_size)
    extra = torch.as_tensor(list(tokens), dtype=torch.long)
    if extra.numel() and (extra.min() < 0 or extra.max() >= model.vocab_size):
        raise InputError(f"extra token ids must be in [0, {model.vocab_size})")
    ctxs = as_contexts(model, contexts, chat=chat)
    i0 = zero_index(a)
    sets = []
    for layer in layers:
        v = _vector_for(vector, layer)
        for ctx in ctxs:
            probs = next_token_probs(model, v, layer, ctx["text"], a, positions=positions, chat=chat)
            top_max = probs[-1].topk(top_k).indices
            top_min = probs[0].topk(top_k).indices
            tracked = [top_max, top_min, extra]
            if top_each:
                tracked.append(probs.topk(top_each, dim=1).indices.reshape(-1))
            ids = torch.unique(torch.cat(tracked))
            p0 = probs[i0, ids].clone()
            delta = probs[:, ids] - p0[None, :]
            del probs
            peak, shapes = shape_classes(delta, rel_tol=rel_tol)
            sets.append(CurveSet(layer, ctx, ids, delta, p0, top_max, top_min, peak, shapes))
            if progress is not None:
                progress(1)
    return TokenCurves(a, sets, top_k, inserted)
