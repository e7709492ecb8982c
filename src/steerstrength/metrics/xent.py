"""Def. 3.7 on a real model: Delta CE(alpha) over an evaluation corpus; its curvature at 0 (Thm 3.8) and plateau (Prop. 4.1).

Windowing (the definition `cross_entropy_curve` follows, so numbers are comparable): each text is
tokenized on its own and cut into windows of seq_len + 1 tokens with stride seq_len (consecutive windows
share one token, so predictions never overlap); an incomplete last window is dropped; texts are never
packed together unless `packing=True` (then one stream, texts separated by EOS). Every window scores its
seq_len next-token predictions; the mean is over all scored tokens. A model trained with a BOS token
(Gemma, Llama) reads BOS first in *every* window: BOS + the next seq_len tokens of the text, the first
of them predicted from BOS alone. Without it a window that starts mid-text is out of the model's
distribution (Gemma-3-270M, 40 Wikipedia test paragraphs, 64-token windows: 3.85 nats/token with BOS
on each text's first window only, 2.99 with BOS leading every window; packed, 5.32 against 3.46).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from steerstrength.config import XentConfig
from steerstrength.errors import InputError
from steerstrength.grid import AlphaGrid, zero_index
from steerstrength.forward_ad import forward_ad_safe, forward_from_differentiable
from steerstrength.models import Encoded, Model
from steerstrength.steering import (
    DEFAULT_LOGIT_BUDGET,
    DEFAULT_TOKEN_BUDGET,
    alpha_chunks,
    as_alphas,
    check_positions,
    forward_from,
    hidden_at,
    repeat_rows,
    steered_hidden,
    vector_of,
)

Progress = Callable[[int], None]


def windows(model: Model, texts: Sequence[str], seq_len: int = 128, *, packing: bool = False) -> torch.Tensor:
    """[W, seq_len + 1] token ids: per-text windows with stride seq_len, incomplete last windows dropped."""
    return _windows(model, texts, seq_len, packing)[0]


def sweep_units(model: Model, texts: Sequence[str], alphas, *, seq_len: int = 128, packing: bool = False,
                max_tokens: int | None = None) -> int:
    """Windows x alphas (0 added) that `xent_sweep` scores: the total of its progress."""
    n_windows = _sweep_ids(model, texts, seq_len, packing, max_tokens)[0].shape[0]
    return int(n_windows) * len(AlphaGrid.explicit(alphas, note=False))


def _sweep_ids(model: Model, texts: Sequence[str], seq_len: int, packing: bool,
               max_tokens: int | None) -> tuple[torch.Tensor, int]:
    """The windows `xent_sweep` scores: `_windows`, the first max_tokens // seq_len of them (the texts past those
    windows are never tokenized: a 10^6-token corpus costs nothing when a slice is scored)."""
    if max_tokens is not None and max_tokens < seq_len:
        raise InputError(f"max_tokens {max_tokens} is below one window of {seq_len} scored tokens")
    return _windows(model, texts, seq_len, packing, None if max_tokens is None else max_tokens // seq_len)


def _windows(model: Model, texts: Sequence[str], seq_len: int, packing: bool,
             max_windows: int | None = None) -> tuple[torch.Tensor, int]:
    """(windows, number of texts read that gave a window or joined the stream); with `max_windows`, the first ones
    only, the texts after them never tokenized."""
    if isinstance(texts, str):
        raise InputError("texts must be a list of strings, not one string; wrap it in a list")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise InputError(f"seq_len must be a positive integer, not {seq_len!r}")
    if model.max_length and seq_len > model.max_length:
        raise InputError(f"seq_len {seq_len} exceeds {model.name}'s maximum length {model.max_length}; "
                         f"use --seq-len {model.max_length} or less")
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise InputError("the corpus is empty: no non-empty text to evaluate cross-entropy on")
    bos = model.token_ids(texts[0])[:1] if model.add_bos else []  # token_ids starts every text with it
    sep = [] if model.tokenizer.eos_token_id is None else [int(model.tokenizer.eos_token_id)]
    need = seq_len + 1 - len(bos)  # text tokens in one window
    out, stream, used, longest = [], [], 0, 0
    for text in texts:  # in order, and only as far as the windows asked for
        row = model.token_ids(text)[len(bos):]
        longest = max(longest, len(row) + len(bos))
        if packing:  # one stream, the texts separated by EOS as in pretraining
            stream += row + sep
            used += 1
            if max_windows is not None and len(stream) >= need + (max_windows - 1) * seq_len:
                break
        elif len(row) >= need:
            out += [bos + row[k * seq_len: k * seq_len + need] for k in range((len(row) - need) // seq_len + 1)]
            used += 1
            if max_windows is not None and len(out) >= max_windows:
                break
    if packing and len(stream) >= need:
        out = [bos + stream[k * seq_len: k * seq_len + need] for k in range((len(stream) - need) // seq_len + 1)]
    if not out:
        raise InputError(f"no text is at least seq_len + 1 = {seq_len + 1} tokens long (the longest has {longest}); "
                         "give longer texts, a smaller --seq-len, or --packing")
    out = out if max_windows is None else out[:max_windows]
    return torch.tensor(out, dtype=torch.long), used


def window_encoding(model: Model, ids: torch.Tensor) -> Encoded:
    """A batch of full windows: no padding, positions 0..T-1."""
    ids = ids.to(model.device)
    positions = torch.arange(ids.shape[1], device=model.device).expand(ids.shape[0], -1)
    return Encoded(ids, torch.ones_like(ids), positions, "right")


def token_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[rows] float64: sum over positions of -log softmax(logits)[target]; per token in float32 (or wider).

    Row by row: the fused log_softmax kernel (about 3x faster than logsumexp on CPU) on a slab that
    stays in cache, then a gather; the sum is in float64.
    """
    sums = []
    for row, target in zip(logits, targets):
        if row.dtype in (torch.float16, torch.bfloat16):
            row = row.float()
        sums.append(-torch.log_softmax(row, dim=-1).gather(-1, target.unsqueeze(-1)).double().sum())
    return torch.stack(sums)


