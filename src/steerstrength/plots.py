"""The paper's figures redrawn from a run directory's tables (PNG and PDF), without a model.

Figures (paper counterpart): Delta p of the top-8 tokens at alpha_max (Fig. 6) and at alpha_min
(Fig. A.10) per concept and layer; concept probability and Delta CE against alpha with every layer
of the run in one panel (Fig. 7; Figs. A.11-A.13 when the run has several layers); MMLU (Fig. A.6);
the spread of the bootstrap vectors (what the tables allow of Fig. A.3); TV to the Prop. 4.1 limit.
`figures/index.json` lists every figure with its caption, and every figure that could not be drawn
with the reason (a stage skipped, not run, or failed).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from steerstrength.io import atomic_path, write_json
from steerstrength.run_tables import RunTables

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

N_TOP = 8  # tokens per panel in Figs. 6 and A.10
DPI = 120
TARGET_STYLE = dict(lw=1.8, ls="-")
OFF_STYLE = dict(lw=1.2, ls="--")

# ----------------------------------------------------------------------------- style


def token_label(text: str, limit: int = 18) -> str:
    """A token string as a label: repr-escaped so spaces and newlines show (' joy', '\\n')."""
    s = repr(str(text))
    return s if len(s) <= limit else s[: limit - 2] + "…" + s[-1]


def palette() -> list:
    """Distinct colours for tokens: tab10, then the tab20 and Dark2 shades."""
    from matplotlib import colormaps

    tab20 = colormaps["tab20"].colors
    return list(colormaps["tab10"].colors) + list(tab20[1::2]) + list(colormaps["Dark2"].colors)


def layer_colors(layers: list[int]) -> dict[int, tuple]:
    """One colour per layer, early (dark) to late (light), the same in every figure of a run."""
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    n = len(layers)
    return {layer: cmap(0.85 * i / max(1, n - 1)) for i, layer in enumerate(sorted(layers))}


def _new_figure(nrows: int, ncols: int, panel: tuple[float, float] = (4.0, 3.0), top: float = 0.55):
    """A grid of panels with fixed margins in inches (no layout engine: drawing stays fast and repeatable)."""
    from matplotlib.figure import Figure

    left, right, bottom, gap_w, gap_h = 0.62, 0.15, 0.45, 0.62, 0.62
    width = left + right + ncols * panel[0] + (ncols - 1) * gap_w
    height = top + bottom + nrows * panel[1] + (nrows - 1) * gap_h
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        wspace=gap_w / panel[0], hspace=gap_h / panel[1])
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _panels(n: int, max_cols: int, panel: tuple[float, float], top: float):
    """`_new_figure` with n panels in rows of at most max_cols; the unused cells hidden. (fig, [n axes])."""
    ncols = min(max_cols, n)
    fig, axes = _new_figure(math.ceil(n / ncols), ncols, panel, top=top)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _not_available(ax, text: str) -> None:
    ax.text(0.5, 0.5, "not available:\n" + _wrap(text, 48), ha="center", va="center", fontsize=8,
            transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


def _short(text: str, n: int = 44) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


# ----------------------------------------------------------------------------- figures


@dataclass
class Drawn:
    """A figure to save, with what the report says about it."""

    stem: str
    title: str
    paper: str
    caption: str
    figure: "Figure"
    concept: str | None = None
    layer: int | None = None


@dataclass
class Missing:
    stem: str
    title: str
    paper: str
    reason: str
    concept: str | None = None


@dataclass
class Plan:
    drawn: list[Drawn] = field(default_factory=list)
    missing: list[Missing] = field(default_factory=list)


def fig_delta_p(run: RunTables, concept: str, layer: int, side: str) -> "Figure | None":
    """Fig. 6 (side alpha_max) / A.10 (alpha_min): Delta p(z, alpha) of the top-8 tokens at that end, per context."""
    top = run.table("tokens_top", filters=[("concept", "==", concept), ("layer", "==", layer)])
    if top is None or top.empty:
        return None
    top = top[(top["side"] == side) & (top["rank"] < N_TOP)].copy()
    top["rank"] = top["rank"].astype(int)
    contexts = list(dict.fromkeys(top["context_id"].tolist()))
    ids = sorted({int(t) for t in top["token_id"]})
    curves = run.table("tokens", columns=["context_id", "token_id", "alpha", "delta_p", "peak_alpha"],
                       filters=[("concept", "==", concept), ("layer", "==", layer), ("token_id", "in", ids)])
    if curves is None:
        return None
    positive = side == "alpha_max"
    curves = curves[curves["alpha"] >= 0] if positive else curves[curves["alpha"] <= 0]
    target = run.target_tokens(concept)
    texts = run.context_texts()
    colors = palette()
    color_of: dict[str, tuple] = {}
    band = control_band_delta_p(run, concept, layer, side)
    fig, axes = _panels(len(contexts), 4, (3.6, 2.8), top=0.62)
    for ax, cid in zip(axes, contexts):
        rows = top[top["context_id"] == cid].sort_values("rank")
        mine = curves[curves["context_id"] == cid]
        b = band.get(cid)
        if b is not None:
            ax.fill_between(b["alpha"], b["low"], b["high"], color="0.6", alpha=0.3, lw=0,
                            label=f"random directions ({b['n']}): largest Δp of their top-{N_TOP}")
        for _, r in rows.iterrows():
            c = mine[mine["token_id"] == r["token_id"]].sort_values("alpha")
            label = token_label(r["token"])
            color = color_of.setdefault(label, colors[len(color_of) % len(colors)])
            is_target = target is not None and int(r["token_id"]) in target
            style = TARGET_STYLE if (is_target or target is None) else OFF_STYLE
            ax.plot(c["alpha"], c["delta_p"], color=color, label=label + (" ★" if is_target else ""), **style)
        ax.axhline(0, color="0.7", lw=0.6)
        ax.set_title(_short(texts.get(cid, cid)), fontsize=8)
        ax.set_xlabel("α", fontsize=8)
        ax.set_ylabel("Δp(z, α)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, frameon=False, loc="upper left" if positive else "upper right", ncols=1)
    end = "α_max" if positive else "α_min"
    key = ("solid ★: target tokens (top-M log-odds), dashed: others" if target is not None
           else "target tokens unknown (logodds stage not available)")
    if band:
        key += "; grey: random directions of the same norm"
    fig.suptitle(f"{concept}, layer {layer}: Δp of the top-{N_TOP} tokens at {end}  ({key})", fontsize=9)
    return fig


def control_band_delta_p(run: RunTables, concept: str, layer: int, side: str) -> dict:
    """Per context: the band (min to max over the random directions of the layer) of the largest Delta p among each
    direction's own top-8 tokens at that end of the grid: what steering of the same norm does to its top tokens."""
    if not run.has_directions("tokens_top") or not run.has_directions("tokens"):
        return {}
    top = run.table("tokens_top", columns=["direction", "context_id", "side", "rank", "token_id"],
                    filters=[("concept", "==", concept), ("layer", "==", layer)], direction=None)
    top = top[(top["direction"] != "v") & (top["side"] == side) & (top["rank"] < N_TOP)]
    if top.empty:
        return {}
    ids = sorted({int(t) for t in top["token_id"]})
    curves = run.table("tokens", columns=["direction", "context_id", "token_id", "alpha", "delta_p"],
                       filters=[("concept", "==", concept), ("layer", "==", layer), ("token_id", "in", ids),
                                ("direction", "!=", "v")], direction=None)
    curves = curves[curves["alpha"] >= 0] if side == "alpha_max" else curves[curves["alpha"] <= 0]
    mine = curves.merge(top[["direction", "context_id", "token_id"]], on=["direction", "context_id", "token_id"])
    out = {}
    for cid, g in mine.groupby("context_id"):
        peak = g.groupby(["direction", "alpha"], as_index=False)["delta_p"].max()
        alpha, low, high, _ = control_band(peak, "delta_p")
        out[cid] = dict(alpha=alpha, low=low, high=high, n=int(peak["direction"].nunique()))
    return out


