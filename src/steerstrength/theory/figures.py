"""Figures 2, 3, B.1, 4 and 5 of the paper, drawn from a trained UFM world (PNG and PDF).

Uses matplotlib's object API (no pyplot), so drawing never touches a global backend or state.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from steerstrength.errors import InputError
from steerstrength.io import write_figure
from steerstrength.theory import laws
from steerstrength.theory.verify import World

TARGET_COLOR = "tab:blue"
OFF_COLOR = "tab:orange"
OTHER_COLORS = ["tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
EQ2_TOKENS = ["a", "b", "c", "A", "B", "C", "α", "β", "γ"]  # the vocabulary of Eq. (2)


def token_labels(world: World) -> list[str]:
    """Eq. (2)'s names when V = 9, G = 3; token indices otherwise."""
    ds = world.dataset
    if ds.vocab_size == 9 and ds.groups == 3:
        return list(EQ2_TOKENS)
    return [str(z) for z in range(ds.vocab_size)]


def context_label(world: World, j: int) -> str:
    """A context written with its token names, e.g. 'aab'."""
    names = token_labels(world)
    sep = "" if world.dataset.vocab_size == 9 and world.dataset.groups == 3 else " "
    return sep.join(names[t] for t in world.dataset.contexts[j])


def concept_color(world: World, k: int) -> str:
    """Blue for the target concept, then orange, green, ... for the others in index order."""
    if k == world.config.target:
        return TARGET_COLOR
    rank = k - (k > world.config.target)
    return OTHER_COLORS[rank % len(OTHER_COLORS)]


def figure_context(world: World) -> int:
    """A context outside T whose target tokens bump at alpha > 0 and off-target ones do not (Fig. 3)."""
    ds, in_T = world.dataset, world.in_T
    best, best_score = None, -np.inf
    for j in world.checked:
        if ds.context_concept[j] == world.config.target:
            continue
        peaks = laws.bump_peaks(ds.p[j], world.M)
        positive = np.isfinite(peaks) & (peaks > 0) & (peaks < world.config.alpha_max)
        score = int((positive & in_T).sum()) - int((positive & ~in_T).sum())
        if score > best_score:
            best, best_score = int(j), score
    return int(world.checked[0]) if best is None else best


def _context(world: World, context: int | None) -> int:
    """The figure context: the given index (checked), or `figure_context`."""
    if context is None:
        return figure_context(world)
    if not 0 <= context < world.dataset.m:
        raise InputError(f"--context {context} is not in 0..{world.dataset.m - 1}")
    return int(context)


def fig_dataset_probabilities(world: World) -> Figure:
    """Fig. 2: p(z|c_j) for a context of C_1 (solid) and one of C_2 (transparent); a_z > b_z."""
    ds = world.dataset
    names = token_labels(world)
    first, second = _fig2_contexts(world)
    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(ds.vocab_size)
    colors = [concept_color(world, k) for k in ds.token_concept]
    for j, alpha, offset in ((second, 0.3, 0.12), (first, 1.0, -0.12)):
        ax.vlines(x + offset, 0, ds.p[j], colors=colors, alpha=alpha, lw=2)
        ax.scatter(x + offset, ds.p[j], c=colors, alpha=alpha, s=40, zorder=3,
                   label=f"c = {context_label(world, j)} (concept {ds.context_concept[j]})")
    ax.set_xticks(x, names)
    ax.set_xlabel("next token z")
    ax.set_ylabel("p(z | c)")
    ax.set_title(f"Fig. 2: dataset next-token probabilities ({ds.family}, eps={ds.eps:g})")
    ax.legend(frameon=False)
    return fig


def _fig2_contexts(world: World) -> tuple[int, int]:
    """Eq. (2)'s aab (in C_1) and ABB (in C_2) when they exist; else the first context of each."""
    ds = world.dataset
    if ds.vocab_size == 9 and ds.groups == 3 and ds.context_length == 4:
        rows = {tuple(c): j for j, c in enumerate(ds.contexts.tolist())}
        if (0, 0, 1) in rows and (3, 4, 4) in rows:
            return rows[(0, 0, 1)], rows[(3, 4, 4)]
    return int(ds.contexts_of(0)[0]), int(ds.contexts_of(1)[0])


