"""Every claim of Sec. 3 and App. B on the closed forms, over random valid configurations.

These tests need no training: under Assumption 2 the steered model is Lemma B.3 of the dataset.
"""

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.special import softmax

from steerstrength.theory import laws
from steerstrength.theory.dataset import concept_dataset
from steerstrength.theory.ufm import ufm_difference_of_means, steering_sets

PROPERTY = settings(max_examples=30, deadline=None)
NOISE = 1e-13  # float64 round-off on probabilities of order 1


@st.composite
def worlds(draw, families=("b1", "b3", "context")):
    """A random valid dataset (Def. 2.1, Assumption 1) with steering sets P, N and log-odds M."""
    family = draw(st.sampled_from(families))
    groups = draw(st.integers(2, 4))
    size = draw(st.integers(1, 4))
    length = draw(st.integers(2, 3))
    cap = (groups - 1) / groups if family == "b1" else (groups - 1) / (groups + size)
    eps = draw(st.floats(0.01, 0.9)) * cap
    seed = draw(st.integers(0, 10_000))
    ds = concept_dataset(family, groups * size, groups, length, eps, seed=seed)
    negatives = draw(st.sampled_from(["random", "contrastive"]))
    target = draw(st.integers(0, groups - 1))
    q = draw(st.integers(1, size ** (length - 1)))
    P, N = steering_sets(ds, target, q, negatives, seed=seed)
    return ds, target, P, N, laws.log_odds(ds.p, P, N)


def one_context_per_concept(ds):
    return [int(ds.contexts_of(k)[0]) for k in range(ds.groups)]


@PROPERTY
@given(worlds())
def test_lemma_b4_target_tokens_are_exactly_the_positive_log_odds(world):
    ds, target, P, N, M = world
    in_T = ds.concept_mask(target)
    assert np.all(M[in_T] > 0)
    assert np.all(M[~in_T] <= 1e-12)
    top, bottom = laws.extremal_sets(M)
    assert np.all(in_T[top]) and not np.any(in_T[bottom])


@PROPERTY
@given(worlds())
def test_thm_3_3_unique_bump_for_non_extremal_tokens(world):
    ds, target, P, N, M = world
    top, bottom = laws.extremal_sets(M)
    assume((~(top | bottom)).any())
    for j in one_context_per_concept(ds):
        peaks = laws.bump_peaks(ds.p[j], M)
        for z in np.flatnonzero(~(top | bottom)):
            a = peaks[z]
            assert np.isfinite(a)
            grid = a + np.linspace(-6, 6, 241)
            dp = laws.probability_increase(ds.p[j], M, grid)[:, z]
            k = int(np.argmin(np.abs(grid - a)))
            assert np.all(np.diff(dp[: k + 1]) >= -NOISE)  # increasing up to the peak
            assert np.all(np.diff(dp[k:]) <= NOISE)  # decreasing after it
            # Lemma B.5: the derivative changes sign at the peak, from + to -
            slope = laws.probability_increase_derivative(ds.p[j], M, np.array([a - 1e-3, a + 1e-3]))[:, z]
            assert slope[0] > 0 > slope[1]


@PROPERTY
@given(worlds())
def test_thm_3_3_off_target_tokens_peak_before_target_tokens(world):
    ds, target, P, N, M = world
    in_T = ds.concept_mask(target)
    for j in one_context_per_concept(ds):
        peaks = laws.bump_peaks(ds.p[j], M)
        assert peaks[~in_T].max() < peaks[in_T].min()


@PROPERTY
@given(worlds())
def test_thm_3_3_extremal_tokens_are_monotone(world):
    ds, target, P, N, M = world
    in_T = ds.concept_mask(target)
    top, bottom = laws.extremal_sets(M)
    grid = np.linspace(-30, 30, 601)
    for j in one_context_per_concept(ds):
        dp = laws.probability_increase(ds.p[j], M, grid)
        for z in np.flatnonzero(top & in_T):
            assert np.all(np.diff(dp[:, z]) >= -NOISE)
        for z in np.flatnonzero(bottom & ~in_T):
            assert np.all(np.diff(dp[:, z]) <= NOISE)
        # strictly: the sign of Lemma B.5's derivative is fixed (the derivative at alpha = 0)
        slope = laws.probability_increase_derivative(ds.p[j], M, 0.0)[0]
        assert np.all(slope[top & in_T] > 0) and np.all(slope[bottom & ~in_T] < 0)


@PROPERTY
@given(worlds())
def test_prop_b1_limits(world):
    ds, target, P, N, M = world
    a = laws.saturating_alpha(M)
    for j in one_context_per_concept(ds):
        for sign in (1, -1):
            limit = laws.probability_increase_limit(ds.p[j], M, sign)
            got = laws.probability_increase(ds.p[j], M, sign * a)[0]
            assert np.abs(got - limit).max() < 1e-9
            assert limit.sum() == pytest.approx(0.0, abs=1e-12)  # mass moves, none is created


@PROPERTY
@given(worlds())
def test_thm_3_6_tanh_form_equals_the_concept_increase(world):
    ds, target, P, N, M = world
    grid = np.linspace(-8, 8, 81)
    for j in one_context_per_concept(ds):
        direct = laws.concept_increase(ds.p[j], M, grid, ds.token_concept, ds.groups)
        for k in range(ds.groups):
            form = laws.concept_increase_tanh(ds.p[j], M, grid, ds.concept_mask(k))
            assert np.abs(form - direct[:, k]).max() < 1e-9


