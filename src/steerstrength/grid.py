"""Alpha grids: the ONLY place a grid of steering strengths is built, and where its unit is converted.

An `AlphaGrid` holds sorted float64 values, whether alpha = 0 (the unsteered baseline every Delta is measured
against) was inserted, and the unit the values are in:

- ``raw``: alpha multiplies the stored vector v (what `steer` adds is alpha * v);
- ``unit``: alpha multiplies v / ||v||;
- ``resid``: the added alpha * v has alpha times the layer's median residual norm r_l (vectors.residual_norms), so a
  grid means the same strength at any layer of any model (norms grow ~9x from layer 3 to 29 of SmolLM2).

alpha_resid = alpha_raw * ||v|| / r_l; tables carry `alpha` (raw) and `alpha_resid` side by side.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch

from steerstrength.errors import InputError
from steerstrength.steering import as_alphas

UNITS = ("raw", "unit", "resid")
ALPHA_UNITS = ("raw", "resid")  # the units a run config and the CLI's --alpha-unit take



def default_alphas(stage: str) -> torch.Tensor:
    """The API's default grid of `stage` (config.API_GRIDS), as values."""
    return AlphaGrid.default(stage).values


@dataclass(frozen=True, eq=False)
class AlphaGrid:
    """Sorted float64 alphas in `unit`; `inserted_zero` says whether 0 was added to what the user gave.

    Example::

        grid = AlphaGrid.linspace(-1.5, 1.5, 256, unit="resid")   # 257 values, 0 included
        raw = grid.to_raw(norm=float(v.norm()), residual_norm=r)   # what `steer` adds at this layer
    """

    values: torch.Tensor
    unit: str = "raw"
    inserted_zero: bool = False

    def __post_init__(self) -> None:
        check_unit(self.unit, UNITS)
        object.__setattr__(self, "values", as_alphas(self.values))

    # ------------------------------------------------------------------ constructors

    @classmethod
    def linspace(cls, alpha_min: float, alpha_max: float, n: int, *, zero: bool = True,
                 unit: str = "raw") -> "AlphaGrid":
        """linspace(alpha_min, alpha_max, n), plus 0 when `zero`."""
        if n < 1:
            raise InputError(f"the alpha grid needs at least one point, not {n}")
        if not alpha_min <= alpha_max:
            raise InputError(f"alpha_min {alpha_min} is above alpha_max {alpha_max}; swap them")
        values = torch.linspace(float(alpha_min), float(alpha_max), int(n), dtype=torch.float64)
        # A symmetric odd grid can miss 0 by rounding (linspace(-1.5, 1.5, 61) holds -8.3e-17): that point is 0.
        tiny = 8 * torch.finfo(torch.float64).eps * max(abs(float(alpha_min)), abs(float(alpha_max)))
        values[values.abs() <= tiny] = 0.0
        if zero:  # "plus 0" is part of this grid: inserted_zero stays for 0 added to values a user listed
            values = cls.explicit(values, note=False).values
        return cls(values, unit)

    @classmethod
    def log(cls, alpha_max: float, n: int, *, unit: str = "raw") -> "AlphaGrid":
        """+/- alpha_max * 2^(-j/2) for j < n // 2, plus 0: dense near 0, reaching far, and holding alpha_max / 2
        exactly (the plateau's growth ratio, metrics/xent.py)."""
        if n < 2:
            raise InputError(f"a log grid needs at least 2 points, not {n}")
        if not 0 < alpha_max < float("inf"):
            raise InputError(f"alpha_max must be a positive finite number, not {alpha_max}")
        side = float(alpha_max) * 2.0 ** (-torch.arange(n // 2, dtype=torch.float64) / 2)
        return cls(torch.sort(torch.cat([-side, side.new_zeros(1), side])).values, unit)

    @classmethod
    def symmetric(cls, alpha_max: float, n: int, spacing: str = "linear", *, zero: bool = True,
                  unit: str = "raw") -> "AlphaGrid":
        """A run stage's grid: linspace(-alpha_max, alpha_max, n) (+ 0), or the log grid."""
        if spacing == "log":
            return cls.log(alpha_max, n, unit=unit)
        return cls.linspace(-alpha_max, alpha_max, n, zero=zero, unit=unit)

    @classmethod
    def centred(cls, alpha_max: float, points: int, *, unit: str = "raw") -> "AlphaGrid":
        """alpha_max * linspace(-1, 1, points) with 0 exactly at its centre (points odd, >= 5): the UFM checks'."""
        import math

        import numpy as np

        if not (math.isfinite(alpha_max) and alpha_max > 0):
            raise InputError(f"--alpha-max {alpha_max} must be a positive number")
        if points < 5 or points % 2 == 0:
            raise InputError(f"--alpha-points {points} must be odd and >= 5 so that alpha = 0 is on the grid")
        values = alpha_max * np.linspace(-1.0, 1.0, points)
        values[points // 2] = 0.0
        return cls(torch.from_numpy(values), unit)

    @classmethod
    def from_zero(cls, alpha_max: float, n: int, *, unit: str = "raw") -> "AlphaGrid":
        """linspace(0, alpha_max, n): one side of 0 (recommend's calibration grids)."""
        return cls.linspace(0.0, alpha_max, n, zero=False, unit=unit)

    @classmethod
    def both_signs(cls, magnitudes: Sequence[float], *, unit: str = "raw") -> "AlphaGrid":
        """+/-|a| for every magnitude, no 0 (the large-alpha limit of Prop. 4.1)."""
        return cls(torch.tensor(sorted({float(s * a) for a in magnitudes for s in (1, -1)}), dtype=torch.float64),
                   unit)

    @classmethod
    def explicit(cls, values, *, unit: str = "raw", zero: bool = True, note: bool = True) -> "AlphaGrid":
        """The given alphas sorted; with `zero`, alpha = 0 is inserted when missing (a warning says so when `note`)."""
        a = as_alphas(values)
        if torch.unique(a).numel() != a.numel():
            raise InputError("the alpha grid has repeated values; give distinct alphas")
        inserted = zero and not bool((a == 0).any())
        if inserted:
            a = torch.cat([a, a.new_zeros(1)])
            if note:
                warnings.warn("the alpha grid had no 0; inserted alpha = 0 (the unsteered baseline of every Delta)",
                              stacklevel=3)
        return cls(torch.sort(a).values, unit, inserted)

    @classmethod
    def parse(cls, text: str, *, unit: str = "raw", zero: bool = True) -> "AlphaGrid":
        """A comma-separated list from the command line, e.g. "-5,0,5"."""
        return cls.explicit(parse_alphas(text), unit=unit, zero=zero, note=False)

    @classmethod
    def from_options(cls, alphas: str | None, alpha_min: float | None, alpha_max: float | None, n: int | None, *,
                     section, unit: str, section_unit: str, zero: bool = True, spacing: str = "linear") -> "AlphaGrid":
        """A sweep command's grid: --alphas, else its --alpha-min/--alpha-max/--n-alphas over the config section's
        (alpha_max, n_alphas), which are in `section_unit`."""
        refuse_with_explicit(alphas, **{"--alpha-min": alpha_min, "--alpha-max": alpha_max, "--n-alphas": n})
        if alphas is not None:
            return cls.parse(alphas, unit=unit, zero=zero)
        if unit != section_unit and alpha_max is None:
            raise InputError(f"the preset's grid is in {section_unit} units (+/-{section.alpha_max:g}); with "
                             f"--alpha-unit {unit} give --alpha-max (and --alpha-min), or --alphas")
        hi = section.alpha_max if alpha_max is None else alpha_max
        n = section.n_alphas if n is None else n
        if alpha_min is None or alpha_min == -hi:
            return cls.symmetric(hi, n, spacing, zero=zero, unit=unit)
        return cls.linspace(alpha_min, hi, n, zero=zero, unit=unit)

    @classmethod
    def default(cls, stage: str) -> "AlphaGrid":
        """The API's grid for `stage` when none is given (raw units): config.API_GRIDS (API_LIMIT_ALPHAS)."""
        from steerstrength.config import API_GRIDS, API_LIMIT_ALPHAS

        if stage == "limit":
            return cls.both_signs(API_LIMIT_ALPHAS)
        alpha_max, n, zero = API_GRIDS[stage]
        return cls.linspace(-alpha_max, alpha_max, n, zero=zero)

    @classmethod
    def of(cls, alphas, *, stage: str | None = None, zero: bool = True, vector=None, model=None) -> "AlphaGrid":
        """What an API function was given (an AlphaGrid, a list or a tensor; None: the stage's default), as a raw
        grid: a grid in unit or residual units becomes the raw alphas of `vector` (a SteeringVector)."""
        if isinstance(alphas, AlphaGrid):
            if alphas.unit == "raw":
                return alphas
            if not hasattr(vector, "raw_alphas"):
                raise InputError(f"a grid in {alphas.unit} units needs the SteeringVector it steers with "
                                 "(sv.raw_alphas(grid) gives the raw alphas)")
            return cls(vector.raw_alphas(alphas, model), "raw", alphas.inserted_zero)
        if alphas is None:
            return cls.default(stage)
        return cls.explicit(alphas, zero=zero)

    # ------------------------------------------------------------------ reading

    @property
    def zero(self) -> int | None:
        """The index of alpha = 0, or None."""
        hits = (self.values == 0).nonzero()
        return int(hits[0]) if hits.numel() else None

    def __len__(self) -> int:
        return int(self.values.numel())

    def numel(self) -> int:
        return len(self)

    def tolist(self) -> list[float]:
        return self.values.tolist()

    def to_raw(self, *, norm: float | None = None, residual_norm: float | None = None) -> torch.Tensor:
        """The values as raw alphas for a vector of norm ||v|| at a layer of median residual norm r_l; 0 stays 0."""
        if self.unit == "raw":
            return self.values
        if norm is None or not norm > 0:
            raise InputError(f"a grid in {self.unit} units needs the vector's (nonzero) norm to become raw alphas")
        if self.unit == "unit":
            return to_raw(self.values, "unit", float(norm))
        if residual_norm is None or not residual_norm > 0:
            raise InputError("a grid in residual units needs the layer's residual norm (a positive number)")
        return to_raw(self.values, "resid", float(norm) / float(residual_norm))


def parse_alphas(text: str) -> list[float]:
    """"-5,0,5" -> [-5.0, 0.0, 5.0], or one error line saying how to write it."""
    try:
        values = [float(x) for x in str(text).replace(" ", "").split(",") if x]
    except ValueError:
        raise InputError(f"--alphas {text!r} must be numbers separated by commas, e.g. --alphas=-5,0,5") from None
    if not values:
        raise InputError("--alphas is empty; give at least one alpha")
    return values


def check_unit(unit: str, allowed: Sequence[str] = ALPHA_UNITS) -> str:
    if unit not in allowed:
        raise InputError(f"the alpha unit must be {' or '.join(allowed)} (resid: multiples of the layer's median "
                         f"residual norm), not {unit!r}")
    return unit


def zero_index(alphas) -> int:
    """The index of alpha = 0 in a grid (AlphaGrid or tensor); an error when there is none."""
    values = alphas.values if isinstance(alphas, AlphaGrid) else alphas
    hits = (values == 0).nonzero()
    if hits.numel() == 0:
        raise InputError("the alpha grid has no 0; Delta quantities are measured against alpha = 0")
    return int(hits[0])


# ----------------------------------------------------------------------------- residual units


def resid_scale(vector, residual_norm: float) -> float:
    """alpha_resid per unit of raw alpha: ||v|| / r_l (alpha * v then has alpha_resid times the residual norm).

    Args:
        vector: v, a [d_model] tensor or a SteeringVector (`sv.resid_scale(model)` reads its own r_l).
        residual_norm: r_l, the layer's median residual norm (vectors.residual_norms).

    Example::

        scale = ss.resid_scale(sv[28].vector, sv[28].residual_norm)    # raw alpha 1 is `scale` residual norms
    """
    if not residual_norm > 0:
        raise InputError(f"the residual norm must be positive, not {residual_norm}")
    vector = getattr(vector, "vector", vector)
    norm = float(torch.as_tensor(vector).double().norm())
    if norm == 0:
        raise InputError("the steering vector is zero; alpha has no residual-unit equivalent")
    return norm / float(residual_norm)


def to_raw(alphas, unit: str, scale: float | None) -> torch.Tensor:
    """THE conversion of strengths in `unit` to the raw alphas of Eq. (1) (AlphaGrid.to_raw, SteeringVector.raw_alphas,
    the exported and served strengths all come here): alphas / scale; 0 stays 0.

    Args:
        alphas: an AlphaGrid, a list or a 1-D tensor.
        unit: "raw" (returned as they are), "resid" or "unit".
        scale: alphas in `unit` per raw alpha: ||v|| / r_l for resid (resid_scale), ||v|| for unit; unused for raw.

    Example::

        raw = ss.to_raw(torch.linspace(-1.5, 1.5, 61), "resid", sv.resid_scale(28))   # or sv[28].raw_alphas(grid)
    """
    a = alphas.values if isinstance(alphas, AlphaGrid) else as_alphas(alphas)
    return a if check_unit(unit, ALPHA_UNITS + ("unit",)) == "raw" else a / scale


def add_resid_column(frame, scale: float, column: str = "alpha"):
    """Tables carry both strengths: `alpha` (raw) and `alpha_resid` next to it."""
    if column in frame.columns and "alpha_resid" not in frame.columns:
        frame.insert(list(frame.columns).index(column) + 1, "alpha_resid", frame[column].astype("float64") * scale)
    return frame


def refuse_with_explicit(alphas, **options) -> None:
    """--alphas is the whole grid: a linspace option given with it (not None) would be ignored, so it is refused."""
    given = [name for name, value in options.items() if value is not None]
    if alphas is not None and given:
        raise InputError(f"--alphas gives the grid itself; drop {' and '.join(given)} (they size a linspace grid), or "
                         "drop --alphas")
