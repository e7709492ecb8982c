"""Sampling from a steered model: the seeded per-row sampler and the batched steered decode.

`steered_generate` / `sample_rows` steer `model.hf.generate` with a hook; `sample_steered` is the decode loop of
the generation stages (rows of (prompt, vector, alpha, seed), prompt blocks shared, a preallocated KV cache, the
unsteered fluency reading); `completion_nll` scores completions under the unsteered model.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch

from steerstrength.errors import InputError
from steerstrength.models import Encoded, Model
from steerstrength.prefix import cache_snapshot, prefix_cache
from steerstrength.steering import (DEFAULT_LOGIT_BUDGET, _forward, _hidden, _replace_hidden, as_alphas, as_vector,
                                    check_positions, forward_from, hidden_at, steer)

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

