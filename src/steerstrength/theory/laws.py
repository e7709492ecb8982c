"""Closed forms of Sec. 3 and App. B: how the steering strength alpha moves a perfectly trained UFM.

Every function takes next-token probabilities `p_j` (V,) of one context (or `p` (m, V) with
weights `pi`) and the log-odds `M` (V,) of Def. 3.2, in float64. They hold for any positive
`p_j` and any `M` (Lemma B.3 needs only Assumption 2), so the same functions evaluate the
dataset's closed form and, fed the trained model's own probabilities and log-odds, the trained
model exactly.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import brentq

TIE_TOL = 1e-9  # log-odds closer than this (relative to max(1, |M|)) count as the same value
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(8)


def logsumexp(w: np.ndarray, axis: int = -1, keepdims: bool = False) -> np.ndarray:
    """log sum exp along `axis`, shifted by the max (rows of -inf give -inf); plain numpy, fast."""
    top = np.max(w, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        out = top + np.log(np.sum(np.exp(w - top), axis=axis, keepdims=True))
    return out if keepdims else np.squeeze(out, axis=axis)


def log_odds(p: np.ndarray, P: np.ndarray, N: np.ndarray) -> np.ndarray:
    """Def. 3.2: M(z) = (1/q) log( prod_{i in P} p(z|c_i) / prod_{i in N} p(z|c_i) )."""
    P, N = np.asarray(P), np.asarray(N)
    if len(P) != len(N) or len(P) == 0:
        raise ValueError("Def. 3.2 needs |P| = |N| = q >= 1")
    return (np.log(p[P]).sum(axis=0) - np.log(p[N]).sum(axis=0)) / len(P)


def extremal_sets(M: np.ndarray, tol: float = TIE_TOL) -> tuple[np.ndarray, np.ndarray]:
    """Def. 3.2: boolean masks of argmax M (M-bar) and argmin M (M-underbar), ties within `tol`."""
    scale = max(1.0, float(np.abs(M).max()))
    return M >= M.max() - tol * scale, M <= M.min() + tol * scale


def steered_log_probs(p_j: np.ndarray, M: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Lemma B.3 in log space: log p(z|c_j) + alpha M(z) - log Z_j(alpha), shape (A, V)."""
    alphas = np.atleast_1d(np.asarray(alphas, dtype=np.float64))
    with np.errstate(divide="ignore"):
        w = np.log(p_j)[None, :] + alphas[:, None] * M[None, :]
    return w - logsumexp(w, axis=1, keepdims=True)


