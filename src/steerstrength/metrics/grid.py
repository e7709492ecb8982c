"""Moved to steerstrength.grid (AlphaGrid); these names stay importable from here for one release."""

from steerstrength.grid import (  # noqa: F401
    ALPHA_UNITS,
    AlphaGrid,
    add_resid_column,
    check_unit,
    linspace_grid,
    log_grid,
    resid_scale,
    stage_grid,
    to_raw,
    with_zero,
    zero_index,
)