def control_band(frame, value: str):
    """(alpha, min, max, mean) of `value` over the random directions of one layer, point by point of their common
    grid (the i-th alpha of every direction: their raw alphas agree up to rounding)."""
    f = frame.assign(point=frame.groupby("direction")["alpha"].rank(method="first"))
    by = f.groupby("point")
    return (by["alpha"].mean().to_numpy(), by[value].min().to_numpy(), by[value].max().to_numpy(),
            by[value].mean().to_numpy())


def _resid_scale(frame) -> float | None:
    """alpha_resid / alpha of one layer's rows (tables carry both strengths), or None for raw-only tables."""
    if "alpha_resid" not in frame.columns:
        return None
    nonzero = frame[frame["alpha"] != 0]
    return float((nonzero["alpha_resid"] / nonzero["alpha"]).median()) if len(nonzero) else None


def fig_concept_xent(run: RunTables, concept: str, layers: list[int]) -> "Figure | None":
    """Fig. 7 (A.11-A.13 with several layers): concept probability (Thm 3.6 fit) and Delta CE (Thm 3.8 quadratic)."""
    import numpy as np

    from steerstrength.metrics.concept import tanh_curve

    curve = run.table("concept_curve", filters=[("concept", "==", concept)])
    xent = run.table("xent", filters=[("concept", "==", concept)])
    if (curve is None or curve.empty) and (xent is None or xent.empty):
        return None
    colors = layer_colors(layers)
    fig, axes = _new_figure(2, 1, (5.2, 3.0), top=0.32)
    ax = axes[0, 0]
    if curve is None or curve.empty:
        _not_available(ax, run.why_missing("concept_curve"))
    else:
        fits = run.summary("concept") or {}
        pooled = curve[curve["scope"] == "pooled"]
        judges = list(dict.fromkeys(pooled["judge"].tolist()))
        for layer, lf in pooled.groupby("layer"):
            scale = _resid_scale(lf)  # x in residual units when the table has them: layers share one axis
            for j, (judge, jf) in enumerate(lf.groupby("judge", sort=False)):
                jf = jf.sort_values("alpha")
                x = jf["alpha"] * (scale or 1.0)
                color = colors.get(int(layer), "k")
                name = f"layer {int(layer)}" + (f", {judge}" if len(judges) > 1 else "")
                ax.fill_between(x, jf["ci_low"], jf["ci_high"], color=color, alpha=0.18, lw=0)
                ax.plot(x, jf["p"], marker="o", color=color, ms=3.5, lw=1.2, label=name,
                        ls=["-", ":", "-."][j % 3])
                if "p_fluent" in jf and jf["p_fluent"].notna().any():  # degenerate completions never count
                    ax.plot(x, jf["p_fluent"], marker="s", mfc="none", color=color, ms=3.5, lw=0.9, ls="--",
                            label=f"fluent only, {name}")
                if j == 0 and "degenerate_share" in jf and jf["degenerate_share"].notna().any():
                    ax.bar(x, jf["degenerate_share"], width=0.6 * float(np.diff(np.sort(x)).min() if len(x) > 1 else 1),
                           color=color, alpha=0.22, hatch="//", edgecolor=color, lw=0,
                           label=f"degenerate share, layer {int(layer)}")
                cur = fits.get(f"{concept}/{int(layer)}", {}).get("curves", {}).get(judge, {})
                fit, span = cur.get("tanh_fit", {}), (jf["alpha"].min(), jf["alpha"].max())
                nd = cur.get("tanh_fit_nondegenerate") or {}
                if cur.get("degenerate_alphas") and nd.get("status") == "ok" and cur.get("fit_range"):
                    fit, span = nd, tuple(cur["fit_range"])  # Thm 3.6 on the alphas whose text did not collapse
                if fit.get("status") == "ok":
                    grid = np.linspace(span[0], span[1], 200)
                    ax.plot(grid * (scale or 1.0), tanh_curve(grid, fit["c"], fit["a"], fit["b"], fit["alpha0"]),
                            color=color, lw=1, ls="--", label=f"sigmoid fit, R²={fit['r2']:.2f}")
        controls = run.table("concept_curve", filters=[("concept", "==", concept), ("scope", "==", "pooled"),
                                                       ("direction", "!=", "v")], direction=None) \
            if run.has_directions("concept_curve") else None
        if controls is not None and not controls.empty:
            for layer, cf in controls.groupby("layer"):
                scale = _resid_scale(cf) or 1.0
                x, low, high, mean = control_band(cf, "p")
                color = colors.get(int(layer), "k")
                ax.fill_between(x * scale, low, high, color=color, alpha=0.12, lw=0, hatch="//",
                                label=f"layer {int(layer)}: {cf['direction'].nunique()} random directions")
                ax.plot(x * scale, mean, color=color, lw=0.8, ls=":")
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel("concept probability")
        ax.legend(fontsize=7, frameon=False)
        if _resid_scale(pooled) is not None:
            ax.set_xlabel("α (× the layer's median residual norm)")
        else:
            ax.set_xlabel("α")
    ax.set_title(f"{concept}: concept probability (Thm 3.6), 95% Wilson band; bars: degenerate share", fontsize=9)
    ax = axes[1, 0]
    if xent is None or xent.empty:
        _not_available(ax, run.why_missing("xent"))
    else:
        per_vector = (run.summary("xent") or {}).get("per_vector", {})
        lo, hi = 0.0, 0.0
        spans = []
        for layer, lf in xent.groupby("layer"):
            lf = lf.sort_values("alpha")
            scale = _resid_scale(lf) or 1.0
            color = colors.get(int(layer), "k")
            ax.plot(lf["alpha"] * scale, lf["delta_ce"], "o-", color=color, ms=3, lw=1.2, label=f"layer {int(layer)}")
            lo, hi = min(lo, float(lf["delta_ce"].min())), max(hi, float(lf["delta_ce"].max()))
            spans.append((lf["alpha"][lf["alpha"] != 0].abs().min() * scale, lf["alpha"].abs().max() * scale))
            info = per_vector.get(f"{concept}/{int(layer)}", {})
            curvature, slope, source = _curvature(info)
            if curvature is not None:
                grid = np.linspace(lf["alpha"].min(), lf["alpha"].max(), 400)
                ax.plot(grid * scale, slope * grid + 0.5 * curvature * grid**2, color=color, lw=1, ls="--",
                        label=f"local quadratic, κ={curvature:.3g} ({source})")
        controls = run.table("xent", filters=[("concept", "==", concept), ("direction", "!=", "v")], direction=None) \
            if run.has_directions("xent") else None
        if controls is not None and not controls.empty:
            for layer, cf in controls.groupby("layer"):
                scale = _resid_scale(cf) or 1.0
                x, low, high, _ = control_band(cf, "delta_ce")
                color = colors.get(int(layer), "k")
                ax.fill_between(x * scale, low, high, color=color, alpha=0.15, lw=0, hatch="//",
                                label=f"layer {int(layer)}: {cf['direction'].nunique()} random directions")
                hi = max(hi, float(cf["delta_ce"].max()))
        inner, outer = min(a for a, _ in spans), max(b for _, b in spans)
        if outer > 50 * inner:  # a log-spaced grid: show the quadratic near 0 and the plateau far out
            ax.set_xscale("symlog", linthresh=inner)
            decades = [10.0**k for k in range(int(np.ceil(np.log10(inner))), int(np.floor(np.log10(outer))) + 1)]
            ticks = [-d for d in reversed(decades)] + [0.0] + decades
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        pad = 0.08 * (hi - lo or 1.0)
        ax.set_ylim(lo - pad, hi + 3 * pad)
        ax.axhline(0, color="0.7", lw=0.6)
        ax.set_ylabel("ΔCE(α) (nats)")
        ax.legend(fontsize=7, frameon=False)
    ax.set_xlabel("α (× the layer's median residual norm)" if xent is not None and "alpha_resid" in xent.columns
                  else "α")
    ax.set_title(f"{concept}: ΔCE (Thm 3.8 locally, Prop. 4.1 plateau)", fontsize=9)
    return fig


