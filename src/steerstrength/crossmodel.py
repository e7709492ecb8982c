"""Several models in one run (the paper's Table A.1 axis): each model's pipeline, then Fig. 6 across models and the
theory badges compared per model.

Layout of a run with `models = [...]`:

    RUN/config.toml                 the whole configuration (models listed)
    RUN/models/<name>/              one ordinary run directory per model (its own manifest, resume, report.html)
    RUN/models.json                 the models, ordered by parameter count, with their facts
    RUN/tables/badges.parquet       every theory badge per model (verdicts.badges: model, concept, layer, claim, verdict)
    RUN/figures/fig6_models_<concept>.png/.pdf   Fig. 6 across models, one panel per model, by size
    RUN/report.html                 the comparison, linking each model's own report

Each model's run resumes on its own; the top-level files are drawn from their tables (`draw_models`), so a run
killed at any moment resumes to the same tables, and `steerstrength plot RUN` redraws everything.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import time
from pathlib import Path
from typing import Callable

from steerstrength.config import RunConfig, to_toml
from steerstrength.errors import InputError
from steerstrength.io import atomic_path, write_json, write_parquet
from steerstrength.loading import spec_kind

MODELS_FILE = "models.json"


def model_dir_name(spec: str) -> str:
    """A model's folder under RUN/models: the embedded name, the directory's or file's name, or the hub id."""
    path = Path(spec).expanduser()
    name = spec if spec_kind(spec) in ("embedded", "hf") else (path.stem if path.suffix.lower() == ".gguf" else path.name)
    return re.sub(r"[^A-Za-z0-9._-]+", "--", name).strip(".-") or "model"


def split_entry(entry: str) -> tuple[str, list[str]]:
    """A `models` entry: "SPEC", or "SPEC key=value ..." with that model's own overrides (e.g. "gemma3-270m
    concept.alpha_max=0.4": a finer concept grid where its text stops being fluent sooner)."""
    spec, *overrides = str(entry).split()
    return spec, overrides


def model_config(cfg: RunConfig, entry: str) -> RunConfig:
    """The single-model configuration of one listed model: the run's stages, sizes and seed, then the entry's own
    overrides (validated like the run's)."""
    from steerstrength.config import _set, validate

    spec, overrides = split_entry(entry)
    one = copy.deepcopy(cfg)
    one.models = []
    one.model.spec = spec
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise InputError(f"models entry {entry!r}: {item!r} is not key=value (e.g. \"{spec} concept.alpha_max=0.4\")")
        if key in ("models", "model.spec", "executor") or key.startswith("ray."):
            raise InputError(f"models entry {entry!r}: {key} is the run's, not one model's; set it for the whole run")
        _set(one, key, value)
    validate(one)
    return one


def check_models(cfg: RunConfig) -> list[tuple[str, str]]:
    """(entry, folder name) of every listed model, checked (specs and per-model overrides) before anything is
    written."""
    if cfg.model.spec is not None:
        raise InputError("set either model.spec (one model) or models (several), not both; e.g. "
                         "models=[\"smollm2-135m-instruct\",\"gemma3-270m\"]")
    entries = [str(s) for s in cfg.models]
    specs = [split_entry(e)[0] for e in entries]
    if len(set(specs)) != len(specs):
        raise InputError(f"models lists a model twice ({', '.join(specs)}); list each once")
    names = [model_dir_name(s) for s in specs]  # spec_kind raises one line for a spec that cannot be a model
    if len(set(names)) != len(names):
        raise InputError(f"models {', '.join(specs)} would share a folder name ({', '.join(names)}); rename one")
    for entry in entries:
        model_config(cfg, entry)
    return list(zip(entries, names))


def run_models(cfg: RunConfig, out: str | Path, *, progress, log: Callable[[str], None],
               only: list[str] | None = None, watch: Callable | None = None) -> dict:
    """Run (or resume) the pipeline for every model of `cfg.models` in RUN/models/<name>, then draw the comparison.

    The models run where `cfg.executor` says: one after the other here ("local"), or one Ray actor each ("ray",
    executors.py; `watch` sees their progress). Returns {model name: that model's run_pipeline results}.
    """
    from steerstrength.executors import Cell, require_ray, run_cells
    from steerstrength.runs import RunDir

    if cfg.executor == "ray":
        require_ray()  # before anything is written
    listed = check_models(cfg)
    root = Path(out)
    if (root / "manifest.json").is_file():
        raise InputError(f"{root} is the run directory of one model; give a new --out for a run over several models")
    with RunDir(root).lock():  # one writer, as for a run of one model
        with atomic_path(root / "config.toml") as tmp:
            tmp.write_text(to_toml(cfg))
        results = run_cells(cfg, [Cell(name, model_config(cfg, entry), root / "models" / name) for entry, name in listed],
                            progress=progress, log=log, only=only, watch=watch)
        draw_models(root)
        write_models_report(root)
    return results


