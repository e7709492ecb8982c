"""The Unconstrained Features Model of Def. 2.2, its training, and difference-of-means steering (Eq. 3).

Training minimises the unregularised cross-entropy of Sec. 2.2 written per distinct context
(App. B.5): CE = -sum_j pi_j sum_z p(z|c_j) log softmax_z(W h_j). On the exact distribution this
is the expected loss of a sampled dataset; on `empirical_dataset` it is the sampled loss itself.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from scipy.special import log_softmax

from steerstrength.errors import InputError
from steerstrength.theory.dataset import ConceptDataset

NEGATIVE_SETTINGS = ("random", "contrastive")


@dataclass(frozen=True)
class UFM:
    """Def. 2.2: f(c_j) = W h_j with W in R^{V x d}, H = (h_1..h_m) in R^{d x m} (float64 copies)."""

    W: np.ndarray  # (V, d)
    H: np.ndarray  # (d, m)
    losses: np.ndarray = field(default_factory=lambda: np.zeros(0))  # loss per step
    final_loss: float = float("nan")
    seconds: float = 0.0

    @property
    def d(self) -> int:
        """Embedding dimension."""
        return self.W.shape[1]

    def logits(self) -> np.ndarray:
        """Def. 2.2: unsteered logits l_j = W h_j, as an (m, V) array."""
        return (self.W @ self.H).T

    def probs(self) -> np.ndarray:
        """softmax(W h_j): the trained model's next-token probabilities, (m, V)."""
        return np.exp(log_softmax(self.logits(), axis=1))


def cross_entropy(logits: np.ndarray, p: np.ndarray, pi: np.ndarray) -> float:
    """App. B.5: CE(f) = -sum_j pi_j sum_z p(z|c_j) log sigma_z(f(c_j)), logits (m, V)."""
    return float(-(pi * (p * log_softmax(logits, axis=1)).sum(axis=1)).sum())


def fitting_dimension(ds: ConceptDataset) -> int:
    """The smallest d this module guarantees fits the data: rank of the (m, V) matrix log p (V if p has zeros).

    Logits l_j = log p(.|c_j) fit exactly with d = rank(log p). A larger d fits too but trains
    far slower to high precision: the spare directions of W and H carry residuals that decay
    along tiny singular values (V = 100, G = 10: log-prob error 1e-2 at d = V, 1e-14 at d = G).
    """
    if np.any(ds.p <= 0):
        return ds.vocab_size
    return int(np.linalg.matrix_rank(np.log(ds.p)))


def train_ufm(
    ds: ConceptDataset,
    d: int | None = None,
    steps: int = 10_000,
    lr: float = 0.1,
    seed: int = 0,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float64,
    progress: Callable[[int, float], None] | None = None,
) -> UFM:
    """Def. 2.2 trained from a random init by Adam (cosine-decayed step) on the unregularised CE.

    The gradient is written out (dCE/dlogit_jz = pi_j softmax_z - pi_j p(z|c_j)) rather than taken
    by autograd: on these tiny matrices that is most of the cost. `d` defaults to
    `fitting_dimension(ds)`. `progress(step, loss)` is called every 100 steps.
    """
    d = fitting_dimension(ds) if d is None else d
    if d < 1:
        raise InputError(f"embedding dimension d={d} must be >= 1")
    if steps < 1:
        raise InputError(f"steps={steps} must be >= 1")
    if not lr > 0:
        raise InputError(f"learning rate {lr} must be > 0")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    V, m = ds.vocab_size, ds.m
    W = (torch.randn(V, d, generator=gen, dtype=torch.float64) / d**0.5).to(device=device, dtype=dtype)
    H = (torch.randn(d, m, generator=gen, dtype=torch.float64) / d**0.5).to(device=device, dtype=dtype)
    # pi_j p(z|c_j) as one weight matrix: zero entries of a sampled dataset simply carry no loss.
    target = torch.as_tensor(ds.p * ds.pi[:, None], device=device, dtype=dtype)
    pi = torch.as_tensor(ds.pi[:, None], device=device, dtype=dtype)
    losses = torch.empty(steps, dtype=torch.float64)
    # Matrices this small lose far more to thread hand-offs than they gain from them.
    threads = torch.get_num_threads()
    if device == "cpu" and V * d * m < 5_000_000:
        torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        _adam_loop(W, H, target, pi, steps, lr, losses, progress)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    W_np = W.to("cpu", torch.float64).numpy().copy()
    H_np = H.to("cpu", torch.float64).numpy().copy()
    final = cross_entropy((W_np @ H_np).T, ds.p, ds.pi)
    return UFM(W=W_np, H=H_np, losses=losses.numpy(), final_loss=final, seconds=seconds)