def _curvature(info: dict) -> tuple[float | None, float, str]:
    """(curvature, slope, source) at alpha = 0: the jvp derivatives, else the quadratic fit's."""
    c = info.get("curvature") or {}
    if c.get("jvp") is not None:
        return float(c["jvp"]), float(c.get("slope_jvp") or 0.0), "jvp"
    fit = info.get("quadratic_fit") or {}
    if fit.get("curvature") is not None:
        return float(fit["curvature"]), float(fit.get("slope") or 0.0), "fit"
    return None, 0.0, ""


def fig_mmlu(run: RunTables, concepts: list[str], layers: list[int]) -> "Figure | None":
    """Fig. A.6: MMLU accuracy (all questions) against alpha, 95% Wilson band, random guessing at 25%."""
    acc = run.table("mmlu", filters=[("subject", "==", "ALL")])
    if acc is None or acc.empty:
        return None
    colors = layer_colors(layers)
    fig, axes = _panels(len(concepts), 3, (4.0, 3.0), top=0.7)
    for ax, concept in zip(axes, concepts):
        cf = acc[acc["concept"] == concept]
        if cf.empty:
            _not_available(ax, f"no MMLU rows for {concept}")
            continue
        for layer, lf in cf.groupby("layer"):
            lf = lf.sort_values("alpha")
            color = colors.get(int(layer), "k")
            ax.fill_between(lf["alpha"], lf["ci_low"], lf["ci_high"], color=color, alpha=0.18, lw=0)
            ax.plot(lf["alpha"], lf["accuracy"], "o-", color=color, ms=3.5, lw=1.2,
                    label=f"layer {int(layer)} (n={int(lf['n'].iloc[0])})")
        guess = float(cf["random_guess"].iloc[0]) if "random_guess" in cf else 0.25
        ax.axhline(guess, color="0.5", ls=":", lw=1, label="random guessing")
        ax.set_ylim(0, 1)
        ax.set_title(concept, fontsize=9)
        ax.set_xlabel("α")
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=7, frameon=False)
    source = (run.summary("mmlu") or {}).get("source")
    fig.suptitle("MMLU accuracy against α" + (f" (source: {source})" if source else ""), fontsize=9)
    return fig