def steered_probs(p_j: np.ndarray, M: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Lemma B.3: sigma_z(f_alpha(c_j)) = p(z|c_j) e^{alpha M(z)} / sum_z' p(z'|c_j) e^{alpha M(z')}."""
    return np.exp(steered_log_probs(p_j, M, alphas))


def steered_logits_from_logits(logits: np.ndarray, P: np.ndarray, N: np.ndarray, j: int, alphas: np.ndarray) -> np.ndarray:
    """Lemma B.2: f_alpha(c_j) = l_j + (alpha/q) (sum_{i in P} l_i - sum_{i in N} l_i), shape (A, V)."""
    alphas = np.atleast_1d(np.asarray(alphas, dtype=np.float64))
    shift = (logits[P].sum(axis=0) - logits[N].sum(axis=0)) / len(P)
    return logits[j][None, :] + alphas[:, None] * shift[None, :]


def probability_increase(p_j: np.ndarray, M: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Def. 3.1 under Assumption 2: Delta p(z|c_j, alpha) = sigma_z(f_alpha(c_j)) - p(z|c_j), (A, V)."""
    return steered_probs(p_j, M, alphas) - p_j[None, :]


def expected_log_odds(p_j: np.ndarray, M: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Lemma B.5: E_{Z ~ sigma(f_alpha(c_j))}[M(Z)], shape (A,)."""
    return steered_probs(p_j, M, alphas) @ M


def log_odds_variance(p_j: np.ndarray, M: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Eq. (10): d/dalpha E_alpha[M(Z)] = Var_{Z ~ sigma(f_alpha(c_j))}(M(Z)), shape (A,)."""
    q = steered_probs(p_j, M, alphas)
    mean = q @ M
    return (q * (M[None, :] - mean[:, None]) ** 2).sum(axis=1)


def probability_increase_derivative(p_j: np.ndarray, M: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Lemma B.5: d/dalpha Delta p(z|c_j, alpha) = sigma_z(f_alpha(c_j)) (M(z) - E_alpha[M(Z)]), (A, V)."""
    q = steered_probs(p_j, M, alphas)
    return q * (M[None, :] - (q @ M)[:, None])


def bump_peaks(p_j: np.ndarray, M: np.ndarray, tol: float = TIE_TOL) -> np.ndarray:
    """Thm 3.3: alpha_(j,z) solving E_alpha[M(Z)] = M(z); +inf on argmax M, -inf on argmin M."""
    top, bottom = extremal_sets(M, tol)
    peaks = np.where(top, np.inf, np.where(bottom, -np.inf, np.nan))
    with np.errstate(divide="ignore"):
        logp = np.log(p_j)
    for z in np.flatnonzero(~(top | bottom)):
        gap = M - M[z]

        def excess(alpha: float, gap=gap) -> float:
            """E_alpha[M] - M(z) by Lemma B.3, strictly increasing in alpha (Eq. 10)."""
            w = logp + alpha * M
            e = np.exp(w - w.max())
            return float(e @ gap / e.sum())

        lo, hi = -1.0, 1.0
        while excess(hi) <= 0 and hi < 1e15:
            lo, hi = hi, 2 * hi
        while excess(lo) >= 0 and lo > -1e15:
            lo, hi = 2 * lo, lo
        peaks[z] = brentq(excess, lo, hi, xtol=1e-13, rtol=4 * np.finfo(float).eps, maxiter=500)
    return peaks


def probability_increase_limit(p_j: np.ndarray, M: np.ndarray, direction: int, tol: float = TIE_TOL) -> np.ndarray:
    """Prop. B.1, Eq. (5): lim_{alpha -> +-inf} Delta p = 1{z in M-bar} p(z|c_j) / sum_{M-bar} p - p(z|c_j)."""
    top, bottom = extremal_sets(M, tol)
    ext = top if direction > 0 else bottom
    return np.where(ext, p_j / p_j[ext].sum(), 0.0) - p_j


def saturating_alpha(M: np.ndarray, tol: float = TIE_TOL, decades: float = 50.0) -> float:
    """Prop. B.1: an |alpha| where non-extremal tokens carry at most ~e^{-50} of their mass."""
    top, bottom = extremal_sets(M, tol)
    gaps = []
    if (~top).any():
        gaps.append(M.max() - M[~top].max())
    if (~bottom).any():
        gaps.append(M[~bottom].min() - M.min())
    gap = min(gaps) if gaps else 1.0
    return float(min(decades / gap, 1e6))


def concept_increase(p_j: np.ndarray, M: np.ndarray, alphas: np.ndarray, token_concept: np.ndarray, groups: int) -> np.ndarray:
    """Def. 3.5: Delta p(C_k|c_j, alpha) = (1/|C_k|) sum_{z in C_k} Delta p(z|c_j, alpha), shape (A, G)."""
    return concept_means(probability_increase(p_j, M, alphas), token_concept, groups)


def concept_means(values: np.ndarray, token_concept: np.ndarray, groups: int) -> np.ndarray:
    """Def. 3.5 aggregation: mean of the last axis (V) over the tokens of each concept, (..., G)."""
    onehot = (token_concept[:, None] == np.arange(groups)[None, :]).astype(np.float64)
    return values @ onehot / onehot.sum(axis=0)


def concept_log_odds_means(p_j: np.ndarray, M: np.ndarray, alphas: np.ndarray, in_C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """App. B.4: mu_C(alpha) = E[M(Z) | Z in C] and mu_Cc(alpha) = E[M(Z) | Z not in C], each (A,)."""
    alphas = np.atleast_1d(np.asarray(alphas, dtype=np.float64))
    with np.errstate(divide="ignore"):
        w = np.log(p_j)[None, :] + alphas[:, None] * M[None, :]

    def conditional_mean(mask: np.ndarray) -> np.ndarray:
        """E[M(Z) | Z in mask] under Lemma B.3, in log space so no mass underflows."""
        wm = np.where(mask[None, :], w, -np.inf)
        return np.exp(wm - logsumexp(wm, axis=1, keepdims=True)) @ np.where(mask, M, 0.0)

    return conditional_mean(in_C), conditional_mean(~in_C)


def concept_nu(p_j: np.ndarray, M: np.ndarray, alphas: np.ndarray, in_C: np.ndarray) -> np.ndarray:
    """Thm 3.6: nu_j(alpha) = int_0^alpha (mu_C(t) - mu_Cc(t)) dt, by composite Gauss-Legendre, (A,)."""
    alphas = np.atleast_1d(np.asarray(alphas, dtype=np.float64))
    knots = np.unique(np.concatenate([[0.0], alphas]))
    # Panels of width 1/(2 (max M - min M)): the integrand is analytic with poles about
    # pi/(max M - min M) away, so 8-point Gauss-Legendre is exact to ~(1/(2 pi))^16 per panel.
    h = 0.5 / max(float(M.max() - M.min()), 1e-12)
    counts = np.maximum(1, np.ceil(np.diff(knots) / h).astype(np.int64))
    edges = np.concatenate([np.linspace(a, b, c + 1)[:-1] for a, b, c in zip(knots[:-1], knots[1:], counts)] + [knots[-1:]])
    half = np.diff(edges) / 2
    mid = (edges[:-1] + edges[1:]) / 2
    nodes = (mid[:, None] + half[:, None] * _GL_NODES[None, :]).reshape(-1)
    mu_c, mu_cc = concept_log_odds_means(p_j, M, nodes, in_C)
    panel = ((mu_c - mu_cc).reshape(-1, len(_GL_NODES)) @ _GL_WEIGHTS) * half
    at_edges = np.concatenate([[0.0], np.cumsum(panel)])
    knot_pos = np.concatenate([[0], np.cumsum(counts)])  # index of each knot among the edges
    at_knots = at_edges[knot_pos]
    at_knots -= at_knots[np.searchsorted(knots, 0.0)]
    return at_knots[np.searchsorted(knots, alphas)]


def concept_tanh_terms(p_j: np.ndarray, in_C: np.ndarray) -> tuple[float, float]:
    """Thm 3.6 / App. B.4: r_j = logit(sum_{z in C} p(z|c_j)) and r'_j = tanh(r_j / 2)."""
    F0 = float(p_j[in_C].sum())
    r = math.log(F0) - math.log1p(-F0)
    return r, math.tanh(r / 2)


def concept_increase_tanh(p_j: np.ndarray, M: np.ndarray, alphas: np.ndarray, in_C: np.ndarray) -> np.ndarray:
    """Thm 3.6: Delta p(C|alpha) = (1/(2|C|)) (tanh((nu_j(alpha) + r_j)/2) - r'_j), shape (A,)."""
    r, r_prime = concept_tanh_terms(p_j, in_C)
    nu = concept_nu(p_j, M, alphas, in_C)
    return (np.tanh((nu + r) / 2) - r_prime) / (2 * in_C.sum())


def concept_increase_limit(p_j: np.ndarray, in_C: np.ndarray) -> float:
    """Thm 3.6: lim_{alpha -> +-inf} Delta p(C'|alpha) = -(1/|C'|) sum_{z in C'} p(z|c_j)."""
    return -float(p_j[in_C].mean())


def delta_cross_entropy(p: np.ndarray, pi: np.ndarray, M: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Def. 3.7 under Assumption 2: Delta CE(alpha) = sum_j pi_j (log Z_j(alpha) - alpha E_{p_j}[M]), (A,)."""
    alphas = np.atleast_1d(np.asarray(alphas, dtype=np.float64))
    with np.errstate(divide="ignore"):
        logp = np.log(p)
    mean_M = np.where(p > 0, p * M[None, :], 0.0).sum(axis=1)
    out = np.empty(len(alphas))
    chunk = max(1, 4_000_000 // max(1, p.size))
    for s in range(0, len(alphas), chunk):
        a = alphas[s : s + chunk]
        lse = logsumexp(logp[None, :, :] + a[:, None, None] * M[None, None, :], axis=2)  # (a, m)
        out[s : s + chunk] = (lse - a[:, None] * mean_M[None, :]) @ pi
    return out


def ce_quadratic_coefficient(p: np.ndarray, pi: np.ndarray, M: np.ndarray) -> float:
    """Thm 3.8: the alpha^2 coefficient (1/2) sum_j pi_j Var_{Z ~ p(.|c_j)}(M(Z))."""
    mean = p @ M
    var = (p * (M[None, :] - mean[:, None]) ** 2).sum(axis=1)
    return 0.5 * float(pi @ var)


def sign_separation_margin(M: np.ndarray, in_T: np.ndarray) -> tuple[float, float]:
    """Lemma B.4: (min_{z in T} M(z), max_{z not in T} M(z)); the lemma says > 0 and <= 0."""
    off = float(M[~in_T].max()) if (~in_T).any() else -np.inf
    return float(M[in_T].min()), off


def remark_3_4_bound(M: np.ndarray, in_T: np.ndarray, eps: float, groups: int) -> float:
    """Remark 3.4 / App. B.3: F(eps) = min_{z in T} M(z) - eps/(G-1) log((1-eps)(G-1)/eps); > 0 suffices."""
    return float(M[in_T].min()) - eps / (groups - 1) * math.log((1 - eps) * (groups - 1) / eps)