def _adam_loop(W, H, target, pi, steps, lr, losses, progress) -> None:
    """Full-batch Adam on CE(W H), in place; cosine decay of the step size to 0."""
    beta1, beta2, adam_eps = 0.9, 0.999, 1e-8
    moments = [(torch.zeros_like(W), torch.zeros_like(W)), (torch.zeros_like(H), torch.zeros_like(H))]
    for step in range(1, steps + 1):
        log_sigma = torch.log_softmax((W @ H).T, dim=1)
        losses[step - 1] = -(target * log_sigma).sum()
        grad_logits = torch.exp(log_sigma) * pi - target  # (m, V)
        grads = (grad_logits.T @ H.T, W.T @ grad_logits.T)
        step_size = lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / steps))
        bias1, bias2 = 1 - beta1**step, 1 - beta2**step
        for param, grad, (mean, sq) in zip((W, H), grads, moments):
            mean.mul_(beta1).add_(grad, alpha=1 - beta1)
            sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            param.addcdiv_(mean, (sq / bias2).sqrt_().add_(adam_eps), value=-step_size / bias1)
        if progress is not None and (step % 100 == 0 or step == steps):
            progress(step, float(losses[step - 1]))


def steering_sets(
    ds: ConceptDataset,
    target: int = 0,
    q: int = 4,
    negatives: str = "random",
    seed: int = 0,
    opposite: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Sec. 2.2: index sets P (contexts of the target concept) and N, |P| = |N| = q, P and N disjoint.

    random: N is q contexts drawn from all contexts outside the target concept;
    contrastive: N is q contexts of one opposite concept (default: the next concept, cyclically).
    """
    if negatives not in NEGATIVE_SETTINGS:
        raise InputError(f"unknown negatives setting {negatives!r}; use random or contrastive")
    if not 0 <= target < ds.groups:
        raise InputError(f"target concept {target} is not in 0..{ds.groups - 1}")
    if q < 1:
        raise InputError(f"q={q} must be >= 1")
    rng = np.random.default_rng(seed)
    positives = ds.contexts_of(target)
    if q > len(positives):
        raise InputError(f"q={q} is larger than the {len(positives)} contexts of the target concept; lower --q")
    if negatives == "random":
        pool = np.flatnonzero(ds.context_concept != target)
    else:
        opposite = (target + 1) % ds.groups if opposite is None else opposite
        if opposite == target or not 0 <= opposite < ds.groups:
            raise InputError(f"opposite concept {opposite} must be a concept other than the target {target}")
        pool = ds.contexts_of(opposite)
    if q > len(pool):
        raise InputError(f"q={q} is larger than the {len(pool)} available negative contexts; lower --q")
    P = np.sort(rng.choice(positives, size=q, replace=False))
    N = np.sort(rng.choice(pool, size=q, replace=False))
    return P, N


def ufm_difference_of_means(H: np.ndarray, P: np.ndarray, N: np.ndarray) -> np.ndarray:
    """Eq. (3): v = (1/|P|) sum_{j in P} h_j - (1/|N|) sum_{j in N} h_j."""
    return H[:, P].mean(axis=1) - H[:, N].mean(axis=1)


def steered_logits(ufm: UFM, v: np.ndarray, j: int | np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Sec. 3.1: f_alpha(c_j) = W (h_j + alpha v); (A, V) for one j, (A, len(j), V) for several."""
    alphas = np.asarray(alphas, dtype=np.float64)
    base = ufm.W @ ufm.H[:, j]  # (V,) or (V, J)
    shift = ufm.W @ v  # (V,)
    if base.ndim == 1:
        return base[None, :] + alphas[:, None] * shift[None, :]
    return base.T[None, :, :] + alphas[:, None, None] * shift[None, None, :]