@PROPERTY
@given(worlds())
def test_thm_3_6_target_concept_increases(world):
    ds, target, P, N, M = world
    grid = np.linspace(-20, 20, 401)
    for j in one_context_per_concept(ds):
        up = laws.concept_increase(ds.p[j], M, grid, ds.token_concept, ds.groups)[:, target]
        assert np.all(np.diff(up) >= -NOISE)
        mu_t, mu_tc = laws.concept_log_odds_means(ds.p[j], M, grid, ds.concept_mask(target))
        assert np.all(mu_t - mu_tc > 0)  # Eq. (12): the derivative is positive


@PROPERTY
@given(worlds())
def test_thm_3_6_limits_and_decrease_of_other_concepts(world):
    ds, target, P, N, M = world
    top, bottom = laws.extremal_sets(M)
    a = laws.saturating_alpha(M)
    grid = np.linspace(-20, 20, 401)
    tie = laws.TIE_TOL * max(1.0, np.abs(M).max())
    for j in one_context_per_concept(ds):
        for k in range(ds.groups):
            mask = ds.concept_mask(k)
            if k == target:
                continue
            if not (mask & (top | bottom)).any():
                limit = laws.concept_increase_limit(ds.p[j], mask)
                for sign in (1, -1):
                    got = laws.concept_increase(ds.p[j], M, sign * a, ds.token_concept, ds.groups)[0, k]
                    assert got == pytest.approx(limit, abs=1e-9)
            if M[mask].max() <= M[~mask].min() + tie:
                down = laws.concept_increase(ds.p[j], M, grid, ds.token_concept, ds.groups)[:, k]
                assert np.all(np.diff(down) <= NOISE)


@PROPERTY
@given(worlds())
def test_thm_3_8_delta_ce_is_locally_quadratic_with_the_stated_coefficient(world):
    ds, target, P, N, M = world
    c = laws.ce_quadratic_coefficient(ds.p, ds.pi, M)
    assert c > 0
    h = 1e-4
    up, down = laws.delta_cross_entropy(ds.p, ds.pi, M, np.array([h, -h]))
    assert (up + down) / (2 * h * h) == pytest.approx(c, rel=1e-5)
    # no linear term: the central slope is b + d h^2 + O(h^4); Richardson removes the cubic's d h^2
    slope = [np.diff(laws.delta_cross_entropy(ds.p, ds.pi, M, np.array([-t, t])))[0] / (2 * t) for t in (2e-3, 1e-3)]
    assert abs((4 * slope[1] - slope[0]) / 3) < 1e-9 * max(1.0, c)
    small = np.array([-0.1, -0.01, 0.01, 0.1])
    assert np.all(laws.delta_cross_entropy(ds.p, ds.pi, M, small) > 0)
    # the coefficient is (1/2) sum_j pi_j Var_j M(Z), computed here the long way
    var = [np.cov(M, aweights=ds.p[j], bias=True) for j in range(ds.m)]
    assert c == pytest.approx(0.5 * np.dot(ds.pi, var), rel=1e-10)


@PROPERTY
@given(worlds(families=("b1", "b3")))
def test_remark_3_4_target_bumps_are_at_positive_alpha_outside_T(world):
    ds, target, P, N, M = world
    in_T = ds.concept_mask(target)
    assume(laws.remark_3_4_bound(M, in_T, ds.eps, ds.groups) > 0)  # App. B.3's "eps small enough"
    for j in one_context_per_concept(ds):
        if ds.context_concept[j] == target:
            continue
        peaks = laws.bump_peaks(ds.p[j], M)[in_T]
        assert np.all(peaks > 0)


@PROPERTY
@given(worlds(), st.integers(0, 1000))
def test_lemmas_b2_b3_steering_a_perfect_ufm(world, seed):
    """Any W, H whose softmax is p (logits log p + beta_j) steer exactly as Lemma B.3 says."""
    ds, target, P, N, M = world
    rng = np.random.default_rng(seed)
    logits = np.log(ds.p) + rng.normal(size=(ds.m, 1)) * 3  # arbitrary per-context shift beta_j
    d = ds.vocab_size
    W = rng.normal(size=(ds.vocab_size, d))
    H = np.linalg.solve(W, logits.T)  # W H = logits^T exactly (W is invertible a.s.)
    v = ufm_difference_of_means(H, P, N)
    alphas = np.linspace(-5, 5, 11)
    for j in one_context_per_concept(ds):
        direct = (W @ (H[:, [j]] + v[:, None] * alphas[None, :])).T
        lemma_b2 = laws.steered_logits_from_logits(logits, P, N, j, alphas)
        assert np.abs(direct - lemma_b2).max() < 1e-8 * max(1.0, np.abs(direct).max())
        assert np.abs(softmax(direct, axis=1) - laws.steered_probs(ds.p[j], M, alphas)).max() < 1e-9


def test_peaks_of_b1_random_setting_by_hand():
    """B.1, q = 3, N = two contexts of C_1 and one of C_2: M = L on T, -2L/3 on C_1, -L/3 on C_2."""
    ds = concept_dataset("b1")
    P = ds.contexts_of(0)[:3]
    N = np.concatenate([ds.contexts_of(1)[:2], ds.contexts_of(2)[:1]])
    M = laws.log_odds(ds.p, P, N)
    L = np.log(((1 - 0.05) / 3) / (0.05 / 6))
    assert np.allclose(M, [L] * 3 + [-2 * L / 3] * 3 + [-L / 3] * 3)
    peaks = laws.bump_peaks(ds.p[0], M)
    assert np.all(peaks[:3] == np.inf) and np.all(peaks[3:6] == -np.inf)
    # C_2 tokens peak where E_alpha[M] = -L/3, solved here with the closed form of E_alpha[M]
    a = peaks[6]
    w = ds.p[0] * np.exp(a * M)
    assert (w @ M) / w.sum() == pytest.approx(-L / 3, abs=1e-10)
