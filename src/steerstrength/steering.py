"""The only place that changes activations: adding alpha * v to the residual stream after block l.

Two ways in:
- `steer(model, v, layer, alpha)`: a context manager (a forward hook) for any forward or `generate`,
  alpha a number or one value per batch row. The hook is always removed.
- The sweep primitives `hidden_at` / `forward_from`: run blocks 0..l once per input, then put alpha
  in the batch dimension and run only blocks l+1.. for each alpha, computing logits only where read.
  `next_token_probs` is built on them; every metric uses them.

Also here, as forward-pass tricks: the shared prefix KV cache (`prefix_cache`, `cache_snapshot`,
`shared_prefix_last_logits`) and the attention that lets every alpha row read a batch-1 prefix cache
without copying it (`shared_prefix_cache`, `forward_over_shared_prefix`), per-row seeded sampling
(`RowSampler`, `sample_rows`) and the patches that make nested forward-mode AD exact (`forward_ad_safe`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
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


def takes_vector(fn):
    """Measurements take a SteeringVector, which knows its layer: f(model, sv, ...). The former form
    f(model, tensor, layer, ...) still works for one release, with a DeprecationWarning."""
    import functools
    import warnings

    @functools.wraps(fn)
    def wrapper(model, vector, *args, **kwargs):
        layer_of = getattr(vector, "layer", None)
        if hasattr(vector, "vectors"):  # a SteeringVectors mapping: the layer argument picks from it
            return fn(model, vector, *args, **kwargs)
        if isinstance(layer_of, int) and hasattr(vector, "vector"):  # a SteeringVector
            given = kwargs.pop("layer", None)
            if given is None and args and isinstance(args[0], int) and not isinstance(args[0], bool):
                given, args = args[0], args[1:]
            if given is not None and given != layer_of:
                raise InputError(f"the vector is layer {layer_of}'s but layer {given} was given; drop the layer "
                                 "argument (a SteeringVector knows its layer)")
            return fn(model, vector, layer_of, *args, **kwargs)
        import sys

        if sys._getframe(1).f_globals.get("__name__", "").startswith("steerstrength."):
            return fn(model, vector, *args, **kwargs)  # our own internals pass tensors they unwrapped
        warnings.warn(f"{fn.__name__}(model, tensor, layer, ...) is deprecated: pass a SteeringVector "
                      f"(SteeringVectors[layer]), which knows its layer: {fn.__name__}(model, sv, ...)",
                      DeprecationWarning, stacklevel=2)
        return fn(model, vector, *args, **kwargs)

    return wrapper


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


# ----------------------------------------------------------------------------- the shared prefix (KV) cache


def prefix_cache(model: Model, layers_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None, *,
                 batch: int = 1, above: int = -1):
    """A KV cache holding the given per-layer (keys, values); a layer not given is empty, for a forward to fill.

    With batch > 1, layers above `above` are seen by `batch` rows as broadcast views of batch-1 keys
    (materialised once, by the cache's own concat); layers up to `above` are stand-ins in
    `forward_from` and keep their batch-1 tensors.
    """
    from transformers import DynamicCache

    layers_kv = layers_kv or {}
    cache = DynamicCache(ddp_cache_data=[layers_kv.get(i, (None, None)) for i in range(model.n_layers)],
                         config=model.hf.config)
    if batch > 1:
        for idx, cache_layer in enumerate(cache.layers):
            if idx > above and cache_layer.keys is not None:
                cache_layer.keys = cache_layer.keys.expand(batch, *cache_layer.keys.shape[1:])
                cache_layer.values = cache_layer.values.expand(batch, *cache_layer.values.shape[1:])
    return cache


def cache_snapshot(cache, layers) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of `layers` of a filled cache, to seed `prefix_cache`; a cache only ever concatenates, so
    later forwards on it leave them unchanged."""
    return {i: (cache.layers[i].keys, cache.layers[i].values) for i in layers}


# ----------------------------------------------------------------------------- attention over a shared prefix
#
# Every alpha row attends to the same batch-1 prefix keys. A cache that concatenates them with each row's
# new keys copies the prefix once per row, layer and chunk (aten::cat was 64% of a 1024-token sweep). Here the
# layers above the steered one keep the prefix and the new keys apart (`_NoConcat`), and one attention function
# scores the rows' queries against the batch-1 prefix in a single matmul (the batch folds into the query rows,
# so nothing is broadcast or copied), scores each row's own keys apart, and takes one softmax over both.
# It reproduces eager attention: scaling, grouped-query heads, the model's own mask (sliding windows, the
# cache already holds only the window), logit soft-capping (Gemma 2) and attention sinks (s_aux, gpt-oss).
# Anything else (position biases, sparse indices, dropout in training, attention weights requested, an
# attention that bypasses the interface or edits the keys the cache returned) raises `_Unsupported`, and
# the caller recomputes with the concatenating cache: never a wrong answer.

_SHARED_PREFIX_ATTENTION = "steerstrength_shared_prefix"
_active_cache: contextvars.ContextVar = contextvars.ContextVar("steerstrength_shared_prefix_cache", default=None)
# Keyword arguments of an attention call that do not change what eager attention computes for our inputs
# (sliding_window: the cache holds only the window and the model's mask says what is visible).
_NEUTRAL_ATTENTION_KWARGS = {"sliding_window", "is_causal", "position_ids", "cache_position", "use_cache",
                             "output_attentions", "return_dict", "layer_idx", "softcap", "s_aux", "sinks",
                             "output_hidden_states", "output_router_logits"}
# Set False to force the concatenating cache (benchmarks and tests compare the two paths).
SHARED_PREFIX_ATTENTION = True
# Attention scores held at once (floats, heads x rows x keys): rows are attended in blocks within it. 4 MB
# blocks stay in a CPU core's cache between the score matmul, the softmax passes and the value matmul.
ATTENTION_SCORES_BUDGET = 1024 * 1024


class _Unsupported(Exception):
    """The model's attention is outside what `_shared_prefix_attention` reproduces exactly."""


class _NoConcat:
    """Cache layer mixin: keeps its batch-1 prefix as it is and hands a forward's new keys straight to the
    attention (`_shared_prefix_attention` joins the two); the prefix is never modified, so the cache serves
    every chunk of alphas."""

    def update(self, key_states, value_states, *args, **kwargs):
        self.new = (key_states, value_states)
        return key_states, value_states


@functools.cache
def _no_concat_classes() -> dict:
    """{transformers cache layer class: its no-concatenation twin}; other layer kinds fall back."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(_SHARED_PREFIX_ATTENTION, _shared_prefix_attention)
    # The model builds its own boolean masks (causal, sliding window) for our attention, sized by the cache.
    AttentionMaskInterface.register(_SHARED_PREFIX_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS.get("sdpa", sdpa_mask))
    return {cls: type(f"NoConcat{cls.__name__}", (_NoConcat, cls), {})
            for cls in (DynamicLayer, DynamicSlidingWindowLayer)}


def shared_prefix_cache(model: Model, layers_kv: dict[int, tuple[torch.Tensor, torch.Tensor]], *, above: int):
    """A KV cache of batch-1 (keys, values) whose layers above `above` never concatenate (any batch attends
    to them through `attention_over_shared_prefix`), or None where a layer kind is not one we reproduce."""
    cache = prefix_cache(model, layers_kv)
    twins = _no_concat_classes()
    for idx, cache_layer in enumerate(cache.layers):
        if idx > above:
            twin = twins.get(type(cache_layer))
            if twin is None or cache_layer.keys is None or cache_layer.keys.shape[0] != 1:
                return None
            cache.layers[idx] = shared = object.__new__(twin)
            # keys_t: [Hkv, D, P], the prefix keys transposed once (a contiguous right operand: ~1.5x faster matmuls)
            shared.__dict__.update(cache_layer.__dict__, new=None, uses=0,
                                   keys_t=cache_layer.keys[0].transpose(1, 2).contiguous())
    return cache


def _model_configs(hf: nn.Module) -> list:
    """Every config object a module of `hf` may read its attention implementation from."""
    found, stack = {}, [getattr(hf, "config", None)] + [getattr(m, "config", None) for m in hf.modules()]
    while stack:
        config = stack.pop()
        if config is None or id(config) in found or not hasattr(config, "_attn_implementation_internal"):
            continue
        found[id(config)] = config
        stack.extend(getattr(config, key, None) for key in getattr(config, "sub_configs", {}) or {})
    return list(found.values())


@contextlib.contextmanager
def attention_over_shared_prefix(model: Model, cache) -> Iterator[None]:
    """Inside it, the model's attention runs `_shared_prefix_attention` over `cache` (a `shared_prefix_cache`);
    the model's configs are restored on exit."""
    _no_concat_classes()
    saved = [(config, config._attn_implementation_internal) for config in _model_configs(model.hf)]
    token = _active_cache.set(cache)
    try:
        for config, _ in saved:
            config._attn_implementation_internal = _SHARED_PREFIX_ATTENTION
        yield
    finally:
        for config, implementation in saved:
            config._attn_implementation_internal = implementation
        _active_cache.reset(token)


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


def _mask_layout(mask: torch.Tensor, n_kv: int, groups: int, n: int) -> torch.Tensor:
    """A [Bm, Hm, n, K] mask (Hm 1 or every head) in the [Hkv, Bm, groups * n, K] layout of our scores."""
    Bm, Hm, _, K = mask.shape
    if Hm == 1:
        return mask[:, 0].unsqueeze(1).expand(Bm, groups, n, K).reshape(1, Bm, groups * n, K)
    return mask.reshape(Bm, n_kv, groups, n, K).transpose(0, 1).reshape(n_kv, Bm, groups * n, K)


def _shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention of each row's queries over [the batch-1 prefix, the row's own keys], without copying
    the prefix per row: softmax(q K^T * scaling (soft-capped) + mask) V, one softmax over both parts."""
    cache = _active_cache.get()
    layer_idx = getattr(module, "layer_idx", None)
    layer = cache.layers[layer_idx] if cache is not None and isinstance(layer_idx, int) \
        and 0 <= layer_idx < len(cache.layers) else None
    if not isinstance(layer, _NoConcat) or layer.new is None or key is not layer.new[0] or value is not layer.new[1]:
        raise _Unsupported("the attention did not receive the keys its cache layer returned")
    extra = [k for k, v in kwargs.items() if v is not None and k not in _NEUTRAL_ATTENTION_KWARGS]
    if extra or kwargs.get("output_attentions") or (dropout and module.training):
        raise _Unsupported(f"attention arguments {extra or ['output_attentions/dropout']}")
    layer.new, layer.uses = None, layer.uses + 1

    B, Hq, n, D = query.shape
    Hkv = key.shape[1]
    if Hq % Hkv or key.shape[2] != n or value.shape[:3] != key.shape[:3]:
        raise _Unsupported("query and key heads do not group")
    P = layer.keys.shape[-2]
    mask = attention_mask
    if mask is not None:
        if mask.ndim != 4 or mask.shape[-2:] != (n, P + n) or mask.shape[0] not in (1, B) \
                or mask.shape[1] not in (1, Hq):
            raise _Unsupported(f"an attention mask of shape {tuple(mask.shape)}")
        if bool(mask.all()) if mask.dtype == torch.bool else not bool((mask != 0).any()):
            mask = None  # everything visible (the usual case for one new token)
    else:
        if getattr(module, "is_causal", True) is False and n > 1:
            raise _Unsupported("bidirectional attention")
        window = kwargs.get("sliding_window")
        if window is not None and P + n > window:
            raise _Unsupported("a sliding window without a mask")
        if n > 1:  # causal among the row's own tokens; the prefix is all visible
            own = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
            mask = torch.cat([torch.ones(n, P, dtype=torch.bool, device=query.device), own], dim=-1)[None, None]
    sinks = kwargs.get("s_aux", kwargs.get("sinks"))
    if sinks is None and isinstance(getattr(module, "sinks", None), torch.Tensor):
        raise _Unsupported("attention sinks not passed to the attention function")
    if sinks is not None:  # one logit per head (gpt-oss) or per head and query (inkling2): [Bs, Hq, ns, 1]
        sinks = sinks.reshape(1, Hq, 1, 1) if sinks.ndim == 1 and sinks.numel() == Hq else sinks
        if sinks.ndim != 4 or sinks.shape[0] not in (1, B) or sinks.shape[1] != Hq or sinks.shape[2] not in (1, n) \
                or sinks.shape[3] != 1:
            raise _Unsupported(f"attention sinks of shape {tuple(sinks.shape)}")
    scaling = D ** -0.5 if scaling is None else scaling
    # Rows in blocks, so the [heads, rows, P + n] scores stay within budget at any context length.
    step = max(1, ATTENTION_SCORES_BUDGET // (Hq * n * (P + n)))
    outs = [_attend_shared(query[i:i + step], key[i:i + step], value[i:i + step],
                           mask if mask is None or mask.shape[0] == 1 else mask[i:i + step],
                           layer.keys_t, layer.values[0], scaling, kwargs.get("softcap"),
                           sinks if sinks is None or sinks.shape[0] == 1 else sinks[i:i + step])
            for i in range(0, B, step)]
    return (outs[0] if len(outs) == 1 else torch.cat(outs)), None


def _attend_shared(query, key, value, mask, Kp_t, Vp, scaling, softcap, sinks) -> torch.Tensor:
    """[B, n, Hq, Dv]: eager attention of query [B, Hq, n, D] over the prefix keys Kp_t [Hkv, D, P] (transposed)
    and values Vp [Hkv, P, Dv], shared by every row and never copied, followed by each row's own key, value
    [B, Hkv, n, ·]; mask [Bm, Hm, n, P + n]; sinks [Bs, Hq, ns, 1], logits that take probability mass and
    give no value."""
    B, Hq, n, D = query.shape
    Hkv, P, Dv = Kp_t.shape[0], Kp_t.shape[2], Vp.shape[-1]
    G = Hq // Hkv
    # Queries in the layout [Hkv, B, G * n, D]: the rows of all alphas share each key head's prefix matmul.
    q = (query * scaling).reshape(B, Hkv, G, n, D).transpose(0, 1).reshape(Hkv, B, G * n, D)
    own_k, own_v = key.transpose(0, 1), value.transpose(0, 1)  # [Hkv, B, n, ·]
    # Scores over the prefix and over the row's own keys, kept apart (joining them would copy the big part).
    parts = [torch.bmm(q.reshape(Hkv, B * G * n, D), Kp_t).view(Hkv, B, G * n, P),
             torch.matmul(q, own_k.transpose(2, 3))]
    parts = [part.float() for part in parts]  # eager: the softmax in float32
    if softcap is not None:
        parts = [part.div_(softcap).tanh_().mul_(softcap) for part in parts]
    if mask is not None:
        mask = _mask_layout(mask, Hkv, G, n)
        for part, visible in zip(parts, (mask[..., :P], mask[..., P:])):
            if visible.dtype == torch.bool:
                part.masked_fill_(~visible, torch.finfo(part.dtype).min)
            else:
                part.add_(visible.to(part.dtype))
    # One softmax over both parts (and the sink): shift by the joint max, exponentiate, normalise at the end.
    top = torch.maximum(parts[0].amax(-1, keepdim=True), parts[1].amax(-1, keepdim=True))
    if sinks is not None:
        sink = sinks.expand(B, Hq, n, 1).reshape(B, Hkv, G, n, 1).transpose(0, 1).reshape(Hkv, B, G * n, 1)
        top = torch.maximum(top, sink.float())
    prefix_w, own_w = parts[0].sub_(top).exp_(), parts[1].sub_(top).exp_()
    total = prefix_w.sum(-1, keepdim=True) + own_w.sum(-1, keepdim=True)
    if sinks is not None:
        total = total + (sink - top).exp()
    out = torch.bmm(prefix_w.to(value.dtype).view(Hkv, B * G * n, P), Vp).view(Hkv, B, G * n, Dv)
    out = (out + torch.matmul(own_w.to(value.dtype), own_v)) / total.to(value.dtype)
    return out.view(Hkv, B, G, n, Dv).permute(1, 3, 0, 2, 4).reshape(B, n, Hq, Dv)


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix all rows share, leaving every row at least one token of its own."""
    n = min(len(r) for r in rows) - 1
    first = rows[0]
    for i in range(max(n, 0)):
        if any(r[i] != first[i] for r in rows[1:]):
            return i
    return max(n, 0)


