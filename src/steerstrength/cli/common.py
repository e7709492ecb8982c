"""Pieces the CLI modules share: the `sweep` group, checks, model loading, what every sweep steers, progress bars
(the shared options are in cli/options.py)."""

from __future__ import annotations

import contextlib
import time
from typing import Iterator, Optional

import typer

from steerstrength.cli.options import ContextOptions, GridOptions, ModelOptions, SteeredOptions, SweepRun, grouped
from steerstrength.progress import console, progress_bar, state  # noqa: F401 - the CLI modules import them from here

sweep_app = typer.Typer(help="Alpha sweeps on a real model; each writes a Parquet table and a JSON summary.",
                        no_args_is_help=True)


def check_at_least(*checks: tuple[str, Optional[int], int]) -> None:
    """Each (option, value, smallest) before any work: a value below its smallest is one line naming the option (a
    size of 0 is not "use the default", and a negative count does not slice from the end)."""
    from steerstrength.errors import InputError

    for option, value, low in checks:
        if value is not None and value < low:
            raise InputError(f"{option} must be at least {low}, not {value}")


def refuse_given(ctx, because: str, names) -> None:
    """One line for the first option among parameter `names` given on the command line, which `because` makes
    unused (an option is honoured or refused, never ignored)."""
    from steerstrength.errors import InputError

    for param in ctx.command.params:
        if param.name in names and ctx.get_parameter_source(param.name).name in ("COMMANDLINE", "ENVIRONMENT"):
            raise InputError(f"{param.opts[0]} has no effect with {because}; drop one of them")


def check_seed(seed: int, option: str = "--seed") -> None:
    """A seed every generator takes (config.SEED_MAX): one line, not numpy's or torch's overflow traceback."""
    from steerstrength.config import SEED_MAX
    from steerstrength.errors import InputError

    if not 0 <= seed <= SEED_MAX:
        raise InputError(f"{option} must be in [0, {SEED_MAX}], not {seed}")


def load(spec: Optional[str], dtype: str = "float32", device: str = "auto", blocks_path: Optional[str] = None):
    from steerstrength.loading import load_model

    return load_model(spec, dtype=dtype, device=device, blocks_path=blocks_path)


def log(message: str) -> None:
    from rich.markup import escape

    console.print(escape(message), highlight=False, soft_wrap=True)


def sweep_command(name: str):
    """`steerstrength sweep NAME`, its option groups spliced in (options.grouped)."""
    return lambda command: sweep_app.command(name)(grouped(command))


def done(paths, run: SweepRun, what: str = "") -> None:
    log(f"wrote {', '.join(str(p) for p in paths)}{' (' + what + ')' if what else ''} in {run.seconds():.1f} s")


def grid_size(grid: GridOptions, n_alphas: int) -> int:
    """How many alphas the grid will hold (0 included, at most), without building it; n_alphas: the section's."""
    if grid.alphas is not None:
        from steerstrength.grid import parse_alphas

        values = parse_alphas(grid.alphas)
        return len(values) + (0.0 not in values)
    if n_alphas < 1:
        from steerstrength.errors import InputError

        raise InputError(f"--n-alphas must be at least 1, not {n_alphas}")
    return n_alphas + 1


def command_grid(grid: GridOptions, *, section, cfg, unit: Optional[str] = None, zero: bool = True,
                 spacing: str = "linear"):
    """A sweep command's grid: grid.AlphaGrid.from_options over the preset's section, in `unit` (default: --alpha-unit,
    else the preset's); a note when 0 was inserted into a user's --alphas."""
    from steerstrength.grid import AlphaGrid, check_unit

    unit = check_unit(unit or grid.alpha_unit or cfg.alpha_unit)
    made = AlphaGrid.from_options(grid.alphas, grid.alpha_min, grid.alpha_max, grid.n_alphas, section=section,
                                  unit=unit, section_unit=cfg.alpha_unit, zero=zero, spacing=spacing)
    if grid.alphas is not None and made.inserted_zero:
        log("note: the alpha grid had no 0; inserted alpha = 0 (the baseline of every Delta)")
    return made


