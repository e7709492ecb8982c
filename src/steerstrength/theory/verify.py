"""`steerstrength theory verify`: train a UFM, steer it, and check every claim of Sec. 3 both ways.

Each claim is checked on the closed form (dataset p and log-odds M, laws.py) and on the trained
model's own numbers (softmax of W(h_j + alpha v), and the same laws fed the model's own
probabilities). Rows report an error (must stay under the tolerance) or a margin (must be > 0).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from scipy.special import softmax

from steerstrength.errors import InputError
from steerstrength.theory import laws
from steerstrength.theory.dataset import ConceptDataset, concept_dataset, dataset_entropy
from steerstrength.theory.ufm import (
    UFM,
    cross_entropy,
    ufm_difference_of_means,
    steered_logits,
    steering_sets,
    train_ufm,
)

# Tolerances. PROB_TOL bounds how far the trained model may sit from the closed form (Assumption 2
# is approximate); the others are float64 round-off for identities, quadrature and differences.
TRAIN_GAP_TOL = 1e-3  # |final CE - entropy| (App. B.1)
PROB_TOL = 1e-6  # probabilities, Delta p, concept increases: trained vs closed form
IDENTITY_TOL = 1e-9  # exact algebraic identities, evaluated in float64
LOG_TOL = 1e-6  # log-probabilities: trained vs dataset (Assumption 2)
LOGODDS_TOL = 1e-6  # trained log-odds of zero-M tokens may sit this far above 0
PEAK_TOL = 1e-4  # alpha units: trained vs closed-form peak positions
COEF_RTOL = 1e-6  # relative: curvature of the trained Delta CE vs Thm 3.8 coefficient
FD_STEP = 2e-3  # alpha step of the finite differences of Delta CE at 0 (then Richardson)


@dataclass(frozen=True)
class TheoryConfig:
    """One UFM world: dataset (Sec. 2.1), UFM (Def. 2.2), steering sets (Sec. 2.2), alpha grid."""

    family: str = "b1"
    groups: int = 3
    size: int = 3
    context_length: int = 4
    eps: float = 0.05
    d: int | None = None  # default: rank of log p, the smallest d that fits (ufm.fitting_dimension)
    negatives: str = "random"
    q: int = 5  # odd: in the random setting with G = 3, N cannot split evenly, so argmin M is one concept
    target: int = 0
    seed: int = 0
    alpha_max: float = 8.0
    alpha_points: int = 401
    steps: int = 10_000
    lr: float = 0.1
    all_contexts: bool = False

    @property
    def vocab_size(self) -> int:
        """V = G s."""
        return self.groups * self.size


@dataclass
class World:
    """A trained, steered UFM with everything the checks and figures read."""

    config: TheoryConfig
    dataset: ConceptDataset
    ufm: UFM
    P: np.ndarray
    N: np.ndarray
    v: np.ndarray  # Eq. (3)
    M: np.ndarray  # Def. 3.2 on the dataset
    alphas: np.ndarray
    entropy: float
    trained_p: np.ndarray  # (m, V) softmax(W h_j)
    trained_M: np.ndarray  # Def. 3.2 on the trained model's probabilities
    checked: np.ndarray  # context indices j reported and checked per context
    peaks: dict = field(default_factory=dict)  # j -> (closed-form peaks, trained peaks)

    @property
    def in_T(self) -> np.ndarray:
        """Boolean (V,) mask of the target concept T."""
        return self.dataset.concept_mask(self.config.target)

    def trained_steered_probs(self, j: int, alphas: np.ndarray | None = None) -> np.ndarray:
        """softmax(W(h_j + alpha v)) on the grid (or given alphas), (A, V)."""
        alphas = self.alphas if alphas is None else np.atleast_1d(alphas)
        return softmax(steered_logits(self.ufm, self.v, j, alphas), axis=1)

    def trained_delta_ce(self, alphas: np.ndarray | None = None) -> np.ndarray:
        """Def. 3.7 on the trained model: CE(f_alpha) - CE(f) over the whole dataset, (A,)."""
        alphas = self.alphas if alphas is None else np.atleast_1d(alphas)
        ds = self.dataset
        base = self.ufm.logits()  # (m, V)
        shift = self.ufm.W @ self.v
        ce0 = cross_entropy(base, ds.p, ds.pi)
        return np.array([cross_entropy(base + a * shift[None, :], ds.p, ds.pi) - ce0 for a in alphas])


@dataclass(frozen=True)
class ClaimCheck:
    """One row of the verify table."""

    claim: str
    reference: str
    side: str  # "closed form", "trained", "dataset"
    status: str  # "pass", "fail", "skip"
    kind: str  # "error" (<= tolerance passes) or "margin" (> 0 passes)
    value: float | None
    tolerance: float | None = None
    note: str = ""


@dataclass
class Verification:
    world: World
    checks: list[ClaimCheck] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        """No row failed (skips do not count)."""
        return all(c.status != "fail" for c in self.checks)


def alpha_grid(alpha_max: float, points: int) -> np.ndarray:
    """A symmetric alpha grid with 0 exactly at its centre (grid.AlphaGrid.centred)."""
    from steerstrength.grid import AlphaGrid

    return AlphaGrid.centred(alpha_max, points).values.numpy()


def checked_contexts(ds: ConceptDataset, P: np.ndarray, N: np.ndarray) -> np.ndarray:
    """Representative contexts: per concept, one inside P (or N) and one outside the steering sets."""
    chosen: list[int] = []
    used = set(P.tolist()) | set(N.tolist())
    for k in range(ds.groups):
        members = ds.contexts_of(k)
        inside = [j for j in members if j in used]
        outside = [j for j in members if j not in used]
        chosen += inside[:1] + outside[:1]
    return np.array(sorted(set(chosen)), dtype=np.int64)


def build_world(config: TheoryConfig, progress: Callable[[int, float], None] | None = None) -> World:
    """Dataset (Def. 2.1) -> trained UFM (Def. 2.2) -> P, N and v (Eq. 3) -> log-odds (Def. 3.2)."""
    alphas = alpha_grid(config.alpha_max, config.alpha_points)
    if config.size < 1:
        raise InputError(f"--size {config.size} must be >= 1")
    from steerstrength.config import SEED_MAX

    if not 0 <= config.seed <= SEED_MAX:
        raise InputError(f"--seed must be in [0, {SEED_MAX}], not {config.seed}")
    ds = concept_dataset(
        config.family,
        vocab_size=config.vocab_size,
        groups=config.groups,
        context_length=config.context_length,
        eps=config.eps,
        seed=config.seed,
    )
    P, N = steering_sets(ds, config.target, config.q, config.negatives, seed=config.seed)
    ufm = train_ufm(ds, d=config.d, steps=config.steps, lr=config.lr, seed=config.seed, progress=progress)
    trained_p = ufm.probs()
    checked = np.arange(ds.m) if config.all_contexts else checked_contexts(ds, P, N)
    return World(
        config=config,
        dataset=ds,
        ufm=ufm,
        P=P,
        N=N,
        v=ufm_difference_of_means(ufm.H, P, N),
        M=laws.log_odds(ds.p, P, N),
        alphas=alphas,
        entropy=dataset_entropy(ds),
        trained_p=trained_p,
        trained_M=laws.log_odds(trained_p, P, N),
        checked=checked,
    )


# ---------------------------------------------------------------------------------------------
# the checks


def _error(claim, ref, side, value, tol, note="") -> ClaimCheck:
    """A row that passes when the measured error is at most `tol`."""
    ok = bool(np.isfinite(value) and value <= tol)
    return ClaimCheck(claim, ref, side, "pass" if ok else "fail", "error", float(value), tol, note)


def _margin(claim, ref, side, value, note="") -> ClaimCheck:
    """A row that passes when the measured margin is > 0."""
    ok = bool(value > 0)
    return ClaimCheck(claim, ref, side, "pass" if ok else "fail", "margin", float(value), None, note)


def _skip(claim, ref, side, note, value=None, kind="margin") -> ClaimCheck:
    """A row whose claim is vacuous or whose hypothesis does not hold here."""
    return ClaimCheck(claim, ref, side, "skip", kind, None if value is None else float(value), None, note)


def _peaks_both(w: World, j: int) -> tuple[np.ndarray, np.ndarray]:
    """Thm 3.3 peaks of context j: closed form, and the trained model's own (cached)."""
    if j not in w.peaks:
        w.peaks[j] = (laws.bump_peaks(w.dataset.p[j], w.M), laws.bump_peaks(w.trained_p[j], w.trained_M))
    return w.peaks[j]


