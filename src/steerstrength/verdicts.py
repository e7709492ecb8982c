"""Verdicts a researcher can trust: every law is a number, the rule that judged it, its 95% interval, and the same
number for the controls (random directions of v's norm at the same layer, vectors.random_controls).

Two kinds, said apart (docs/fidelity.md, "Controls and verdicts"):
- generic: whether a law holds as the theory states it, for v and for the random directions. A law that holds for
  random directions too is a property of steering, not of the concept (in the UFM, log p_alpha(z) is concave in
  alpha for any direction, so unimodal curves say nothing about the concept).
- concept-specific: an effect size of v against the control distribution, with a seeded bootstrap 95% interval
  over the sampling units (contexts for the token curves, prompts for the generations); for the Delta CE curvature,
  whose controls are the units, a 95% prediction interval of the controls' log-curvature.

A verdict compares the interval with the rule's threshold: `agrees` when the whole interval is past it, `disagrees`
when the whole interval is short of it, `inconclusive` when it contains the threshold; then `n_more` says how many
more units would decide, from the interval's width (the half-width shrinks as 1/sqrt(n)).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    from steerstrength.run_tables import RunTables

AGREES, DISAGREES, INCONCLUSIVE = "agrees", "disagrees", "inconclusive"
GENERIC, SPECIFIC = "generic", "concept-specific"

# The rules: (claim, statistic, threshold, what it means). One home: the report prints them, the tests read them.
UNIMODAL_SHARE = 0.75  # Thm 3.3 as stated: at least 75% of the dominating tokens' curves are unimodal
CONCEPT_WORD_LEAD = 0.10  # v's top-8 at alpha_max hold 10 points more concept words than random directions' do
TARGET_LATER_LEAD = 0.10  # target bumps peak after off-target ones 10 points more often than under random directions
SPEARMAN_LEAD = 0.20  # Spearman(M, peak alpha) at least 0.2 above the random directions'
CONCEPT_RISE_LEAD = 0.10  # the judge finds the concept 10 points more often under v than under random steering
CURVATURE_RATIO = 1.25  # v's Delta CE curvature differs from random directions' by more than x1.25 (either way)
N_DOMINANT = 8
MIN_UNITS = 3  # fewer sampling units than this decide nothing (a bootstrap of 2 values is no interval)
Z95 = 1.959963984540054

RULES = {
    "Thm 3.3 (unimodal curves)": (GENERIC, f"the share of unimodal Δp curves among the top-{N_DOMINANT} tokens at "
                                           f"α_max (mean over contexts) is at least {UNIMODAL_SHARE:.0%}"),
    "concept words lead at α_max": (SPECIFIC, f"v's share of concept words (top 5% of M) among the top-{N_DOMINANT} "
                                              f"at α_max exceeds the random directions' by more than "
                                              f"{CONCEPT_WORD_LEAD:.2f}"),
    "target tokens peak after off-target ones": (SPECIFIC, f"the fraction of (target, off-target) bump pairs where the "
                                                           f"target peaks later exceeds the random directions' by more "
                                                           f"than {TARGET_LATER_LEAD:.2f} (0.5 where a direction has "
                                                           "no pair)"),
    "Spearman(M, peak α)": (SPECIFIC, f"the rank correlation of M with the peak α of bump tokens exceeds the random "
                                      f"directions' by more than {SPEARMAN_LEAD:.2f} (0 where undefined)"),
    "concept probability rises under v": (SPECIFIC, f"the judge's rate at α_max exceeds its rate under random "
                                                    f"directions of the same strength (its false-positive baseline) by "
                                                    f"more than {CONCEPT_RISE_LEAD:.2f}"),
    "Thm 3.6 (sigmoidal rise)": (GENERIC, "the pooled curve is monotone (|Spearman| ≥ 0.8, 95% interval over prompts) "
                                          "and sigmoidal (tanh fit R² ≥ 0.8)"),
    "ΔCE curvature against controls": (SPECIFIC, f"log κ_v lies outside the random directions' log κ by more than "
                                                 f"log {CURVATURE_RATIO} (95% prediction interval of a random "
                                                 "direction)"),
    "Thm 3.8 (positive curvature)": (GENERIC, "the curvature of ΔCE at α = 0 is positive"),
    "MMLU (Fig. A.6)": (GENERIC, "accuracy at both ends of the α grid is at most the unsteered accuracy (the smaller "
                                 "drop, 95% interval over questions, above 0)"),
}


@dataclass
class Verdict:
    """One row of verdicts.parquet."""

    concept: str
    layer: int
    claim: str
    kind: str  # generic or concept-specific
    direction: str  # v, random (the controls pooled), or v-vs-random (an effect)
    verdict: str
    estimate: float  # the statistic (generic) or the effect v - controls (concept-specific)
    low: float
    high: float
    threshold: float
    v: float  # v's value of the statistic
    controls: float  # the random directions' mean
    controls_sd: float  # their spread (sd over directions)
    n: int  # sampling units behind the interval
    unit: str  # contexts, prompts, directions
    n_controls: int
    n_more: float  # inconclusive: more units that would decide (inf: none would); else 0
    wider: str  # what dominates the interval: "units" (contexts, prompts) or "directions" (raise controls.n_random)
    rule: str
    why: str


def decide(low: float, high: float, threshold: float, *, two_sided: bool = False) -> str:
    """agrees when the interval is past the threshold, disagrees when short of it, else inconclusive.
    two_sided: past means outside [-threshold, threshold], short means inside it."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return INCONCLUSIVE
    if two_sided:
        if low > threshold or high < -threshold:
            return AGREES
        if -threshold < low and high < threshold:
            return DISAGREES
        return INCONCLUSIVE
    if low > threshold:
        return AGREES
    if high < threshold:
        return DISAGREES
    return INCONCLUSIVE


