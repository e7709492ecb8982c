"""Concept datasets (Def. 2.1, Assumption 1, App. B.1 / B.3): exact rows, sampled pairs, bad configs."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from steerstrength.errors import InputError
from steerstrength.theory.dataset import (
    check_assumption_1,
    concept_dataset,
    dataset_entropy,
    empirical_dataset,
    sample_pairs,
)
from steerstrength.theory.ufm import cross_entropy


def test_app_b1_default_entropy_is_the_papers_1_3317():
    ds = concept_dataset()  # V = 9, G = 3, T = 4, eps = 0.05: the vocabulary of Eq. (2)
    s, G, eps = 3, 3, 0.05
    closed = math.log(s) - (1 - eps) * math.log(1 - eps) - eps * math.log(eps) + eps * math.log(G - 1)
    assert dataset_entropy(ds) == pytest.approx(closed, abs=1e-12)
    assert abs(dataset_entropy(ds) - 1.3317) < 1e-4
    assert ds.m == 3 * 3**3 and ds.contexts.shape == (81, 3)


def test_b1_rows_take_the_two_values_a_and_b():
    ds = concept_dataset("b1", vocab_size=12, groups=4, context_length=3, eps=0.2)
    s = 3
    same = ds.context_concept[:, None] == ds.token_concept[None, :]
    assert np.allclose(ds.p[same], (1 - 0.2) / s)
    assert np.allclose(ds.p[~same], 0.2 / (3 * s))


def test_every_context_lies_in_one_concept():
    ds = concept_dataset("b3", vocab_size=8, groups=2, context_length=3, seed=3)
    assert np.all(ds.token_concept[ds.contexts] == ds.context_concept[:, None])


@settings(max_examples=40, deadline=None)
@given(
    family=st.sampled_from(["b1", "b3", "context"]),
    groups=st.integers(2, 5),
    size=st.integers(1, 4),
    length=st.integers(2, 3),
    frac=st.floats(0.01, 0.9),
    seed=st.integers(0, 1000),
)
def test_every_family_satisfies_assumption_1(family, groups, size, length, frac, seed):
    # b3 / context weights are >= 1/(2s), so a > b is guaranteed below eps = (G-1)/(G+s)
    cap = (groups - 1) / groups if family == "b1" else (groups - 1) / (groups + size)
    ds = concept_dataset(family, groups * size, groups, length, frac * cap, seed=seed)
    assert np.allclose(ds.p.sum(axis=1), 1.0)
    assert ds.pi.sum() == pytest.approx(1.0)
    assert check_assumption_1(ds.p, ds.token_concept, ds.context_concept) > 0
    if family == "b3":
        for k in range(groups):  # App. B.3: gamma and omega are simplex weights per concept
            assert ds.gamma[ds.concept_mask(k)].sum() == pytest.approx(1.0)
            assert ds.omega[ds.concept_mask(k)].sum() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(vocab_size=10, groups=3), "does not divide"),
        (dict(groups=1, vocab_size=3), "at least 2"),
        (dict(eps=0.0), "eps"),
        (dict(eps=2 / 3), "eps"),
        (dict(eps=-0.1), "eps"),
        (dict(context_length=1), "context length"),
        (dict(family="b2"), "unknown family"),
        (dict(vocab_size=60, groups=3, context_length=6), "distinct contexts"),
    ],
)
def test_invalid_configurations_raise_input_error(kwargs, message):
    with pytest.raises(InputError, match=message):
        concept_dataset(**kwargs)


def test_weights_with_a_not_above_b_are_refused():
    # gamma tiny on token 0 and omega large there: a_0 = 0.95 * 0.01 < b_0 = 0.05 * 0.98 / 2
    gamma = np.array([0.01, 0.495, 0.495] * 3)
    omega = np.array([0.98, 0.01, 0.01] * 3)
    with pytest.raises(InputError, match="a_z <= b_z"):
        concept_dataset("b3", gamma=gamma, omega=omega)


def test_weights_not_on_the_simplex_are_refused():
    with pytest.raises(InputError, match="sum to 1"):
        concept_dataset("b3", gamma=np.full(9, 0.5))


def test_sampled_pairs_give_empirical_frequencies_of_def_2_1():
    ds = concept_dataset("b3", vocab_size=6, groups=2, context_length=2, seed=1)
    pairs = sample_pairs(ds, 60_000, seed=2)
    emp = empirical_dataset(ds, pairs)
    assert emp.n_pairs == 60_000 and emp.m == ds.m  # 6 contexts: all seen
    # Def. 2.1 by hand for one context
    j = 4
    rows = pairs.context_index == j
    counts = np.bincount(pairs.next_token[rows], minlength=ds.vocab_size)
    assert np.allclose(emp.p[j], counts / rows.sum())
    assert emp.pi[j] == pytest.approx(rows.mean())
    # frequencies within 5 standard errors of the exact rows
    n_j = np.bincount(pairs.context_index, minlength=ds.m)[:, None]
    assert np.all(np.abs(emp.p - ds.p) < 5 * np.sqrt(ds.p * (1 - ds.p) / n_j) + 1e-12)


def test_exact_loss_is_the_expected_sampled_loss():
    ds = concept_dataset("b1", vocab_size=6, groups=3, context_length=3)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(ds.m, ds.vocab_size))
    exact = cross_entropy(logits, ds.p, ds.pi)
    pairs = sample_pairs(ds, 100_000, seed=1)
    log_sigma = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    per_pair = -log_sigma[pairs.context_index, pairs.next_token]
    standard_error = per_pair.std() / np.sqrt(len(per_pair))
    assert abs(per_pair.mean() - exact) < 4 * standard_error
    # ... and the sampled loss is the CE of the empirical dataset (Def. 2.1, App. B.5)
    emp = empirical_dataset(ds, pairs)
    seen = np.unique(pairs.context_index)
    assert cross_entropy(logits[seen], emp.p, emp.pi) == pytest.approx(per_pair.mean(), rel=1e-12)