def fig_probability_increase(world: World, context: int | None = None, negative: bool = False) -> Figure:
    """Fig. 3 (alpha > 0) / Fig. B.1 (alpha < 0): Delta p(z|c_j, alpha) per token, peaks alpha_(j,z) marked."""
    ds, in_T = world.dataset, world.in_T
    j = _context(world, context)
    alphas = world.alphas[world.alphas <= 0] if negative else world.alphas[world.alphas >= 0]
    delta = world.trained_steered_probs(j, alphas) - world.trained_p[j][None, :]
    peaks = laws.bump_peaks(ds.p[j], world.M)
    names = token_labels(world)
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.axhline(0, color="0.7", lw=0.8)
    for z in range(ds.vocab_size):
        color = TARGET_COLOR if in_T[z] else OFF_COLOR
        ax.plot(alphas, delta[:, z], color=color, lw=1.6)
        a = peaks[z]
        if np.isfinite(a) and alphas.min() <= a <= alphas.max():
            height = laws.probability_increase(ds.p[j], world.M, a)[0, z]
            ax.axvline(a, color=color, ls=":", lw=0.8, alpha=0.7)
            ax.plot([a], [height], "o", color=color, mec="black", ms=6, zorder=4)
            ax.annotate(f"α({j},{names[z]})", (a, height), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.plot([], [], color=TARGET_COLOR, label="target tokens T")
    ax.plot([], [], color=OFF_COLOR, label="off-target tokens")
    ax.plot([], [], "o", color="white", mec="black", label="peak α(j,z) (Thm 3.3)")
    ax.set_xlabel("steering strength α")
    ax.set_ylabel("Δp(z | c_j, α)")
    which = "Fig. B.1" if negative else "Fig. 3"
    ax.set_title(f"{which}: context {context_label(world, j)} (j={j}, concept {ds.context_concept[j]}), "
                 f"target concept {world.config.target}")
    ax.legend(frameon=False, fontsize=8)
    return fig


def fig_concept_increase(world: World, context: int | None = None) -> Figure:
    """Fig. 4: Delta p(C|alpha) of every concept (trained), with Thm 3.6's tanh form and limits."""
    ds = world.dataset
    j = _context(world, context)
    alphas = world.alphas
    trained = laws.concept_means(world.trained_steered_probs(j) - world.trained_p[j][None, :], ds.token_concept,
                                 ds.groups)
    top, bottom = laws.extremal_sets(world.M)
    fig = Figure(figsize=(7.6, 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.axhline(0, color="0.7", lw=0.8)
    for k in range(ds.groups):
        mask = ds.concept_mask(k)
        is_target = k == world.config.target
        color = concept_color(world, k)
        label = f"concept {k}" + (" (target T)" if is_target else "")
        ax.plot(alphas, trained[:, k], color=color, lw=2.2, alpha=0.8, label=label)
        ax.plot(alphas, laws.concept_increase_tanh(ds.p[j], world.M, alphas, mask), color="black", ls="--", lw=0.9)
        if not is_target and not (mask & (top | bottom)).any():
            ax.axhline(laws.concept_increase_limit(ds.p[j], mask), color=color, ls=":", lw=1)
    ax.plot([], [], color="black", ls="--", lw=0.9, label="tanh form (Thm 3.6)")
    ax.plot([], [], color="0.4", ls=":", lw=1, label="limit -mean p (Thm 3.6)")
    ax.set_xlabel("steering strength α")
    ax.set_ylabel("Δp(C | c_j, α)")
    ax.set_title(f"Fig. 4: concept increases, context {context_label(world, j)} (j={j}, concept {ds.context_concept[j]})")
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def fig_delta_cross_entropy(world: World) -> Figure:
    """Fig. 5: Delta CE(alpha) of the trained UFM near 0 and Thm 3.8's quadratic c alpha^2."""
    ds = world.dataset
    # Thm 3.8 is local: show the eighth of the grid around 0.
    alphas = np.linspace(-1.0, 1.0, 201) * world.config.alpha_max / 8
    delta_ce = world.trained_delta_ce(alphas)
    coef = laws.ce_quadratic_coefficient(ds.p, ds.pi, world.M)
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(alphas, delta_ce, color=TARGET_COLOR, lw=2, label="ΔCE(α), trained UFM")
    ax.plot(alphas, coef * alphas**2, color="black", lw=1.2, label=f"{coef:.3f} α²  (Thm 3.8)")
    top = float(delta_ce.max())
    ax.set_ylim(-0.05 * top, 1.15 * top)
    ax.set_xlabel("steering strength α")
    ax.set_ylabel("ΔCE(α)")
    ax.set_title("Fig. 5: cross-entropy increase and its local quadratic")
    ax.legend(frameon=False)
    return fig


def save_theory_figure(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    """A UFM figure as `stem`.png and `stem`.pdf (io.write_figure at 150 dpi)."""
    return write_figure(fig, out_dir, stem, dpi=150)


def make_figures(world: World, out_dir: str | Path, context: int | None = None) -> list[Path]:
    """All figures: fig2_dataset, fig3_delta_p, figB1_delta_p_negative, fig4_concept_increase, fig5_delta_ce."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir} is a file; give a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    j = _context(world, context)
    figures = {
        "fig2_dataset": fig_dataset_probabilities(world),
        "fig3_delta_p": fig_probability_increase(world, j),
        "figB1_delta_p_negative": fig_probability_increase(world, j, negative=True),
        "fig4_concept_increase": fig_concept_increase(world, j),
        "fig5_delta_ce": fig_delta_cross_entropy(world),
    }
    paths: list[Path] = []
    for stem, fig in figures.items():
        paths += save_theory_figure(fig, out_dir, stem)
    return paths