def fig_limit(run: RunTables, concepts: list[str], layers: list[int]) -> "Figure | None":
    """Prop. 4.1: TV between the steered next-token distribution and softmax(LN(±v) W^T) against |alpha|."""
    lim = run.table("limit", columns=["concept", "layer", "alpha", "tv"])
    if lim is None or lim.empty:
        return None
    colors = layer_colors(layers)
    fig, axes = _panels(len(concepts), 3, (4.0, 3.0), top=0.85)
    for ax, concept in zip(axes, concepts):
        cf = lim[lim["concept"] == concept]
        if cf.empty:
            _not_available(ax, f"no limit rows for {concept}")
            continue
        for (layer, positive), lf in cf.groupby([cf["layer"], cf["alpha"] > 0]):
            g = lf.groupby(lf["alpha"].abs())["tv"].agg(["mean", "min", "max"]).sort_index()
            color = colors.get(int(layer), "k")
            ax.fill_between(g.index, g["min"], g["max"], color=color, alpha=0.15, lw=0)
            ax.plot(g.index, g["mean"], "o-" if positive else "s--", color=color, ms=4, lw=1.2,
                    label=f"layer {int(layer)}, α {'>' if positive else '<'} 0")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("|α|")
        ax.set_ylabel("TV to the limit")
        ax.set_title(concept, fontsize=9)
        ax.legend(fontsize=7, frameon=False)
    fig.suptitle("Prop. 4.1: TV to softmax(LN(±v) Wᵀ)\n(mean over contexts, band: min to max)", fontsize=9)
    return fig