def model_runs(root: str | Path) -> list[dict]:
    """The models of a multi-model run, ordered by parameter count: name, folder, facts (from each manifest)."""
    root = Path(root)
    found = []
    for manifest in sorted((root / "models").glob("*/manifest.json")):
        try:
            m = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(m, dict):
            continue  # damaged: not a model run (as unreadable JSON)
        facts = m.get("model") if isinstance(m.get("model"), dict) else {}
        found.append(dict(name=facts.get("name") or manifest.parent.name, folder=manifest.parent.name,
                          n_params=facts.get("n_params"), n_layers=facts.get("n_layers"),
                          d_model=facts.get("d_model"), architecture=facts.get("architecture"),
                          finished=bool(m.get("finished"))))
    return sorted(found, key=lambda r: (r["n_params"] is None, r["n_params"] or 0, r["name"]))


def is_multi_model(root: str | Path) -> bool:
    return (Path(root) / "models").is_dir() and bool(model_runs(root))


def fig6_layer(run, concept: str) -> int | None:
    """The layer Fig. 6 shows for one model: the scanned one ("auto") when the run has it, else its deepest."""
    sv = run.vectors(concept)
    auto = (sv.meta.get("auto_layer") if sv is not None else None)
    top = run.table("tokens_top", columns=["concept", "layer"])
    layers = sorted({int(x) for x in top.loc[top["concept"] == concept, "layer"]}) if top is not None else []
    if auto is not None and int(auto) in layers:
        return int(auto)
    return layers[-1] if layers else None


