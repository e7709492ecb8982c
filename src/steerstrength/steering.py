"""Where activations change: adding alpha * v to the residual stream after block l.

Two ways in:
- `steer(model, v, layer, alpha)`: a context manager (a forward hook) for any forward or `generate`,
  alpha a number or one value per batch row. The hook is always removed.
- The sweep primitives `hidden_at` / `forward_from`: run blocks 0..l once per input, then put alpha
  in the batch dimension and run only blocks l+1.. for each alpha, computing logits only where read.
  `next_token_probs` is built on them; every metric uses them.

A measurement takes a SteeringVector and reads its v and layer here (`vector_of`). Also here: the forwards over a
shared prefix (`forward_over_shared_prefix`, `shared_prefix_last_logits`: k-shot rows). The other forward-pass tricks
are beside this module, one idea each: prefix.py (the shared prefix KV cache and its attention), sampling.py (seeded
and batched steered sampling) and forward_ad.py (forward-mode AD through a replay).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
from torch import nn

from steerstrength.errors import InputError
from steerstrength.models import Encoded, Model
from steerstrength.prefix import (_NoConcat, _Unsupported, attention_over_shared_prefix, cache_snapshot,
                                 common_prefix_length, prefix_cache, shared_prefix_cache)

POSITIONS = ("all", "last")
# Activation budget of one forward: batch rows x sequence length. Bounded memory for any #alphas.
DEFAULT_TOKEN_BUDGET = 2048
# Budget of logits held at once (floats): rows x kept positions x vocab.
DEFAULT_LOGIT_BUDGET = 64 * 1024 * 1024
# Set False to force the concatenating cache (benchmarks and tests compare the two paths).
SHARED_PREFIX_ATTENTION = True


# ----------------------------------------------------------------------------- validation


def as_vector(model: Model, vector) -> torch.Tensor:
    """A steering vector as a [d_model] tensor on the model's device and dtype; checked."""
    if hasattr(vector, "vector"):  # a SteeringVectors entry / object carrying .vector
        vector = vector.vector
    v = torch.as_tensor(vector)
    if v.ndim != 1 or v.shape[0] != model.d_model:
        raise InputError(
            f"steering vector has shape {tuple(v.shape)} but {model.name} needs [{model.d_model}] (d_model); "
            "use a vector extracted from this model"
        )
    if not torch.isfinite(v).all():
        raise InputError("steering vector contains NaN or inf; recompute it from finite activations")
    return v.to(device=model.device, dtype=model.dtype)


def vector_of(model: Model, sv) -> tuple[torch.Tensor, int]:
    """(v as `as_vector` gives it, its layer) of a SteeringVector: the vector carries its layer down to the hook."""
    if not hasattr(sv, "vector") or not isinstance(getattr(sv, "layer", None), int):
        raise InputError(f"a measurement takes a SteeringVector (SteeringVectors[layer]), which knows its layer, "
                         f"not a {type(sv).__name__}")
    return as_vector(model, sv.vector), check_layer(model, sv.layer)


def check_layer(model: Model, layer: int) -> int:
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < model.n_layers:
        raise InputError(f"layer {layer!r} is outside [0, {model.n_layers}) for {model.name}; pick 0..{model.n_layers - 1}")
    return layer


def check_positions(positions: str) -> str:
    if positions not in POSITIONS:
        raise InputError(f"positions must be 'all' or 'last', not {positions!r}")
    return positions


def as_alphas(alphas) -> torch.Tensor:
    """A non-empty, finite 1-D float64 tensor of steering strengths."""
    a = torch.as_tensor(alphas, dtype=torch.float64).reshape(-1) if not isinstance(alphas, torch.Tensor) \
        else alphas.detach().to(torch.float64).reshape(-1).cpu()
    if a.numel() == 0:
        raise InputError("the alpha grid is empty; give at least one alpha")
    if not torch.isfinite(a).all():
        raise InputError("the alpha grid contains NaN or inf; give finite alphas")
    return a


