"""Concept probability in sampled generations of the steered model (Sec. 5, App. A; Thm 3.6).

For each alpha and prompt, completions are sampled with alpha * v added after block `layer` at
every position, decode steps included. Alpha sits in the batch dimension: one `generate` call
serves many (alpha, prompt, completion) rows. A judge labels each completion; the concept
probability per alpha is the fraction labelled present, with a Wilson interval, pooled and per
prompt, and a tanh fit p(alpha) = c + a tanh(b (alpha - alpha0)) in the spirit of Thm 3.6.

Degeneration: at large |alpha| steered text degenerates (one token repeated, strings of non-words), the
judge stops finding the concept, and p(alpha) falls where Thm 3.6 says it saturates. `degeneration(text)`
measures each completion on its whitespace-separated tokens ("words": lower-cased, surrounding punctuation
stripped, for the repetition measures):
  distinct2      distinct word bigrams / word bigrams (1.0 under 3 words),
  repeat_share   count of the most frequent word / words,
  nonword_share  share of tokens with no letter a-z/A-Z, or a run of 4+ identical characters, or over
                 20 characters (so text in a non-Latin script counts as non-words too),
and flags it degenerate when distinct2 < 0.5 or repeat_share > 0.4 (both only with at least 3 words, so
"Sure!" is not degenerate) or nonword_share > 0.3, or when it is empty (`degenerate_rules`); and, with the
fluency check (fluency_tokens > 0), when the unsteered model reads its first tokens with a mean NLL above the
threshold `calibrate_fluency` fits on fluent texts vs their token shuffles (word salad the rules pass). Degenerate
completions are counted apart: the curve's p_fluent is the judge's rate among the fluent ones. An alpha is degenerate when
more than half of its completions are (`degenerate_share` > 0.5, per scope: pooled or per prompt).
`curve_summary` then fits the tanh a second time on the fit range: the contiguous run of non-degenerate
alphas (on the sorted grid) containing alpha = 0, or, when 0 is degenerate or off the grid, the
non-degenerate alpha nearest to 0 (a tie goes to the longer run, then to the negative side).

Reproducibility: row r samples with its own generator torch.Generator(seed_r), one uniform per decode
step, by inverse CDF (sampling.RowSampler). A completion is therefore a function of (prompt, alpha,
seed_r), the sampling settings and the model/dtype/device, not of which rows shared its batch (up to
float rounding between batch shapes, which flips a token only if a uniform falls within ~1e-6 of a
CDF boundary). Seeds are shared across alphas (common random numbers), so differences between alphas
come from steering, not from luck.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import string
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from steerstrength.errors import InputError
from steerstrength.models import Model
from steerstrength.sampling import sample_rows
from steerstrength.steering import as_alphas, check_layer, check_positions

if TYPE_CHECKING:
    import pandas as pd

    from steerstrength.config import ConceptConfig

Z95 = 1.959963984540054

# The documented degeneration rule (module docstring): a completion is degenerate when one measure
# crosses its threshold. Fluent English sits far from all three (distinct2 ~ 1, repeat_share ~ 0.1-0.3,
# nonword_share ~ 0); looping or garbage text crosses at least one.
MIN_DISTINCT2 = 0.5  # fewer distinct word bigrams than this share: the text loops
MAX_REPEAT_SHARE = 0.4  # one word makes more than this share of the text
MAX_NONWORD_SHARE = 0.3  # more than this share of tokens are not words
MIN_WORDS_FOR_REPETITION = 3  # shorter texts are too short to judge repetition ("Sure!", "Hi there")
NONWORD_MAX_LENGTH = 20  # a token longer than this is not a word
MAX_DEGENERATE_SHARE = 0.5  # an alpha is degenerate when more than this share of its completions are
DEGENERATION_RULE = (f"a completion is degenerate when empty, or distinct2 < {MIN_DISTINCT2} or repeat_share > "
                     f"{MAX_REPEAT_SHARE} (with >= {MIN_WORDS_FOR_REPETITION} words), or nonword_share > "
                     f"{MAX_NONWORD_SHARE}; an alpha is degenerate when more than {MAX_DEGENERATE_SHARE} of its "
                     "completions are; tanh_fit_nondegenerate fits the contiguous non-degenerate alphas around 0")
_LETTER = re.compile(r"[A-Za-z]")
_RUN4 = re.compile(r"(.)\1{3,}", re.DOTALL)


# ----------------------------------------------------------------------------- seeded sampling


def completion_seed(seed: int, prompt: str, index: int) -> int:
    """The seed of completion `index` of `prompt` (the same for every alpha)."""
    digest = hashlib.sha256(f"{int(seed)}\x00{prompt}\x00{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class SamplingSettings:
    """Everything besides (prompt, alpha, seed) that a completion depends on."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    chat: bool = True
    positions: str = "all"

    def check(self, batch_size: int = 1) -> "SamplingSettings":
        from steerstrength.prompts import check_sampling

        check_sampling(1, self.max_new_tokens, self.temperature, self.top_p, self.top_k, batch_size)
        check_positions(self.positions)
        return self