def check_claims(w: World) -> list[ClaimCheck]:
    """Every claim of Sec. 2-3 and App. B, on the closed form and on the trained model."""
    ds, alphas = w.dataset, w.alphas
    in_T = w.in_T
    step = float(alphas[1] - alphas[0])
    rows: list[ClaimCheck] = []

    # --- data and training -------------------------------------------------------------------
    same = ds.context_concept[:, None] == ds.token_concept[None, :]
    a_min = np.where(same, ds.p, np.inf).min(axis=0)
    b_max = np.where(same, -np.inf, ds.p).max(axis=0)
    rows.append(_margin("a_z > b_z for every token", "Asm. 1", "dataset", (a_min - b_max).min()))
    gap = abs(w.ufm.final_loss - w.entropy)
    rows.append(_error("|final CE - dataset entropy|", "Asm. 2, App. B.1", "trained", gap, TRAIN_GAP_TOL,
                       f"entropy {w.entropy:.6f}, final CE {w.ufm.final_loss:.6f}"))
    # Log-probabilities, not probabilities: M (Def. 3.2) is built from logs, so small p matter.
    log_err = float(np.abs(np.log(w.trained_p) - np.log(ds.p)).max())
    rows.append(_error("log softmax(W h_j) = log p(z|c_j)", "Asm. 2", "trained", log_err, LOG_TOL,
                       "" if log_err <= LOG_TOL else "train longer: raise --steps"))

    # --- Lemmas B.2-B.4 ------------------------------------------------------------------------
    logits = w.ufm.logits()
    b2 = b3_self = b3_cross = 0.0
    for j in w.checked:
        direct = steered_logits(w.ufm, w.v, j, alphas)
        via = laws.steered_logits_from_logits(logits, w.P, w.N, j, alphas)
        b2 = max(b2, float(np.abs(direct - via).max() / max(1.0, np.abs(direct).max())))
        trained = softmax(direct, axis=1)
        b3_self = max(b3_self, float(np.abs(trained - laws.steered_probs(w.trained_p[j], w.trained_M, alphas)).max()))
        b3_cross = max(b3_cross, float(np.abs(trained - laws.steered_probs(ds.p[j], w.M, alphas)).max()))
    rows.append(_error("W(h_j + a v) = l_j + (a/q)(sum_P l - sum_N l)", "Lemma B.2", "trained", b2, IDENTITY_TOL,
                       "relative to max |logit|"))
    rows.append(_error("softmax(W(h_j + a v)) = p e^{aM}/Z, model's own p, M", "Lemma B.3", "trained", b3_self,
                       IDENTITY_TOL))
    rows.append(_error("closed form p e^{aM}/Z = trained steered probs", "Lemma B.3", "closed form", b3_cross,
                       PROB_TOL))
    lo, hi = laws.sign_separation_margin(w.M, in_T)
    scale = max(1.0, float(np.abs(w.M).max()))
    rows.append(_margin("z in T iff M(z) > 0", "Lemma B.4", "closed form",
                        lo if hi <= laws.TIE_TOL * scale else -hi, f"min_T M {lo:.4g}, max_Tc M {hi:.3g}"))
    lo_t, hi_t = laws.sign_separation_margin(w.trained_M, in_T)
    rows.append(_margin("z in T iff M(z) > 0", "Lemma B.4", "trained",
                        lo_t if hi_t <= LOGODDS_TOL else -hi_t, f"min_T M {lo_t:.4g}, max_Tc M {hi_t:.3g}"))

    # --- Thm 3.3 and Prop. B.1 -----------------------------------------------------------------
    rows += _check_bumps(w, step)
    rows += _check_limits(w)
    rows += _check_remark_3_4(w)

    # --- Thm 3.6 -------------------------------------------------------------------------------
    rows += _check_concepts(w)

    # --- Thm 3.8 -------------------------------------------------------------------------------
    rows += _check_cross_entropy(w)
    return rows


