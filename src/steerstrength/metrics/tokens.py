"""Def. 3.1 on a real model: next-token curves Delta p(z, alpha) = p(z, alpha) - p(z, 0), their peaks and shapes (Thm 3.3).

Shape classes of a curve p_i = Delta p(z, alpha_i) on the sorted grid (R = max p - min p, tol = rel_tol * R):
- unimodal: before the argmax i* the curve never drops more than tol below its running maximum, and
  from i* on it never rises more than tol above its running minimum;
- "increasing": unimodal and the last value is within tol of the maximum (still at its top at alpha_max);
- "decreasing": unimodal and the first value is within tol of the maximum;
- "bump": unimodal with an interior peak: it falls by more than tol on both sides (Thm 3.3's bump);
- "other": not unimodal, or flat (R = 0).
The peak alpha is the grid alpha of the (first) maximum of Delta p.

Memory: a grid whose [alphas, vocab] probabilities exceed `memory_budget` (512 MB) runs in two passes of blocks
(metrics/reduce.py): the first finds the tracked tokens, the second reads their curves; the tables are identical.
bfloat16 / float16 models: `certify` re-checks the tracked curves in float32 at a few alphas and reports the
measured error bound (docs/steering.md, "bfloat16 sweeps and their error bound").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from steerstrength.config import TokensConfig
from steerstrength.errors import InputError
from steerstrength.metrics.contexts import as_contexts
from steerstrength.grid import AlphaGrid, zero_index
from steerstrength.metrics.reduce import Rows, TopK, Track, next_token_reduce
from steerstrength.models import Model
from steerstrength.steering import check_positions, next_token_probs, vector_of

SHAPES = ("bump", "increasing", "decreasing", "other")
DEFAULT_REL_TOL = 0.01
# Bytes of [alphas, vocab] float32 probabilities a sweep may hold at once; past it, two passes of blocks.
DEFAULT_MEMORY_BUDGET = 512 * 1024 * 1024
# certify=True: evenly spaced alphas (plus both ends and 0) where a half-precision sweep is re-run in float32.
CERTIFY_ALPHAS = 9


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
    p_error_bound: float = float("nan")  # max |p - p_float32| at the check alphas (half-precision models); NaN: float32


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
            categories, token_codes = np.unique(np.array(strings, dtype=object), return_inverse=True)
            frame = pd.DataFrame({
                **{key: constant_column(value, A * U) for key, value in labels.items()},
                "layer": np.full(A * U, s.layer, dtype=np.int64),
                "context_id": constant_column(s.context["id"], A * U),
                "context_kind": constant_column(s.context.get("kind", "user"), A * U),
                "token_id": np.tile(s.token_ids.numpy(), A),
                "token": pd.Categorical.from_codes(np.tile(token_codes, A), pd.Index(categories)),
                "alpha": np.repeat(alphas, U),
                "p": (s.delta_p + s.p0[None, :]).reshape(-1).numpy(),
                "delta_p": s.delta_p.reshape(-1).numpy(),
                "peak_alpha": np.tile(alphas[s.peak_index.numpy()], A),
                "shape": pd.Categorical.from_codes(np.tile([SHAPES.index(x) for x in s.shapes], A), SHAPES),
                "p_error_bound": np.full(A * U, s.p_error_bound, dtype=np.float64),
            }, copy=False)
            frames.append(frame)
        return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)

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
        bounds = [s.p_error_bound for s in self.sets if not np.isnan(s.p_error_bound)]
        return dict(n_alphas=int(self.alphas.numel()), alpha_min=float(self.alphas[0]),
                    alpha_max=float(self.alphas[-1]), inserted_zero=self.inserted_zero, top_k=self.top_k,
                    n_contexts=len({s.context["id"] for s in self.sets}), layers=layers, per_layer=per_layer,
                    p_error_bound=max(bounds) if bounds else None)


def constant_column(value, n: int):
    """n copies of `value` for a table column. A string (pandas' pyarrow-backed `str`) is one block of rows repeated:
    a few MB instead of n copies (the labels of a 16,385-alpha sweep's table would take 300 MB); same values, same
    Parquet file."""
    import pandas as pd

    dtype = pd.Series([value]).dtype
    if not isinstance(value, str) or getattr(dtype, "storage", None) != "pyarrow":
        return pd.Series([value] * n, dtype=dtype).array
    import pyarrow as pa

    chunk = max(1, min(n, 1 << 16))
    block = pa.array([value] * chunk, type=pa.large_string())
    parts = [block] * (n // chunk) + ([block.slice(0, n % chunk)] if n % chunk else [])
    return pd.array(pa.chunked_array(parts, type=pa.large_string()), dtype=dtype)


def token_curves(model: Model, sv, contexts: Sequence[str | dict] | str,
                 alphas=None, *, positions: str = "all", top_k: int = TokensConfig.top_k, tokens: Sequence[int] = (),
                 top_each: int = TokensConfig.top_each, chat: bool = False, rel_tol: float = DEFAULT_REL_TOL,
                 progress: Callable[[int], None] | None = None, certify: bool | int = True,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET, block: int | None = None) -> TokenCurves:
    """Def. 3.1 / Thm 3.3: Delta p(z, alpha) for the top-k tokens at alpha_max and alpha_min (plus `tokens`).

    Args:
        sv: a SteeringVector, which knows its layer.
        contexts: one text, texts, or {id, text, kind} dicts.
        alphas: raw alphas (default: 1025 in [-200, 200]); without 0, 0 is inserted (with a warning): Delta p
            is measured against alpha = 0.
        top_k: tokens kept at each end of the grid.
        top_each: also the top tokens at every alpha (0: off), so that a middle alpha (what report.html's
            explorer shows) has its leaders.
        tokens: token ids tracked besides those.
        certify: for a bfloat16 / float16 model, re-run the tracked tokens in float32 at CERTIFY_ALPHAS (9; an int:
            that many) evenly spaced alphas plus alpha_min, alpha_max and 0, and keep max |p - p_float32| as
            `p_error_bound` (False / 0: off; a float32 model: NaN, nothing re-run).
        memory_budget: bytes of [alphas, vocab] float32 probabilities held at once; a larger grid runs in two
            passes of `block` alphas (metrics/reduce.py), with the same result.

    Example::

        grid = AlphaGrid.symmetric(1.5, 64, unit="resid")     # steerstrength.grid: +/-1.5 x r_l, plus 0
        curves = ss.token_curves(model, sv[28], ["Today I feel"], sv[28].raw_alphas(grid))
        curves.curves_frame(model)               # one row per (layer, context, token, alpha)
    """
    _, layer = vector_of(model, sv)
    check_positions(positions)
    grid = AlphaGrid.explicit(AlphaGrid.default("tokens").values if alphas is None else alphas)
    a, inserted = grid.values, grid.inserted_zero
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
    n_check = int(certify) if not isinstance(certify, (bool, np.bool_)) else CERTIFY_ALPHAS if certify else 0
    n_check = 0 if model.dtype == torch.float32 else n_check
    sets = []
    for ctx in ctxs:
        ids, p, top_max, top_min = tracked_curves(model, sv, ctx["text"], a, top_k=top_k, top_each=top_each,
                                                  extra=extra, positions=positions, chat=chat,
                                                  memory_budget=memory_budget, block=block)
        bound = float("nan")
        if n_check > 0:
            bound = error_bound(model, sv, ctx["text"], a, ids, p, n_check, positions=positions, chat=chat)
        p0 = p[i0].clone()
        delta = p - p0[None, :]
        del p
        peak, shapes = shape_classes(delta, rel_tol=rel_tol)
        sets.append(CurveSet(layer, ctx, ids, delta, p0, top_max, top_min, peak, shapes, bound))
        if progress is not None:
            progress(1)
    return TokenCurves(a, sets, top_k, inserted)


def tracked_curves(model: Model, sv, text: str, a: torch.Tensor, *, top_k: int, top_each: int,
                   extra: torch.Tensor, positions: str = "all", chat: bool = False,
                   memory_budget: int = DEFAULT_MEMORY_BUDGET,
                   block: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tracked ids [U], their p [A, U], top_max [k], top_min [k]): the union of the top-k at alpha_max and at
    alpha_min, the top `top_each` at every alpha and `extra`.

    One pass over the full [A, vocab] matrix when it fits `memory_budget`; otherwise two passes of blocks, O(block)
    memory: pass 1 keeps the two end distributions and the top_each ids per alpha, pass 2 the tracked set's p. Both
    make the same `next_token_probs` calls on the same blocks, so their results are identical."""
    kw = dict(positions=positions, chat=chat, block=block)
    if 4 * a.numel() * model.vocab_size <= memory_budget:
        probs = next_token_reduce(model, sv, text, a, {"p": Rows()}, **kw)["p"]
        ends, each = probs[[0, -1]], probs.topk(top_each, dim=1).indices if top_each else None
    else:
        wanted = {"ends": Rows([0, -1]), **({"each": TopK(top_each)} if top_each else {})}
        found = next_token_reduce(model, sv, text, a, wanted, **kw)
        probs, ends, each = None, found["ends"], found["each"][0] if top_each else None
    top_min, top_max = ends[0].topk(top_k).indices, ends[1].topk(top_k).indices
    ids = torch.unique(torch.cat([top_max, top_min, extra] + ([each.reshape(-1)] if top_each else [])))
    if probs is not None:
        return ids, probs[:, ids], top_max, top_min
    return ids, next_token_reduce(model, sv, text, a, {"p": Track(ids)}, **kw)["p"], top_max, top_min


def check_alphas(n_alphas: int, i0: int, n_check: int = CERTIFY_ALPHAS) -> torch.Tensor:
    """Indices of the alphas where a half-precision sweep is re-run in float32: n_check evenly spaced inside the
    grid, both ends and alpha = 0."""
    spaced = torch.linspace(0, n_alphas - 1, n_check + 2, dtype=torch.float64).round().long()
    return torch.unique(torch.cat([spaced, torch.tensor([i0])]))


def error_bound(model: Model, sv, text: str, a: torch.Tensor, ids: torch.Tensor, p: torch.Tensor,
                n_check: int = CERTIFY_ALPHAS, *, positions: str = "all", chat: bool = False) -> float:
    """max |p - p_float32| over the tracked tokens `ids` (p: their [A, U] curves in the model's dtype) at the check
    alphas; the float32 reference is `model.in_dtype(torch.float32)` (made once per model)."""
    idx = check_alphas(a.numel(), zero_index(a), n_check)
    reference = next_token_probs(model.in_dtype(torch.float32), sv, text, a[idx], positions=positions,
                                 chat=chat)[:, ids]
    return float((p[idx] - reference).abs().max())