def one_layer(vectors) -> tuple[list, int]:
    """(the SteeringVectors as a list, their one layer): one decode loop steers one block."""
    svs = [vectors] if hasattr(vectors, "layer") else list(vectors)
    if not svs or not all(hasattr(sv, "vector") and isinstance(getattr(sv, "layer", None), int) for sv in svs):
        raise InputError("give a SteeringVector or a list of them (ss.SteeringVectors.load(FILE)[layer])")
    layers = sorted({sv.layer for sv in svs})
    if len(layers) != 1:
        raise InputError(f"the vectors steer layers {layers}; one decode loop steers one layer: give them apart")
    return svs, layers[0]


def generate_rows(model: Model, vectors, rows: Sequence[tuple], settings: SamplingSettings, *,
                  batch_size: int = 64, read_tokens: int = 0, progress: Callable | None = None,
                  streamer=None) -> list[dict]:
    """Completions of (prompt, alpha, seed) rows steered by one SteeringVector, or of (prompt, vector_index, alpha,
    seed) rows over a list of SteeringVectors of one layer: the concept direction and its random controls, every
    alpha and completion, share one batched decode loop (sampling.sample_steered).

    Each row samples from its own generator, so its text depends on its (prompt, vector, alpha, seed) and the
    settings only. Rows are batched by prompt, then vector and alpha: a batch's prompt runs once through blocks
    0..l, and once through blocks l+1.. per (vector, alpha), shared by its completions. With `read_tokens`, each
    row also gets `nll`: the unsteered model's mean NLL of its first `read_tokens` tokens (the fluency reading).
    `streamer` (one row only): transformers' streamer, fed the tokens as they are sampled (the same tokens: the
    engines sample alike, tests/test_concept.py).
    """
    from steerstrength.prompts import stop_ids
    from steerstrength.sampling import as_vectors

    settings.check(batch_size)
    svs, layer = one_layer(vectors)
    stacked = as_vectors(model, [sv.vector for sv in svs])
    check_layer(model, layer)
    rows = [tuple(r) if len(r) == 4 else (r[0], 0, r[1], r[2]) for r in rows]
    bad = [r for r in rows if not 0 <= int(r[1]) < len(svs)]
    if bad:
        raise InputError(f"a row names vector {bad[0][1]} but {len(svs)} vector(s) were given")
    if settings.chat and not model.has_chat_template:
        raise InputError(f"{model.name} has no chat template; run without the chat template (--no-chat)")
    stops = stop_ids(model)
    prompts = sorted({r[0] for r in rows})
    ids = {p: model.token_ids(p, chat=settings.chat) for p in prompts}
    longest = max((len(i) for i in ids.values()), default=0)
    if model.max_length and longest + settings.max_new_tokens > model.max_length:
        raise InputError(f"a prompt ({longest} tokens) plus {settings.max_new_tokens} new tokens exceeds "
                         f"{model.name}'s maximum length {model.max_length}; lower --max-new-tokens")
    out: list[dict] = [{} for _ in rows]
    # Prompt, then vector and alpha: rows that share prefill work share a batch; similar lengths pad little.
    order = sorted(range(len(rows)), key=lambda i: (len(ids[rows[i][0]]), rows[i][0], int(rows[i][1]),
                                                    float(rows[i][2])))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        for i, s in zip(idx, _sample_batch(model, ids, [rows[i] for i in idx], stacked, layer, settings, stops,
                                           read_tokens, streamer)):
            out[i] = {"completion": s["text"], "n_new_tokens": s["n_tokens"], "finish": s["finish"]}
            if "nll" in s:
                out[i]["nll"] = s["nll"]
        if progress is not None:
            progress(len(idx))
    return out


def _sample_batch(model: Model, ids: dict, rows: Sequence[tuple], vectors, layer: int, settings: SamplingSettings,
                  stops: Sequence[int], read_tokens: int = 0, streamer=None) -> list[dict]:
    """One batch of (prompt, vector_index, alpha, seed) rows through the engine sampling.GENERATION_ENGINE names
    (a streamed row through `generate`, which feeds a streamer)."""
    import steerstrength.sampling as sampling

    kw = dict(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p,
              top_k=settings.top_k, stops=stops)
    if sampling.GENERATION_ENGINE == "hf" or streamer is not None:  # one `generate` with a hook, one vector per call
        out: list[dict] = [{} for _ in rows]
        for k in sorted({int(r[1]) for r in rows}):
            idx = [i for i, r in enumerate(rows) if int(r[1]) == k]
            enc = model.pad([ids[rows[i][0]] for i in idx], padding_side="left")
            samples = sample_rows(model, enc, [rows[i][3] for i in idx], vector=vectors[k], layer=layer,
                                  alphas=[rows[i][2] for i in idx], positions=settings.positions, streamer=streamer,
                                  **kw)
            for i, s in zip(idx, samples):
                out[i] = s
        return out
    prompts = sorted({r[0] for r in rows})
    slot = {p: i for i, p in enumerate(prompts)}
    done = sampling.sample_steered(model, [ids[p] for p in prompts], [(slot[r[0]], int(r[1]), float(r[2]), int(r[3]))
                                                                        for r in rows],
                                   vectors=vectors, layer=layer, positions=settings.positions,
                                   read_tokens=read_tokens, **kw)
    return [dict(text=model.decode(d["ids"]).strip(), n_tokens=d["n_tokens"], finish=d["finish"],
                 **({"nll": float(d["nll"].mean()) if d["nll"].size else float("nan")} if "nll" in d else {}))
            for d in done]