def _check_bumps(w: World, step: float) -> list[ClaimCheck]:
    """Thm 3.3: bump, peak order, monotone extremal tokens (Lemma B.5, Eq. 10)."""
    ds, alphas, in_T = w.dataset, w.alphas, w.in_T
    top, bottom = laws.extremal_sets(w.M)
    # Closed-form signs are read where they are representable: past alpha_sat (Prop. B.1) the
    # non-extremal mass is below e^-50 and float64 sees flat curves.
    core = alphas[np.abs(alphas) <= laws.saturating_alpha(w.M)]
    min_var = np.inf
    unfound = 0
    grid_dist = 0.0
    shape_err = 0.0
    peak_err = 0.0
    order_cf = order_tr = np.inf
    mono_cf = np.inf
    mono_tr = 0.0
    inside = 0
    for j in w.checked:
        p_j = ds.p[j]
        min_var = min(min_var, float(laws.log_odds_variance(p_j, w.M, core).min()))
        peaks, peaks_tr = _peaks_both(w, j)
        unfound += int(np.isnan(peaks).sum())
        delta_tr = w.trained_steered_probs(j) - w.trained_p[j][None, :]
        diffs = np.diff(delta_tr, axis=0)
        for z in np.flatnonzero(~(top | bottom)):
            if np.isfinite(peaks_tr[z]):
                peak_err = max(peak_err, abs(peaks_tr[z] - peaks[z]))
            else:
                peak_err = np.inf
            if alphas[0] + step < peaks[z] < alphas[-1] - step:
                inside += 1
                k = int(np.argmax(delta_tr[:, z]))
                grid_dist = max(grid_dist, abs(alphas[k] - peaks[z]))
                # rises up to the grid argmax, falls after it
                shape_err = max(shape_err, float(max(0.0, -diffs[:k, z].min(initial=0.0), diffs[k:, z].max(initial=0.0))))
        order_cf = min(order_cf, _order_margin(peaks, in_T))
        order_tr = min(order_tr, _order_margin(peaks_tr, in_T))
        # Extremal tokens: Lemma B.5's sign M(z) - E_alpha[M] never changes (closed form) ...
        q = laws.steered_probs(p_j, w.M, core)
        for z in np.flatnonzero(top & in_T):
            mono_cf = min(mono_cf, float((q @ np.where(top, 0.0, w.M[z] - w.M)).min()))
            mono_tr = max(mono_tr, float(max(0.0, -diffs[:, z].min())))
        for z in np.flatnonzero(bottom & ~in_T):
            mono_cf = min(mono_cf, float((q @ np.where(bottom, 0.0, w.M - w.M[z])).min()))
            mono_tr = max(mono_tr, float(max(0.0, diffs[:, z].max())))

    rows = []
    n_bump = int((~(top | bottom)).sum())
    if n_bump == 0:
        rows.append(_skip("unique bump for non-extremal tokens", "Thm 3.3", "closed form",
                          "every token is in argmax M or argmin M"))
    else:
        rows.append(_margin("E_a[M] strictly increasing => unique bump", "Thm 3.3, Eq. 10", "closed form",
                            min_var if unfound == 0 else -1.0,
                            f"min Var_a M(Z), |a| <= a_sat; {n_bump} non-extremal tokens" +
                            (f"; {unfound} peaks not found" if unfound else "")))
        rows.append(_error("peak alpha_(j,z): trained root vs closed form", "Thm 3.3", "trained", peak_err, PEAK_TOL))
        if inside:
            ok = grid_dist <= step and shape_err <= PROB_TOL
            rows.append(ClaimCheck("trained Delta p rises then falls; argmax within 1 grid step", "Thm 3.3", "trained",
                                   "pass" if ok else "fail", "error", grid_dist, step,
                                   f"{inside} peaks in grid; |argmax - peak|; shape err {shape_err:.1e}"))
        else:
            rows.append(_skip("trained Delta p rises then falls on the grid", "Thm 3.3", "trained",
                              "no finite peak inside the alpha grid; raise --alpha-max"))
    rows.append(_margin("alpha_(j,z') < alpha_(j,z) for z' off-target, z target", "Thm 3.3", "closed form", order_cf,
                        "min target peak - max off-target peak"))
    rows.append(_margin("alpha_(j,z') < alpha_(j,z) for z' off-target, z target", "Thm 3.3", "trained", order_tr,
                        "trained model's own peaks"))
    rows.append(_margin("T & argmax M increasing, Tc & argmin M decreasing", "Thm 3.3, Lemma B.5", "closed form",
                        mono_cf, "min |M(z) - E_a[M]|, |a| <= a_sat (ties in M count as equal)"))
    rows.append(_error("T & argmax M increasing, Tc & argmin M decreasing", "Thm 3.3", "trained", mono_tr, PROB_TOL,
                       "worst step against the claimed direction"))
    return rows