# ----------------------------------------------------------------------------- next-token probabilities


@takes_vector
@torch.inference_mode()
def next_token_probs(model: Model, vector, layer: int, context: str, alphas, positions: str = "all", *,
                     chat: bool = False, token_budget: int = DEFAULT_TOKEN_BUDGET) -> torch.Tensor:
    """Eq. (1) swept over alpha: [len(alphas), vocab] float32, the softmax of the steered logits after `context`.

    Blocks 0..layer run once; alphas go in the batch dimension through blocks layer+1.. only; logits
    only at the last position. With positions="last", the prefix runs once with a KV cache and only
    the last token goes through the model per alpha.

    Args:
        vector: a SteeringVector (SteeringVectors[layer]), which knows its layer; the former (tensor, layer)
            pair still works for one release, with a DeprecationWarning.
        context: the text whose next token is predicted.
        alphas: raw strengths, a list or a 1-D tensor (`sv.raw_alphas(grid)` converts an AlphaGrid).
        positions: "all" steers every position, "last" only the last one.
        chat: wrap the context in the model's chat template.
        token_budget: rows x tokens per forward: bounded memory for any number of alphas.

    Example::

        probs = ss.next_token_probs(model, sv[15], "Today I", [-8.0, 0.0, 8.0])   # [3, vocab]
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
def shared_prefix_last_logits(model: Model, v: torch.Tensor, layer: int, rows: Sequence[Sequence[int]],
                              alphas: torch.Tensor, positions: str, *,
                              token_budget: int) -> Iterator[tuple[slice, int, torch.Tensor]]:
    """(alpha slice, row index j, [b, vocab] steered logits at the last token of rows[j]) for token rows
    sharing a prefix (k-shot prompts), over every alpha chunk and row.

    The shared prefix runs once through blocks 0..l (unsteered, shared by all alphas) and once per alpha
    chunk through blocks l+1.. (steered, alpha in the batch dimension), leaving KV caches; with
    positions="last" it is unsteered throughout and runs once. Each row then runs only its own tokens:
    blocks 0..l once, blocks l+1.. with the alphas in the batch, logits at the last position only.
    """
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


# ----------------------------------------------------------------------------- generation


@torch.inference_mode()
def steered_generate(model: Model, enc: Encoded, vector, layer: int, alphas, positions: str = "all",
                     **generate_kwargs) -> torch.Tensor:
    """Eq. (1) during `generate`: one alpha per batch row, steering the prompt and every decode step.

    Args:
        enc: the encoded prompts (model.encode, left padded), one row per alpha.
        vector, layer: a [d_model] tensor or a SteeringVector, and the block whose output is steered.
        alphas: one raw alpha per row of `enc`.
        positions: "all" or "last" (as in `steer`).
        generate_kwargs: passed on to model.hf.generate (max_new_tokens, do_sample, ...).

    Example::

        enc = model.encode(["Tell me about your day."] * 3, chat=True)
        ids = ss.steered_generate(model, enc, sv[15], 15, [-4.0, 0.0, 4.0], max_new_tokens=20)
    """
    a = as_alphas(alphas)
    if a.shape[0] != enc.input_ids.shape[0]:
        raise InputError(f"{a.shape[0]} alphas for {enc.input_ids.shape[0]} prompts; give one alpha per row")
    generate_kwargs.setdefault("pad_token_id", model.pad_id)
    with steer(model, vector, layer, a, positions=positions):
        return model.hf.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, **generate_kwargs)


# Nucleus sampling needs the tokens in order of probability; a full sort of the vocabulary costs ~20x
# a top-256, and the nucleus of a language model almost always lies in its top 256 (else we widen).
NUCLEUS_WIDTHS = (256, 4096)


def candidates(scores: torch.Tensor, temperature: float, top_p: float, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, token ids), both [B, k]: what temperature, top-k and nucleus sampling may pick.

    Probabilities are renormalised over the candidates; zeros mark tokens the nucleus drops.
    """
    probs = torch.softmax(scores.float() / temperature, dim=-1)
    vocab = probs.shape[-1]
    if top_k > 0 and top_k < vocab:
        values, ids = torch.topk(probs, top_k, dim=-1)
        values = values / values.sum(-1, keepdim=True)  # the nucleus is taken within the top k
    elif top_p < 1.0:
        for width in NUCLEUS_WIDTHS + (vocab,):
            values, ids = torch.topk(probs, min(width, vocab), dim=-1)
            if width >= vocab or bool((values.sum(-1) >= top_p).all()):
                break  # every row's nucleus lies within these candidates: the rest would be dropped anyway
    else:
        return probs, torch.arange(vocab, device=probs.device).expand_as(probs)
    if top_p < 1.0:
        # Drop a token when the tokens before it already reach top_p (the top token always stays).
        values = values.masked_fill((values.cumsum(-1) - values) >= top_p, 0.0)
    return values / values.sum(-1, keepdim=True), ids