def regenerate(model: Model, sv, prompt: str, alpha: float, seed: int, settings: SamplingSettings) -> str:
    """One completion again, alone, from its recorded (prompt, alpha, seed) and the run's settings."""
    return generate_rows(model, sv, [(prompt, float(alpha), int(seed))], settings)[0]["completion"]


# ----------------------------------------------------------------------------- degeneration


def _is_nonword(token: str) -> bool:
    return (_LETTER.search(token) is None or _RUN4.search(token) is not None
            or len(token) > NONWORD_MAX_LENGTH)


def degeneration(text: str) -> dict:
    """Repetition and non-word measures of one completion, and the rule's verdict (module docstring)."""
    tokens = (text or "").split()
    words = [t.lower().strip(string.punctuation) or t.lower() for t in tokens]
    n = len(words)
    if n == 0:
        return dict(n_words=0, distinct2=1.0, repeat_share=0.0, nonword_share=0.0, degenerate=True)
    bigrams = list(zip(words, words[1:]))
    distinct2 = len(set(bigrams)) / len(bigrams) if n >= 3 else 1.0
    repeat_share = Counter(words).most_common(1)[0][1] / n
    nonword_share = sum(map(_is_nonword, tokens)) / n
    repetitive = n >= MIN_WORDS_FOR_REPETITION and (distinct2 < MIN_DISTINCT2 or repeat_share > MAX_REPEAT_SHARE)
    return dict(n_words=n, distinct2=distinct2, repeat_share=repeat_share, nonword_share=nonword_share,
                degenerate=bool(repetitive or nonword_share > MAX_NONWORD_SHARE))


DEGENERATION_COLUMNS = ("n_words", "distinct2", "repeat_share", "nonword_share", "degenerate")
FLUENCY_COLUMNS = ("nll", "degenerate_rules")  # with the fluency check: mean NLL, and the rules' verdict alone


# ----------------------------------------------------------------------------- fluency under the unsteered model
#
# Gibberish is never the concept (issue 24): a completion the unsteered model reads as noise -- its mean
# per-token negative log-likelihood above a threshold -- is degenerate too, beside the repetition and non-word
# rules (which catch loops, whose likelihood is high). The threshold is calibrated per model on fluent texts
# (curated P, N and neutral texts, "train" split, completing the evaluation prompts) against the same texts
# with their tokens shuffled, at the midpoint that best separates them; its accuracy is measured on the
# "heldout" split (benchmarks/bench_degeneration.py adds steered-to-collapse texts).

FLUENCY_PROMPT = "Write a few sentences about your day."  # the chat prompt calibration texts complete


def mean_nll(model: Model, prompts: Sequence[str], texts: Sequence[str], *, chat: bool,
             max_tokens: int | None = None) -> np.ndarray:
    """Per text: the unsteered model's mean per-token negative log-likelihood (nats) of `texts[i]` (its first
    `max_tokens` tokens) after `prompts[i]` (NaN for an empty text); each distinct prompt runs once."""
    from steerstrength.sampling import completion_nll

    distinct = sorted(set(prompts))
    slot = {p: i for i, p in enumerate(distinct)}
    prompt_ids = [model.token_ids(p, chat=chat) for p in distinct]
    ids = [model.tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] if t else [] for t in texts]
    nll = completion_nll(model, prompt_ids, [(slot[p], i) for p, i in zip(prompts, ids)])
    return np.array([x.mean() if x.size else np.nan for x in nll])


def shuffled_tokens(model: Model, text: str, rng: np.random.Generator) -> str:
    """`text` with its tokens in a random order: the same tokens, no language."""
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    return model.decode([ids[i] for i in rng.permutation(len(ids))])


def fluency_texts(split: str) -> list[str]:
    """Fluent calibration texts: every curated concept's P and N texts and the neutral texts of `split`."""
    from steerstrength.prompts import curated_concepts, curated_texts, neutral_texts

    out = [t for c in curated_concepts() for kind in ("positive", "negative") for t in curated_texts(c, kind, split)]
    return out + neutral_texts(split)