def _order_margin(peaks: np.ndarray, in_T: np.ndarray) -> float:
    """min_{z in T} alpha_(j,z) - max_{z' not in T} alpha_(j,z'), finite when one side is finite."""
    lo = peaks[in_T].min()
    hi = peaks[~in_T].max() if (~in_T).any() else -np.inf
    if np.isinf(lo) and np.isinf(hi):
        return np.inf if lo > hi else -np.inf
    return float(lo - hi)


def _check_limits(w: World) -> list[ClaimCheck]:
    """Prop. B.1: Delta p at +-alpha_sat against Eq. (5)."""
    ds = w.dataset
    a_sat = laws.saturating_alpha(w.M)
    err_cf = err_tr = 0.0
    for j in w.checked:
        for sign in (1, -1):
            limit = laws.probability_increase_limit(ds.p[j], w.M, sign)
            cf = laws.probability_increase(ds.p[j], w.M, sign * a_sat)[0]
            tr = w.trained_steered_probs(j, sign * a_sat)[0] - w.trained_p[j]
            err_cf = max(err_cf, float(np.abs(cf - limit).max()))
            err_tr = max(err_tr, float(np.abs(tr - limit).max()))
    note = f"at alpha = +-{a_sat:.4g}"
    return [
        _error("lim Delta p = 1{M-bar} p / p(M-bar) - p", "Prop. B.1", "closed form", err_cf, IDENTITY_TOL, note),
        _error("lim Delta p = 1{M-bar} p / p(M-bar) - p", "Prop. B.1", "trained", err_tr, PROB_TOL, note),
    ]