def fig_models(root: Path, concept: str, models: list[dict]):
    """Fig. 6 across models: Delta p(z, alpha) of the top-8 tokens at alpha_max, one panel per model (by size), on
    each model's first context, x in residual units (alpha / r_l) so models compare at the same relative strength."""
    from steerstrength.plots import N_TOP as TOP, OFF_STYLE, TARGET_STYLE, _panels, palette, token_label
    from steerstrength.run_tables import RunTables

    fig, axes = _panels(len(models), 4, (3.6, 2.8), top=0.62)
    colors = palette()
    drawn = 0
    for ax, info in zip(axes, models):
        run = RunTables(root / "models" / info["folder"])
        layer = fig6_layer(run, concept)
        top = None if layer is None else run.table("tokens_top", filters=[("concept", "==", concept),
                                                                           ("layer", "==", layer)])
        if top is None or top.empty:
            ax.text(0.5, 0.5, "no token curves", ha="center", va="center", transform=ax.transAxes, fontsize=8)
            ax.set_title(info["name"], fontsize=8)
            continue
        top = top[(top["side"] == "alpha_max") & (top["rank"] < TOP)]
        cid = top["context_id"].iloc[0]
        rows = top[top["context_id"] == cid].sort_values("rank")
        ids = [int(t) for t in rows["token_id"]]
        curves = run.table("tokens", columns=["context_id", "token_id", "alpha", "alpha_resid", "delta_p"],
                           filters=[("concept", "==", concept), ("layer", "==", layer), ("context_id", "==", cid),
                                    ("token_id", "in", ids)])
        curves = curves[curves["alpha"] >= 0]
        target = run.target_tokens(concept)
        for i, (_, r) in enumerate(rows.iterrows()):
            c = curves[curves["token_id"] == r["token_id"]].sort_values("alpha")
            is_target = target is not None and int(r["token_id"]) in target
            style = TARGET_STYLE if (is_target or target is None) else OFF_STYLE
            ax.plot(c["alpha_resid"], c["delta_p"], color=colors[i % len(colors)],
                    label=token_label(r["token"]) + (" ★" if is_target else ""), **style)
        ax.axhline(0, color="0.7", lw=0.6)
        size = f"{info['n_params'] / 1e6:.0f}M" if info.get("n_params") else "?"
        ax.set_title(f"{info['name']} ({size}), layer {layer}/{info.get('n_layers')}", fontsize=8)
        ax.set_xlabel("α / r_l (residual units)", fontsize=8)
        ax.set_ylabel("Δp(z, α)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, frameon=False, loc="upper left")
        drawn += 1
    fig.suptitle(f"{concept}: Δp of the top-{TOP} tokens at α_max across models, by size (Fig. 6; solid ★: target "
                 "tokens, dashed: others)", fontsize=9)
    return fig if drawn else None


def draw_models(root: str | Path) -> list[Path]:
    """RUN/tables/badges.parquet and Fig. 6 across models from the models' tables (no model loaded)."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from steerstrength.plots import DPI
    from steerstrength.prompts import SAFE_NAME
    from steerstrength.run_tables import RunTables
    from steerstrength.verdicts import badges
    
    root = Path(root)
    models = model_runs(root)
    if not models:
        raise InputError(f"{root} holds no model runs (models/<name>/manifest.json); run it with models=[...]")
    frames, concepts = [], []
    for info in models:
        run = RunTables(root / "models" / info["folder"])
        b = badges(run)
        frames.append(b.assign(model=info["name"], n_params=info["n_params"])[
            ["model", "n_params", "concept", "layer", "claim", "verdict", "rule"]])
        concepts += [c for c in run.concepts() if c not in concepts]
    written = [write_parquet(root / "tables" / "badges.parquet", pd.concat(frames, ignore_index=True))]
    write_json(root / MODELS_FILE, dict(models=models))
    written.append(root / MODELS_FILE)
    from steerstrength.io import write_figure

    for concept in concepts:
        if not SAFE_NAME.fullmatch(concept):
            continue
        fig = fig_models(root, concept, models)
        if fig is not None:
            written += write_figure(fig, root / "figures", f"fig6_models_{concept}", dpi=DPI)
            plt.close(fig)
    return written


def write_models_report(root: str | Path) -> Path:
    """RUN/report.html: the models by size, Fig. 6 across them, and each theory badge per model side by side."""
    import pandas as pd

    from steerstrength.report import CSP, CSS, esc, table_html

    root = Path(root)
    models = model_runs(root)
    rows = [[m["name"], f"{m['n_params']:,}" if m.get("n_params") else "?", m.get("architecture"), m.get("n_layers"),
             m.get("d_model"), "finished" if m["finished"] else "not finished"] for m in models]
    links = "".join(f'<li><a href="models/{esc(m["folder"])}/report.html">{esc(m["name"])}</a></li>' for m in models)
    parts = ["<h2>Models (by size)</h2>", table_html(["model", "parameters", "architecture", "layers", "d_model",
                                                      "run"], rows), f"<p>Each model's own report:</p><ul>{links}</ul>"]
    path = root / "tables" / "badges.parquet"
    if path.is_file():
        b = pd.read_parquet(path)
        names = [m["name"] for m in models]
        cells = {}
        for (concept, claim, model), g in b.groupby(["concept", "claim", "model"], sort=False):
            cells.setdefault((concept, claim), {})[model] = ", ".join(
                f"{v} (L{int(l)})" if pd.notna(l) else v for l, v in zip(g["layer"], g["verdict"]))
        grid = [[concept, claim] + [by.get(n, "–") for n in names] for (concept, claim), by in cells.items()]
        parts += ["<h2>The paper's claims, per model</h2>",
                  "<p>Each cell: the verdict at each steered layer (L = layer index). The rules are in each model's "
                  "own report.</p>", table_html(["concept", "claim"] + names, grid, cls="badges")]
    for png in sorted((root / "figures").glob("fig6_models_*.png")):
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        parts.append(f'<h2>Fig. 6 across models: {esc(png.stem.removeprefix("fig6_models_"))}</h2>'
                     f'<img alt="{esc(png.stem)}" style="max-width:100%" src="data:image/png;base64,{data}">')
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())
    page = (f"<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='Content-Security-Policy' "
            f"content=\"{esc(CSP)}\"><title>steerstrength: {esc(root.name)} across models</title>"
            f"<style>{CSS}</style></head><body>"
            f"<h1>steerstrength across models: {esc(root.name)}</h1><p>Written {esc(when)}.</p>"
            + "\n".join(parts) + "</body></html>")
    out = root / "report.html"
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out