def fig_resamples(run: RunTables, concept: str) -> "Figure | None":
    """Fig. A.3 from the tables: how much the vector moves when P and N are resampled (bootstrap replicates)."""
    import numpy as np

    sv = run.vectors(concept)
    if sv is None or not sv.resamples:
        return None
    layers = sorted(sv.resamples)
    cos, ratio = [], []
    for layer in layers:
        v = sv[layer].vector.double()
        r = sv.resamples[layer].double()
        cos.append(((r @ v) / (r.norm(dim=1) * v.norm())).numpy())
        ratio.append((r.norm(dim=1) / v.norm()).numpy())
    fig, axes = _new_figure(1, 2, (3.8, 3.0), top=0.4)
    x = np.arange(len(layers))
    panels = ((axes[0, 0], cos, "cos(v_resampled, v)"), (axes[0, 1], ratio, "‖v_resampled‖ / ‖v‖"))
    for ax, values, name in panels:
        for i, vals in enumerate(values):
            jitter = np.linspace(-0.12, 0.12, len(vals)) if len(vals) > 1 else np.zeros(1)
            ax.plot(x[i] + jitter, vals, "o", color="tab:blue", ms=3.5, alpha=0.7)
            ax.errorbar(x[i] + 0.25, vals.mean(), yerr=vals.std(ddof=1) if len(vals) > 1 else 0, fmt="s",
                        color="k", ms=4, capsize=3)
        ax.set_xticks(x, [str(layer) for layer in layers])
        ax.set_xlim(-0.6, len(layers) - 0.4)
        ax.set_xlabel("layer")
        ax.set_ylabel(name)
    k = int(sv.resamples[layers[0]].shape[0])
    fig.suptitle(f"{concept}: {k} bootstrap resamples of P and N (points; square: mean ± sd)", fontsize=9)
    return fig


def fig_layer_scan(table, concept: str | None = None) -> "Figure":
    """The layer scan (scan.py): held-out AUC, lens share and their score against the layer; the pick marked."""
    fig, axes = _new_figure(1, 1, (5.5, 3.0), top=0.5)
    ax = axes[0, 0]
    t = table.sort_values("layer")
    ax.plot(t["layer"], t["heldout_auc"], "o-", ms=3, label="held-out AUC of P vs N along v")
    ax.plot(t["layer"], t["lens_share"], "s-", ms=3, label="lens share: top tokens of LN(v)Wᵀ with high M")
    ax.plot(t["layer"], t["score"], "k-", lw=2, label="score = (2 AUC − 1) × lens share")
    for layer in t[t["chosen"]]["layer"]:
        ax.axvline(layer, color="tab:red", ls=":", lw=1)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("layer")
    ax.legend(fontsize=6.5, loc="center left")
    fig.suptitle(f"{concept or 'concept'}: layer scan (red: the pick)", fontsize=9)
    return fig