def separating_threshold(fluent, gibberish) -> float:
    """The NLL threshold (midpoint between neighbouring scores) with the best balanced accuracy, fluent below."""
    f, g = np.asarray(fluent, np.float64), np.asarray(gibberish, np.float64)
    f, g = f[np.isfinite(f)], g[np.isfinite(g)]
    values = np.unique(np.concatenate([f, g]))
    cuts = (values[1:] + values[:-1]) / 2 if len(values) > 1 else values
    accuracy = [((f <= c).mean() + (g > c).mean()) / 2 for c in cuts]
    return float(cuts[int(np.argmax(accuracy))])


_CALIBRATED: dict = {}


def calibrate_fluency(model: Model, *, chat: bool, n_texts: int, max_tokens: int | None = None, seed: int = 0,
                      splits: Sequence[str] = ("train",)) -> dict:
    """{threshold, heldout_accuracy, ...}: the mean-NLL threshold of `model` separating `n_texts` fluent texts from
    their token shuffles (first `max_tokens` tokens), fit on the train split; with "heldout" in `splits`, its
    balanced accuracy there (cached per model in the process)."""
    key = (model.fingerprint(), str(model.dtype), chat, n_texts, max_tokens, seed, tuple(splits))
    if key in _CALIBRATED:
        return _CALIBRATED[key]
    rng = np.random.default_rng(seed)
    scores = {}
    for split in splits:
        texts = fluency_texts(split)
        texts = [texts[i] for i in sorted(rng.choice(len(texts), min(n_texts, len(texts)), replace=False))]
        shuffled = [shuffled_tokens(model, t, rng) for t in texts]
        both = mean_nll(model, [FLUENCY_PROMPT] * (2 * len(texts)), texts + shuffled, chat=chat,
                        max_tokens=max_tokens)
        scores[split] = (both[:len(texts)], both[len(texts):])
    threshold = separating_threshold(*scores["train"])
    fluent, gibberish = scores["train"]
    out = dict(threshold=threshold, n_train=int(2 * len(fluent)), max_tokens=max_tokens,
               fluent_nll_median=float(np.nanmedian(fluent)), shuffled_nll_median=float(np.nanmedian(gibberish)))
    if "heldout" in scores:
        fluent, gibberish = scores["heldout"]
        out.update(heldout_accuracy=float(((fluent <= threshold).mean() + (gibberish > threshold).mean()) / 2),
                   n_heldout=int(2 * len(fluent)))
    _CALIBRATED[key] = out
    return out


def fit_range(alphas, degenerate) -> tuple[float, float] | None:
    """The contiguous run of non-degenerate alphas containing 0 or, failing that, the one nearest 0."""
    order = np.argsort(np.asarray(alphas, dtype=np.float64))
    x = np.asarray(alphas, dtype=np.float64)[order]
    bad = np.asarray(degenerate, dtype=bool)[order]
    runs, start = [], None  # (first, last) index of each run of non-degenerate alphas
    for i, b in enumerate(bad):
        if not b and start is None:
            start = i
        if b and start is not None:
            runs.append((start, i - 1))
            start = None
    if start is not None:
        runs.append((start, len(x) - 1))
    if not runs:
        return None

    # The run's distance to 0 (0 when it contains 0), then its length (longer first), then its position.
    def rank(run):
        lo, hi = x[run[0]], x[run[1]]
        return (0.0 if lo <= 0 <= hi else min(abs(lo), abs(hi)), -(run[1] - run[0]), lo)

    lo, hi = min(runs, key=rank)
    return float(x[lo]), float(x[hi])


# ----------------------------------------------------------------------------- curve statistics