def controls_count(cfg, given: Optional[int]) -> int:
    """--controls, or the preset's controls.n_sweep (0: v alone; `steerstrength run` steers controls.n_random)."""
    if given is not None:
        check_at_least(("--controls", given, 0))
        return given
    return cfg.controls.n_sweep


class Steering:
    """What every sweep command shares: the model, one SteeringVector per layer, the labels of every table row."""

    def __init__(self, lm: ModelOptions, steered: SteeredOptions, alpha_unit: str = "raw"):
        from steerstrength.grid import check_unit
        from steerstrength.stages import row_labels
        from steerstrength.steering import check_positions
        from steerstrength.vectors import SteeringVectors, parse_layers

        check_positions(steered.positions)
        self.alpha_unit = check_unit(alpha_unit)
        self.sv = SteeringVectors.load(steered.vectors)
        self.model = lm.load()
        self.layers = self.sv.layers if steered.layers is None else parse_layers(steered.layers, self.model.n_layers)
        fp = self.sv.meta.get("model_fingerprint")
        if fp and fp != self.model.fingerprint():
            log(f"warning: {steered.vectors} was made with model {self.sv.meta.get('model')!r} (fingerprint {fp}), "
                f"not with {self.model.name}")
        chosen = self.sv.select(self.layers, self.model)
        self.vectors = {v.layer: v.normalized() if steered.normalize else v for v in chosen}
        self.normalize = steered.normalize
        self.positions = steered.positions
        self.labels = row_labels(self.model.name, steered.concept or self.sv.meta.get("concept") or "",
                                 steered.setting or self.sv.meta.get("setting") or "", steered.positions)
        self.vectors_path = str(steered.vectors)

    def steered(self, cfg, n_controls: Optional[int], seed: Optional[int] = None) -> list:
        """v at every layer, each followed by its random directions (vectors.random_controls): --controls, or the
        preset's count, seeded from the run seed, exactly as `steerstrength run` steers them."""
        from steerstrength.vectors import random_controls

        n = controls_count(cfg, n_controls)
        out = []
        for sv in self.vectors.values():
            out += [sv, *random_controls(sv, n, seed=cfg.seed if seed is None else seed)]
        return out

    def header(self, start: float | None = None, **extra) -> dict:
        """What the summary JSON says besides the stage's own summary: the inputs, and the seconds it took."""
        out = dict(self.labels, model_fingerprint=self.model.fingerprint(), vectors_file=self.vectors_path,
                   layers=self.layers, vector="normalized" if self.normalize else "raw",
                   vector_norms={str(k): float(v.vector.double().norm()) for k, v in self.vectors.items()},
                   alpha_unit=self.alpha_unit, resid_scales={str(k): self.scale(k) for k in self.layers}, **extra)
        if start is not None:
            out["seconds"] = round(time.perf_counter() - start, 2)
        return out

    def scale(self, layer: int) -> float:
        """alpha_resid per unit of raw alpha at `layer` (grid.py)."""
        return self.vectors[layer].resid_scale(self.model)

    def contexts(self, given: ContextOptions, preset_n: Optional[int] = None):
        """--contexts, or the built-in ones the run uses (metrics.contexts.stage_contexts), checked on the model:
        the first --n-contexts of them; without it, all of a user's file, or the preset's count of the built-in."""
        from steerstrength.metrics.contexts import as_contexts, builtin_concepts, stage_contexts

        concept = self.labels["concept"]
        if given.contexts is None and concept and concept.lower() not in builtin_concepts():
            log(f"note: no built-in contexts for concept {concept!r}; using the 44 neutral ones")
        n = given.n_contexts if given.n_contexts is not None or given.contexts is not None else preset_n
        return as_contexts(self.model, stage_contexts(concept, given.contexts, n), chat=given.chat)