def _check_remark_3_4(w: World) -> list[ClaimCheck]:
    """Remark 3.4: target peaks are positive for contexts outside T (App. B.3, eps small enough)."""
    ds, cfg, in_T = w.dataset, w.config, w.in_T
    claim, ref = "target peaks > 0 for contexts outside T", "Remark 3.4"
    if ds.family == "context":
        return [_skip(claim, ref, "closed form", "stated for App. B.3 datasets (a_z not depending on j)")]
    bound = laws.remark_3_4_bound(w.M, in_T, ds.eps, ds.groups)
    outside = [j for j in w.checked if ds.context_concept[j] != cfg.target]
    rows = []
    for side in ("closed form", "trained"):
        low = np.inf
        for j in outside:
            peaks = _peaks_both(w, j)[0 if side == "closed form" else 1]
            finite = peaks[in_T][np.isfinite(peaks[in_T])]
            low = min(low, float(finite.min())) if finite.size else low
        note = f"min finite target peak, contexts outside T; F(eps) = {bound:.4g}"
        if np.isinf(low):
            note = f"no finite target peak (all target tokens in argmax M); F(eps) = {bound:.4g}"
        if bound > 0:
            rows.append(_margin(claim, ref, side, low, note))
        else:
            rows.append(_skip(claim, ref, side, "hypothesis F(eps) > 0 of App. B.3 not met; lower --eps; " + note, low))
    return rows