def filtered_probs(scores: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """The sampling distribution of each row of `scores` [B, V], as a dense [B, V] float32 tensor."""
    values, ids = candidates(scores, temperature, top_p, top_k)
    return torch.zeros(scores.shape, dtype=values.dtype, device=values.device).scatter(-1, ids, values)


class RowSampler:
    """A logits processor that samples every row from its own seeded generator.

    It returns scores that are -inf except at the sampled token, so greedy search keeps that token:
    a row's text depends only on its own seed, not on the batch it shares.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, top_k: int):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        values, ids = candidates(scores, self.temperature, self.top_p, self.top_k)
        # One uniform per row from its own CPU generator, then inverse-CDF on the model's device.
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in self.generators])
        cdf = values.cumsum(-1)
        target = (u.to(device=cdf.device, dtype=cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
        pick = torch.searchsorted(cdf, target).clamp(max=values.shape[-1] - 1)
        # Never land on a zero-probability token through rounding at a flat stretch of the CDF.
        pick = torch.where(values.gather(-1, pick) > 0, pick, values.argmax(-1, keepdim=True))
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(-1, ids.gather(-1, pick), 0.0)


@torch.inference_mode()
def sample_rows(model: Model, enc: Encoded, seeds: Sequence[int], *, max_new_tokens: int, temperature: float,
                top_p: float, top_k: int, stops: Sequence[int], vector=None, layer: int | None = None, alphas=None,
                positions: str = "all", streamer=None) -> list[dict]:
    """One sampled continuation per row of `enc`, row r from its own generator seeded seeds[r] (RowSampler):
    {text, n_tokens, finish ("stop"|"length")}, cut at the first of `stops`. With a `vector`, row r is
    steered by alphas[r] * v after block `layer` (steered_generate). `streamer`: transformers' streamer protocol
    (put / end), for one row.
    """
    from transformers import LogitsProcessorList

    # Greedy over the sampler's one-hot scores; neutral values keep a model's own generation_config
    # (repetition penalty, n-gram blocking) from changing the distribution we sample.
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, repetition_penalty=1.0,
                  no_repeat_ngram_size=0, eos_token_id=list(stops) or None, pad_token_id=model.pad_id,
                  logits_processor=LogitsProcessorList([RowSampler(seeds, temperature, top_p, top_k)]))
    if streamer is not None:
        kwargs["streamer"] = streamer
    if vector is None:
        generated = model.hf.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, **kwargs)
    else:
        generated = steered_generate(model, enc, vector, layer, alphas, positions, **kwargs)
    out = []
    for row in generated[:, enc.input_ids.shape[1]:].tolist():
        end = next((i for i, t in enumerate(row) if t in stops), None)
        ids = row if end is None else row[:end]
        out.append(dict(text=model.decode(ids).strip(), n_tokens=len(ids), finish="length" if end is None else "stop"))
    return out


# ----------------------------------------------------------------------------- batched steered sampling
#
# The decode loop of the generation stages (concept, recommend, the controls of the trust issue). Rows are
# (prompt, vector, alpha, seed); what does not depend on alpha or the vector is computed once:
# - blocks 0..l of each distinct prompt run once (their keys are unsteered: the edit is at block l's output);
# - blocks l+1.. of the prompt run once per distinct (prompt, vector, alpha), shared by its completions, and
#   give their first token's distribution;
# - each row then decodes one token per step, steered by its own alpha_r * V[vector_r] (any mix of vectors
#   and alphas in one batch), into a KV cache preallocated for the whole completion (no concatenation);
# - finished rows leave the batch.
# Row r draws one uniform per step from its own generator (as `RowSampler`), so its text is a function of
# (prompt, vector, alpha, seed) and the settings, not of its batch (up to float rounding between batch shapes).

# Set to "hf" to sample through `model.hf.generate` with a hook (the former path; benchmarks compare the two).
GENERATION_ENGINE = "batched"
# Prompt tokens per prefill forward (rows x padded length): bounded memory for long prompts and many groups.
PREFILL_TOKEN_BUDGET = 16384


def as_vectors(model: Model, vectors) -> torch.Tensor:
    """[n, d_model] on the model's device and dtype: one vector, a list of vectors/SteeringVectors, or a stacked
    [n, d] tensor; each checked as `as_vector`."""
    if isinstance(vectors, torch.Tensor) and vectors.ndim == 2:
        return torch.stack([as_vector(model, v) for v in vectors]) if len(vectors) else \
            vectors.to(device=model.device, dtype=model.dtype).reshape(0, model.d_model)
    if isinstance(vectors, (list, tuple)):
        return torch.stack([as_vector(model, v) for v in vectors])
    return as_vector(model, vectors)[None, :]


class _RowDelta:
    """A forward hook adding each batch row's own steering delta [B, d] at `positions`; `delta` may be
    replaced between forwards (rows leave the batch)."""

    def __init__(self, delta: torch.Tensor | None):
        self.delta = delta
        self.record = None  # a list: each forward's unsteered last-position residual stream is appended

    def __call__(self, _module, _inputs, output):
        h = _hidden(output)
        if self.record is not None:
            self.record.append(h[:, -1].clone())
        if self.delta is None:
            return output
        return _replace_hidden(output, h + self.delta.to(h.device)[:, None, :])


class _Preallocated:
    """Cache layer mixin: keys and values live in a buffer sized for the whole completion; a forward writes its
    new keys in place and attends to a view of the filled part (no concatenation, no copy per step)."""

    def update(self, key_states, value_states, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self.buffer_k.shape[-2]:
            raise RuntimeError("the preallocated KV cache is full")
        self.buffer_k[:, :, self.length:end] = key_states
        self.buffer_v[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self.buffer_k[:, :, :end], self.buffer_v[:, :, :end]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.buffer_k, self.buffer_v = self.buffer_k[indices], self.buffer_v[indices]
        self.keys, self.values = self.buffer_k[:, :, :self.length], self.buffer_v[:, :, :self.length]


@functools.cache
def _preallocated_class():
    from transformers.cache_utils import DynamicLayer

    return type("PreallocatedDynamicLayer", (_Preallocated, DynamicLayer), {})


def _decode_cache(model: Model, layers_kv: dict[int, tuple[torch.Tensor, torch.Tensor]], capacity: int):
    """A KV cache holding `layers_kv` (every layer, batch = rows), full-attention layers preallocated to
    `capacity` positions; other layer kinds (sliding windows) keep their own update."""
    from transformers.cache_utils import DynamicLayer

    cache = prefix_cache(model, layers_kv)
    twin = _preallocated_class()
    for idx, cache_layer in enumerate(cache.layers):
        if type(cache_layer) is DynamicLayer and cache_layer.keys is not None:
            keys, values = cache_layer.keys, cache_layer.values
            B, H, T, D = keys.shape
            buffer_k = keys.new_empty((B, H, capacity, D))
            buffer_v = values.new_empty((B, H, capacity, values.shape[-1]))
            buffer_k[:, :, :T], buffer_v[:, :, :T] = keys, values
            cache.layers[idx] = layer = object.__new__(twin)
            layer.__dict__.update(cache_layer.__dict__, buffer_k=buffer_k, buffer_v=buffer_v, length=T,
                                  keys=buffer_k[:, :, :T], values=buffer_v[:, :, :T])
    return cache


def _draw(generators: Sequence[torch.Generator], scores: torch.Tensor, temperature: float, top_p: float,
          top_k: int) -> torch.Tensor:
    """[B] token ids: row r by inverse CDF at one uniform from generators[r] (the rule of `RowSampler`)."""
    values, ids = candidates(scores, temperature, top_p, top_k)
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
    cdf = values.cumsum(-1)
    target = (u.to(device=cdf.device, dtype=cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    pick = torch.searchsorted(cdf, target).clamp(max=values.shape[-1] - 1)
    pick = torch.where(values.gather(-1, pick) > 0, pick, values.argmax(-1, keepdim=True))
    return ids.gather(-1, pick)[:, 0]


def _group_rows(rows: Sequence[tuple[int, int, float, int]]) -> tuple[list[int], list[tuple], list[int], list[int]]:
    """(distinct prompt indices, distinct (prompt, vector, alpha) groups, each group's prompt slot, each row's group)."""
    prompts = sorted({r[0] for r in rows})
    slot = {p: i for i, p in enumerate(prompts)}
    groups = sorted({(r[0], r[1], float(r[2])) for r in rows}, key=lambda g: (slot[g[0]], g[1], g[2]))
    index = {g: i for i, g in enumerate(groups)}
    return prompts, groups, [slot[g[0]] for g in groups], [index[(r[0], r[1], float(r[2]))] for r in rows]


@torch.inference_mode()
def _prefill(model: Model, enc: Encoded, layer: int | None, vectors: torch.Tensor | None, groups, group_slot,
             positions: str, read: dict | None = None):
    """(first-token logits [G, V] float32, {layer: (keys, values)} per prompt slot for blocks 0..l, per group
    above l): blocks 0..l once per prompt, blocks l+1.. once per (prompt, vector, alpha) group."""
    T = enc.input_ids.shape[1]
    slots = torch.tensor(group_slot, device=model.device)

    def sub(e: Encoded, idx: torch.Tensor) -> Encoded:
        return Encoded(e.input_ids[idx], e.attention_mask[idx], e.position_ids[idx], e.padding_side)

    if layer is None:  # unsteered: the whole model once per prompt
        cache = prefix_cache(model)
        logits = _forward(model, enc, use_cache=True, past_key_values=cache, logits_to_keep=1).logits[:, -1].float()
        return logits[slots], cache_snapshot(cache, range(model.n_layers)), None
    low = prefix_cache(model)
    h = hidden_at(model, enc, layer, past_key_values=low)  # [P, T, d]
    lo = cache_snapshot(low, range(layer + 1))
    step = max(1, PREFILL_TOKEN_BUDGET // max(1, T))
    logits, hi_parts = [], []
    for start in range(0, len(groups), step):
        part = groups[start:start + step]
        idx = slots[start:start + len(part)]
        alphas = torch.tensor([g[2] for g in part], dtype=h.dtype, device=h.device)
        delta = alphas[:, None] * vectors[torch.tensor([g[1] for g in part], device=vectors.device)]
        steered = h[idx].clone()
        if positions == "all":
            steered += delta[:, None, :]
        else:
            steered[:, -1] += delta
        cache = prefix_cache(model)
        logits.append(forward_from(model, sub(enc, idx), layer, steered, logits_to_keep=1,
                                   past_key_values=cache)[:, -1].float())
        hi_parts.append(cache_snapshot(cache, range(layer + 1, model.n_layers)))
    hi = {i: tuple(torch.cat([p[i][j] for p in hi_parts]) if len(hi_parts) > 1 else hi_parts[0][i][j]
                   for j in range(2)) for i in range(layer + 1, model.n_layers)}
    if read is not None:  # the unsteered model above l, once per prompt: its first-token logits and keys (fluency reading)
        cache = prefix_cache(model)
        plain = forward_from(model, enc, layer, h, logits_to_keep=1, past_key_values=cache)[:, -1].float()
        read.update(logits=plain, hi=cache_snapshot(cache, range(layer + 1, model.n_layers)))
    return torch.cat(logits), lo, hi


@torch.inference_mode()
def sample_steered(model: Model, prompts: Sequence[Sequence[int]], rows: Sequence[tuple[int, int, float, int]], *,
                   max_new_tokens: int, temperature: float, top_p: float, top_k: int, stops: Sequence[int],
                   vectors: torch.Tensor | None = None, layer: int | None = None, positions: str = "all",
                   read_tokens: int = 0) -> list[dict]:
    """One sampled continuation per row (prompt_index, vector_index, alpha, seed), all rows in one decode loop:
    {ids, n_tokens, finish ("stop"|"length")}, cut at the first of `stops`. Row r adds alpha_r * vectors[vector_r]
    after block `layer` (`vectors` [n, d], or None: unsteered); it samples from its own generator seeded seed_r.

    With `read_tokens` (steered only), each row also gets `nll`: the unsteered model's negative log-likelihood of
    its first `read_tokens` tokens, teacher-forced after the prompt. Blocks 0..l of the unsteered model see
    exactly what the steered decode fed them (the edit is at block l's output), so their residual stream is
    recorded during the decode and only blocks l+1.. run again, over the new tokens, on the prompt's unsteered keys.
    """
    check_positions(positions)
    B = len(rows)
    if B == 0:
        return []
    lengths = {len(prompts[r[0]]) for r in rows}
    if len(lengths) > 1 and model.hf.config.get_text_config(decoder=True) is not model.hf.config:
        # A multimodal wrapper (Gemma 3) builds its own masks, and its decode steps over a left-padded batch differ
        # from the rows alone (measured, tests/test_steering.py): prompts of one length per batch, never padded.
        out: list[dict] = [{} for _ in rows]
        for n in sorted(lengths):
            idx = [i for i, r in enumerate(rows) if len(prompts[r[0]]) == n]
            for i, d in zip(idx, sample_steered(model, prompts, [rows[i] for i in idx], max_new_tokens=max_new_tokens,
                                                temperature=temperature, top_p=top_p, top_k=top_k, stops=stops,
                                                vectors=vectors, layer=layer, positions=positions,
                                                read_tokens=read_tokens)):
                out[i] = d
        return out
    dev = model.device
    prompt_list, groups, group_slot, row_group = _group_rows(rows)
    enc = model.pad([list(prompts[p]) for p in prompt_list], padding_side="left")
    T = enc.input_ids.shape[1]
    steered = vectors is not None and layer is not None
    read = {} if steered and read_tokens > 0 else None
    first_logits, lo, hi = _prefill(model, enc, layer if steered else None, vectors, groups, group_slot, positions,
                                    read)

    # Each row's prompt cache: blocks 0..l from its prompt, blocks l+1.. from its group (one copy, into the buffer).
    row_group_t = torch.tensor(row_group, device=dev)
    row_slot_t = torch.tensor(group_slot, device=dev)[row_group_t]
    if steered:
        kv = {i: (k[row_slot_t], v[row_slot_t]) for i, (k, v) in lo.items()}
        kv.update({i: (k[row_group_t], v[row_group_t]) for i, (k, v) in hi.items()})
        alphas = torch.tensor([float(r[2]) for r in rows], dtype=vectors.dtype, device=vectors.device)
        delta = alphas[:, None] * vectors[torch.tensor([r[1] for r in rows], device=vectors.device)]
    else:
        kv = {i: (k[row_slot_t], v[row_slot_t]) for i, (k, v) in lo.items()}
        delta = None
    cache = _decode_cache(model, kv, T + max_new_tokens)
    mask = enc.attention_mask[row_slot_t]
    position = enc.position_ids[row_slot_t][:, -1:]
    generators = [torch.Generator().manual_seed(int(r[3])) for r in rows]
    stop_set = torch.tensor(sorted(set(int(s) for s in stops)) or [-1], device=dev)

    out: list[dict] = [{} for _ in rows]
    tokens: list[list[int]] = [[] for _ in rows]
    active = list(range(B))  # original row index of each batch row
    hook = _RowDelta(delta)
    recorded: list[tuple[list[int], torch.Tensor]] = []  # (rows, their unsteered residual at block l) per step
    handle = model.blocks[layer].register_forward_hook(hook) if steered else None
    try:
        logits = first_logits[row_group_t]
        for step in range(max_new_tokens):
            picked = _draw(generators, logits, temperature, top_p, top_k)
            done = torch.isin(picked, stop_set)
            for j, (r, t, d) in enumerate(zip(active, picked.tolist(), done.tolist())):
                if d:
                    out[r] = dict(ids=tokens[r], n_tokens=len(tokens[r]), finish="stop")
                else:
                    tokens[r].append(t)
            if step == max_new_tokens - 1:
                break
            keep = (~done).nonzero()[:, 0]
            if keep.numel() == 0:
                break
            if keep.numel() < len(active):  # finished rows leave the batch
                active = [active[j] for j in keep.tolist()]
                generators = [generators[j] for j in keep.tolist()]
                picked, mask, position = picked[keep], mask[keep], position[keep]
                cache.batch_select_indices(keep)
                if hook.delta is not None:
                    hook.delta = hook.delta[keep]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
            position = position + 1
            hook.record = [] if read is not None and step < read_tokens - 1 else None
            logits = _forward(model, Encoded(picked[:, None], mask, position, "left"), use_cache=True,
                              past_key_values=cache, logits_to_keep=1).logits[:, -1].float()
            if hook.record:
                recorded.append((list(active), hook.record[0]))
    finally:
        if handle is not None:
            handle.remove()
        hook.record = None
    for r in range(B):
        if not out[r]:
            out[r] = dict(ids=tokens[r], n_tokens=len(tokens[r]), finish="length")
    if read is not None:
        del cache
        for r, nll in enumerate(_read_unsteered(model, layer, read, kv, row_slot_t, enc, tokens, recorded,
                                                read_tokens)):
            out[r]["nll"] = nll
    return out


@torch.inference_mode()
def _read_unsteered(model: Model, layer: int, read: dict, kv: dict, row_slot: torch.Tensor, enc: Encoded,
                    tokens: list[list[int]], recorded: list, read_tokens: int) -> list[np.ndarray]:
    """Per row: the unsteered NLL of its first `read_tokens` tokens, from the recorded block-l residual streams of
    its tokens (blocks l+1.. only, over the prompt's unsteered keys above l and its keys up to l)."""
    B, d = len(tokens), model.d_model
    n = [min(len(t), read_tokens) for t in tokens]
    first = torch.log_softmax(read["logits"], dim=-1)[row_slot]  # [B, V]: the prompt's unsteered next token
    out = [np.array([-float(first[r, tokens[r][0]])]) if n[r] else np.zeros(0) for r in range(B)]
    k = max(n) - 1  # positions fed back: tokens 0..n-2 predict tokens 1..n-1
    if k <= 0:
        return out
    hidden = torch.zeros((B, k, d), dtype=model.dtype, device=model.device)
    for j, (rows, h) in enumerate(recorded[:k]):
        hidden[torch.tensor(rows, device=model.device), j] = h.to(device=hidden.device, dtype=hidden.dtype)
    ids = torch.full((B, k), model.pad_id, dtype=torch.long, device=model.device)
    own = torch.zeros((B, k), dtype=torch.long, device=model.device)
    for r in range(B):
        if n[r] > 1:
            ids[r, :n[r] - 1] = torch.tensor(tokens[r][:n[r] - 1])
            own[r, :n[r] - 1] = 1
    mask = torch.cat([enc.attention_mask[row_slot], own], dim=-1)
    position = enc.position_ids[row_slot][:, -1:] + 1 + torch.arange(k, device=model.device)
    cache = prefix_cache(model, {**{i: kv[i] for i in range(layer + 1)},
                                 **{i: (a[row_slot], b[row_slot]) for i, (a, b) in read["hi"].items()}})
    logits = forward_from(model, Encoded(ids, mask, position, "right"), layer, hidden, logits_to_keep=0,
                          past_key_values=cache)
    logp = torch.log_softmax(logits.float(), dim=-1)
    for r in range(B):
        if n[r] > 1:
            nxt = torch.tensor(tokens[r][1:n[r]], device=model.device)
            more = -logp[r, torch.arange(n[r] - 1), nxt].double().cpu().numpy()
            out[r] = np.concatenate([out[r], more])
    return out


@torch.inference_mode()
def completion_nll(model: Model, prompts: Sequence[Sequence[int]], rows: Sequence[tuple[int, Sequence[int]]], *,
                   logit_budget: int = DEFAULT_LOGIT_BUDGET) -> list[np.ndarray]:
    """Per row (prompt_index, completion ids): each completion token's negative log-likelihood (nats, float64)
    under the unsteered model, teacher-forced after its prompt. Each distinct prompt runs once; its KV cache
    is expanded to the rows that complete it (the text as the unsteered model reads it)."""
    out = [np.zeros(0) for _ in rows]
    todo = [r for r in range(len(rows)) if len(rows[r][1])]
    todo.sort(key=lambda r: (rows[r][0], len(rows[r][1])))
    k_max = max((len(rows[r][1]) for r in todo), default=1)
    size = max(1, logit_budget // (k_max * model.vocab_size))
    dev = model.device
    for start in range(0, len(todo), size):
        chunk = todo[start:start + size]
        slots = sorted({rows[r][0] for r in chunk})
        slot = {p: i for i, p in enumerate(slots)}
        enc = model.pad([list(prompts[p]) for p in slots], padding_side="left")
        cache = prefix_cache(model)
        first = _forward(model, enc, use_cache=True, past_key_values=cache, logits_to_keep=1).logits[:, -1]
        first = torch.log_softmax(first.float(), dim=-1)
        idx = torch.tensor([slot[rows[r][0]] for r in chunk], device=dev)
        kv = {i: (k[idx], v[idx]) for i, (k, v) in cache_snapshot(cache, range(model.n_layers)).items()}
        comp = model.pad([list(rows[r][1]) for r in chunk], padding_side="right")
        k = comp.input_ids.shape[1]
        mask = torch.cat([enc.attention_mask[idx], comp.attention_mask], dim=-1)
        position = enc.position_ids[idx][:, -1:] + 1 + torch.arange(k, device=dev)
        logits = _forward(model, Encoded(comp.input_ids, mask, position, "right"), use_cache=True,
                          past_key_values=prefix_cache(model, kv), logits_to_keep=0).logits
        logp = torch.log_softmax(logits.float(), dim=-1)  # position j predicts completion token j + 1
        target = comp.input_ids
        nll = torch.empty(target.shape, dtype=torch.float64)
        nll[:, 0] = -first[idx].gather(-1, target[:, :1])[:, 0].double().cpu()
        if k > 1:
            nll[:, 1:] = -logp[:, :-1].gather(-1, target[:, 1:, None])[..., 0].double().cpu()
        for j, r in enumerate(chunk):
            out[r] = nll[j, :len(rows[r][1])].numpy()
        del logits, logp
    return out


# ----------------------------------------------------------------------------- differentiable replay


def forward_from_differentiable(model: Model, enc: Encoded, layer: int, hidden: torch.Tensor, *,
                                logits_to_keep=0) -> torch.Tensor:
    """`forward_from` outside inference mode, so forward-mode AD (torch.func.jvp) can carry d/d alpha.

    `hidden` may be a dual tensor, e.g. h + alpha * v with alpha a jvp input; blocks 0..layer never run.
    """
    check_layer(model, layer)
    if any(p.is_meta for p in model.hf.parameters()):
        raise InputError(f"{model.name} keeps some weights offloaded (device_map with \"cpu\"/\"disk\" entries), which "
                         "accelerate loads inside the forward, where forward-mode AD (the curvature of Thm 3.8) cannot "
                         "run; place the model on GPUs only, or skip the curvature (xent --no-curvature)")
    with _replay_from(model, layer, hidden):
        out = _forward(model, enc, use_cache=False, logits_to_keep=logits_to_keep)
    return out.logits


class _SecondOrderOps(torch.overrides.TorchFunctionMode):
    """Plain formulas for ops whose nested forward-mode AD PyTorch gets wrong or lacks.

    layer_norm's jvp-of-jvp is wrong (torch 2.13) and silu's is missing under no_grad; the formulas
    below are the same functions written with ops whose nested forward AD is exact.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.layer_norm, torch.layer_norm):
            return _layer_norm(*args, **kwargs)
        if func is F.silu or func is torch.nn.functional.silu:
            x = args[0] if args else kwargs["input"]
            return x * torch.sigmoid(x)
        if hasattr(F, "rms_norm") and func is F.rms_norm:
            return _rms_norm(*args, **kwargs)
        return func(*args, **kwargs)


def _layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *_args):
    dims = tuple(range(-len(normalized_shape), 0))
    mean = x.mean(dim=dims, keepdim=True)
    var = (x - mean).pow(2).mean(dim=dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def _rms_norm(x, normalized_shape, weight=None, eps=None):
    dims = tuple(range(-len(normalized_shape), 0))
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    y = x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)
    return y * weight if weight is not None else y


@contextlib.contextmanager
def forward_ad_safe() -> Iterator[None]:
    """Inside it, nested torch.func.jvp through `forward_from_differentiable` is exact (Thm 3.8 curvature)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # The fused CPU/GPU attention kernels have no forward-mode AD; the math backend is composite.
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), _SecondOrderOps():
        yield