# ----------------------------------------------------------------------------- hooks


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output, hidden):
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    return hidden


@contextlib.contextmanager
def steer(model: Model, vector, layer: int, alpha, positions: str = "all") -> Iterator[None]:
    """Eq. (1): add alpha * v to the output of block `layer` inside the `with` block; the hook is always removed.

    Args:
        vector: a [d_model] tensor or a SteeringVector (`sv.apply(model, alpha)` is this with the vector's layer).
        layer: the block whose output is steered (0-based).
        alpha: a number, or a 1-D tensor (or list) with one value per batch row.
        positions: "all", or "last": only the last position of each forward call (the prompt's last token,
            then each new token).

    Example::

        enc = model.encode(["Tell me about your day."], chat=True)
        with ss.steer(model, sv[15].vector, 15, alpha=4.0):
            ids = model.hf.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=20)
    """
    v = as_vector(model, vector)
    check_layer(model, layer)
    check_positions(positions)
    per_row = isinstance(alpha, torch.Tensor) and alpha.ndim > 0 or isinstance(alpha, (list, tuple))
    if per_row:
        a = as_alphas(alpha).to(device=model.device, dtype=model.dtype)
    else:
        a = float(alpha)
        if not math.isfinite(a):
            raise InputError(f"alpha must be finite, not {alpha!r}")

    def hook(_module, _inputs, output):
        h = _hidden(output)
        if per_row:
            if h.shape[0] != a.shape[0]:
                raise InputError(f"{a.shape[0]} per-row alphas for a batch of {h.shape[0]} rows; give one alpha per row")
            delta = a[:, None] * v[None, :]
        else:
            delta = (a * v)[None, :]
        delta = delta.to(h.device)  # the block's own device when the model spans several
        if positions == "all":
            h = h + delta[:, None, :]
        else:
            h = h.clone()
            h[:, -1, :] = h[:, -1, :] + delta
        return _replace_hidden(output, h)

    handle = model.blocks[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the blocks we need have run."""


@contextlib.contextmanager
def _capture(model: Model, layers: Sequence[int], store: dict) -> Iterator[None]:
    """Record block outputs at `layers` and stop the forward after the last of them."""
    last = max(layers)
    handles = []

    def make(idx):
        def hook(_module, _inputs, output):
            store[idx] = _hidden(output).to(model.device)  # a no-op unless the model spans several devices
            if idx == last:
                raise _Stop

        return hook

    for idx in sorted(set(layers)):
        handles.append(model.blocks[idx].register_forward_hook(make(idx)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _forward(model: Model, enc: Encoded, **kwargs):
    if "past_key_values" in kwargs:
        kwargs[model.cache_arg] = kwargs.pop("past_key_values")
    return model.hf(
        input_ids=enc.input_ids,
        attention_mask=enc.attention_mask,
        position_ids=enc.position_ids,
        **kwargs,
    )


@torch.inference_mode()
def hidden_at(model: Model, enc: Encoded, layers: int | Sequence[int], *, past_key_values=None) -> dict | torch.Tensor:
    """Residual stream at the output of block(s) `layers`; blocks after the last one never run."""
    single = isinstance(layers, int)
    wanted = [layers] if single else list(layers)
    for layer in wanted:
        check_layer(model, layer)
    store: dict = {}
    with _capture(model, wanted, store):
        try:
            _forward(model, enc, use_cache=past_key_values is not None, past_key_values=past_key_values)
        except _Stop:
            pass
    return store[wanted[0]] if single else store


# ----------------------------------------------------------------------------- residual streams of texts


def layer_states(model: Model, texts: Sequence[str], layers: Sequence[int], *, batch_size: int = 8,
                 max_length: int | None = None, skip_first_token: bool = True, require_tokens: bool = True):
    """Per batch of `texts`: (start index, mask of the counted tokens [b, T], {layer: residual stream [b, T, d]}).

    Right padding; one forward per batch records every layer and stops after the deepest one. The mask leaves
    out padding and, with `skip_first_token`, position 0 (the attention sink). With `require_tokens`, a text with
    no counted token is an InputError before its batch runs.
    """
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start:start + batch_size])
        enc = model.encode(chunk, padding_side="right", max_length=max_length)
        if model.max_length and enc.input_ids.shape[1] > model.max_length:
            raise InputError(f"a text has {enc.input_ids.shape[1]} tokens, more than {model.name}'s maximum "
                             f"{model.max_length}; truncate with --max-length (API: max_length=)")
        mask = enc.attention_mask.clone()
        if skip_first_token:
            mask[:, 0] = 0  # right padding: column 0 is each text's first token
        counts = mask.sum(-1)
        if require_tokens and (counts == 0).any():
            bad = chunk[int((counts == 0).nonzero()[0])]
            need = "two tokens" if skip_first_token else "one token"
            raise InputError(f"text {bad[:40]!r} has fewer than {need} after tokenization; remove it or pass "
                             "skip_first_token=False")
        yield start, mask, hidden_at(model, enc, layers)


def token_means(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[b, d] float64 on the CPU: each row's residual stream averaged over its masked-in tokens (Eq. 3's average)."""
    acc_device = torch.device("cpu") if hidden.device.type == "mps" else hidden.device  # MPS has no float64
    w = mask.to(device=acc_device, dtype=torch.float64).unsqueeze(-1)
    h = hidden.to(device=acc_device, dtype=torch.float64)
    return ((h * w).sum(1) / w.sum(1)).cpu()


def token_norms(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[n] float32 on the CPU: the L2 norm of the residual stream at every masked-in token."""
    return hidden.float()[mask.bool().to(hidden.device)].norm(dim=-1).cpu()


class _Skip(nn.Module):
    """Stands in for a block below the steered layer: its output is replaced anyway."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _Replay(nn.Module):
    """Stands in for the steered block: returns the precomputed, steered residual stream."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states, *args, **kwargs):
        return self.hidden


@contextlib.contextmanager
def _replay_from(model: Model, layer: int, hidden: torch.Tensor) -> Iterator[None]:
    """Swap blocks 0..layer for stand-ins so a forward starts from `hidden` at block layer+1."""
    originals = [model.blocks[i] for i in range(layer + 1)]
    try:
        for i in range(layer):
            model.blocks[i] = _Skip()
        model.blocks[layer] = _Replay(hidden)
        yield
    finally:
        for i, block in enumerate(originals):
            model.blocks[i] = block


@contextlib.contextmanager
def _last_mlp_only(model: Model, enabled: bool) -> Iterator[None]:
    """When only the last position is read, the last block's MLP runs on that position alone.

    Its [B, 1, d] output broadcasts in the residual add; the other positions' values are never read.
    """
    mlp = model.last_mlp if enabled else None
    if mlp is None:
        yield
        return

    def pre_hook(_module, args):
        return (args[0][:, -1:],) + tuple(args[1:]) if args else None

    handle = mlp.register_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()


@torch.inference_mode()
def forward_from(model: Model, enc: Encoded, layer: int, hidden: torch.Tensor, *, logits_to_keep=1,
                 past_key_values=None) -> torch.Tensor:
    """Logits of blocks layer+1.. applied to `hidden` (the output of block `layer`) for batch `enc`.

    `logits_to_keep`: 0 for all positions, an int k for the last k, or a 1-D index tensor.
    """
    with _replay_from(model, layer, hidden), _last_mlp_only(model, logits_to_keep == 1 and layer < model.n_layers - 1):
        out = _forward(model, enc, use_cache=past_key_values is not None, past_key_values=past_key_values,
                       logits_to_keep=logits_to_keep)
    return out.logits


def repeat_rows(enc: Encoded, n: int) -> Encoded:
    """The batch `enc` repeated n times along the batch dimension (row-major: copy after copy)."""
    return Encoded(
        enc.input_ids.repeat(n, 1), enc.attention_mask.repeat(n, 1), enc.position_ids.repeat(n, 1), enc.padding_side
    )


def alpha_chunks(n_alphas: int, rows_per_alpha: int, tokens_per_row: int, *, token_budget: int,
                 logit_positions: int = 1, vocab: int = 1, logit_budget: int = DEFAULT_LOGIT_BUDGET) -> Iterator[slice]:
    """Slices of the alpha grid whose forward fits the activation and logit budgets."""
    per_alpha_tokens = max(1, rows_per_alpha * tokens_per_row)
    per_alpha_logits = max(1, rows_per_alpha * logit_positions * vocab)
    size = max(1, min(token_budget // per_alpha_tokens, logit_budget // per_alpha_logits))
    for start in range(0, n_alphas, size):
        yield slice(start, min(n_alphas, start + size))


def steered_hidden(hidden: torch.Tensor, vector: torch.Tensor, alphas: torch.Tensor, positions: str) -> torch.Tensor:
    """[A*N, T, d]: h + alpha v for each alpha (alpha-major), at all positions or the last one."""
    a = alphas.to(device=hidden.device, dtype=hidden.dtype)
    n = hidden.shape[0]
    out = hidden.unsqueeze(0).expand(a.shape[0], *hidden.shape).clone()
    if positions == "all":
        out += a[:, None, None, None] * vector
    else:
        out[:, :, -1, :] += a[:, None, None] * vector
    return out.reshape(a.shape[0] * n, *hidden.shape[1:])


# ----------------------------------------------------------------------------- a forward over the shared prefix


def forward_over_shared_prefix(model: Model, cache, enc: Encoded, layer: int, hidden: torch.Tensor) -> torch.Tensor:
    """`forward_from` (last-position logits) of batch `enc` on a `shared_prefix_cache`, its rows attending to the
    batch-1 prefix uncopied. Raises `_Unsupported`, having changed nothing, where that is not exact."""
    shared = [cache_layer for cache_layer in cache.layers if isinstance(cache_layer, _NoConcat)]
    for cache_layer in shared:
        cache_layer.new, cache_layer.uses = None, 0
    with attention_over_shared_prefix(model, cache):
        logits = forward_from(model, enc, layer, hidden, past_key_values=cache)
    # Each layer's new keys went through our attention exactly once: no attention bypassed the interface.
    if any(cache_layer.uses != 1 or cache_layer.new is not None for cache_layer in shared):
        raise _Unsupported("an attention layer bypassed the attention interface")
    return logits


# ----------------------------------------------------------------------------- next-token probabilities


@torch.inference_mode()
def next_token_probs(model: Model, sv, context: str, alphas, positions: str = "all", *,
                     chat: bool = False, token_budget: int = DEFAULT_TOKEN_BUDGET) -> torch.Tensor:
    """Eq. (1) swept over alpha: [len(alphas), vocab] float32, the softmax of the steered logits after `context`.

    Blocks 0..layer run once; alphas go in the batch dimension through blocks layer+1.. only; logits
    only at the last position. With positions="last", the prefix runs once with a KV cache and only
    the last token goes through the model per alpha.

    Args:
        sv: a SteeringVector (SteeringVectors[layer]), which knows its layer.
        context: the text whose next token is predicted.
        alphas: raw strengths, a list or a 1-D tensor (`sv.raw_alphas(grid)` converts an AlphaGrid).
        positions: "all" steers every position, "last" only the last one.
        chat: wrap the context in the model's chat template.
        token_budget: rows x tokens per forward: bounded memory for any number of alphas.

    Example::

        probs = ss.next_token_probs(model, sv[15], "Today I", [-8.0, 0.0, 8.0])   # [3, vocab]
    """
    v, layer = vector_of(model, sv)
    check_positions(positions)
    a = as_alphas(alphas)
    enc = model.encode([context], chat=chat)
    T = enc.input_ids.shape[1]
    if T == 0:
        raise InputError("the context is empty after tokenization; give a non-empty context")
    if model.max_length and T > model.max_length:
        raise InputError(f"the context has {T} tokens, more than {model.name}'s maximum {model.max_length}; shorten it")
    if positions == "last" and T > 1:
        return _last_token_probs(model, v, layer, enc, a, token_budget)
    out = torch.empty((a.shape[0], model.vocab_size), dtype=torch.float32)
    h = hidden_at(model, enc, layer)  # [1, T, d]
    for sl in alpha_chunks(a.shape[0], 1, T, token_budget=token_budget, vocab=model.vocab_size):
        steered = steered_hidden(h, v, a[sl], positions)
        logits = forward_from(model, repeat_rows(enc, sl.stop - sl.start), layer, steered, logits_to_keep=1)
        out[sl] = torch.softmax(logits[:, -1, :].float(), dim=-1).cpu()
    return out


def _last_token_probs(model: Model, v: torch.Tensor, layer: int, enc: Encoded, a: torch.Tensor,
                      token_budget: int) -> torch.Tensor:
    """`next_token_probs` with positions="last": the first T-1 tokens run once into a KV cache; per chunk of
    alphas only the last token goes through blocks layer+1.., attending to that batch-1 cache uncopied."""
    T = enc.input_ids.shape[1]
    prefix = Encoded(enc.input_ids[:, :-1], enc.attention_mask[:, :-1], enc.position_ids[:, :-1], enc.padding_side)
    cache = prefix_cache(model)
    with _last_mlp_only(model, True):  # only the prefix's keys and values are read, never its outputs
        _forward(model, prefix, use_cache=True, past_key_values=cache, logits_to_keep=1)
    snapshot = cache_snapshot(cache, range(model.n_layers))
    last = Encoded(enc.input_ids[:, -1:], enc.attention_mask, enc.position_ids[:, -1:], enc.padding_side)
    h = hidden_at(model, last, layer, past_key_values=prefix_cache(model, snapshot))  # [1, 1, d]

    def rows(b):
        return Encoded(last.input_ids.repeat(b, 1), last.attention_mask.repeat(b, 1), last.position_ids.repeat(b, 1),
                       enc.padding_side)

    shared = shared_prefix_cache(model, snapshot, above=layer) if SHARED_PREFIX_ATTENTION else None
    if shared is not None:
        out = torch.empty((a.shape[0], model.vocab_size), dtype=torch.float32)
        try:
            # One token per row: the cached prefix is shared, not per row, so chunks need not shrink with T.
            for sl in alpha_chunks(a.shape[0], 1, 1, token_budget=token_budget, vocab=model.vocab_size):
                logits = forward_over_shared_prefix(model, shared, rows(sl.stop - sl.start), layer,
                                                    steered_hidden(h, v, a[sl], "all"))
                out[sl] = torch.softmax(logits[:, -1, :].float(), dim=-1).cpu()
            return out
        except _Unsupported:
            pass  # an attention we do not reproduce exactly: the concatenating cache below is always right
    return _last_token_probs_concat(model, v, layer, T, snapshot, last, h, a, rows, token_budget)


def _last_token_probs_concat(model, v, layer, T, snapshot, last, h, a, rows, token_budget) -> torch.Tensor:
    """The concatenating path: each chunk's cache update copies the broadcast prefix (any architecture)."""
    out = torch.empty((a.shape[0], model.vocab_size), dtype=torch.float32)
    for sl in alpha_chunks(a.shape[0], 1, T, token_budget=token_budget * 8, vocab=model.vocab_size):
        b = sl.stop - sl.start
        logits = forward_from(model, rows(b), layer, steered_hidden(h, v, a[sl], "all"),
                              past_key_values=prefix_cache(model, snapshot, batch=b, above=layer))
        out[sl] = torch.softmax(logits[:, -1, :].float(), dim=-1).cpu()
    return out


@torch.inference_mode()
def shared_prefix_last_logits(model: Model, sv, rows: Sequence[Sequence[int]], alphas: torch.Tensor, positions: str,
                              *,
                              token_budget: int) -> Iterator[tuple[slice, int, torch.Tensor]]:
    """(alpha slice, row index j, [b, vocab] steered logits at the last token of rows[j]) for token rows
    sharing a prefix (k-shot prompts), over every alpha chunk and row.

    The shared prefix runs once through blocks 0..l (unsteered, shared by all alphas) and once per alpha
    chunk through blocks l+1.. (steered, alpha in the batch dimension), leaving KV caches; with
    positions="last" it is unsteered throughout and runs once. Each row then runs only its own tokens:
    blocks 0..l once, blocks l+1.. with the alphas in the batch, logits at the last position only.
    """
    v, layer = vector_of(model, sv)
    n_layers, dev = model.n_layers, model.device
    P = common_prefix_length(rows)
    low, high = range(layer + 1), range(layer + 1, n_layers)

    def enc(ids, start, batch=1):
        t = torch.tensor([list(ids)] * batch, dtype=torch.long, device=dev)
        mask = torch.ones((batch, start + t.shape[1]), dtype=torch.long, device=dev)
        pos = torch.arange(start, start + t.shape[1], device=dev).expand(batch, -1)
        return Encoded(t, mask, pos, "left")

    # Prefix, blocks 0..l: once for every alpha and row.
    lo, hi_shared, h_prefix = {}, {}, None
    if P > 0:
        cache = prefix_cache(model)
        if positions == "all":
            h_prefix = hidden_at(model, enc(rows[0][:P], 0), layer, past_key_values=cache)
            lo = cache_snapshot(cache, low)
        else:  # only last tokens are steered: the whole prefix is unsteered and shared by every alpha
            model.hf(input_ids=enc(rows[0][:P], 0).input_ids, use_cache=True, logits_to_keep=1,
                     **{model.cache_arg: cache})
            lo, hi_shared = cache_snapshot(cache, low), cache_snapshot(cache, high)
    # Each row's own tokens, blocks 0..l: once, on top of the prefix cache.
    h_rows = [hidden_at(model, enc(r[P:], P), layer, past_key_values=prefix_cache(model, lo) if P > 0 else None)
              for r in rows]
    longest = max(len(r) for r in rows)
    # positions="last": the batch-1 prefix above l is attended uncopied by every alpha row (falls back per forward).
    shared = shared_prefix_cache(model, {**lo, **hi_shared}, above=layer) \
        if P > 0 and positions == "last" and SHARED_PREFIX_ATTENTION else None
    for sl in alpha_chunks(alphas.shape[0], 1, longest, token_budget=token_budget, vocab=model.vocab_size):
        a = alphas[sl]
        b = a.shape[0]
        hi = hi_shared
        if P > 0 and positions == "all":  # the steered prefix through blocks l+1..: once per alpha chunk
            cache = prefix_cache(model)
            forward_from(model, enc(rows[0][:P], 0, b), layer, steered_hidden(h_prefix, v, a, "all"),
                         logits_to_keep=1, past_key_values=cache)
            hi = cache_snapshot(cache, high)
        for j, r in enumerate(rows):
            steered, logits = steered_hidden(h_rows[j], v, a, positions), None
            if shared is not None:
                try:
                    logits = forward_over_shared_prefix(model, shared, enc(r[P:], P, b), layer, steered)
                except _Unsupported:
                    shared = None
            if logits is None:
                cache = prefix_cache(model, {**lo, **hi}, batch=b, above=layer) if P > 0 else None
                logits = forward_from(model, enc(r[P:], P, b), layer, steered, logits_to_keep=1,
                                      past_key_values=cache)
            yield sl, j, logits[:, -1, :]