def _check_concepts(w: World) -> list[ClaimCheck]:
    """Thm 3.6: tanh form, increasing target concept, limits, decreasing low-log-odds concepts."""
    ds, cfg, alphas = w.dataset, w.config, w.alphas
    in_T = w.in_T
    top, bottom = laws.extremal_sets(w.M)
    a_sat = laws.saturating_alpha(w.M)
    tanh_cf = tanh_tr = 0.0
    inc_cf = np.inf
    inc_tr = 0.0
    lim_cf = lim_tr = 0.0
    dec_cf = 0.0
    dec_tr = 0.0
    limit_concepts = [k for k in range(ds.groups)
                      if k != cfg.target and not (ds.concept_mask(k) & (top | bottom)).any()]
    tie = laws.TIE_TOL * max(1.0, float(np.abs(w.M).max()))
    decreasing = [k for k in range(ds.groups)
                  if k != cfg.target and w.M[ds.concept_mask(k)].max() <= w.M[~ds.concept_mask(k)].min() + tie]
    for j in w.checked:
        p_j = ds.p[j]
        cf = laws.concept_increase(p_j, w.M, alphas, ds.token_concept, ds.groups)
        tr = laws.concept_means(w.trained_steered_probs(j) - w.trained_p[j][None, :], ds.token_concept, ds.groups)
        for k in range(ds.groups):
            form = laws.concept_increase_tanh(p_j, w.M, alphas, ds.concept_mask(k))
            tanh_cf = max(tanh_cf, float(np.abs(form - cf[:, k]).max()))
            tanh_tr = max(tanh_tr, float(np.abs(form - tr[:, k]).max()))
        mu_t, mu_tc = laws.concept_log_odds_means(p_j, w.M, alphas, in_T)
        inc_cf = min(inc_cf, float((mu_t - mu_tc).min()))
        inc_tr = max(inc_tr, float(max(0.0, -np.diff(tr[:, cfg.target]).min())))
        for k in limit_concepts:
            mask = ds.concept_mask(k)
            for sign in (1, -1):
                limit = laws.concept_increase_limit(p_j, mask)
                c = laws.concept_increase(p_j, w.M, sign * a_sat, ds.token_concept, ds.groups)[0, k]
                t = laws.concept_means(w.trained_steered_probs(j, sign * a_sat) - w.trained_p[j][None, :],
                                       ds.token_concept, ds.groups)[0, k]
                lim_cf = max(lim_cf, abs(c - limit))
                lim_tr = max(lim_tr, abs(t - limit))
        for k in decreasing:
            mu_c, mu_cc = laws.concept_log_odds_means(p_j, w.M, alphas, ds.concept_mask(k))
            dec_cf = max(dec_cf, float((mu_c - mu_cc).max()))
            dec_tr = max(dec_tr, float(max(0.0, np.diff(tr[:, k]).max())))

    ref = "Thm 3.6"
    rows = [
        _error("Delta p(C|a) = (tanh((nu+r)/2) - r')/(2|C|), nu by quadrature", ref, "closed form", tanh_cf,
               IDENTITY_TOL, "vs Def. 3.5 from Lemma B.3, every concept"),
        _error("Delta p(C|a) = (tanh((nu+r)/2) - r')/(2|C|)", ref, "trained", tanh_tr, PROB_TOL,
               "tanh form vs trained concept increase"),
        _margin("Delta p(T|a) increasing", ref, "closed form", inc_cf, "min mu_T - mu_Tc on grid"),
        _error("Delta p(T|a) increasing", ref, "trained", inc_tr, PROB_TOL, "worst decrease on grid"),
    ]
    claim = "lim Delta p(C'|a) = -mean_{C'} p, C' without extremal tokens"
    if limit_concepts:
        note = f"concepts {limit_concepts} at alpha = +-{a_sat:.4g}"
        rows.append(_error(claim, ref, "closed form", lim_cf, IDENTITY_TOL, note))
        rows.append(_error(claim, ref, "trained", lim_tr, PROB_TOL, note))
    else:
        rows.append(_skip(claim, ref, "closed form", "no concept outside T avoids argmax/argmin M", kind="error"))
    claim = "Delta p(C|a) decreasing when max_C M <= min_Cc M"
    if decreasing:
        rows.append(_error(claim, ref, "closed form", dec_cf, tie,
                           f"concepts {decreasing}; max mu_C - mu_Cc on grid (<= 0 up to ties in M)"))
        rows.append(_error(claim, ref, "trained", dec_tr, PROB_TOL, "worst increase on grid"))
    else:
        rows.append(_skip(claim, ref, "closed form", "no concept has max_C M <= min_Cc M", kind="margin"))
    return rows


def _check_cross_entropy(w: World) -> list[ClaimCheck]:
    """Thm 3.8: Delta CE = c alpha^2 + o(alpha^2), no linear term, Delta CE > 0."""
    ds, alphas = w.dataset, w.alphas
    ref = "Thm 3.8"
    coef = laws.ce_quadratic_coefficient(ds.p, ds.pi, w.M)
    slope_cf, curv_cf = taylor_at_zero(lambda a: laws.delta_cross_entropy(ds.p, ds.pi, w.M, a))
    slope_tr, curv_tr = taylor_at_zero(w.trained_delta_ce)
    nonzero = alphas != 0
    min_cf = float(laws.delta_cross_entropy(ds.p, ds.pi, w.M, alphas[nonzero]).min())
    min_tr = float(w.trained_delta_ce(alphas[nonzero]).min())
    note = f"coefficient (1/2) sum_j pi_j Var_j M(Z) = {coef:.6g}"
    return [
        _error("Delta CE(a) = c a^2 + o(a^2): curvature at 0 vs c (relative)", ref, "closed form",
               abs(curv_cf - coef) / coef, COEF_RTOL, note),
        _error("Delta CE(a) = c a^2 + o(a^2): curvature at 0 vs c (relative)", ref, "trained",
               abs(curv_tr - coef) / coef, COEF_RTOL, note),
        _error("no linear term: Delta CE'(0) = 0", ref, "closed form", abs(slope_cf), PROB_TOL),
        _error("no linear term: Delta CE'(0) = 0", ref, "trained", abs(slope_tr), PROB_TOL),
        _margin("Delta CE(a) > 0 for a != 0 on the grid", ref, "closed form", min_cf),
        _margin("Delta CE(a) > 0 for a != 0 on the grid", ref, "trained", min_tr),
    ]


