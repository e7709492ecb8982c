"""Alpha grids: a linspace plus alpha = 0, the unsteered baseline every Delta is measured against."""

from __future__ import annotations

import warnings

import torch

from steerstrength.errors import InputError
from steerstrength.steering import as_alphas


def linspace_grid(alpha_min: float, alpha_max: float, n: int, *, zero: bool = True) -> torch.Tensor:
    """linspace(alpha_min, alpha_max, n), plus 0 when `zero` (sorted, float64)."""
    if n < 1:
        raise InputError(f"the alpha grid needs at least one point, not {n}")
    if not alpha_min <= alpha_max:
        raise InputError(f"alpha_min {alpha_min} is above alpha_max {alpha_max}; swap them")
    grid = torch.linspace(float(alpha_min), float(alpha_max), int(n), dtype=torch.float64)
    return with_zero(grid, warn=False)[0] if zero else grid


def log_grid(alpha_max: float, n: int) -> torch.Tensor:
    """+/- alpha_max * 2^(-j/2) for j < n // 2, plus 0 (sorted, float64): dense near 0, reaching far, and holding
    alpha_max / 2 exactly (the plateau's growth ratio, metrics/xent.py)."""
    if n < 2:
        raise InputError(f"a log grid needs at least 2 points, not {n}")
    if not 0 < alpha_max < float("inf"):
        raise InputError(f"alpha_max must be a positive finite number, not {alpha_max}")
    side = float(alpha_max) * 2.0 ** (-torch.arange(n // 2, dtype=torch.float64) / 2)
    return torch.sort(torch.cat([-side, side.new_zeros(1), side])).values


def stage_grid(alpha_max: float, n: int, spacing: str = "linear", *, zero: bool = True) -> torch.Tensor:
    """A run stage's grid: linspace(-alpha_max, alpha_max, n) (+ 0), or the log grid."""
    if spacing == "log":
        return log_grid(alpha_max, n)
    return linspace_grid(-alpha_max, alpha_max, n, zero=zero)


def with_zero(alphas, *, warn: bool = True) -> tuple[torch.Tensor, bool]:
    """The grid sorted, with alpha = 0 inserted if missing (and a warning saying so); (grid, inserted)."""
    a = as_alphas(alphas)
    if torch.unique(a).numel() != a.numel():
        raise InputError("the alpha grid has repeated values; give distinct alphas")
    inserted = not bool((a == 0).any())
    if inserted:
        a = torch.cat([a, a.new_zeros(1)])
        if warn:
            warnings.warn("the alpha grid had no 0; inserted alpha = 0 (the unsteered baseline of every Delta)",
                          stacklevel=3)
    return torch.sort(a).values, inserted


def zero_index(alphas: torch.Tensor) -> int:
    hits = (alphas == 0).nonzero()
    if hits.numel() == 0:
        raise InputError("the alpha grid has no 0; Delta quantities are measured against alpha = 0")
    return int(hits[0])


# ----------------------------------------------------------------------------- residual units
# alpha_resid = alpha * ||v|| / r_l, where r_l is the median residual-stream norm at layer l (first token left out,
# vectors.residual_norms): the norm of the added alpha * v as a multiple of the stream it is added to. A grid in
# residual units means the same strength at any layer of any model (norms grow ~9x from layer 3 to 29 of SmolLM2).

ALPHA_UNITS = ("raw", "resid")


def check_unit(unit: str) -> str:
    if unit not in ALPHA_UNITS:
        raise InputError(f"the alpha unit must be raw or resid (multiples of the layer's median residual norm), "
                         f"not {unit!r}")
    return unit


def resid_scale(vector: torch.Tensor, residual_norm: float) -> float:
    """alpha_resid per unit of raw alpha: ||v|| / r_l."""
    if not residual_norm > 0:
        raise InputError(f"the residual norm must be positive, not {residual_norm}")
    norm = float(torch.as_tensor(vector).double().norm())
    if norm == 0:
        raise InputError("the steering vector is zero; alpha has no residual-unit equivalent")
    return norm / float(residual_norm)


def to_raw(alphas, unit: str, scale: float) -> torch.Tensor:
    """A grid in `unit` as raw alphas (the coefficient of v that `steer` adds); 0 stays exactly 0."""
    a = as_alphas(alphas)
    return a if check_unit(unit) == "raw" else a / scale


def add_resid_column(frame, scale: float, column: str = "alpha"):
    """Tables carry both strengths: `alpha` (raw) and `alpha_resid` next to it."""
    if column in frame.columns and "alpha_resid" not in frame.columns:
        frame.insert(list(frame.columns).index(column) + 1, "alpha_resid", frame[column].astype("float64") * scale)
    return frame
