"""Concept datasets of Sec. 2.1: V tokens in G concepts, single-concept contexts, p(z|c) = a_z or b_z.

Three families (all satisfy Assumption 1 or its App. B.1 generalisation):

- ``b1``: a_z = (1-eps)/s, b_z = eps/((G-1)s)                      (App. B.1, the default)
- ``b3``: a_z = (1-eps) gamma_z, b_z = eps omega_z/(G-1)          (App. B.3, simplex weights per concept)
- ``context``: a_{j,z} = (1-eps) gamma_{j,z}, b_z as in ``b3``    (App. B.1: a depends on the context)

A `ConceptDataset` is the exact distribution over (distinct context, next token): weights `pi` per
context and rows `p` of next-token probabilities. Training on it gives the expected loss of a
sampled dataset; `sample_pairs` + `empirical_dataset` give the sampled dataset of Def. 2.1 itself.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from steerstrength.errors import InputError

FAMILIES = ("b1", "b3", "context")
MAX_CONTEXTS = 100_000  # the UFM holds one embedding per distinct context
_WEIGHT_TRIES = 1000


@dataclass(frozen=True)
class ConceptDataset:
    """Def. 2.1: next-token probabilities p(z|c_j) over the m distinct contexts, with weights pi_j."""

    family: str
    vocab_size: int  # V
    groups: int  # G
    context_length: int  # T: contexts hold T-1 tokens
    eps: float
    token_concept: np.ndarray  # (V,) concept index of each token
    contexts: np.ndarray  # (m, T-1) token ids; every context lies in one concept
    context_concept: np.ndarray  # (m,)
    p: np.ndarray  # (m, V) float64, rows sum to 1
    pi: np.ndarray  # (m,) float64, sums to 1 (App. B.5)
    gamma: np.ndarray | None = None  # (V,) b3, or (m, V) context; in-concept simplex weights
    omega: np.ndarray | None = None  # (V,) off-concept simplex weights
    n_pairs: int | None = None  # set for a sampled dataset

    @property
    def size(self) -> int:
        """s = V/G, tokens per concept."""
        return self.vocab_size // self.groups

    @property
    def m(self) -> int:
        """Number of distinct contexts."""
        return len(self.pi)

    def concept_mask(self, k: int) -> np.ndarray:
        """Boolean (V,) mask of the tokens of concept C_k."""
        return self.token_concept == k

    def contexts_of(self, k: int) -> np.ndarray:
        """Indices j of the contexts lying in concept C_k."""
        return np.flatnonzero(self.context_concept == k)


def dataset_entropy(ds: ConceptDataset) -> float:
    """App. B.1 / B.5: sum_j pi_j H(p(.|c_j)), the lower bound of the cross-entropy."""
    p = ds.p
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return float(-(ds.pi * plogp.sum(axis=1)).sum())


def validate_shape(vocab_size: int, groups: int, context_length: int, eps: float) -> int:
    """Check a (V, G, T, eps) configuration of Sec. 2.1 / App. B.1 and return s = V/G."""
    if groups < 2:
        raise InputError(f"groups G={groups} must be at least 2 (concepts need an outside); use G >= 2")
    if vocab_size < groups or vocab_size % groups:
        raise InputError(f"G={groups} does not divide V={vocab_size}; choose V a multiple of G (V = G*s)")
    if context_length < 2:
        raise InputError(f"context length T={context_length} must be >= 2 (contexts hold T-1 tokens)")
    upper = (groups - 1) / groups
    if not (0.0 < eps < upper):
        raise InputError(f"eps={eps} must lie in (0, (G-1)/G) = (0, {upper:.4g}) so that a_z > b_z")
    s = vocab_size // groups
    m = groups * s ** (context_length - 1)
    if m > MAX_CONTEXTS:
        raise InputError(
            f"G*s^(T-1) = {m} distinct contexts is over {MAX_CONTEXTS}; lower the size s or the context length T"
        )
    return s


def all_contexts(vocab_size: int, groups: int, context_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Sec. 2.1: every context of T-1 tokens drawn from a single concept, and that concept."""
    s = vocab_size // groups
    per = np.array(list(itertools.product(range(s), repeat=context_length - 1)), dtype=np.int64)
    contexts = np.concatenate([per + k * s for k in range(groups)])
    concept = np.repeat(np.arange(groups), len(per))
    return contexts, concept


