"""The only place that changes activations: adding alpha * v to the residual stream after block l.

Two ways in:
- `steer(model, v, layer, alpha)`: a context manager (a forward hook) for any forward or `generate`,
  alpha a number or one value per batch row. The hook is always removed.
- The sweep primitives `hidden_at` / `forward_from`: run blocks 0..l once per input, then put alpha
  in the batch dimension and run only blocks l+1.. for each alpha, computing logits only where read.
  `next_token_probs` is built on them; every metric uses them.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
from torch import nn

from steerstrength.errors import InputError
from steerstrength.models import Encoded, Model

POSITIONS = ("all", "last")
# Activation budget of one forward: batch rows x sequence length. Bounded memory for any #alphas.
DEFAULT_TOKEN_BUDGET = 2048
# Budget of logits held at once (floats): rows x kept positions x vocab.
DEFAULT_LOGIT_BUDGET = 64 * 1024 * 1024


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
    """Add alpha * v to the output of block `layer` (Eq. 1) inside the `with` block.

    `alpha` is a number or a 1-D tensor with one value per batch row. With positions="last", only
    the last position of each forward call is steered (the prompt's last token, then each new token).
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
            store[idx] = _hidden(output)
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


# ----------------------------------------------------------------------------- next-token probabilities


def _kv_snapshot(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def _expanded_cache(model: Model, snapshot, batch: int, layer: int = -1):
    """A KV cache of the batch-1 prefix seen by `batch` rows, without copying it.

    Layers above `layer` get broadcast views (materialised once, by the cache's own concat);
    layers up to `layer` are stand-ins in `forward_from` and keep their batch-1 tensors.
    """
    from transformers import DynamicCache

    cache = DynamicCache(ddp_cache_data=snapshot, config=model.hf.config)
    if batch > 1:
        for idx, cache_layer in enumerate(cache.layers):
            if idx > layer:
                cache_layer.keys = cache_layer.keys.expand(batch, *cache_layer.keys.shape[1:])
                cache_layer.values = cache_layer.values.expand(batch, *cache_layer.values.shape[1:])
    return cache


@torch.inference_mode()
def next_token_probs(model: Model, vector, layer: int, context: str, alphas, positions: str = "all", *,
                     chat: bool = False, token_budget: int = DEFAULT_TOKEN_BUDGET) -> torch.Tensor:
    """[len(alphas), vocab] float32: softmax of the steered logits of the token after `context`.

    Blocks 0..layer run once; alphas go in the batch dimension through blocks layer+1.. only; logits
    only at the last position. With positions="last", the prefix runs once with a KV cache and only
    the last token goes through the model per alpha.
    """
    v = as_vector(model, vector)
    check_layer(model, layer)
    check_positions(positions)
    a = as_alphas(alphas)
    enc = model.encode([context], chat=chat)
    T = enc.input_ids.shape[1]
    if T == 0:
        raise InputError("the context is empty after tokenization; give a non-empty context")
    if model.max_length and T > model.max_length:
        raise InputError(f"the context has {T} tokens, more than {model.name}'s maximum {model.max_length}; shorten it")
    out = torch.empty((a.shape[0], model.vocab_size), dtype=torch.float32)
    if positions == "last" and T > 1:
        prefix = Encoded(enc.input_ids[:, :-1], enc.attention_mask[:, :-1], enc.position_ids[:, :-1], enc.padding_side)
        from transformers import DynamicCache

        cache = DynamicCache(config=model.hf.config)
        _forward(model, prefix, use_cache=True, past_key_values=cache, logits_to_keep=1)
        snapshot = _kv_snapshot(cache)
        last = Encoded(enc.input_ids[:, -1:], enc.attention_mask, enc.position_ids[:, -1:], enc.padding_side)
        h = hidden_at(model, last, layer, past_key_values=_expanded_cache(model, snapshot, 1))  # [1, 1, d]
        for sl in alpha_chunks(a.shape[0], 1, T, token_budget=token_budget * 8, vocab=model.vocab_size):
            b = sl.stop - sl.start
            steered = steered_hidden(h, v, a[sl], "all")
            rows = Encoded(last.input_ids.repeat(b, 1), last.attention_mask.repeat(b, 1),
                           last.position_ids.repeat(b, 1), enc.padding_side)
            logits = forward_from(model, rows, layer, steered, past_key_values=_expanded_cache(model, snapshot, b, layer))
            out[sl] = torch.softmax(logits[:, -1, :].float(), dim=-1).cpu()
        return out
    h = hidden_at(model, enc, layer)  # [1, T, d]
    for sl in alpha_chunks(a.shape[0], 1, T, token_budget=token_budget, vocab=model.vocab_size):
        steered = steered_hidden(h, v, a[sl], positions)
        logits = forward_from(model, repeat_rows(enc, sl.stop - sl.start), layer, steered, logits_to_keep=1)
        out[sl] = torch.softmax(logits[:, -1, :].float(), dim=-1).cpu()
    return out


# ----------------------------------------------------------------------------- generation


@torch.inference_mode()
def steered_generate(model: Model, enc: Encoded, vector, layer: int, alphas, positions: str = "all",
                     **generate_kwargs) -> torch.Tensor:
    """`generate` with a per-row alpha (len(alphas) == batch rows), steering prompt and decode steps."""
    a = as_alphas(alphas)
    if a.shape[0] != enc.input_ids.shape[0]:
        raise InputError(f"{a.shape[0]} alphas for {enc.input_ids.shape[0]} prompts; give one alpha per row")
    generate_kwargs.setdefault("pad_token_id", model.pad_id)
    with steer(model, vector, layer, a, positions=positions):
        return model.hf.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, **generate_kwargs)


# ----------------------------------------------------------------------------- differentiable replay


def forward_from_differentiable(model: Model, enc: Encoded, layer: int, hidden: torch.Tensor, *,
                                logits_to_keep=0) -> torch.Tensor:
    """`forward_from` outside inference mode, so forward-mode AD (torch.func.jvp) can carry d/d alpha.

    `hidden` may be a dual tensor, e.g. h + alpha * v with alpha a jvp input; blocks 0..layer never run.
    """
    check_layer(model, layer)
    with _replay_from(model, layer, hidden):
        out = _forward(model, enc, use_cache=False, logits_to_keep=logits_to_keep)
    return out.logits