def fig_depth(run: RunTables, concept: str) -> "Figure | None":
    """Concept-word share, bump share and Spearman(M, peak alpha) against the steered layer (metrics/depth.py)."""
    depth = run.table("depth")
    if depth is None or depth.empty or concept not in set(depth["concept"]):
        return None
    d = depth[depth["concept"] == concept].sort_values("layer")
    scan = run.table("layer_scan")
    fig, axes = _new_figure(1, 1, (6.0, 3.2), top=0.5)
    ax = axes[0, 0]
    controls = run.table("depth", direction=None) if run.has_directions("depth") else None
    controls = None if controls is None else controls[(controls["concept"] == concept) & (controls["direction"] != "v")]
    for col, label, style in (("concept_word_share", "concept words in the top-8 at α_max", "o-"),
                              ("bump_share", "bumps among the top-8", "s-"),
                              ("unimodal_share", "unimodal among the top-8", "^:"),
                              ("spearman_M_peak", "Spearman(M, peak α), median", "d--")):
        line, = ax.plot(d["layer"], d[col], style, ms=4, label=label)
        if col == "concept_word_share" and controls is not None and not controls.empty:
            by = controls.groupby("layer")[col]
            ax.fill_between(by.min().index, by.min().to_numpy(), by.max().to_numpy(), color=line.get_color(),
                            alpha=0.2, lw=0)
            ax.plot(by.mean().index, by.mean().to_numpy(), "x:", color=line.get_color(), ms=5, lw=0.8,
                    label=f"concept words, {controls['direction'].nunique()} random direction(s) per layer "
                          "(mean; band: min-max)")
    if scan is not None and concept in set(scan["concept"]):
        s = scan[scan["concept"] == concept].sort_values("layer")
        ax.plot(s["layer"], s["lens_share"], color="0.6", lw=1, label="scan: lens share (no sweep)")
        chosen = s[s["chosen"]]["layer"]
        for layer in chosen:
            ax.axvline(layer, color="tab:red", lw=0.8, ls=":")
    ax.axhline(0.05, color="0.8", lw=0.8)
    rho = d["spearman_M_peak"].dropna()
    ax.set_ylim(min(-0.05, float(rho.min()) - 0.05) if len(rho) else -0.05, 1.05)  # a correlation may be negative
    ax.set_xlabel("steered layer")
    ax.set_ylabel("fraction / correlation")
    ax.legend(fontsize=6.5, loc="upper left")
    amax = float(d["alpha_resid_max"].iloc[0])
    fig.suptitle(f"{concept}: where steering works, α ∈ [−{amax:g}, {amax:g}] × the layer's residual norm "
                 "(red: the scanned layer; grey line: chance 5%)", fontsize=8)
    return fig


RECOMMEND_PANELS = {  # method: (objective, its label, distortion, its label)
    "sweet-spot": ("target_mass", "target-token mass (top-M)", "kl", "next-token KL (nats)"),
    "curvature": ("predicted", "quadratic ½κα² (+ slope α), nats", "measured", "measured distortion (nats)"),
    "iso-kl": (None, None, "p95_kl", "p95 per-token KL (nats)"),
    "grid-judge": ("concept_p", "judged concept probability", "p95_kl", "p95 per-token KL (nats)"),
    "global": ("concept_p", "judged concept probability", "p95_kl", "p95 per-token KL (nats)"),
}


def fig_recommendations(table: "pd.DataFrame", curve: "pd.DataFrame", title: str | None = None) -> "Figure":
    """recommend.py's alphas: one column per method, its objective (top) and distortion (bottom) against alpha per
    prompt (thin) and pooled (black), the budget (dashed) and the recommended alphas (red) on the curve they came
    from."""
    import numpy as np

    from steerstrength.recommend import METHODS

    methods = [m for m in METHODS if m in set(table["method"])]
    fig, axes = _new_figure(2, len(methods), (3.8, 2.6), top=0.5)
    several = table["layer"].nunique() > 1
    for col, method in enumerate(methods):
        obj, obj_label, dist, dist_label = RECOMMEND_PANELS[method]
        c = curve[curve["method"] == method]
        t = table[table["method"] == method]
        for row, (key, label) in enumerate(((obj, obj_label), (dist, dist_label))):
            ax = axes[row, col]
            if key is None:
                ax.axis("off")
                ax.set_title(method, fontsize=9)
                continue
            for (layer, pi), g in c.groupby(["layer", "prompt_index"]):
                g = g.sort_values("alpha")
                pooled = pi == -1
                name = (f"pooled, layer {layer}" if several else "pooled") if pooled else None
                ax.plot(g["alpha"], g[key], color="black" if pooled else None, lw=2.2 if pooled else 0.9,
                        alpha=1.0 if pooled else 0.6, label=name)
            for _, r in t.iterrows():
                own_rows = (c["prompt_index"] == r["prompt_index"]).any()
                scope = r["prompt_index"] if own_rows and method not in ("iso-kl", "global") else -1
                own = c[(c["layer"] == r["layer"]) & (c["prompt_index"] == scope)].sort_values("alpha")
                if len(own):
                    ax.plot([r["alpha"]], [np.interp(r["alpha"], own["alpha"], own[key])], "o", color="crimson",
                            ms=5)
            if row == 1:
                ax.axhline(t["budget"].iloc[0], color="grey", ls="--", lw=1, label="budget")
                ax.set_xlabel("alpha")
            if key in ("kl", "p95_kl", "target_mass", "predicted", "measured"):
                ax.set_yscale("symlog", linthresh=1e-3 if key == "target_mass" else 0.1)
                ax.set_ylim(bottom=0)
            ax.set_ylabel(label, fontsize=8)
            if row == 0:
                ax.set_title(method, fontsize=9)
            ax.grid(alpha=0.3)
        axes[1, col].legend(fontsize=7, loc="upper left")
    fig.suptitle(title or "recommended alpha (red) on the curve it came from", fontsize=10)
    return fig