def random_simplex_weights(rng: np.random.Generator, groups: int, s: int) -> np.ndarray:
    """App. B.3: (V,) weights on the simplex of each concept, half uniform, half Dirichlet(1).

    The uniform half keeps every weight >= 1/(2s): tiny probabilities would make the UFM's
    unregularised training crawl (curvature of the loss along a logit scales with its probability).
    """
    return (0.5 / s + 0.5 * rng.dirichlet(np.ones(s), size=groups)).reshape(-1)


def concept_dataset(
    family: str = "b1",
    vocab_size: int = 9,
    groups: int = 3,
    context_length: int = 4,
    eps: float = 0.05,
    *,
    gamma: np.ndarray | None = None,
    omega: np.ndarray | None = None,
    seed: int = 0,
) -> ConceptDataset:
    """Def. 2.1 + Assumption 1: the exact dataset of family b1, b3 (App. B.3) or context (App. B.1).

    For ``b3`` and ``context``, weights not given are drawn uniformly on the simplex (seeded) and
    redrawn until a > b holds; given weights that break a > b raise `InputError`.
    """
    if family not in FAMILIES:
        raise InputError(f"unknown family {family!r}; use one of {', '.join(FAMILIES)}")
    s = validate_shape(vocab_size, groups, context_length, eps)
    contexts, context_concept = all_contexts(vocab_size, groups, context_length)
    m = len(contexts)
    token_concept = np.arange(vocab_size) // s
    same = context_concept[:, None] == token_concept[None, :]
    rng = np.random.default_rng(seed)

    if family == "b1":
        a = np.full(vocab_size, (1 - eps) / s)
        b = np.full(vocab_size, eps / ((groups - 1) * s))
        p = np.where(same, a[None, :], b[None, :])
        gamma_out = omega_out = None
    else:
        omega_out = _simplex(omega, "omega", rng, groups, s, None)
        b = eps * omega_out / (groups - 1)
        if family == "b3":
            gamma_out = _simplex(gamma, "gamma", rng, groups, s, b / (1 - eps))
            a = (1 - eps) * gamma_out
            p = np.where(same, a[None, :], b[None, :])
        else:
            gamma_out = _context_simplex(gamma, rng, context_concept, s, b / (1 - eps))
            p = np.where(same, (1 - eps) * gamma_out, b[None, :])

    check_assumption_1(p, token_concept, context_concept)
    return ConceptDataset(
        family=family,
        vocab_size=vocab_size,
        groups=groups,
        context_length=context_length,
        eps=float(eps),
        token_concept=token_concept,
        contexts=contexts,
        context_concept=context_concept,
        p=p.astype(np.float64),
        pi=np.full(m, 1.0 / m),
        gamma=gamma_out,
        omega=omega_out,
    )


def _simplex(w, name, rng, groups, s, floor) -> np.ndarray:
    """Per-concept simplex weights (V,): validated if given, else drawn with every w_z > floor_z."""
    if w is not None:
        w = np.asarray(w, dtype=np.float64).reshape(-1)
        if w.shape != (groups * s,) or np.any(w <= 0) or np.any(w >= 1):
            raise InputError(f"{name} must hold V={groups * s} weights in (0, 1)")
        if not np.allclose(w.reshape(groups, s).sum(axis=1), 1.0, atol=1e-12):
            raise InputError(f"{name} must sum to 1 within each concept (App. B.3)")
        return w
    for _ in range(_WEIGHT_TRIES):
        w = random_simplex_weights(rng, groups, s)
        if floor is None or np.all(w > floor):
            return w
    raise InputError("could not draw simplex weights with a_z > b_z; lower --eps")