def more_samples(estimate: float, low: float, high: float, threshold: float, n: int, *,
                 two_sided: bool = False) -> float:
    """Units to add so that an interval of this centre no longer contains the threshold: the half-width h shrinks
    as 1/sqrt(n), so n' = n (h / |estimate - threshold|)^2. inf when the estimate sits on the threshold."""
    half = (high - low) / 2
    gap = abs(abs(estimate) - threshold) if two_sided else abs(estimate - threshold)
    if not (math.isfinite(half) and n > 0) or gap == 0:
        return math.inf
    return float(max(0, math.ceil(n * (half / gap) ** 2) - n))


def bootstrap_mean(values: np.ndarray, n_boot: int, seed: int) -> tuple[float, float, float]:
    """(mean, 2.5%, 97.5%) of the mean of `values` [n] (NaN dropped) over units resampled with replacement."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan, math.nan, math.nan
    if x.size == 1:
        return float(x[0]), -math.inf, math.inf  # one unit: no interval
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    return float(x.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def effect_verdict(v_units: Sequence[float], control_units: np.ndarray, threshold: float, *, n_boot: int = 2000,
                   seed: int = 0, fill: float = math.nan) -> dict:
    """Concept-specific: the effect v - controls per unit (a context, a prompt), its bootstrap 95% interval over
    units, and the verdict against `threshold`.

    Args:
        v_units: v's statistic per unit [n].
        control_units: the random directions' statistic per direction and unit [K, n] (the same units).
        fill: a value standing for a control's undefined statistic (NaN: dropped from its mean).
    """
    v = np.asarray(v_units, dtype=np.float64)
    c = np.atleast_2d(np.asarray(control_units, dtype=np.float64))
    if fill == fill:
        c = np.where(np.isfinite(c), c, fill)
    with np.errstate(invalid="ignore"):
        c_unit = np.nanmean(c, axis=0) if c.size else np.full(v.shape, math.nan)
        per_direction = np.nanmean(c, axis=1) if c.size else np.zeros(0)
    per_direction = per_direction[np.isfinite(per_direction)]
    effect = v - c_unit
    est, low, high = bootstrap_mean(effect, n_boot, seed)
    n = int(np.isfinite(effect).sum())
    k = per_direction.size
    if k >= 2 and math.isfinite(low):
        # v is one direction: the interval also holds where one more random direction would fall (the 95%
        # prediction interval of the controls' means, t_{K-1} sd sqrt(1 + 1/K)), added in quadrature
        from scipy.stats import t as student

        spread = float(student.ppf(0.975, k - 1)) * float(per_direction.std(ddof=1)) * math.sqrt(1 + 1 / k)
        below, above = est - low, high - est
        low, high = est - math.hypot(below, spread), est + math.hypot(above, spread)
        wider = "directions" if spread > max(below, above) else "units"
    else:
        wider = "units"
    verdict = decide(low, high, threshold) if n >= MIN_UNITS and k >= 2 else INCONCLUSIVE
    return dict(verdict=verdict, estimate=est, low=low, high=high, threshold=threshold,
                v=float(np.nanmean(v)) if np.isfinite(v).any() else math.nan,
                controls=float(per_direction.mean()) if per_direction.size else math.nan,
                controls_sd=float(per_direction.std(ddof=1)) if per_direction.size > 1 else math.nan,
                n=n, n_controls=int(c.shape[0]) if c.size else 0, wider=wider,
                n_more=_more(est, low, high, threshold, n) if verdict == INCONCLUSIVE else 0.0)


def _more(est, low, high, threshold, n) -> float:
    """more_samples, and at least what MIN_UNITS asks."""
    need = more_samples(est, low, high, threshold, n) if n >= 2 else math.inf
    return max(need, float(MIN_UNITS - n), 1.0)


def level_verdict(units: Sequence[float], threshold: float, *, n_boot: int = 2000, seed: int = 0) -> dict:
    """Generic: a statistic's mean over units against the law's threshold, with its bootstrap 95% interval."""
    est, low, high = bootstrap_mean(np.asarray(units, dtype=np.float64), n_boot, seed)
    n = int(np.isfinite(np.asarray(units, dtype=np.float64)).sum())
    verdict = decide(low, high, threshold) if n >= MIN_UNITS else INCONCLUSIVE
    return dict(verdict=verdict, estimate=est, low=low, high=high, threshold=threshold, n=n,
                n_more=_more(est, low, high, threshold, n) if verdict == INCONCLUSIVE else 0.0)


def outlier_verdict(v_value: float, control_values: Sequence[float], ratio: float) -> dict:
    """Concept-specific, when the controls are the units (one number per direction, e.g. the Delta CE curvature):
    log v - mean log controls, with the 95% prediction interval of one more random direction
    (t_{K-1} sd sqrt(1 + 1/K)), judged two-sided against log(ratio)."""
    from scipy.stats import t as student

    c = np.log(np.asarray([x for x in control_values if x is not None and x > 0], dtype=np.float64))
    k = c.size
    threshold = math.log(ratio)
    if v_value is None or not v_value > 0 or k < 2:
        est = math.log(v_value) - float(c.mean()) if (v_value and v_value > 0 and k) else math.nan
        return dict(verdict=INCONCLUSIVE, estimate=est, low=-math.inf, high=math.inf, threshold=threshold, n=k,
                    n_more=math.inf if k == 0 else 2 - k, controls=float(np.exp(c.mean())) if k else math.nan,
                    controls_sd=math.nan, v=v_value if v_value is not None else math.nan, n_controls=k)
    est = math.log(v_value) - float(c.mean())
    half = float(student.ppf(0.975, k - 1)) * float(c.std(ddof=1)) * math.sqrt(1 + 1 / k)
    low, high = est - half, est + half
    verdict = decide(low, high, threshold, two_sided=True)
    return dict(verdict=verdict, estimate=est, low=low, high=high, threshold=threshold, n=k,
                n_more=more_samples(est, low, high, threshold, k, two_sided=True) if verdict == INCONCLUSIVE else 0.0,
                controls=float(np.exp(c.mean())), controls_sd=float(c.std(ddof=1)), v=float(v_value), n_controls=k)


SIGMOID_SPEARMAN, SIGMOID_R2 = 0.8, 0.8  # Thm 3.6's rule (report.rule_concept): |Spearman| and tanh R^2 of the curve


def sigmoid_verdict(rows, cur: dict, *, n_boot: int, seed: int) -> dict:
    """Generic, Thm 3.6: the pooled curve's |Spearman(alpha, p)| over its non-degenerate fit range with a bootstrap
    95% interval over prompts (the curve recomputed from resampled prompts), against SIGMOID_SPEARMAN; the tanh fit's
    R^2 (a point estimate: one fit per resample would cost 12 starts each) must reach SIGMOID_R2 for "agrees".
    `rows`: concept_scores rows of one (layer, judge) and one direction or the controls pooled; `cur`: their
    curve_summary entry."""
    from scipy.stats import spearmanr

    span = cur.get("fit_range")
    fit = cur.get("tanh_fit_nondegenerate") or cur.get("tanh_fit") or {}
    r2 = fit.get("r2")
    rho = cur.get("spearman_rho_nondegenerate", cur.get("spearman_rho"))
    est = abs(rho) if rho is not None and math.isfinite(rho) else math.nan
    base = dict(estimate=est, low=math.nan, high=math.nan, threshold=SIGMOID_SPEARMAN, r2=r2,
                n=int(rows["prompt_index"].nunique()))
    if str(fit.get("status", "")).startswith("flat curve") and span is not None:
        # The judge's rate is the same at every fluent alpha: no rise at all (|rho| 0), however many prompts.
        return dict(base, estimate=0.0, low=0.0, high=0.0, verdict=DISAGREES, n_more=0.0)
    if span is None or r2 is None or not math.isfinite(est):
        return dict(base, verdict=INCONCLUSIVE, n_more=math.inf)
    inside = rows[rows["alpha"].between(*span)]
    rate = inside.groupby(["prompt_index", "alpha"])["judged"].mean().unstack("alpha")  # [prompts, alphas]
    R, alphas = rate.to_numpy(dtype=np.float64), rate.columns.to_numpy(dtype=np.float64)
    if R.shape[0] < MIN_UNITS or R.shape[1] < 3:
        return dict(base, verdict=INCONCLUSIVE, n_more=_more(est, -math.inf, math.inf, SIGMOID_SPEARMAN, R.shape[0]))
    rng = np.random.default_rng(seed)
    curves = np.nanmean(R[rng.integers(0, R.shape[0], size=(n_boot, R.shape[0]))], axis=1)  # [n_boot, alphas]
    flat = np.ptp(curves, axis=1) == 0  # a flat resampled curve rises nowhere: |rho| = 0
    rho_b = np.zeros(n_boot)
    if (~flat).any():
        ranked = spearmanr(np.vstack([alphas, curves[~flat]]), axis=1).statistic
        rho_b[~flat] = np.abs(np.atleast_2d(ranked)[0, 1:])
    low, high = float(np.quantile(rho_b, 0.025)), float(np.quantile(rho_b, 0.975))
    verdict = decide(low, high, SIGMOID_SPEARMAN)
    if verdict == AGREES and r2 < SIGMOID_R2:
        verdict = INCONCLUSIVE  # monotone beyond doubt, but the tanh does not fit the mean curve (yet)
    return dict(base, verdict=verdict, low=low, high=high,
                n_more=_more(est, low, high, SIGMOID_SPEARMAN, R.shape[0]) if verdict == INCONCLUSIVE else 0.0)


def accuracy_drop_verdict(per_question, *, n_boot: int, seed: int) -> dict:
    """Generic, Fig. A.6: the smaller of the accuracy drops at the two ends of the grid (unsteered minus steered),
    paired over questions, with a bootstrap 95% interval over questions; agrees when the interval is above 0 (both
    ends cost accuracy), disagrees when below. `per_question`: [questions, 2] drops (0/1 differences) at the ends."""
    d = np.asarray(per_question, dtype=np.float64)
    d = d[np.isfinite(d).all(axis=1)]
    n = d.shape[0]
    if n == 0:
        return dict(verdict=INCONCLUSIVE, estimate=math.nan, low=math.nan, high=math.nan, threshold=0.0, n=0,
                    n_more=math.inf)
    est = float(d.mean(axis=0).min())
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, n, size=(n_boot, n))].mean(axis=1).min(axis=1)
    low, high = float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))
    verdict = decide(low, high, 0.0) if n >= MIN_UNITS else INCONCLUSIVE
    return dict(verdict=verdict, estimate=est, low=low, high=high, threshold=0.0, n=n,
                n_more=_more(est, low, high, 0.0, n) if verdict == INCONCLUSIVE else 0.0)


# ----------------------------------------------------------------------------- statistics per unit, from the tables


def token_statistics(top, curves, M: np.ndarray, n_target: int, concept_fraction: float) -> "pd.DataFrame":
    """Per (layer, direction, context) of the tokens tables: unimodal share and concept-word share of the top-8 at
    alpha_max, the fraction of (target, off-target) bump pairs where the target peaks later, Spearman(M, peak).

    top: tokens_top rows (layer, direction, context_id, side, rank, token_id, shape); curves: one row per curve
    (layer, direction, context_id, token_id, peak_alpha, shape); M: log-odds over the vocabulary (Def. 3.2).
    """
    import pandas as pd
    from scipy.stats import spearmanr

    order = np.argsort(-M, kind="stable")
    target = set(order[:n_target].tolist())
    k = max(1, int(round(concept_fraction * M.size)))
    hi = float(np.sort(M)[-k])
    dom = top[(top["side"] == "alpha_max") & (top["rank"] < N_DOMINANT)]
    rows = []
    bumps = curves[curves["shape"] == "bump"]
    bump_groups = {key: g for key, g in bumps.groupby(["layer", "direction", "context_id"])}
    for (layer, direction, cid), g in dom.groupby(["layer", "direction", "context_id"]):
        ids = g["token_id"].to_numpy()
        row = dict(layer=int(layer), direction=direction, context_id=cid,
                   unimodal=float((g["shape"] != "other").mean()), concept_words=float((M[ids] >= hi).mean()),
                   target_later=math.nan, spearman=math.nan)
        b = bump_groups.get((layer, direction, cid))
        if b is not None and len(b):
            tid, peak = b["token_id"].to_numpy(), b["peak_alpha"].to_numpy(dtype=np.float64)
            is_t = np.array([t in target for t in tid])
            pt, po = peak[is_t], peak[~is_t]
            if pt.size and po.size:
                later = (pt[:, None] > po[None, :]).sum()
                ties = (pt[:, None] == po[None, :]).sum()
                row["target_later"] = float(later / (pt.size * po.size)) if ties < pt.size * po.size else math.nan
            ms = M[tid]
            if tid.size >= 3 and np.unique(ms).size > 1 and np.unique(peak).size > 1:
                row["spearman"] = float(spearmanr(ms, peak).statistic)
        rows.append(row)
    return pd.DataFrame(rows)


def _units(stats, layer: int, column: str) -> tuple[np.ndarray, np.ndarray, list]:
    """v's values per unit [n] and the controls' [K, n] on the same units (the contexts v has)."""
    s = stats[stats["layer"] == layer]
    wide = s.pivot_table(index="direction", columns="context_id", values=column, aggfunc="first", dropna=False)
    if "v" not in wide.index:
        return np.zeros(0), np.zeros((0, 0)), []
    controls = [d for d in wide.index if d != "v"]
    return wide.loc["v"].to_numpy(dtype=np.float64), wide.loc[controls].to_numpy(dtype=np.float64), controls


def pct(x: float) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.0f}%"


def num(x: float) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.2g}"


def _row(concept, layer, claim, direction, res: dict, why: str, unit: str) -> Verdict:
    kind, rule = RULES[claim]
    fields = dict(v=math.nan, controls=math.nan, controls_sd=math.nan, n_controls=0, wider="units")
    fields.update({k: res[k] for k in ("v", "controls", "controls_sd", "n_controls", "wider") if k in res})
    return Verdict(concept=concept, layer=int(layer), claim=claim, kind=kind, direction=direction,
                   verdict=res["verdict"], estimate=res["estimate"], low=res["low"], high=res["high"],
                   threshold=res["threshold"], n=res["n"], unit=unit, n_more=res["n_more"], rule=rule, why=why,
                   **fields)


def token_verdicts(concept: str, stats, *, n_boot: int, seed: int) -> list[Verdict]:
    """Thm 3.3 (generic, for v and for the controls) and the three concept-specific token claims, per layer."""
    out = []
    for layer in sorted(stats["layer"].unique()):
        v, c, controls = _units(stats, layer, "unimodal")
        if v.size == 0:
            continue
        k = len(controls)
        for direction, units in (("v", v), ("random", np.nanmean(c, axis=0) if k else np.zeros(0))):
            if direction == "random" and not k:
                continue
            res = level_verdict(units, UNIMODAL_SHARE, n_boot=n_boot, seed=seed)
            why = (f"unimodal curves among the top-{N_DOMINANT} at α_max: {pct(np.nanmean(v))} for v vs "
                   f"{pct(np.nanmean(c)) if k else '–'}"
                   f"{' ± ' + pct(np.nanstd(np.nanmean(c, axis=1), ddof=1)) if k > 1 else ''} for {k} random "
                   f"directions of the same norm at layer {layer}")
            res.update(v=float(np.nanmean(v)), controls=float(np.nanmean(c)) if k else math.nan, n_controls=k)
            out.append(_row(concept, layer, "Thm 3.3 (unimodal curves)", direction, res, why, "contexts"))
        for claim, column, threshold, fill, what in (
                ("concept words lead at α_max", "concept_words", CONCEPT_WORD_LEAD, math.nan,
                 "concept words among the top-8 at α_max"),
                ("target tokens peak after off-target ones", "target_later", TARGET_LATER_LEAD, 0.5,
                 "(target, off-target) bump pairs with the target peaking later"),
                ("Spearman(M, peak α)", "spearman", SPEARMAN_LEAD, 0.0, "Spearman(M, peak α), mean over contexts")):
            v, c, controls = _units(stats, layer, column)
            if not k:
                continue
            vv = np.where(np.isfinite(v), v, fill) if fill == fill else v
            res = effect_verdict(vv, c, threshold, n_boot=n_boot, seed=seed, fill=fill)
            show = pct if column != "spearman" else num
            why = (f"{what}: {show(res['v'])} for v vs {show(res['controls'])}"
                   f"{' ± ' + show(res['controls_sd']) if k > 1 else ''} for {k} random directions; effect "
                   f"{res['estimate']:+.2f} [{res['low']:+.2f}, {res['high']:+.2f}] over {res['n']} contexts")
            out.append(_row(concept, layer, claim, "v-vs-random", res, why, "contexts"))
    return out


def concept_verdicts(concept: str, scores, *, n_boot: int, seed: int) -> list[Verdict]:
    """The judge's rate at alpha_max under v against random directions' (per prompt), and Thm 3.6's rule for v and
    for the controls (generic). `scores`: concept_scores rows of every direction."""
    from steerstrength.metrics.concept import concept_curve, curve_summary

    out = []
    for (layer, judge), g in scores.groupby(["layer", "judge"]):
        top = g[g["alpha"] == g.groupby("direction")["alpha"].transform("max")]  # each direction's largest alpha
        per = top.groupby(["direction", "prompt_index"])["judged"].mean().unstack("prompt_index")
        if "v" not in per.index:
            continue
        controls = [d for d in per.index if d != "v"]
        if controls:
            res = effect_verdict(per.loc["v"].to_numpy(dtype=np.float64),
                                 per.loc[controls].to_numpy(dtype=np.float64), CONCEPT_RISE_LEAD, n_boot=n_boot,
                                 seed=seed)
            n_completions = int(len(top[top["direction"] == "v"]))
            why = (f"{judge} judge at α_max = {g['alpha'].max():.3g}: {pct(res['v'])} of v's completions vs "
                   f"{pct(res['controls'])} under {len(controls)} random direction(s) of the same strength (its "
                   f"false-positive rate); effect {res['estimate']:+.2f} [{res['low']:+.2f}, {res['high']:+.2f}] over "
                   f"{res['n']} prompts ({n_completions} completions)")
            out.append(_row(concept, layer, "concept probability rises under v", "v-vs-random", res, why, "prompts"))
        for direction, rows in (("v", g[g["direction"] == "v"]), ("random", g[g["direction"] != "v"])):
            if rows.empty:
                continue
            cur = next(iter(curve_summary(concept_curve(rows.drop(columns=["direction"]))).values()))
            res = dict(sigmoid_verdict(rows, cur, n_boot=n_boot, seed=seed), n_controls=len(controls))
            fit = cur.get("tanh_fit_nondegenerate") or cur.get("tanh_fit") or {}
            status = "" if fit.get("status") in (None, "ok") else f" (tanh fit: {fit['status']})"
            span = (f" [{res['low']:.2f}, {res['high']:.2f}] over {res['n']} prompts"
                    if math.isfinite(res["low"]) else "")
            why = (f"{judge} judge, {'v' if direction == 'v' else 'random directions pooled'}: |Spearman| "
                   f"{num(res['estimate'])}{span}, tanh R² {num(res['r2'])}{status}")
            out.append(_row(concept, layer, "Thm 3.6 (sigmoidal rise)", direction, res, why, "prompts"))
    return out


def xent_verdicts(summary: dict) -> list[Verdict]:
    """Thm 3.8 for v and the controls (generic), and v's curvature against the controls' (concept-specific)."""
    per_vector, controls = summary.get("per_vector") or {}, summary.get("controls") or {}
    out = []
    for key, s in per_vector.items():
        concept, layer = _key(key)
        kappa = (s.get("curvature") or {}).get("jvp")
        ck = [(c.get("curvature") or {}).get("jvp") for k, c in controls.items() if k.startswith(f"{key}/")]
        ck = [x for x in ck if x is not None]
        res = dict(outlier_verdict(kappa, ck, CURVATURE_RATIO), wider="directions")
        why = (f"ΔCE curvature at 0: κ = {num(kappa)} for v vs {num(res['controls'])} (geometric mean"
               f"{', log sd ' + num(res['controls_sd']) if len(ck) > 1 else ''}) for {len(ck)} random directions of "
               f"the same norm: ratio ×{num(math.exp(res['estimate'])) if math.isfinite(res['estimate']) else '–'}")
        out.append(_row(concept, layer, "ΔCE curvature against controls", "v-vs-random", res, why, "directions"))
        for direction, values in (("v", [kappa] if kappa is not None else []), ("random", ck)):
            if not values:
                continue
            share = float(np.mean([x > 0 for x in values]))
            res = dict(verdict=AGREES if share == 1 else DISAGREES if share == 0 else INCONCLUSIVE, estimate=share,
                       low=math.nan, high=math.nan, threshold=1.0, n=len(values), n_more=math.nan,
                       v=kappa if (kappa is not None and direction == "v") else math.nan,
                       controls=float(np.mean(ck)) if ck else math.nan, n_controls=len(ck))
            who = "(v)" if direction == "v" else "random directions"
            why = f"κ > 0 for {sum(x > 0 for x in values)} of {len(values)} {who}"
            out.append(_row(concept, layer, "Thm 3.8 (positive curvature)", direction, res, why, "directions"))
    return out


def question_drops(questions) -> dict:
    """{direction: [questions, 2]}: per question, correct at alpha = 0 minus correct at each end of the grid (the
    questions every alpha of the direction answered); `questions`: mmlu_questions rows of one (concept, layer)."""
    out = {}
    for direction, d in questions.groupby("direction"):
        wide = d.pivot_table(index=["subject", "question_index"], columns="alpha", values="correct", aggfunc="first")
        wide = wide.dropna()
        if 0.0 not in wide.columns or wide.shape[1] < 3:
            continue
        c = wide.to_numpy(dtype=np.float64)
        zero = c[:, list(wide.columns).index(0.0)][:, None]
        out[direction] = zero - c[:, [0, -1]]
    return out


def mmlu_verdicts(mmlu, questions=None, *, n_boot: int = 2000, seed: int = 0) -> list[Verdict]:
    """Fig. A.6's rule for v and for the random directions (generic): does steering hard cost accuracy in any
    direction? With the per-question table, the smaller of the two end drops with a paired bootstrap interval over
    questions (the controls' drops averaged over directions per question); else the share of directions whose both
    ends are at most the unsteered accuracy."""
    out = []
    acc = mmlu[mmlu["subject"] == "ALL"] if "subject" in mmlu.columns else mmlu
    for (concept, layer), g in acc.groupby(["concept", "layer"]):
        holds, at_chance = {}, False
        for direction, d in g.groupby("direction"):
            d = d.sort_values("alpha")
            zero = d[d["alpha"] == 0]
            if zero.empty:
                continue
            ends = d["accuracy"].iloc[[0, -1]].to_numpy()
            holds[direction] = bool((ends <= float(zero["accuracy"].iloc[0])).all())
            if "ci_low" in zero.columns and "random_guess" in zero.columns:  # report.rule_mmlu's "unclear"
                at_chance |= bool(zero["ci_low"].iloc[0] <= zero["random_guess"].iloc[0])
        controls = [h for d, h in holds.items() if d != "v"]
        drops = {}
        if questions is not None:
            q = questions[(questions["concept"] == concept) & (questions["layer"] == layer)]
            drops = question_drops(q)
        random_drops = [x for d, x in drops.items() if d != "v"]
        if random_drops and len({x.shape for x in random_drops}) == 1:
            drops["random"] = np.mean(random_drops, axis=0)
        for direction, values in (("v", [holds["v"]] if "v" in holds else []), ("random", controls)):
            if not values:
                continue
            share = float(np.mean(values))
            who = "(v)" if direction == "v" else "random directions"
            if direction in drops:
                res = accuracy_drop_verdict(drops[direction], n_boot=n_boot, seed=seed)
                why = (f"accuracy drop at the grid's ends (the smaller of the two, paired over {res['n']} questions"
                       f"{', averaged over the directions' if direction == 'random' else ''}): {res['estimate']:+.2f} "
                       f"[{res['low']:+.2f}, {res['high']:+.2f}]; both ends ≤ unsteered for {sum(values)} of "
                       f"{len(values)} {who}")
            else:
                word = AGREES if share == 1 else DISAGREES if share == 0 else INCONCLUSIVE
                res = dict(verdict=word, estimate=share, low=math.nan, high=math.nan, threshold=1.0, n=len(values),
                           n_more=math.nan)
                why = f"accuracy at both ends ≤ unsteered for {sum(values)} of {len(values)} {who}"
            if at_chance:
                res["verdict"] = INCONCLUSIVE
                why += ("; the unsteered accuracy's 95% interval reaches random guessing: no skill for steering to "
                        "remove")
            res["n_controls"] = len(controls)
            out.append(_row(concept, layer, "MMLU (Fig. A.6)", direction, res, why,
                            "questions" if direction in drops else "directions"))
    return out


def run_verdicts(run) -> "pd.DataFrame":
    """Every verdict of a run directory (run_tables.RunTables) as rows (the Verdict fields): the report renders them."""
    import pandas as pd

    from steerstrength.config import ControlsConfig
    from steerstrength.metrics.depth import CONCEPT_WORD_FRACTION

    cfg = run.manifest.get("config") or {}
    n_boot = int((cfg.get("controls") or {}).get("n_bootstrap") or ControlsConfig().n_bootstrap)
    seed = int(cfg.get("seed") or 0)
    rows: list[Verdict] = []
    lo = run.table("logodds")
    if run.has_directions("tokens_top") and run.has_directions("tokens") and lo is not None:
        top = run.table("tokens_top", columns=["concept", "layer", "direction", "context_id", "side", "rank",
                                               "token_id", "shape"], direction=None)
        curves = run.table("tokens", columns=["concept", "layer", "direction", "context_id", "token_id", "peak_alpha",
                                              "shape"], filters=[("shape", "==", "bump")], direction=None)
        n_target = {c: (a.get("definitions") or {}).get("n_target") or 100
                    for c, a in (run.summary("logodds") or {}).items()}
        for concept, t in top.groupby("concept"):
            lo_c = lo[lo["concept"] == concept].sort_values("token_id")
            # M from held-out texts when the run has them: M from v's own texts shares their noise with v
            held = "M_heldout" in lo_c.columns and bool(np.isfinite(lo_c["M_heldout"].to_numpy(dtype=float)).all())
            m = lo_c["M_heldout" if held else "M"].to_numpy(dtype=np.float64)
            if m.size == 0:
                continue
            cur = curves[curves["concept"] == concept].drop_duplicates(["layer", "direction", "context_id",
                                                                        "token_id"])
            stats = token_statistics(t, cur, m, n_target.get(concept, 100), CONCEPT_WORD_FRACTION)
            found = token_verdicts(concept, stats, n_boot=n_boot, seed=seed)
            for r in found:
                if r.kind == SPECIFIC:
                    r.why += ("; M from held-out texts" if held else
                              "; M from the texts v was built from (no held-out texts: shares their noise with v)")
            rows += found
    if run.has_directions("concept_scores"):
        scores = run.table("concept_scores", direction=None)
        for concept, g in scores.groupby("concept"):
            rows += concept_verdicts(concept, g, n_boot=n_boot, seed=seed)
    xent = run.summary("xent")
    if xent:
        rows += xent_verdicts(xent)
    if run.has_directions("mmlu"):
        questions = run.table("mmlu_questions", direction=None) if run.has_directions("mmlu_questions") else None
        rows += mmlu_verdicts(run.table("mmlu", direction=None), questions, n_boot=n_boot, seed=seed)
    columns = [f for f in Verdict.__dataclass_fields__]
    return pd.DataFrame([asdict(r) for r in rows], columns=columns)


# ----------------------------------------------------------------------------- the theory badges
# One home for each theory badge's rule (moved here from report.py, which only renders them): the report's findings
# print them, `badges` tabulates them (the cross-model report compares models with it).

def fmt(x: Any, digits: int = 3) -> str:
    """Numbers for people: 3 significant digits, integers as they are, None/NaN as a dash."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return "–"
        return f"{x:.{digits}g}"
    return str(x)


RULE_TOKENS = ("at least 75% of the dominating tokens' Δp curves are unimodal (a bump, or still increasing at "
               "α_max)")
RULE_CURVATURE = "the curvature of ΔCE at α = 0 (jvp) is positive"
RULE_PLATEAU = "ΔCE(α_edge) / ΔCE(α_edge/2) < 2 on both sides (a parabola gives 4, a plateau 1)"
RULE_MMLU = "accuracy at both ends of the α grid is at most the unsteered accuracy"


def rule_tokens(dom) -> bool | None:
    """Thm 3.3 on the top-8 rows at α_max (tokens_top, side alpha_max)."""
    n = len(dom)
    return (n - int((dom["shape"] == "other").sum())) >= 0.75 * n if n else None


def rule_limit(s: dict) -> bool | None:
    shrinks, reached = s.get("tv_shrinks", {}), s.get("limit_reached", {})
    return all(shrinks.values()) and all(reached.values()) if shrinks and reached else None


def rule_limit_text(s: dict) -> str:
    return (f"the mean TV to softmax(LN(±v) Wᵀ) decreases as |α| grows, on each side, down to at most "
            f"{fmt(s.get('reached_tv', 0.1))} at the largest |α|")


def rule_curvature(s: dict) -> bool | None:
    kappa = (s.get("curvature") or {}).get("jvp")
    return None if kappa is None else kappa > 0


def plateau_growth(s: dict) -> list:
    plateau = s.get("plateau") or {}
    return [plateau[side]["growth"] for side in ("negative", "positive") if side in plateau]


def rule_plateau(s: dict) -> bool | None:
    growth = plateau_growth(s)
    return None if not growth else all(g < 2 for g in growth)


def rule_concept(cur: dict) -> bool | None:
    """Thm 3.6 on one judge's pooled curve, over its non-degenerate range."""
    fit = cur.get("tanh_fit") or {}
    nd = cur.get("tanh_fit_nondegenerate") or fit
    r2 = nd.get("r2") if nd.get("status") == "ok" else None
    rho = cur.get("spearman_rho_nondegenerate", cur.get("spearman_rho"))
    return None if r2 is None or rho is None or not math.isfinite(rho) else (r2 >= 0.8 and abs(rho) >= 0.8)


def rule_concept_text(cur: dict) -> str:
    nd = cur.get("tanh_fit_nondegenerate") or cur.get("tanh_fit") or {}
    if str(nd.get("status", "")).startswith("too few alphas"):
        span = cur.get("fit_range") or [None, None]
        inside = sum(1 for a in cur.get("alpha") or [] if span[0] is not None and span[0] <= a <= span[1])
        return (f"not judged: the fluent (non-degenerate) range α ∈ [{fmt(span[0])}, {fmt(span[1])}] holds "
                f"{inside} grid points, too few for the 4-parameter tanh; rerun with a finer grid inside it (a smaller "
                "concept.alpha_max)")
    bad = cur.get("degenerate_alphas") or []
    where = (f" over the non-degenerate range α ∈ [{fmt((cur.get('fit_range') or [None])[0])}, "
             f"{fmt((cur.get('fit_range') or [None, None])[1])}]" if bad else "")
    return f"the pooled curve{where} is monotone (|Spearman| ≥ 0.8) and sigmoidal (tanh fit R² ≥ 0.8)"


def rule_mmlu(s: dict) -> tuple[bool | None, dict]:
    """(verdict, facts): accuracy at both ends at most the unsteered one; unclear when the unsteered accuracy's
    95% interval is not above random guessing (no skill for steering to remove)."""
    acc = s.get("accuracy") or {}
    alphas, values = acc.get("alpha") or [], acc.get("accuracy") or []
    at0 = next((v for a, v in zip(alphas, values) if a == 0), None)
    ends = [values[0], values[-1]] if values else []
    ok = None if at0 is None or not ends else all(e <= at0 for e in ends)
    i0 = alphas.index(0) if 0 in alphas else None
    lows, highs = acc.get("ci_low") or [], acc.get("ci_high") or []
    low = lows[i0] if i0 is not None and i0 < len(lows) else None
    high = highs[i0] if i0 is not None and i0 < len(highs) else None
    guess = s.get("random_guess", 0.25)
    at_chance = i0 is not None and low is not None and low <= guess
    return (None if at_chance else ok), dict(at0=at0, ends=ends, low=low, high=high, guess=guess, at_chance=at_chance)


def _key(key: str) -> tuple[str, int | None]:
    concept, _, layer = str(key).rpartition("/")
    return (concept, int(layer)) if layer.lstrip("-").isdigit() else (str(key), None)


def badges(run: "RunTables"):
    """Every theory badge of a run as rows (concept, layer, claim, verdict, rule): the report's verdicts as data."""
    import pandas as pd

    word = {True: "agrees", False: "disagrees", None: "unclear"}
    rows = []

    def add(concept, layer, claim, ok, rule):
        rows.append(dict(concept=concept, layer=layer, claim=claim, verdict=word[ok], rule=rule))

    top = run.table("tokens_top")
    if top is not None and not top.empty:
        for (concept, layer), g in top.groupby(["concept", "layer"], sort=False):
            add(concept, int(layer), "Thm 3.3", rule_tokens(g[(g["rank"] < 8) & (g["side"] == "alpha_max")]),
                RULE_TOKENS)
    for key, s in (run.summary("concept") or {}).items():
        for judge, cur in (s.get("curves") or {}).items():
            add(*_key(key), "Thm 3.6", rule_concept(cur),
                f"{judge}: {rule_concept_text(cur)}{judge_caveat(run, s, judge)}")
    for key, s in ((run.summary("xent") or {}).get("per_vector") or {}).items():
        add(*_key(key), "Thm 3.8", rule_curvature(s), RULE_CURVATURE)
        add(*_key(key), "Prop. 4.1 (ΔCE plateau)", rule_plateau(s), RULE_PLATEAU)
    for key, s in (run.summary("limit") or {}).items():
        add(*_key(key), "Prop. 4.1 (limit)", rule_limit(s), rule_limit_text(s))
    for key, s in ((run.summary("mmlu") or {}).get("per_vector") or {}).items():
        add(*_key(key), "MMLU (Fig. A.6)", rule_mmlu(s)[0], RULE_MMLU)
    return pd.DataFrame(rows, columns=["concept", "layer", "claim", "verdict", "rule"])


def judge_floor(run: "RunTables") -> float:
    from steerstrength.config import ConceptConfig

    floor = run.manifest.get("config", {}).get("concept", {}).get("judge_floor")
    return float(floor) if isinstance(floor, (int, float)) else ConceptConfig().judge_floor


def judge_caveat(run: "RunTables", s: dict, judge: str) -> str:
    """The warning set beside every concept-probability verdict whose judge measured below concept.judge_floor (or
    was not measured)."""
    acc = ((s.get("judge_accuracy") or {}).get(judge) or {}).get("balanced_accuracy")
    floor = judge_floor(run)
    if acc is None or not math.isfinite(acc):
        return f" — the {judge} judge's held-out accuracy was not measured: read this verdict with care"
    if acc < floor:
        return (f" — the {judge} judge measured balanced accuracy {acc:.2f} on held-out P/N, below the floor "
                f"{floor:.2f} (concept.judge_floor): this verdict rests on an unreliable judge")
    return ""