def wilson_interval(k, n, z: float = Z95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval for a binomial proportion k/n (95% by default)."""
    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    p = np.divide(k, n, out=np.zeros_like(k), where=n > 0)
    denom = 1 + z**2 / n
    center = (p + z**2 / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    # Exact ends at k = 0 and k = n (the formula gives them up to rounding).
    low = np.where(k == 0, 0.0, np.clip(center - half, 0, 1))
    high = np.where(k == n, 1.0, np.clip(center + half, 0, 1))
    return low, high


def tanh_curve(alpha, c, a, b, alpha0):
    """Thm 3.6 shape: p(alpha) = c + a tanh(b (alpha - alpha0))."""
    return c + a * np.tanh(b * (np.asarray(alpha, dtype=np.float64) - alpha0))


MIN_FIT_ALPHAS = 6  # the tanh has 4 parameters: on 4 or 5 alphas any curve fits (R^2 = 1 says nothing)


def fit_tanh(alphas, p) -> dict:
    """Least-squares tanh fit with b >= 0 (so sign(a) is the direction); status says when it cannot be fit (fewer
    than MIN_FIT_ALPHAS distinct alphas, a flat curve)."""
    from scipy.optimize import curve_fit

    x = np.asarray(alphas, dtype=np.float64)
    y = np.asarray(p, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    result = {"status": "ok", "c": None, "a": None, "b": None, "alpha0": None, "r2": None}
    if len(np.unique(x)) < MIN_FIT_ALPHAS:
        return dict(result, status=f"too few alphas ({len(np.unique(x))}; the 4-parameter fit needs {MIN_FIT_ALPHAS})")
    sst = float(((y - y.mean()) ** 2).sum())
    if sst <= 1e-12:
        return dict(result, status="flat curve: nothing to fit")
    span = float(x.max() - x.min())
    order = np.argsort(x)
    rise = float(y[order][-1] - y[order][0])
    mid_guess = float(x[np.argmin(np.abs(y - (y.min() + y.max()) / 2))])
    lower = [-1.0, -1.0, 0.0, float(x.min()) - span]
    upper = [2.0, 1.0, 200.0 / span, float(x.max()) + span]
    best = None
    for b0 in (1.0 / span, 4.0 / span, 16.0 / span):
        for a0 in (rise / 2 or 0.1, -(rise / 2 or 0.1)):
            for m0 in (mid_guess, float(np.median(x))):
                p0 = [float(np.clip(y.mean(), 0, 1)), float(np.clip(a0, -1, 1)), b0, m0]
                try:
                    params, _ = curve_fit(tanh_curve, x, y, p0=p0, bounds=(lower, upper), maxfev=5000)
                except (RuntimeError, ValueError):
                    continue
                sse = float(((tanh_curve(x, *params) - y) ** 2).sum())
                if best is None or sse < best[0]:
                    best = (sse, params)
    if best is None:
        return dict(result, status="fit did not converge")
    sse, (c, a, b, alpha0) = best
    return dict(result, c=float(c), a=float(a), b=float(b), alpha0=float(alpha0), r2=1.0 - sse / sst)


def concept_curve(scores, *, group: Sequence[str] = ("judge",)) -> "pd.DataFrame":
    """Per alpha, pooled over prompts and per prompt: k, n, p = k/n, Wilson 95% CI, mean judge score,
    the share of degenerate completions and whether the alpha is degenerate (NaN, False without the
    scores' `degenerate` column)."""
    import pandas as pd

    frames = []
    keys = list(group)
    flags = scores["degenerate"].astype(np.float64) if "degenerate" in scores.columns else np.nan
    scores = scores.assign(degenerate_share=flags)
    for scope, by in (("pooled", keys + ["alpha"]), ("prompt", keys + ["prompt_index", "alpha"])):
        g = scores.groupby(by, sort=True)
        agg = g.agg(k=("judged", "sum"), n=("judged", "size"), mean_score=("score", "mean"),
                    degenerate_share=("degenerate_share", "mean")).reset_index()
        if scope == "pooled":
            agg["prompt_index"] = -1
        agg["scope"] = scope
        frames.append(agg)
    curve = pd.concat(frames, ignore_index=True)
    curve["k"] = curve["k"].astype(np.int64)
    curve["p"] = curve["k"] / curve["n"]
    curve["ci_low"], curve["ci_high"] = wilson_interval(curve["k"].to_numpy(), curve["n"].to_numpy())
    curve["degenerate"] = (curve["degenerate_share"] > MAX_DEGENERATE_SHARE).astype(bool)
    # The fluent concept probability: degenerate completions are counted apart, never as the concept.
    fluent = scores.assign(judged=scores["judged"] & ~scores["degenerate"].astype(bool)) \
        if "degenerate" in scores.columns else scores
    fluent = fluent[~fluent["degenerate"].astype(bool)] if "degenerate" in fluent.columns else fluent
    parts = []
    for scope, by in (("pooled", keys + ["alpha"]), ("prompt", keys + ["prompt_index", "alpha"])):
        agg = fluent.groupby(by, sort=True).agg(k_fluent=("judged", "sum"), n_fluent=("judged", "size")).reset_index()
        if scope == "pooled":
            agg["prompt_index"] = -1
        agg["scope"] = scope
        parts.append(agg)
    curve = curve.merge(pd.concat(parts, ignore_index=True), on=keys + ["scope", "prompt_index", "alpha"], how="left")
    curve["k_fluent"] = curve["k_fluent"].fillna(0).astype(np.int64)
    curve["n_fluent"] = curve["n_fluent"].fillna(0).astype(np.int64)
    curve["p_fluent"] = np.where(curve["n_fluent"] > 0, curve["k_fluent"] / curve["n_fluent"].clip(lower=1), np.nan)
    empty = curve["n_fluent"].to_numpy() == 0
    low, high = wilson_interval(curve["k_fluent"].to_numpy(), np.maximum(curve["n_fluent"].to_numpy(), 1))
    curve["ci_low_fluent"], curve["ci_high_fluent"] = np.where(empty, np.nan, low), np.where(empty, np.nan, high)
    return curve[keys + ["scope", "prompt_index", "alpha", "k", "n", "p", "ci_low", "ci_high", "mean_score",
                         "degenerate_share", "degenerate", "k_fluent", "n_fluent", "p_fluent", "ci_low_fluent",
                         "ci_high_fluent"]]


def _spearman(x, y) -> float:
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or np.unique(y).size < 2:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def curve_summary(curve) -> dict:
    """Per judge: the pooled curve, its tanh fit and Spearman rho with alpha (over all alphas and over the
    non-degenerate fit range), the degenerate alphas, and per-prompt fits."""
    out = {}
    for judge, frame in curve.groupby("judge", sort=False):
        pooled = frame[frame["scope"] == "pooled"].sort_values("alpha")
        bad = pooled["degenerate"].to_numpy(bool) if "degenerate" in pooled else np.zeros(len(pooled), bool)
        share = pooled["degenerate_share"] if "degenerate_share" in pooled else np.full(len(pooled), np.nan)
        span = fit_range(pooled["alpha"], bad)
        if span is None:
            fit_nd = dict(fit_tanh([], []), status="every alpha is degenerate: nothing to fit")
            rho_nd = float("nan")
        else:
            inside = pooled[pooled["alpha"].between(*span)]
            fit_nd, rho_nd = fit_tanh(inside["alpha"], inside["p"]), _spearman(inside["alpha"], inside["p"])
        per_prompt = {}
        for prompt_index, pf in frame[frame["scope"] == "prompt"].groupby("prompt_index"):
            pf = pf.sort_values("alpha")
            per_prompt[str(int(prompt_index))] = fit_tanh(pf["alpha"], pf["p"])
        out[judge] = {
            "alpha": pooled["alpha"].tolist(), "p": pooled["p"].tolist(), "ci_low": pooled["ci_low"].tolist(),
            "ci_high": pooled["ci_high"].tolist(), "mean_score": pooled["mean_score"].tolist(),
            "n_per_alpha": pooled["n"].tolist(), "spearman_rho": _spearman(pooled["alpha"], pooled["p"]),
            "tanh_fit": fit_tanh(pooled["alpha"], pooled["p"]), "tanh_fit_per_prompt": per_prompt,
            "degenerate_share": [None if np.isnan(v) else float(v) for v in np.asarray(share, dtype=np.float64)],
            "degenerate_alphas": pooled["alpha"][bad].astype(float).tolist(),
            "fit_range": None if span is None else list(span),
            "tanh_fit_nondegenerate": fit_nd, "spearman_rho_nondegenerate": rho_nd,
        }
    return out


# ----------------------------------------------------------------------------- the measurement


@dataclass
class ConceptResult:
    """Completions (one row each), judge scores (one row per completion and judge), curve, summary."""

    completions: "pd.DataFrame"
    scores: "pd.DataFrame"
    curve: "pd.DataFrame"
    summary: dict = field(default_factory=dict)

    def save(self, out_dir, prefix: str = "concept") -> dict[str, Path]:
        """completions JSONL, scores and curve Parquet, summary JSON (runs.write_result, as the stage writes)."""
        from steerstrength.runs import StageResult, write_result

        names = {"completions": f"{prefix}_completions.jsonl", "scores": f"{prefix}_scores.parquet",
                 "curve": f"{prefix}_curve.parquet"}
        out = Path(out_dir)
        paths = {k: out / v for k, v in names.items()} | {"summary": out / f"{prefix}.json"}
        write_result(out, StageResult(prefix, {names[k]: getattr(self, k) for k in names},
                                      dict(self.summary, files={k: str(v) for k, v in paths.items()})))
        return paths


def _judges(judges, judge_model, device: str):
    from steerstrength.judges import Judge, make_judge

    if isinstance(judges, (str, Judge)):
        judges = [judges]
    if not judges:
        raise InputError("no judge given; pick at least one of llm, lexicon, embedding")
    out = [j if isinstance(j, Judge) else make_judge(j, model=judge_model, device=device) for j in judges]
    names = [j.name for j in out]
    if len(set(names)) != len(names):
        raise InputError(f"judge names repeat ({', '.join(names)}); give each judge once")
    return out


def concept_probability(model: Model, vectors, concept: str, section: "ConceptConfig | None" = None, *,
                        alphas=None, prompts: Sequence[str] | None = None, judges=None, judge_model: Model | None = None,
                        positive: Sequence[str] | None = None, negative: Sequence[str] | None = None, seed: int = 0,
                        positions: str = "all", setting: str = "", judge_device: str = "cpu",
                        progress: Callable | None = None) -> ConceptResult:
    """Sec. 5: fraction of sampled steered completions a judge finds `concept` in, per alpha (Thm 3.6).

    Args:
        vectors: a SteeringVector, or several of one layer (the concept's direction and its random controls: one
            decode loop samples them all; the tables' `direction` column tells them apart, the summary is the
            first one's).
        concept: what the judges look for.
        section: sizes, sampling, judge and fluency settings (config.ConceptConfig; default: its defaults, the run's).
        alphas: an AlphaGrid (each vector's raw alphas from it) or raw alphas; default: the section's grid, in
            residual units (the run's stage grid).
        prompts: the prompts completed (default: the section's n_prompts evaluation prompts, the run's);
            section.completions per prompt and alpha.
        judges: names from judges.JUDGES or Judge objects (default: section.judge; the llm judge asks `judge_model`,
            by default the steered model itself, unsteered).
        positive, negative: P and N texts: calibrate the embedding judge and give every judge's held-out accuracy.
        seed: completion seeds derive from (seed, prompt, index), the same for every alpha and vector.
        progress: called with the number of completions generated, then judged by each judge.

    The fluency check reads each completion's first section.fluency_tokens tokens with the unsteered model; a mean
    NLL above the threshold calibrated on section.fluency_texts fluent texts and their shuffles marks it degenerate
    (fluency_tokens 0: the repetition and non-word rules only).

    Example::

        res = ss.concept_probability(model, sv[28], "joy", alphas=[-200.0, 0.0, 200.0])
        res.curve                                # judge, scope, alpha, k, n, p, ci_low, ci_high, mean_score
    """
    import pandas as pd

    from steerstrength.config import ConceptConfig
    from steerstrength.grid import AlphaGrid
    from steerstrength.judges import judge_accuracy
    from steerstrength.prompts import evaluation_prompts

    section = section or ConceptConfig()
    svs, layer = one_layer(vectors)
    if alphas is None:
        alphas = AlphaGrid.symmetric(section.alpha_max, section.n_alphas, zero=False, unit="resid")
    raw = [as_alphas(sv.raw_alphas(alphas, model) if isinstance(alphas, AlphaGrid) else alphas).tolist()
           for sv in svs]
    directions = [sv.direction for sv in svs]
    if len(set(directions)) != len(directions):
        raise InputError(f"the vectors' directions repeat ({', '.join(directions)}); give each direction once")
    n_completions, judges = section.completions, judges or [section.judge]
    # The random directions' completions: their rate is a baseline (the judge's false positives), not the curve.
    per_direction = [n_completions if d == "v" or section.control_completions is None
                     else section.control_completions for d in directions]
    t_start = time.perf_counter()
    check_layer(model, layer)
    prompts = list(evaluation_prompts("train")[:section.n_prompts] if prompts is None else prompts)
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise InputError("the prompt list is empty or has an empty prompt; give non-empty prompts")
    if min(per_direction) < 1:
        raise InputError(f"concept.completions and concept.control_completions must be at least 1, not "
                         f"{min(per_direction)}")
    settings = SamplingSettings(max_new_tokens=section.max_new_tokens, temperature=section.temperature,
                                top_p=section.top_p, top_k=section.top_k,
                                chat=model.has_chat_template if section.chat is None else bool(section.chat),
                                positions=positions).check(section.batch_size)
    judge_objs = _judges(judges, judge_model if judge_model is not None else model, judge_device)
    for j in judge_objs:
        j.check(concept)
    have_pn = positive is not None and negative is not None
    if any(j.calibrates for j in judge_objs) and not have_pn:
        raise InputError("the embedding judge calibrates its threshold on P and N texts: give positive= and "
                         "negative= (CLI: --positive / --negative)")

    # Calibrate and measure the judges first: a judge that cannot be trusted is known before the sweep.
    accuracy = {}
    if have_pn:
        for j in judge_objs:
            accuracy[j.name] = judge_accuracy(j, concept, positive, negative, holdout=section.holdout,
                                              seed=seed).to_dict()

    if len(set(prompts)) != len(prompts):
        raise InputError("the prompt list repeats a prompt; give each prompt once (raise concept.completions for more samples)")
    # Vector by vector, then prompt, alpha, completion: each vector's rows are the rows it would have alone
    # (common random numbers across alphas and vectors), sampled together.
    rows = [(p, k, alpha, completion_seed(seed, p, c)) for k in range(len(svs)) for p in prompts for alpha in raw[k]
            for c in range(per_direction[k])]
    meta = [(directions[k], pi, c) for k in range(len(svs)) for pi, _ in enumerate(prompts) for _ in raw[k]
            for c in range(per_direction[k])]
    fluency_tokens = section.fluency_tokens
    t0 = time.perf_counter()
    generated = generate_rows(model, svs, rows, settings, batch_size=section.batch_size, read_tokens=fluency_tokens,
                              progress=progress)
    read_nll = [g.pop("nll", None) for g in generated]
    gen_seconds = time.perf_counter() - t0
    base = dict(model=model.name, concept=concept, layer=layer, setting=setting)
    completions = pd.DataFrame([
        dict(base, direction=d, completion_id=i, alpha=alpha, prompt_index=pi, prompt=prompt, completion_index=ci,
             seed=s, **g)
        for i, ((prompt, _, alpha, s), (d, pi, ci), g) in enumerate(zip(rows, meta, generated))
    ])

    texts = completions["completion"].tolist()
    measures = pd.DataFrame([degeneration(t) for t in texts], columns=list(DEGENERATION_COLUMNS))
    for col in DEGENERATION_COLUMNS:
        completions[col] = measures[col].to_numpy()
    fluency, t0 = None, time.perf_counter()
    if fluency_tokens > 0:  # gibberish is never the concept: the unsteered model's reading of each completion
        fluency = calibrate_fluency(model, chat=settings.chat, n_texts=section.fluency_texts,
                                    max_tokens=fluency_tokens, seed=seed)
        # Read during the decode (blocks l+1.. only) where the engine did; else teacher-forced from the text.
        completions["nll"] = read_nll if all(x is not None for x in read_nll) else \
            mean_nll(model, completions["prompt"].tolist(), texts, chat=settings.chat, max_tokens=fluency_tokens)
        completions["degenerate_rules"] = completions["degenerate"]
        completions["degenerate"] = completions["degenerate_rules"] | (completions["nll"] > fluency["threshold"])
    fluency_seconds = time.perf_counter() - t0
    score_frames, judge_seconds, judge_notes = [], {}, {}
    for j in judge_objs:
        t0 = time.perf_counter()
        chunks = []
        for start in range(0, len(texts), 256):
            chunks.append(j.score(texts[start:start + 256], concept))
            if getattr(j, "answer_mass", None) is not None and len(j.answer_mass):
                judge_notes.setdefault(j.name, []).append(j.answer_mass)
            if progress is not None:
                progress(len(chunks[-1]))
        s = np.concatenate(chunks) if chunks else np.zeros(0)
        judge_seconds[j.name] = time.perf_counter() - t0
        completions[f"score_{j.name}"] = s
        frame = completions[["completion_id", "model", "concept", "layer", "setting", "direction", "alpha",
                             "prompt_index",
                             "completion_index", "seed", *DEGENERATION_COLUMNS,
                             *[c for c in FLUENCY_COLUMNS if c in completions]]].copy()
        frame["judge"] = j.name
        frame["score"] = s
        frame["judged"] = s >= j.threshold
        score_frames.append(frame)
    scores = pd.concat(score_frames, ignore_index=True)
    curve = concept_curve(scores, group=("direction", "judge"))
    curve = curve.assign(**base)[list(base) + list(curve.columns)]

    notes, answer_mass = [], {}
    for name, masses in judge_notes.items():
        mean_mass = answer_mass[name] = float(np.concatenate(masses).mean())
        if mean_mass < 0.5:
            notes.append(f"the {name} judge put only {mean_mass:.2f} of its next-token mass on '1'/'0' on "
                         "average: it may not be following the question; try a stronger --judge-model")
    curves = curve_summary(curve[curve["direction"] == directions[0]])
    first = next(iter(curves.values()))  # degeneration is a property of the completions, not of the judge
    if first["degenerate_alphas"]:
        where = ("no alpha is left to fit" if first["fit_range"] is None else
                 "tanh_fit_nondegenerate fits alpha in [{:g}, {:g}]".format(*first["fit_range"]))
        notes.append(f"completions degenerate at alpha {', '.join(f'{x:g}' for x in first['degenerate_alphas'])} "
                     f"(repetition or non-words; rule: {DEGENERATION_RULE}): {where}")
    summary = {
        "metric": "concept_probability", "model": model.name, "model_fingerprint": model.fingerprint(),
        "concept": concept, "layer": layer, "setting": setting, "alphas": raw[0], "prompts": prompts,
        "directions": directions, "n_completions": n_completions,
        "n_completions_per_direction": dict(zip(directions, per_direction)), "seed": seed, "batch_size": section.batch_size,
        "sampling": dataclasses.asdict(settings),
        "reproduce": "a completion is regenerated by steerstrength.metrics.concept.regenerate(model, sv, prompt, "
                     "alpha, seed, SamplingSettings(**sampling)) with its direction's vector and the same model, "
                     "dtype and device",
        "judges": {j.name: j.describe() for j in judge_objs},
        "judge_accuracy": accuracy,
        "judge_answer_mass": answer_mass,
        "curves": curves,
        "degeneration_rule": DEGENERATION_RULE + ("" if fluency is None else
                                                  f"; or its first {fluency_tokens} tokens' mean NLL under the "
                                                  f"unsteered model exceeds {fluency['threshold']:.2f} nats"),
        "fluency_calibration": fluency,
        "notes": notes,
        "seconds": {"generate": gen_seconds, "fluency": fluency_seconds, "judges": judge_seconds,
                    "total": time.perf_counter() - t_start},
        "n_rows": len(rows),
    }
    return ConceptResult(completions=completions, scores=scores, curve=curve, summary=summary)
