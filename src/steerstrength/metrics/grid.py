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