def plot_recommendations(table: "pd.DataFrame", curve: "pd.DataFrame", path) -> Path:
    """fig_recommendations as one PNG, written atomically (`steerstrength recommend`'s recommend.png)."""
    path = Path(path)
    fig = fig_recommendations(table, curve)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


# ----------------------------------------------------------------------------- all of them


def plan_figures(run: RunTables) -> Plan:
    """Every figure the run's tables allow, and the reason for each one they do not."""
    plan = Plan()
    concepts, layers = run.concepts(), run.layers()

    def add(stem, title, paper, caption, make: Callable[[], "Figure | None"], why: Callable[[], str],
            concept=None, layer=None):
        try:
            fig = make()
        except Exception as exc:  # one broken table must not cost the rest of the report
            plan.missing.append(Missing(stem, title, paper, f"could not be drawn: {type(exc).__name__}: {exc}",
                                        concept))
            return
        if fig is None:
            plan.missing.append(Missing(stem, title, paper, why(), concept))
        else:
            plan.drawn.append(Drawn(stem, title, paper, caption, fig, concept, layer))

    for concept in concepts:
        for layer in layers or [None]:
            for side, paper, tag in (("alpha_max", "Fig. 6", "max"), ("alpha_min", "Fig. A.10", "min")):
                end = "α_max" if side == "alpha_max" else "α_min"
                stem = "fig6_delta_p_max" if tag == "max" else "figA10_delta_p_min"
                add(f"{stem}_{concept}_L{layer}",
                    f"Δp of the top-{N_TOP} tokens at {end}: {concept}, layer {layer}", paper,
                    f"Δp(z, α) = p(z, α) − p(z, 0) (Def. 3.1) for the {N_TOP} most probable tokens at {end}, one "
                    "panel per context. Thm 3.3 predicts bumps for most tokens and a few that keep increasing; "
                    + ("the dominating tokens should be concept tokens." if tag == "max"
                       else "at α < 0 they should be unrelated to the concept."),
                    (lambda c=concept, ly=layer, s=side: fig_delta_p(run, c, ly, s) if ly is not None else None),
                    lambda: run.why_missing("tokens_top"), concept, layer)
        add(f"fig7_{concept}", f"Concept probability and ΔCE against α: {concept}", "Fig. 7" + (
            ", Figs. A.11-A.13" if len(layers) > 1 else ""),
            "Top: fraction of sampled steered completions the judge labels as showing the concept, pooled over "
            "prompts, with 95% Wilson intervals and the sigmoid (tanh) fit of Thm 3.6. Bottom: ΔCE(α) on the "
            "evaluation corpus with the local quadratic ½κα² (+ slope·α) from the curvature κ measured at α = 0 "
            "by forward-mode AD (Thm 3.8); it should hold near 0 only, and ΔCE should plateau at large |α| "
            "(Prop. 4.1). Every layer of the run is one colour.",
            lambda c=concept: fig_concept_xent(run, c, layers),
            lambda: f"{run.why_missing('concept_curve')}; {run.why_missing('xent')}", concept)
        add(f"figA3_resamples_{concept}", f"Bootstrap spread of the steering vector: {concept}", "Fig. A.3 (partial)",
            "Fig. A.3 shows Δp with error bands over vectors rebuilt from resampled P and N; redrawing that needs "
            "the model, so this figure shows what the run's files hold: per layer, the cosine of each bootstrap "
            "vector with the full-sample vector and its relative norm.",
            lambda c=concept: fig_resamples(run, c),
            lambda c=concept: (f"vectors/{c}.safetensors has no bootstrap resamples; run with vectors.resamples=K"
                               if (run.root / "vectors" / f"{c}.safetensors").is_file()
                               else f"vectors/{c}.safetensors is missing ({run.why_missing('vectors')})"), concept)
    for concept in concepts:
        add(f"figdepth_{concept}", f"Where steering works, against depth: {concept}", "App. A (layer comparisons)",
            "Each layer steered with its own difference-of-means direction at the same strength in residual units. "
            "Concept words: tokens with log-odds M in the top 5% of the vocabulary. Bumps and unimodal curves: "
            "Thm 3.3's shapes of the top-8 tokens at α_max. Spearman(M, peak α): Thm 3.3's ordering of peaks.",
            lambda c=concept: fig_depth(run, c), lambda: run.why_missing("depth"), concept)
    if concepts:
        add("figA6_mmlu", "MMLU accuracy against α", "Fig. A.6",
            "Accuracy over all questions by answer-letter likelihood, with 95% Wilson intervals; the dotted line is "
            "random guessing (25%). Steering should lower accuracy as |α| grows.",
            lambda: fig_mmlu(run, concepts, layers), lambda: run.why_missing("mmlu"))
        add("figP41_limit", "Distance to the large-α limit", "Prop. 4.1",
            "Total variation between the steered next-token distribution and the prompt-independent limit "
            "softmax(LN(±v) Wᵀ); Prop. 4.1 predicts it shrinks towards 0 as |α| grows.",
            lambda: fig_limit(run, concepts, layers), lambda: run.why_missing("limit"))
    recommend, recommend_curve = run.table("recommend"), run.table("recommend_curve")
    if recommend is not None and recommend_curve is not None:  # the recommend stage's own figure, when it ran
        for concept in concepts:
            add(f"figrec_{concept}", f"Recommended α and the curves behind it: {concept}", "Sec. 3.1, Thm 3.3",
                "Per method (recommend.py), its objective (top) and distortion (bottom) against α, per prompt and "
                "pooled (black), the distortion budget (dashed) and the recommended α (red). sweet-spot: target-token "
                "mass and next-token KL; iso-kl: the p95 per-token KL of steered generations; global: judged concept "
                "probability and p95 KL.",
                lambda c=concept: (fig_recommendations(recommend[recommend["concept"] == c],
                                                       recommend_curve[recommend_curve["concept"] == c],
                                                       f"{c}: recommended α (red) on the curve it came from")
                                   if (recommend["concept"] == c).any() else None),
                lambda: run.why_missing("recommend"), concept)
    if not concepts:
        why = "the run has no tables yet: " + run.why_missing("tokens")
        plan.missing.append(Missing("all", "every figure", "", why))
    return plan


