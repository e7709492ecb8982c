"""Reductions of the steered next-token distributions p_alpha over a grid, applied block by block of alphas.

`next_token_reduce(model, sv, context, alphas, {"kl": KL(), "top": TopK(10)})` calls `next_token_probs` on blocks
of the grid and hands each block's [b, vocab] probabilities to every reduction, so memory is O(block + results)
whatever the grid (the full [alphas, vocab] matrix of a 16,385-alpha grid is 3.2 GB at vocabulary 49,152).
The prefix work of a block (blocks 0..l on the context) is one row, negligible next to the block's rows.

Each reduction sees p_0 (alpha = 0) before any block: the block holding alpha = 0 runs first, so p_0 is its row,
bit-identical to the alpha = 0 row every other reduction sees (a grid without 0 gets one extra forward for it).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from steerstrength.errors import InputError
from steerstrength.models import Model
from steerstrength.steering import as_alphas, check_positions, next_token_probs, vector_of

# A block of next-token probabilities held at once: rows x vocabulary x 4 bytes (128 MB: 682 alphas at vocabulary
# 49,152, 128 at 262,144). Grids that fit run as one block, exactly as one `next_token_probs` call.
DEFAULT_BLOCK_BYTES = 128 * 1024 * 1024


def default_block(vocab_size: int) -> int:
    """Alphas per block: DEFAULT_BLOCK_BYTES of float32 probabilities."""
    return max(1, DEFAULT_BLOCK_BYTES // (4 * vocab_size))


class Reduction:
    """A per-block reduction of p_alpha: `start(n_alphas, p0)`, then `update(rows, probs)` once per block (any order:
    `rows` is the block's slice of the grid, `probs` its [b, vocab] float32 probabilities), then `result()`."""

    def start(self, n_alphas: int, p0: torch.Tensor) -> None:
        self.n = n_alphas

    def update(self, rows: slice, probs: torch.Tensor) -> None:
        raise NotImplementedError

    def result(self):
        raise NotImplementedError


class Track(Reduction):
    """The probabilities of given token ids at every alpha: [A, U] float32."""

    def __init__(self, ids):
        self.ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)

    def start(self, n_alphas, p0):
        if self.ids.numel() and (self.ids.min() < 0 or self.ids.max() >= p0.numel()):
            raise InputError(f"tracked token ids must be in [0, {p0.numel()})")
        self.out = torch.empty((n_alphas, self.ids.numel()), dtype=torch.float32)

    def update(self, rows, probs):
        self.out[rows] = probs[:, self.ids]

    def result(self) -> torch.Tensor:
        return self.out


class TopK(Reduction):
    """The k most likely tokens at every alpha: (ids [A, k] long, probs [A, k] float32), most likely first."""

    def __init__(self, k: int):
        if k < 1:
            raise InputError(f"top-k needs k >= 1, not {k}")
        self.k = k

    def start(self, n_alphas, p0):
        self.k = min(self.k, p0.numel())
        self.ids = torch.empty((n_alphas, self.k), dtype=torch.long)
        self.probs = torch.empty((n_alphas, self.k), dtype=torch.float32)

    def update(self, rows, probs):
        top = probs.topk(self.k, dim=1)
        self.ids[rows], self.probs[rows] = top.indices, top.values

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ids, self.probs


class Rows(Reduction):
    """The whole distribution at given alpha indices: [len(indices), vocab] float32 (None: every alpha, the full
    matrix, for grids that fit in memory)."""

    def __init__(self, indices: Sequence[int] | None = None):
        self.indices = None if indices is None else [int(i) for i in indices]

    def start(self, n_alphas, p0):
        self.n, self.vocab, self.out = n_alphas, p0.numel(), None
        if self.indices is None:
            return
        if any(not -n_alphas <= i < n_alphas for i in self.indices):
            raise InputError(f"row indices must be in [-{n_alphas}, {n_alphas})")
        self.where = {}
        for j, i in enumerate(self.indices):
            self.where.setdefault(i % n_alphas, []).append(j)
        self.out = torch.empty((len(self.indices), self.vocab), dtype=torch.float32)

    def update(self, rows, probs):
        if self.indices is None:
            if rows.start == 0 and rows.stop == self.n:  # one block: it is the matrix (no copy)
                self.out = probs
                return
            if self.out is None:
                self.out = torch.empty((self.n, self.vocab), dtype=torch.float32)
            self.out[rows] = probs
            return
        for i in range(rows.start, rows.stop):
            for j in self.where.get(i, ()):
                self.out[j] = probs[i - rows.start]

    def result(self) -> torch.Tensor:
        return self.out


