"""Using an answer: steered completions at chosen strengths (`generate`) and the next-token view the live page shows
(`serve`), each with what the measurements say about it.

Completions: every (prompt, alpha, completion) is one row of ONE batched generation (alpha per row,
metrics.concept.generate_rows), each row from its own seeded generator (completion_seed, shared across alphas: common
random numbers), so a text depends on (prompt, alpha, seed) only and the columns differ by steering, not by luck.
Each completion carries its per-token KL(p_alpha || p_0) to the unsteered model (recommend.token_kl: teacher-forced on
prompt + completion, the completion re-tokenized from its text) and the degeneration rule's verdict
(metrics.concept.degeneration).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from steerstrength.config import USE
from steerstrength.errors import InputError
from steerstrength.models import Model

if TYPE_CHECKING:
    import pandas as pd


def raw_alphas(sv, alphas, unit: str, model: Model) -> list[float]:
    """`alphas` in `unit` ("raw" or "resid") as the raw alphas `steer` adds with the SteeringVector `sv`."""
    from steerstrength.grid import check_unit, to_raw

    return to_raw(alphas, check_unit(unit), None if unit == "raw" else sv.resid_scale(model)).tolist()


def generate_completions(model: Model, sv, prompts: Sequence[str], alphas, *, unit: str = "raw",
                         completions: int | None = None, settings=None, seed: int | None = None,
                         batch_size: int | None = None, streamer=None, progress=None) -> "pd.DataFrame":
    """Steered completions of every prompt at every alpha: one row per (prompt, alpha, completion).

    Args:
        sv: a SteeringVector (it knows its layer; r_l recorded or measured on `model` for unit "resid").
        alphas: strengths in `unit`; the table has both `alpha` (raw) and `alpha_resid`.
        settings: a metrics.concept.SamplingSettings (default: config.USE's sampling, the chat template when the model
            has one); positions "all" (the KL is teacher-forced with every position steered, as generated).
        streamer: transformers' streamer for a single row (one prompt, one alpha, one completion).

    Columns: prompt_index, prompt, alpha, alpha_resid, completion_index, seed, completion, n_new_tokens, finish,
    kl_mean, kl_max (per-token KL to the unsteered model, nats), n_kl_tokens, the degeneration measures and
    `degenerate`; plus model, concept, layer.
    """
    import pandas as pd

    from steerstrength.metrics.concept import SamplingSettings, completion_seed, degeneration, generate_rows
    from steerstrength.recommend import token_kl

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise InputError("give at least one non-empty prompt")
    completions = USE.completions if completions is None else int(completions)
    if completions < 1:
        raise InputError(f"completions must be at least 1, not {completions}")
    settings = settings or SamplingSettings(max_new_tokens=USE.max_new_tokens, temperature=USE.temperature,
                                            top_p=USE.top_p, top_k=USE.top_k, chat=model.has_chat_template)
    if settings.positions != "all":
        raise InputError("generate steers every position (positions='all'), as the KL it reports is measured")
    seed = USE.seed if seed is None else int(seed)
    raw = raw_alphas(sv, alphas, unit, model)
    scale = sv.resid_scale(model) if unit == "resid" or sv.residual_norm is not None else None
    rows = [(p, a, completion_seed(seed, p, c)) for p in prompts for a in raw for c in range(completions)]
    where = [(pi, c) for pi in range(len(prompts)) for _ in raw for c in range(completions)]
    if streamer is not None and len(rows) != 1:
        raise InputError(f"streaming shows one completion at a time; this call has {len(rows)} "
                         "(one prompt, one alpha, one completion)")
    done = generate_rows(model, sv, rows, settings.check(), progress=progress, streamer=streamer,
                         batch_size=USE.batch_size if batch_size is None else int(batch_size))
    prompt_ids = {p: model.token_ids(p, chat=settings.chat) for p in prompts}
    completion_ids = [model.tokenizer(g["completion"], add_special_tokens=False)["input_ids"] for g in done]
    kl = token_kl(model, sv, [prompt_ids[r[0]] for r in rows], completion_ids, [r[1] for r in rows])
    out = []
    for (p, a, s), (pi, c), g, k in zip(rows, where, done, kl):
        out.append(dict(model=model.name, concept=sv.meta.get("concept") or "", layer=sv.layer,
                        prompt_index=pi, prompt=p, alpha=a,
                        alpha_resid=None if scale is None else a * scale, completion_index=c, seed=s,
                        **g, kl_mean=float(k.mean()) if k.size else 0.0, kl_max=float(k.max()) if k.size else 0.0,
                        n_kl_tokens=int(k.size), **degeneration(g["completion"])))
    return pd.DataFrame(out)


def top_tokens(model: Model, sv, prompt: str, alpha: float, *, chat: bool, k: int | None = None) -> dict:
    """The next-token distribution after `prompt` steered at raw `alpha` (steering.next_token_probs), and unsteered:
    the k most probable tokens with both probabilities, KL(p_alpha || p_0) and the entropy."""
    import torch

    from steerstrength.steering import next_token_probs

    k = USE.top_tokens if k is None else int(k)
    probs = next_token_probs(model, sv, prompt, [float(alpha), 0.0], chat=chat).double()
    p, p0 = probs[0], probs[1]
    top = torch.topk(p, min(k, p.numel()))
    kl = float((p * (p.clamp_min(1e-300).log() - p0.clamp_min(1e-300).log())).sum())
    entropy = float(-(p * p.clamp_min(1e-300).log()).sum())
    tokens = model.token_strings(top.indices.tolist())
    return dict(tokens=[dict(token=t, id=int(i), p=float(v), p0=float(p0[i]))
                        for t, i, v in zip(tokens, top.indices.tolist(), top.values.tolist())],
                kl=max(kl, 0.0), entropy=entropy)
