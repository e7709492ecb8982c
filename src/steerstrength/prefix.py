"""The shared prefix (KV) cache: a prefix's keys and values computed once and read by every alpha row.

`prefix_cache` / `cache_snapshot` seed and read a transformers cache; `shared_prefix_cache` and
`attention_over_shared_prefix` let a batch of rows attend to a batch-1 prefix without copying it
(docs/steering.md "Last-token sweeps at long context"). The forwards that use them are in steering.py.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Iterator, Sequence

import torch
from torch import nn

from steerstrength.models import Model


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