class KL(Reduction):
    """KL(p_alpha || p_0) in nats at every alpha: [A] float64 (terms in float32, summed in float64)."""

    def start(self, n_alphas, p0):
        self.p0 = p0
        self.out = torch.empty(n_alphas, dtype=torch.float64)

    def update(self, rows, probs):
        terms = torch.special.xlogy(probs, probs)
        terms -= torch.special.xlogy(probs, self.p0)  # 0 where p_alpha = 0; +inf where only p_0 is 0
        self.out[rows] = terms.sum(-1, dtype=torch.float64)

    def result(self) -> torch.Tensor:
        return self.out


class Entropy(Reduction):
    """The entropy of p_alpha in nats at every alpha: [A] float64."""

    def start(self, n_alphas, p0):
        self.out = torch.empty(n_alphas, dtype=torch.float64)

    def update(self, rows, probs):
        self.out[rows] = -torch.special.xlogy(probs, probs).sum(-1, dtype=torch.float64)

    def result(self) -> torch.Tensor:
        return self.out


def blocks(n_alphas: int, block: int, first: int | None = None) -> list[slice]:
    """Slices of `block` alphas covering the grid; the one holding index `first` comes first."""
    out = [slice(s, min(n_alphas, s + block)) for s in range(0, n_alphas, block)]
    if first is not None:
        out.sort(key=lambda sl: not sl.start <= first < sl.stop)
    return out


def next_token_reduce(model: Model, sv, context: str, alphas, reductions: Mapping[str, Reduction], *,
                      positions: str = "all", chat: bool = False, block: int | None = None) -> dict:
    """{name: reduction.result()} over the steered next-token distributions p_alpha, computed `block` alphas at a time.

    Example::

        out = next_token_reduce(model, sv, "I felt", alphas, {"kl": KL(), "H": Entropy(), "top": TopK(5)})
        out["kl"]  # [A] float64, KL(p_alpha || p_0)

    `block` (default: `default_block(vocab)`, 128 MB of probabilities) bounds the memory; the results are the same for
    any block size up to the last bits of the forward (each block is one `next_token_probs` call).
    """
    vector_of(model, sv)
    check_positions(positions)
    a = as_alphas(alphas)
    block = default_block(model.vocab_size) if block is None else int(block)
    if block < 1:
        raise InputError(f"block must be at least 1 alpha, not {block}")
    if not reductions:
        raise InputError("no reduction given; pass e.g. {'kl': KL()}")
    zero = (a == 0).nonzero()
    i0 = int(zero[0]) if zero.numel() else None
    todo = blocks(a.shape[0], block, i0)
    first = None
    if i0 is None:
        p0 = next_token_probs(model, sv, context, torch.zeros(1, dtype=torch.float64), positions=positions,
                              chat=chat)[0]
    else:  # the block holding alpha = 0 runs first: p_0 is its row
        first = next_token_probs(model, sv, context, a[todo[0]], positions=positions, chat=chat)
        p0 = first[i0 - todo[0].start].clone()
    for r in reductions.values():
        r.start(a.shape[0], p0)
    for k, sl in enumerate(todo):
        probs = first if k == 0 and first is not None else \
            next_token_probs(model, sv, context, a[sl], positions=positions, chat=chat)
        first = None
        for r in reductions.values():
            r.update(sl, probs)
        del probs
    return {name: r.result() for name, r in reductions.items()}