def taylor_at_zero(f: Callable[[np.ndarray], np.ndarray], h: float = FD_STEP) -> tuple[float, float]:
    """f'(0) and f''(0)/2 from central differences at h and h/2, Richardson-extrapolated (error O(h^4))."""
    left2, left, right, right2 = f(np.array([-h, -h / 2, h / 2, h]))
    slope = (4 * (right - left) / h - (right2 - left2) / (2 * h)) / 3
    half = (4 * (right + left) / (h * h / 2) - (right2 + left2) / (2 * h * h)) / 3
    return float(slope), float(half)


def verify(config: TheoryConfig, progress: Callable[[int, float], None] | None = None) -> Verification:
    """Build the world and run every check."""
    start = time.perf_counter()
    world = build_world(config, progress=progress)
    checks = check_claims(world)
    return Verification(world=world, checks=checks, seconds=time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# JSON


def _peak_list(peaks: np.ndarray) -> tuple[list, list]:
    """Thm 3.3 peaks for JSON: numbers (null at +-inf) and their signs."""
    values = [float(x) if np.isfinite(x) else None for x in peaks]
    signs = ["+inf" if x == np.inf else "-inf" if x == -np.inf else "finite" for x in peaks]
    return values, signs


def verification_json(result: Verification) -> dict:
    """The `--json` document: config, entropy, final loss, grid, per-context curves, checks."""
    w = result.world
    ds = w.dataset
    delta_ce = w.trained_delta_ce()
    coef = laws.ce_quadratic_coefficient(ds.p, ds.pi, w.M)
    contexts = []
    for j in w.checked:
        j = int(j)
        peaks, signs = _peak_list(laws.bump_peaks(ds.p[j], w.M))
        probs_trained = w.trained_steered_probs(j)
        contexts.append({
            "j": j,
            "tokens": ds.contexts[j].tolist(),
            "concept": int(ds.context_concept[j]),
            "p": w.trained_p[j].tolist(),
            "p_dataset": ds.p[j].tolist(),
            "M": w.M.tolist(),
            "peaks": peaks,
            "peak_signs": signs,
            "probs_trained": probs_trained.tolist(),
            "probs_closed_form": laws.steered_probs(ds.p[j], w.M, w.alphas).tolist(),
            "concept_increase": laws.concept_means(probs_trained - w.trained_p[j][None, :], ds.token_concept,
                                                   ds.groups).tolist(),
            "delta_ce": delta_ce.tolist(),
            "ce_quadratic_coefficient": coef,
        })
    config = asdict(w.config)
    config["vocab_size"] = w.config.vocab_size
    config["d"] = w.ufm.d
    return {
        "config": config,
        "entropy": w.entropy,
        "final_loss": w.ufm.final_loss,
        "train_seconds": w.ufm.seconds,
        "seconds": result.seconds,
        "passed": result.passed,
        "alphas": w.alphas.tolist(),
        "target_concept": int(w.config.target),
        "P": w.P.tolist(),
        "N": w.N.tolist(),
        "M": w.M.tolist(),
        "token_concept": ds.token_concept.tolist(),
        "delta_ce": delta_ce.tolist(),
        "ce_quadratic_coefficient": coef,
        "contexts": contexts,
        "checks": [asdict(c) for c in result.checks],
    }


def write_verification_json(result: Verification, path: str | Path) -> Path:
    """Write `verification_json` atomically (temp file beside `path`, then os.replace)."""
    from steerstrength.io import write_json

    return write_json(path, verification_json(result))
