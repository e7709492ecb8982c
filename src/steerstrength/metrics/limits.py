"""Prop. 4.1: as alpha -> +/-inf the steered logits tend to LN(+/-v) W^T, whatever the prompt."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from steerstrength.errors import InputError
from steerstrength.grid import AlphaGrid
from steerstrength.metrics.contexts import as_contexts
from steerstrength.models import Model
from steerstrength.steering import as_alphas, as_vector, check_positions, next_token_probs, vector_of

# The limit counts as reached on a side when the mean TV at its largest |alpha| is at most this; a TV that
# decreases but stays near 1 (alphas too small for the vector's norm) is not Prop. 4.1 confirmed.
REACHED_TV = 0.1
# LN is scale invariant up to its eps; at this RMS the eps term is ~1e-9 relative (and fp16-safe).
_LIMIT_RMS = 100.0


@torch.inference_mode()
def limit_logits(model: Model, vector, sign: int = 1) -> torch.Tensor:
    """Prop. 4.1: LN(sign * v) W^T as float32 [V]; LN is the model's final norm, soft-capping applied if the model has it."""
    if sign not in (1, -1):
        raise InputError(f"sign must be +1 or -1, not {sign!r}")
    v = as_vector(model, vector)
    rms = v.float().pow(2).mean().sqrt()
    if rms == 0:
        raise InputError("the steering vector is zero; its large-alpha limit is undefined")
    x = (sign * _LIMIT_RMS / rms) * v.float()
    return model.logits_of(x[None, None, :])[0, 0].cpu()


def limit_probs(model: Model, vector, sign: int = 1) -> torch.Tensor:
    """softmax(LN(sign * v) W^T), float32 [V]."""
    return torch.softmax(limit_logits(model, vector, sign), dim=-1)


def total_variation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """TV(p, q) = 1/2 sum |p - q| over the last dimension, in float64."""
    return 0.5 * (p.double() - q.double()).abs().sum(-1)


@dataclass
class LimitCheck:
    """Steered next-token distributions at large |alpha| against their Prop. 4.1 limit."""

    alphas: torch.Tensor  # [A] float64
    contexts: list[dict]
    tv: torch.Tensor  # [C, A] float64
    top1_steered: torch.Tensor  # [C, A] long
    top1_limit: dict = field(default_factory=dict)  # sign -> token id
    softcap: float | None = None

    def frame(self, model: Model, /, **labels):
        """One row per (context, alpha): TV distance and the top tokens of both distributions."""
        import pandas as pd

        rows = []
        for c, ctx in enumerate(self.contexts):
            for a, alpha in enumerate(self.alphas.tolist()):
                sign = 1 if alpha > 0 else -1
                steered, limit = int(self.top1_steered[c, a]), int(self.top1_limit[sign])
                rows.append(dict(labels, context_id=ctx["id"], context_kind=ctx.get("kind", "user"), alpha=alpha,
                                 sign=sign, tv=float(self.tv[c, a]), top1_steered=steered,
                                 top1_steered_token=model.token_strings([steered])[0], top1_limit=limit,
                                 top1_limit_token=model.token_strings([limit])[0], top1_match=steered == limit))
        return pd.DataFrame(rows)

    def summary(self) -> dict:
        """Mean and max TV per alpha, and whether the mean TV shrinks as |alpha| grows on each side."""
        per_alpha = []
        for a, alpha in enumerate(self.alphas.tolist()):
            col = self.tv[:, a]
            per_alpha.append(dict(alpha=alpha, tv_mean=float(col.mean()), tv_max=float(col.max()),
                                  top1_match=float((self.top1_steered[:, a] == self.top1_limit[1 if alpha > 0 else -1])
                                                   .double().mean())))
        shrinks, largest, reached = {}, {}, {}
        for sign, name in ((1, "positive"), (-1, "negative")):
            side = sorted((abs(r["alpha"]), r["tv_mean"]) for r in per_alpha if (r["alpha"] > 0) == (sign > 0))
            if len(side) >= 2:
                shrinks[name] = all(b[1] < a[1] for a, b in zip(side, side[1:]))
            if side:
                largest[name] = dict(alpha=sign * side[-1][0], tv_mean=side[-1][1])
                reached[name] = side[-1][1] <= REACHED_TV
        return dict(per_alpha=per_alpha, tv_shrinks=shrinks, tv_at_largest=largest, limit_reached=reached,
                    reached_tv=REACHED_TV, softcap=self.softcap,
                    n_contexts=len(self.contexts),
                    note="limit = softmax(final_norm(+/-v) W^T)" + (
                        f" with the model's final logit soft-capping ({self.softcap})" if self.softcap else ""))


def limit_check(model: Model, sv, contexts: Sequence[str | dict],
                alphas=None, *, positions: str = "all", chat: bool = False,
                progress: Callable[[int], None] | None = None) -> LimitCheck:
    """Prop. 4.1 on a real model: TV(p_alpha(.|context), softmax(LN(+/-v) W^T)) for large |alpha|.

    Args:
        sv: a SteeringVector, which knows its layer.
        contexts: texts, or {id, text, kind} dicts.
        alphas: nonzero raw alphas (default: +/- config.API_LIMIT_ALPHAS, 1e2, 1e3, 1e4; `sv.raw_alphas(AlphaGrid.both_signs(...))` for
            multiples of r_l).
        positions, chat: as in next_token_probs.

    Example::

        check = ss.limit_check(model, sv[15], ["Today I", "The weather is"])
        check.tv                                 # [contexts, alphas]; check.summary()["tv_shrinks"]
    """
    v, _ = vector_of(model, sv)
    check_positions(positions)
    a = as_alphas(AlphaGrid.default("limit").values if alphas is None else alphas)
    if (a == 0).any():
        raise InputError("alpha = 0 has no large-alpha limit; give nonzero alphas such as +/-1e2, 1e3, 1e4")
    ctxs = as_contexts(model, contexts, chat=chat)
    limits = {sign: limit_probs(model, v, sign).double() for sign in (1, -1)}
    tv = torch.empty((len(ctxs), a.numel()), dtype=torch.float64)
    top1 = torch.empty((len(ctxs), a.numel()), dtype=torch.long)
    for c, ctx in enumerate(ctxs):
        probs = next_token_probs(model, sv, ctx["text"], a, positions=positions, chat=chat)
        for i, alpha in enumerate(a.tolist()):
            tv[c, i] = total_variation(probs[i], limits[1 if alpha > 0 else -1])
        top1[c] = probs.argmax(-1)
        if progress is not None:
            progress(1)
    return LimitCheck(a, ctxs, tv, top1, {s: int(q.argmax()) for s, q in limits.items()}, model.final_logit_softcap)