def _rows_per_forward(model: Model, seq_len: int, token_budget: int, logit_budget: int) -> int:
    return max(1, min(token_budget // seq_len, logit_budget // (seq_len * model.vocab_size)))


# ----------------------------------------------------------------------------- the sweep


@torch.inference_mode()
def cross_entropy_sums(model: Model, sv, ids: torch.Tensor, alphas, *, positions: str = "all",
                       token_budget: int = DEFAULT_TOKEN_BUDGET, logit_budget: int = DEFAULT_LOGIT_BUDGET,
                       progress: Progress | None = None) -> torch.Tensor:
    """[A] float64: summed next-token CE over windows `ids` [W, T+1] for each alpha.

    Blocks 0..layer run once per window batch; alphas go in the batch through blocks layer+1..;
    each chunk's logits [rows, T, V] are reduced to per-row sums at once and freed.
    """
    v, layer = vector_of(model, sv)
    check_positions(positions)
    a = as_alphas(alphas)
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise InputError("windows must be a [W, T+1] id tensor with T >= 1")
    T = ids.shape[1] - 1
    batch = min(ids.shape[0], _rows_per_forward(model, T, token_budget, logit_budget))
    sums = torch.zeros(a.numel(), dtype=torch.float64)
    for start in range(0, ids.shape[0], batch):
        w = ids[start:start + batch]
        enc = window_encoding(model, w[:, :-1])
        targets = w[:, 1:].to(model.device)
        h = hidden_at(model, enc, layer)
        for sl in alpha_chunks(a.numel(), w.shape[0], T, token_budget=token_budget, logit_positions=T,
                               vocab=model.vocab_size, logit_budget=logit_budget):
            n = sl.stop - sl.start
            logits = forward_from(model, repeat_rows(enc, n), layer, steered_hidden(h, v, a[sl], positions),
                                  logits_to_keep=0)
            sums[sl] += token_ce(logits, targets.repeat(n, 1)).view(n, -1).sum(1).cpu()
            del logits
            if progress is not None:
                progress(n * w.shape[0])
    return sums


def cross_entropy_curve(model: Model, sv, texts: Sequence[str], alphas, *, seq_len: int = XentConfig.seq_len,
                        positions: str = "all", packing: bool = False, token_budget: int = DEFAULT_TOKEN_BUDGET,
                        logit_budget: int = DEFAULT_LOGIT_BUDGET, progress: Progress | None = None) -> torch.Tensor:
    """Def. 3.7's CE(f_alpha): [len(alphas)] float64, the mean next-token cross-entropy over the windows of `texts`.

    Args:
        sv: a SteeringVector, which knows its layer.
        texts: the corpus; each text is cut into windows of seq_len + 1 tokens (module doc).
        alphas: raw alphas; include 0 for the baseline CE(f).
        seq_len: scored tokens per window; packing: concatenate the texts before windowing.
        token_budget, logit_budget: bounds of one forward (memory for any number of alphas).

    Example::

        ce = ss.cross_entropy_curve(model, sv[15], ss.neutral_texts(), [-4.0, 0.0, 4.0], seq_len=32, packing=True)
        delta_ce = ce - ce[1]                    # Delta CE(alpha)
    """
    ids = windows(model, texts, seq_len, packing=packing)
    sums = cross_entropy_sums(model, sv, ids, alphas, positions=positions, token_budget=token_budget,
                              logit_budget=logit_budget, progress=progress)
    return sums / (ids.shape[0] * seq_len)


# ----------------------------------------------------------------------------- curvature at alpha = 0 (Thm 3.8)


def ce_derivatives(model: Model, sv, ids: torch.Tensor, *, positions: str = "all",
                   token_budget: int = DEFAULT_TOKEN_BUDGET, logit_budget: int = DEFAULT_LOGIT_BUDGET,
                   progress: Progress | None = None) -> dict:
    """Thm 3.8: mean CE, d CE / d alpha and d^2 CE / d alpha^2 at alpha = 0, by forward-over-forward AD.

    One pass per window batch: torch.func.jvp of torch.func.jvp through blocks layer+1.. with the
    tangent v at the steered layer (no finite differences). Means over all scored tokens, float64.
    """
    from torch.func import jvp

    v, layer = vector_of(model, sv)
    check_positions(positions)
    T = ids.shape[1] - 1
    # Forward-over-forward carries four copies of every activation (primal and three tangents).
    batch = max(1, min(ids.shape[0], _rows_per_forward(model, T, token_budget, logit_budget) // 4))
    totals = torch.zeros(3, dtype=torch.float64)
    for start in range(0, ids.shape[0], batch):
        w = ids[start:start + batch]
        enc = window_encoding(model, w[:, :-1])
        targets = w[:, 1:].to(model.device)
        h = hidden_at(model, enc, layer).clone()  # out of inference mode, for AD
        direction = v.expand_as(h).clone()
        if positions == "last":
            direction[:, :-1] = 0

        def ce(alpha):
            logits = forward_from_differentiable(model, enc, layer, h + alpha * direction, logits_to_keep=0)
            return token_ce(logits, targets).sum()

        def slope(alpha):
            value, d1 = jvp(ce, (alpha,), (torch.ones_like(alpha),))
            return d1, value

        zero = torch.zeros((), dtype=h.dtype, device=h.device)
        with forward_ad_safe():
            d1, d2, value = jvp(slope, (zero,), (torch.ones_like(zero),), has_aux=True)
        totals += torch.stack([value.detach().double().cpu(), d1.detach().double().cpu(), d2.detach().double().cpu()])
        if progress is not None:
            progress(w.shape[0])
    n = ids.shape[0] * T
    return dict(ce=float(totals[0] / n), slope=float(totals[1] / n), curvature=float(totals[2] / n))


# ----------------------------------------------------------------------------- reading the curve


def quadratic_fit(alphas: torch.Tensor, delta_ce: torch.Tensor, *, radius: float | None = None,
                  min_points: int = 3) -> dict:
    """Least squares Delta CE = b1 alpha + b2 alpha^2 on 0 < |alpha| <= radius; curvature = 2 b2 (Thm 3.8).

    Default radius: 5% of max |alpha|, widened to hold `min_points` nonzero alphas on each side.
    """
    a, y = alphas.double(), delta_ce.double()
    nonzero = a[a != 0].abs()
    if nonzero.numel() < 2:
        raise InputError("a quadratic fit needs at least two nonzero alphas")
    if radius is None:
        radius = 0.05 * float(a.abs().max())
        for side in (a[a > 0], -a[a < 0]):
            if side.numel():
                radius = max(radius, float(torch.sort(side).values[min(min_points, side.numel()) - 1]))
    keep = (a != 0) & (a.abs() <= radius + 1e-12)
    x, t = a[keep], y[keep]
    if x.numel() < 2:
        raise InputError(f"only {x.numel()} nonzero alpha within radius {radius}; widen it")
    b1, b2 = _least_squares_quadratic(x.tolist(), t.tolist())
    resid = [ti - (b1 * xi + b2 * xi * xi) for xi, ti in zip(x.tolist(), t.tolist())]
    return dict(radius=radius, n_points=int(x.numel()), slope=b1, curvature=2 * b2,
                rmse=math.sqrt(math.fsum(r * r for r in resid) / len(resid)))


def _least_squares_quadratic(x: list[float], t: list[float]) -> tuple[float, float]:
    """(b1, b2) minimising sum (t - b1 x - b2 x^2)^2: the 2x2 normal equations in float64, on x scaled to [-1, 1].

    Every sum is math.fsum (correctly rounded), so the fit depends on the points, not on their order, the
    thread count or the LAPACK build: the same curve gives the same bits.
    """
    s = max(abs(xi) for xi in x)
    u = [xi / s for xi in x]
    s2, s3, s4 = (math.fsum(ui ** k for ui in u) for k in (2, 3, 4))
    r1, r2 = math.fsum(ui * ti for ui, ti in zip(u, t)), math.fsum(ui * ui * ti for ui, ti in zip(u, t))
    det = s2 * s4 - s3 * s3
    if not det > 0:
        raise InputError("a quadratic fit needs at least two distinct nonzero |alpha| or alphas on both sides")
    c1, c2 = (s4 * r1 - s3 * r2) / det, (s2 * r2 - s3 * r1) / det
    return c1 / s, c2 / (s * s)


def quadratic_range(alphas: torch.Tensor, delta_ce: torch.Tensor, slope: float, curvature: float, *,
                    rel: float = 0.1) -> dict:
    """Where Thm 3.8's local law holds on the grid: the largest |alpha| up to which every grid point has
    |Delta CE - (slope alpha + curvature alpha^2 / 2)| <= rel * |prediction| (0 if none)."""
    a, y = alphas.double(), delta_ce.double()
    pred = slope * a + 0.5 * curvature * a * a
    bad = ((y - pred).abs() > rel * pred.abs()) & (a != 0)
    order = torch.argsort(a.abs())
    reach = 0.0
    for i in order.tolist():
        if a[i] == 0:
            continue
        if bad[i]:
            break
        reach = float(a[i].abs())
    inner = order[1:3] if a[order[0]] == 0 else order[:2]
    return dict(rel=rel, max_abs_alpha=reach,
                innermost=[dict(alpha=float(a[i]), delta_ce=float(y[i]), predicted=float(pred[i])) for i in inner.tolist()])


def plateau(alphas: torch.Tensor, delta_ce: torch.Tensor, *, fraction: float = 0.1) -> dict:
    """Prop. 4.1 reading: on each side, Delta CE over the outer `fraction` of the range, and its growth.

    `growth` = Delta CE(alpha_edge) / Delta CE(alpha_edge / 2): 4 for a parabola, 1 on a flat plateau.
    """
    out = {}
    for name, sign in (("positive", 1.0), ("negative", -1.0)):
        side = sign * alphas.double() > 0
        if not side.any():
            continue
        x, y = (sign * alphas.double())[side], delta_ce.double()[side]
        edge = float(x.max())
        outer = x >= (1 - fraction) * edge
        vals = y[outer]
        half = y[(x - edge / 2).abs().argmin()]
        mean = float(vals.mean())
        out[name] = dict(alpha_edge=sign * edge, mean=mean, min=float(vals.min()), max=float(vals.max()),
                         relative_spread=float((vals.max() - vals.min()) / abs(mean)) if mean else math.inf,
                         growth=float(y[x.argmax()] / half) if half != 0 else math.inf, n_points=int(outer.sum()))
    return out


def limit_delta_ce(model: Model, vector, ids: torch.Tensor, ce0: float) -> dict:
    """Prop. 4.1 plateau value: CE of the input-independent limit softmax(LN(+/-v) W^T) on the same targets, minus CE(f)."""
    from steerstrength.metrics.limits import limit_logits

    counts = torch.bincount(ids[:, 1:].reshape(-1), minlength=model.vocab_size).double()
    out = {}
    for name, sign in (("positive", 1), ("negative", -1)):
        logq = torch.log_softmax(limit_logits(model, vector, sign).double(), -1)
        out[name] = float(-(counts * logq).sum() / counts.sum()) - ce0
    return out


# ----------------------------------------------------------------------------- the stage


@dataclass
class XentSweep:
    """Delta CE(alpha) on a corpus, with the curvature at 0 and the large-|alpha| plateau."""

    alphas: torch.Tensor  # [A] float64, contains 0
    ce: torch.Tensor  # [A] float64 mean CE
    n_windows: int
    seq_len: int
    n_texts: int
    n_texts_used: int
    inserted_zero: bool
    derivatives: dict | None = None
    fit: dict = field(default_factory=dict)
    plateau: dict = field(default_factory=dict)
    limit: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return self.n_windows * self.seq_len

    @property
    def delta_ce(self) -> torch.Tensor:
        return self.ce - self.ce[zero_index(self.alphas)]

    def frame(self, **labels):
        """One row per alpha: CE, Delta CE, scored tokens."""
        import pandas as pd

        return pd.DataFrame(dict(labels, alpha=self.alphas.numpy(), ce=self.ce.numpy(),
                                 delta_ce=self.delta_ce.numpy(), n_tokens=self.n_tokens))

    def summary(self) -> dict:
        out = dict(n_texts=self.n_texts, n_texts_used=self.n_texts_used, n_windows=self.n_windows,
                   seq_len=self.seq_len, n_tokens=self.n_tokens, n_alphas=int(self.alphas.numel()),
                   alpha_min=float(self.alphas.min()), alpha_max=float(self.alphas.max()),
                   inserted_zero=self.inserted_zero, ce0=float(self.ce[zero_index(self.alphas)]),
                   quadratic_fit=self.fit, plateau=self.plateau, limit_delta_ce=self.limit)
        if self.derivatives is not None:
            d = self.derivatives
            out["curvature"] = dict(jvp=d["curvature"], fit=self.fit.get("curvature"),
                                    quadratic_range=quadratic_range(self.alphas, self.delta_ce, d["slope"],
                                                                    d["curvature"]),
                                    relative_difference=abs(self.fit["curvature"] - d["curvature"]) / abs(d["curvature"])
                                    if self.fit and d["curvature"] else None,
                                    slope_jvp=d["slope"], ce0_jvp=d["ce"], n_tokens=d.get("n_tokens"))
        return out


def _digest(*parts) -> str:
    """sha256 over tensors (their bytes, dtype and shape) and plain values."""
    import hashlib

    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            p = p.detach().cpu().contiguous()
            h.update(f"{p.dtype}{tuple(p.shape)}".encode())
            h.update(p.view(torch.uint8).numpy().tobytes() if p.numel() else b"")
        else:
            h.update(repr(p).encode())
    return h.hexdigest()


def _chunked_sums(model: Model, sv, ids: torch.Tensor, alphas: torch.Tensor, chunk,
                  chunk_windows: int, **kwargs) -> torch.Tensor:
    """`cross_entropy_sums` piece by piece of `chunk_windows` windows through `chunk(name, compute)` (the run's one
    resume mechanism, runs.read_or_compute): finished pieces are read back. A piece's name carries a digest of its
    inputs (vector, layer, alphas, windows, positions), so one made from other inputs is never read back."""
    import pandas as pd

    if chunk_windows < 1:
        raise InputError(f"chunk_windows must be at least 1, not {chunk_windows}")
    progress = kwargs.pop("progress", None)
    v, layer = vector_of(model, sv)
    total = torch.zeros(alphas.numel(), dtype=torch.float64)
    for start in range(0, ids.shape[0], chunk_windows):
        part = ids[start:start + chunk_windows]
        inputs = _digest(v, layer, alphas.double(), part, kwargs.get("positions", "all"))
        computed = []

        def compute(part=part) -> dict:
            sums = cross_entropy_sums(model, sv, part, alphas, progress=progress, **kwargs)
            computed.append(1)
            return {"sums": pd.DataFrame({"sum": sums.double().cpu().numpy()})}

        frames = chunk(f"windows_{start:07d}_{start + part.shape[0]:07d}_{inputs[:16]}", compute)
        sums = torch.from_numpy(frames["sums"]["sum"].to_numpy(copy=True))
        if sums.dtype != torch.float64 or sums.numel() != alphas.numel():
            raise InputError(f"a stored Delta CE piece has {sums.numel()} sums for {alphas.numel()} alphas; delete it")
        if not computed and progress is not None:
            progress(part.shape[0] * alphas.numel())
        total += sums
    return total


def xent_sweep(model: Model, sv, texts: Sequence[str], alphas=None, *, seq_len: int = XentConfig.seq_len,
               positions: str = "all", packing: bool = False, max_tokens: int | None = None, curvature: bool = True,
               curvature_tokens: int | None = None, token_budget: int = DEFAULT_TOKEN_BUDGET,
               logit_budget: int = DEFAULT_LOGIT_BUDGET, chunk=None, chunk_windows: int = XentConfig.chunk_windows,
               progress: Progress | None = None) -> XentSweep:
    """Delta CE(alpha) = CE(f_alpha) - CE(f) (Def. 3.7) with curvature (Thm 3.8) and plateau (Prop. 4.1) readings.

    With `chunk` (a run's `chunk(name, compute)`, or `lambda name, compute: runs.read_or_compute(folder, name,
    compute)`), the windows are scored in pieces of `chunk_windows`, each piece's float64 sums kept; a rerun reads
    them back.
    """
    grid = AlphaGrid.of(alphas, stage="xent", vector=sv, model=model)
    a, inserted = grid.values, grid.inserted_zero
    ids, n_used = _sweep_ids(model, texts, seq_len, packing, max_tokens)
    if chunk is None:
        sums = cross_entropy_sums(model, sv, ids, a, positions=positions, token_budget=token_budget,
                                  logit_budget=logit_budget, progress=progress)
    else:
        sums = _chunked_sums(model, sv, ids, a, chunk, chunk_windows, positions=positions,
                             token_budget=token_budget, logit_budget=logit_budget, progress=progress)
    ce = sums / (ids.shape[0] * seq_len)
    result = XentSweep(a, ce, int(ids.shape[0]), seq_len, len(texts), n_used, inserted)
    delta = result.delta_ce
    if (a != 0).sum() >= 2:
        result.fit = quadratic_fit(a, delta)
    result.plateau = plateau(a, delta)
    result.limit = limit_delta_ce(model, sv, ids, float(ce[zero_index(a)]))
    if curvature:
        sub = ids if curvature_tokens is None else ids[: max(1, curvature_tokens // seq_len)]
        result.derivatives = ce_derivatives(model, sv, sub, positions=positions, token_budget=token_budget,
                                            logit_budget=logit_budget)
        result.derivatives["n_tokens"] = int(sub.shape[0] * seq_len)
    return result
