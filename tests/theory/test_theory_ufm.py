"""The trained UFM (Def. 2.2), steering sets (Sec. 2.2) and every claim checked on trained models."""

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from steerstrength.errors import InputError
from steerstrength.theory import laws
from steerstrength.theory.dataset import concept_dataset, dataset_entropy, empirical_dataset, sample_pairs
from steerstrength.theory.ufm import ufm_difference_of_means, steered_logits, steering_sets, train_ufm
from steerstrength.theory.verify import TheoryConfig, build_world, check_claims


def test_default_ufm_reaches_the_dataset_entropy_within_1e3():
    ds = concept_dataset()  # App. B.1 (training time: benchmarks/bench_load.py)
    ufm = train_ufm(ds)
    assert abs(ufm.final_loss - dataset_entropy(ds)) < 1e-3
    assert ufm.final_loss >= dataset_entropy(ds) - 1e-12  # the entropy is a lower bound
    assert ufm.W.shape == (9, 3) and ufm.H.shape == (3, 81)  # d = rank(log p) = G for App. B.1
    assert np.abs(ufm.probs() - ds.p).max() < 1e-6  # Assumption 2, essentially exactly


def test_ufm_trained_on_sampled_pairs_reaches_their_empirical_entropy():
    ds = concept_dataset("b1", vocab_size=6, groups=2, context_length=3, eps=0.2)
    emp = empirical_dataset(ds, sample_pairs(ds, 5_000, seed=0))
    ufm = train_ufm(emp, steps=4000)
    assert abs(ufm.final_loss - dataset_entropy(emp)) < 1e-3


def test_training_is_reproducible_and_seeded():
    ds = concept_dataset("b1", vocab_size=4, groups=2, context_length=2)
    a, b, c = train_ufm(ds, steps=50, seed=1), train_ufm(ds, steps=50, seed=1), train_ufm(ds, steps=50, seed=2)
    assert np.array_equal(a.W, b.W) and not np.array_equal(a.W, c.W)


def test_train_rejects_bad_arguments():
    ds = concept_dataset("b1", vocab_size=4, groups=2, context_length=2)
    for kwargs in (dict(d=0), dict(steps=0), dict(lr=0.0)):
        with pytest.raises(InputError):
            train_ufm(ds, **kwargs)


def test_steering_sets_random_and_contrastive():
    ds = concept_dataset()
    P, N = steering_sets(ds, target=1, q=6, negatives="random", seed=3)
    assert len(P) == len(N) == 6 and not set(P) & set(N)
    assert np.all(ds.context_concept[P] == 1) and np.all(ds.context_concept[N] != 1)
    P, N = steering_sets(ds, target=1, q=6, negatives="contrastive", seed=3)
    assert np.all(ds.context_concept[N] == 2)  # the next concept, cyclically
    P, N = steering_sets(ds, target=1, q=6, negatives="contrastive", opposite=0)
    assert np.all(ds.context_concept[N] == 0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(q=28), "contexts of the target concept"),
        (dict(q=0), "q=0"),
        (dict(negatives="contrastive", q=27, opposite=0), "opposite"),
        (dict(negatives="both"), "unknown negatives"),
        (dict(target=3), "target concept"),
    ],
)
def test_steering_sets_reject_impossible_requests(kwargs, message):
    with pytest.raises(InputError, match=message):
        steering_sets(concept_dataset(), **kwargs)


def test_q_larger_than_the_negative_pool_is_refused():
    ds = concept_dataset()
    keep = np.flatnonzero(ds.context_concept != 1)[:27].tolist() + ds.contexts_of(1)[:2].tolist()
    keep = np.array(sorted(keep))
    small = replace(ds, contexts=ds.contexts[keep], context_concept=ds.context_concept[keep], p=ds.p[keep],
                    pi=np.full(len(keep), 1 / len(keep)))
    with pytest.raises(InputError, match="2 available negative contexts"):
        steering_sets(small, target=0, q=3, negatives="contrastive")


def test_difference_of_means_and_steered_logits():
    rng = np.random.default_rng(0)
    W, H = rng.normal(size=(5, 3)), rng.normal(size=(3, 8))
    P, N = np.array([0, 2]), np.array([5, 7])
    v = ufm_difference_of_means(H, P, N)
    assert np.allclose(v, (H[:, 0] + H[:, 2]) / 2 - (H[:, 5] + H[:, 7]) / 2)

    class Model:
        pass

    model = Model()
    model.W, model.H = W, H
    out = steered_logits(model, v, 4, np.array([0.0, 2.0]))
    assert np.allclose(out[0], W @ H[:, 4]) and np.allclose(out[1], W @ (H[:, 4] + 2 * v))


@settings(max_examples=6, deadline=None)
@given(
    family=st.sampled_from(["b1", "b3", "context"]),
    groups=st.integers(2, 3),
    size=st.integers(2, 3),
    frac=st.floats(0.05, 0.8),
    negatives=st.sampled_from(["random", "contrastive"]),
    q=st.integers(1, 3),
    seed=st.integers(0, 100),
)
def test_every_claim_holds_on_small_trained_ufms(family, groups, size, frac, negatives, q, seed):
    cap = (groups - 1) / groups if family == "b1" else (groups - 1) / (groups + size)
    config = TheoryConfig(family=family, groups=groups, size=size, context_length=3, eps=frac * cap,
                          negatives=negatives, q=q, seed=seed, alpha_max=6.0, alpha_points=121)
    world = build_world(config)
    failed = [(c.reference, c.side, c.claim, c.value) for c in check_claims(world) if c.status == "fail"]
    assert failed == []


def test_checks_catch_an_untrained_model():
    """The trained-side rows are real checks: 30 Adam steps leave Assumption 2 and Lemma B.3 failing."""
    world = build_world(TheoryConfig(steps=30))
    failed = {(c.reference, c.side) for c in check_claims(world) if c.status == "fail"}
    assert ("Asm. 2", "trained") in failed
    assert ("Lemma B.3", "closed form") in failed
    assert ("Lemma B.2", "trained") not in failed  # an identity: holds for any W, H


def test_trained_model_peaks_match_closed_form():
    world = build_world(TheoryConfig(family="b3", negatives="contrastive"))
    j = int(world.checked[-1])
    closed = laws.bump_peaks(world.dataset.p[j], world.M)
    trained = laws.bump_peaks(world.trained_p[j], world.trained_M)
    finite = np.isfinite(closed)
    assert finite.any()
    assert np.array_equal(np.isinf(closed), np.isinf(trained))
    assert np.abs(closed[finite] - trained[finite]).max() < 1e-4