def _context_simplex(gamma, rng, context_concept, s, floor) -> np.ndarray:
    """(m, V) in-concept weights gamma_{j,z}, zero outside the context's concept."""
    m = len(context_concept)
    V = len(floor)
    if gamma is not None:
        g = np.asarray(gamma, dtype=np.float64)
        if g.shape != (m, V):
            raise InputError(f"gamma for family 'context' must have shape (m, V) = ({m}, {V})")
        return g
    g = np.zeros((m, V))
    for j, k in enumerate(context_concept):
        cols = slice(k * s, (k + 1) * s)
        for _ in range(_WEIGHT_TRIES):
            w = random_simplex_weights(rng, 1, s)
            if np.all(w > floor[cols]):
                g[j, cols] = w
                break
        else:
            raise InputError("could not draw context weights with a_(j,z) > b_z; lower --eps")
    return g


def check_assumption_1(p: np.ndarray, token_concept: np.ndarray, context_concept: np.ndarray) -> float:
    """Assumption 1 (App. B.1 form): p(z|c_j) = b_z off-concept, > b_z in-concept; returns min a - b."""
    if np.any(~np.isfinite(p)) or np.any(p <= 0) or np.any(p >= 1):
        raise InputError("next-token probabilities must lie in (0, 1) (Assumption 1)")
    if not np.allclose(p.sum(axis=1), 1.0, atol=1e-12):
        raise InputError("each row p(.|c_j) must sum to 1")
    same = context_concept[:, None] == token_concept[None, :]
    b = np.where(same, np.nan, p)
    b_z = np.nanmax(b, axis=0)
    if not np.allclose(np.nanmin(b, axis=0), b_z, rtol=1e-12, atol=0):
        raise InputError("p(z|c_j) must equal one value b_z for every context outside z's concept (Assumption 1)")
    a_min = np.where(same, p, np.inf).min(axis=0)
    margin = float((a_min - b_z).min())
    if margin <= 0:
        raise InputError("a_z <= b_z for some token: Assumption 1 needs a_z > b_z; lower eps or fix the weights")
    return margin


@dataclass(frozen=True)
class SampledPairs:
    """n training pairs (c_i, z_i) of Sec. 2.1, with c_i given as an index into the exact dataset."""

    context_index: np.ndarray  # (n,)
    next_token: np.ndarray  # (n,)
    contexts: np.ndarray  # (n, T-1) token ids


def sample_pairs(ds: ConceptDataset, n: int, seed: int = 0) -> SampledPairs:
    """Sec. 2.1: draw n pairs (c_i, z_i): c_i ~ pi, then z_i ~ p(.|c_i)."""
    if n < 1:
        raise InputError(f"n={n} pairs: sample at least one pair")
    rng = np.random.default_rng(seed)
    j = rng.choice(ds.m, size=n, p=ds.pi)
    # Inverse-CDF sampling of the next token, row by row, vectorised.
    cdf = np.cumsum(ds.p[j], axis=1)
    z = (rng.random(n)[:, None] > cdf).sum(axis=1)
    z = np.minimum(z, ds.vocab_size - 1)
    return SampledPairs(context_index=j, next_token=z, contexts=ds.contexts[j])


def empirical_dataset(ds: ConceptDataset, pairs: SampledPairs) -> ConceptDataset:
    """Def. 2.1: empirical p(z|c_j) and pi_j (App. B.5) over the distinct contexts seen in `pairs`."""
    seen, inverse = np.unique(pairs.context_index, return_inverse=True)
    counts = np.zeros((len(seen), ds.vocab_size))
    np.add.at(counts, (inverse, pairs.next_token), 1.0)
    per_context = counts.sum(axis=1)
    return ConceptDataset(
        family=ds.family,
        vocab_size=ds.vocab_size,
        groups=ds.groups,
        context_length=ds.context_length,
        eps=ds.eps,
        token_concept=ds.token_concept,
        contexts=ds.contexts[seen],
        context_concept=ds.context_concept[seen],
        p=counts / per_context[:, None],
        pi=per_context / per_context.sum(),
        gamma=None if ds.gamma is None or ds.gamma.ndim == 1 else ds.gamma[seen],
        omega=ds.omega,
        n_pairs=len(pairs.next_token),
    )