def save_figure(fig: "Figure", out_dir: Path, stem: str) -> list[Path]:
    """A run figure as `stem`.png and `stem`.pdf (io.write_figure at the figures' DPI)."""
    from steerstrength.io import write_figure

    return write_figure(fig, out_dir, stem, dpi=DPI)


def draw_all(run_dir: str | Path) -> list[Path]:
    """Redraw every figure of a run from its tables into RUN/figures (PNG + PDF) and write figures/index.json."""
    run = RunTables(run_dir)
    out_dir = run.root / "figures"
    out_dir.mkdir(parents=True, exist_ok=True)
    index_path = out_dir / "index.json"
    previous = _previous_files(index_path)
    plan = plan_figures(run)
    written: list[Path] = []
    entries = []
    for d in plan.drawn:
        files = save_figure(d.figure, out_dir, d.stem)
        written += files
        entries.append(dict(stem=d.stem, title=d.title, paper=d.paper, caption=d.caption, concept=d.concept,
                            layer=d.layer, files=[str(p.relative_to(run.root)) for p in files]))
    keep = {str(p.relative_to(run.root)) for p in written}
    for rel in previous - keep:  # figures of an earlier drawing that this one no longer makes
        (run.root / rel).unlink(missing_ok=True)
    missing = [dict(stem=m.stem, title=m.title, paper=m.paper, reason=m.reason, concept=m.concept)
               for m in plan.missing]
    written.append(write_json(index_path, dict(figures=entries, missing=missing)))
    return written


def _previous_files(index_path: Path) -> set[str]:
    try:
        data = json.loads(index_path.read_text())
        return {f for e in data.get("figures", []) for f in e.get("files", [])
                if f.startswith("figures/") and "/" not in f[len("figures/"):]}
    except (OSError, ValueError, AttributeError, TypeError):  # a damaged index: nothing known to clean up
        return set()
