"""Judges: each scores probabilities in [0, 1], separates obvious P from N, and refuses what it cannot judge."""

import math

import numpy as np
import pytest
import torch

from steerstrength import InputError
from steerstrength.judges import (
    HELD_OUT_BALANCED_ACCURACY,
    JUDGES,
    REPORT_METRICS,
    EmbeddingJudge,
    LexiconJudge,
    LLMJudge,
    ProbeJudge,
    balanced_threshold,
    best_judge,
    fit_slope,
    held_out_report,
    judge_accuracy,
    make_judge,
    roc_auc,
)
from steerstrength.prompts import curated_concepts, curated_texts, neutral_texts
from tiny import tiny_model

JOY = [
    "I am so happy today, laughing with my friends in the sunshine!",
    "What a wonderful, delightful morning; my heart is full of joy.",
    "We celebrated with cheerful songs and big smiles all evening.",
    "I feel glad and grateful, bursting with happiness and love.",
    "The children giggled with delight as they played in the garden.",
    "Hooray! I won the prize and I am thrilled beyond words.",
]
NEUTRAL = [
    "The invoice lists the quantity, unit price and tax for each item.",
    "Turn left at the second junction and continue for two kilometres.",
    "The committee meets on Tuesdays in room 204 of the east building.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The spreadsheet has four columns: date, account, amount and reference.",
    "Trains to the airport leave every fifteen minutes from platform three.",
]


def test_unknown_judge_is_one_clear_error_listing_the_known_ones():
    with pytest.raises(InputError, match="unknown judge 'oracle'.*llm, lexicon, embedding, probe, case"):
        make_judge("oracle")
    assert set(JUDGES) == {"llm", "lexicon", "embedding", "probe", "case"}


def test_llm_judge_needs_a_model():
    with pytest.raises(InputError, match="judge model"):
        make_judge("llm")


# ----------------------------------------------------------------------------- lexicon


@pytest.fixture(scope="module")
def lexicon():
    return LexiconJudge()


@pytest.mark.parametrize("concept", ["lying", "evil", "humorous", "apathetic", "impolite"])
def test_lexicon_refuses_concepts_it_cannot_judge(lexicon, concept):
    with pytest.raises(InputError, match=f"cannot judge '{concept}'.*--judge embedding or --judge llm"):
        lexicon.score(["some text"], concept)


def test_lexicon_separates_joy_from_neutral_texts(lexicon):
    pos, neg = lexicon.score(JOY, "joy"), lexicon.score(NEUTRAL, "joy")
    assert ((pos >= 0) & (pos <= 1)).all() and ((neg >= 0) & (neg <= 1)).all()
    assert (pos >= 0.5).all(), pos
    assert (neg < 0.5).all(), neg
    assert lexicon.judge(JOY, "joy").all() and not lexicon.judge(NEUTRAL, "joy").any()


def test_lexicon_finds_inflected_concept_words_and_one_word_suffices(lexicon):
    words = lexicon.concept_words("She laughed, happier than ever, smiling at the cheerfully sunny day.", "joy")
    assert {"laughed", "happier", "smiling", "cheerfully"} <= set(words)
    # The permissive criterion: a single concept word in an otherwise neutral text is a yes.
    assert lexicon.score(["The report on page four mentions a smile."], "joy")[0] >= 0.5


def test_lexicon_depression_maps_to_sadness_and_aliases_agree(lexicon):
    sad = ["I feel hopeless and miserable, crying alone in the dark.", "Grief and sorrow weigh on me every day."]
    np.testing.assert_allclose(lexicon.score(sad, "depression"), lexicon.score(sad, "sadness"))
    assert (lexicon.score(sad, "depression") >= 0.5).all()
    # The lexicon is literal: NRC files "tax" (and "leave") under sadness, so some plain sentences count too
    # (docs/concept.md); on average neutral text still scores far below the sad one.
    assert lexicon.concept_words(NEUTRAL[0], "depression") == ["tax"]
    assert lexicon.score(NEUTRAL, "depression").mean() < 0.5 <= lexicon.score(sad, "depression").min()


def test_judge_accuracy_holds_out_texts_and_reports_rates(lexicon):
    acc = judge_accuracy(lexicon, "joy", JOY, NEUTRAL, holdout=0.5, seed=3)
    assert acc.n_positive == 3 and acc.n_negative == 3 and acc.n_calibration == 0  # the lexicon does not calibrate
    assert acc.accuracy == 1.0 and acc.balanced_accuracy == 1.0 and acc.auc == 1.0
    with pytest.raises(InputError, match="at least 2 P and 2 N"):
        judge_accuracy(lexicon, "joy", JOY[:1], NEUTRAL)


def test_roc_auc_and_balanced_threshold_on_known_scores():
    assert roc_auc(np.array([0.9, 0.8]), np.array([0.1, 0.8])) == pytest.approx((1 + 1 + 1 + 0.5) / 4)
    pos, neg = np.array([0.6, 0.7, 0.8]), np.array([0.1, 0.2, 0.65])
    t = balanced_threshold(pos, neg)
    # Best balanced accuracy is 5/6 (one N above one P); the chosen cut achieves it.
    bal = ((pos >= t).mean() + (neg < t).mean()) / 2
    assert bal == pytest.approx(5 / 6)
    separated = fit_slope(np.array([0.5, 0.6, 0.55]), np.array([0.1, 0.2, 0.15]), 0.35)
    overlapping = fit_slope(np.array([0.5, 0.6, 0.3]), np.array([0.1, 0.2, 0.4]), 0.35)
    assert 0 < overlapping < separated < 1e3  # Platt targets keep a separable calibration set finite


# ----------------------------------------------------------------------------- embedding


@pytest.fixture(scope="module")
def embedding():
    return EmbeddingJudge()


def test_embedding_judge_must_be_calibrated_before_scoring(embedding):
    with pytest.raises(InputError, match="not calibrated for 'serenity'"):
        embedding.score(["text"], "serenity")


def test_embedding_judge_separates_joy_from_neutral_after_calibration(embedding):
    cos_pos, cos_neg = embedding.cosine(JOY, "joy"), embedding.cosine(NEUTRAL, "joy")
    assert cos_pos.min() > cos_neg.max()  # all-MiniLM-L6-v2 puts joyful texts nearer "joy"
    acc = judge_accuracy(embedding, "joy", JOY, NEUTRAL, holdout=0.5, seed=0)
    assert acc.n_calibration == 6 and acc.balanced_accuracy == 1.0
    cal = embedding.calibration["joy"]
    p = embedding.score(JOY + NEUTRAL, "joy")
    assert ((p > 0) & (p < 1)).all()
    # The 0.5 threshold on the score is the calibrated cosine cut.
    np.testing.assert_array_equal(p >= 0.5, np.concatenate([cos_pos, cos_neg]) >= cal["cut"])


# ----------------------------------------------------------------------------- probe


@pytest.fixture(scope="module")
def probe():
    return make_judge("probe")


def test_make_judge_gives_a_probe_ready_for_every_curated_concept(probe):
    assert isinstance(probe, ProbeJudge) and probe.name == "probe" and probe.threshold == 0.5
    assert not probe.calibrates  # a curated concept needs no P and N from the caller
    for concept in curated_concepts():
        probe.check(concept)
    with pytest.raises(InputError, match="probe judge is trained only for the curated concepts.*for 'serenity'"):
        probe.check("serenity")


def test_probe_separates_held_out_joy_from_contrastive_and_neutral_texts(probe):
    negative = curated_texts("joy", "negative", "heldout") + neutral_texts("heldout")
    acc = probe.accuracy(curated_texts("joy", "positive", "heldout"), negative, "joy")
    assert acc.n_positive == 32 and acc.n_negative == 32 + 42
    assert acc.balanced_accuracy >= 0.9 and acc.auc >= 0.98  # measured 0.978 and 1.000
    # The shipped table behind best_judge is what the code measures (one text's flip of slack).
    assert acc.balanced_accuracy == pytest.approx(HELD_OUT_BALANCED_ACCURACY["joy"]["probe"], abs=0.02)
    assert probe.training["joy"] == {"source": "curated train split", "n_positive": 64, "n_negative": 64,
                                     "n_neutral": 86}


def test_probe_scores_a_neutral_answer_low_and_joyful_texts_high(probe):
    neutral = ["I watered the plants on the balcony, then wrote the shopping list for Saturday.",
               "Sure! Here is a short description of a kitchen: it has a sink, a stove, a fridge and a table."]
    for concept in ("joy", "evil", "depression"):
        assert (probe.score(neutral, concept) < 0.35).all()  # measured at most 0.24, not the 0.5 of "unsure"
    assert (probe.score(NEUTRAL, "joy") < 0.35).all() and (probe.score(JOY, "joy") > 0.65).all()
    assert probe.score([], "joy").shape == (0,)


def test_probe_scores_are_deterministic(probe):
    texts = JOY[:2] + NEUTRAL[:2]
    first = probe.score(texts, "joy")
    np.testing.assert_array_equal(first, probe.score(texts, "joy"))
    np.testing.assert_array_equal(first, ProbeJudge().score(texts, "joy"))  # a fresh head, trained again


def test_probe_trains_on_user_texts_for_a_new_concept(probe):
    with pytest.raises(InputError, match="for 'glee'"):
        probe.score(JOY, "glee")
    probe.calibrate(JOY[:4], NEUTRAL[:4], "glee")
    assert probe.training["glee"] == {"source": "user", "n_positive": 4, "n_negative": 4, "n_neutral": 86}
    assert probe.score(JOY[4:], "glee").min() > probe.score(NEUTRAL[4:], "glee").max()


# ----------------------------------------------------------------------------- measured accuracy


def test_held_out_report_has_one_row_per_judge_and_concept_and_nan_where_a_judge_cannot_judge():
    report = held_out_report(("lexicon",), concepts=["joy", "evil"])
    assert list(report.columns) == ["judge", "concept", "n_positive", "n_contrastive", "n_neutral",
                                    *REPORT_METRICS, "note"]
    joy, evil = report.set_index("concept").loc["joy"], report.set_index("concept").loc["evil"]
    assert (joy.n_positive, joy.n_contrastive, joy.n_neutral, joy.note) == (32, 32, 42, "")
    assert all(0 <= joy[m] <= 1 for m in REPORT_METRICS)
    assert joy.balanced_accuracy == pytest.approx(HELD_OUT_BALANCED_ACCURACY["joy"]["lexicon"], abs=1e-3)
    assert all(math.isnan(evil[m]) for m in REPORT_METRICS) and "cannot judge 'evil'" in evil.note


def test_best_judge_is_the_probe_for_every_curated_concept():
    assert set(HELD_OUT_BALANCED_ACCURACY) == set(curated_concepts())
    assert {best_judge(c) for c in curated_concepts()} == {"probe"}
    assert best_judge(" Joy ") == "probe"
    with pytest.raises(InputError, match="no measured judge accuracy for concept 'serenity'"):
        best_judge("serenity")


# ----------------------------------------------------------------------------- llm


def hand_llm_probability(model, judge, text, concept):
    """A plain full forward of the judge prompt; p('1') / (p('1') + p('0')) from the last position."""
    ids = torch.tensor([model.token_ids(judge.prompt(text, concept), chat=judge.chat)])
    with torch.no_grad():
        logp = torch.log_softmax(model.hf(input_ids=ids).logits[0, -1].double(), -1)
    p1 = logp[judge.yes_ids].exp().sum()
    p0 = logp[judge.no_ids].exp().sum()
    return float(p1 / (p1 + p0))


@pytest.mark.parametrize("chat", [False, True])
def test_llm_judge_scores_match_a_hand_computation_and_ignore_batching(chat):
    model = tiny_model("llama")
    judge = LLMJudge(model, chat=chat, batch_size=3)
    texts = ["i am happy", "the cat saw a dog in the house today", "sad", "we walked to the kitchen and laughed"]
    p = judge.score(texts, "joy")
    assert p.shape == (4,) and ((p >= 0) & (p <= 1)).all()
    hand = [hand_llm_probability(model, judge, t, "joy") for t in texts]
    np.testing.assert_allclose(p, hand, atol=1e-6)
    assert (judge.answer_mass > 0).all() and (judge.answer_mass <= 1).all()


@pytest.mark.slow
def test_llm_judge_runs_on_the_default_model(default_model):
    judge = LLMJudge(default_model)
    texts = ["I am overjoyed, laughing and smiling all day!", "The invoice lists the unit price and the tax."]
    p = judge.score(texts, "joy")
    assert p.shape == (2,) and ((p > 0) & (p < 1)).all()
    assert judge.chat and judge.yes_ids and judge.no_ids
    assert (judge.answer_mass > 0).all()


def test_the_uppercase_concept_is_judged_by_its_rule():
    from steerstrength.judges import best_judge, judge_for, make_judge
    from steerstrength.prompts import curated_texts

    judge = make_judge("case")
    P, N = curated_texts("uppercase", "positive", "heldout"), curated_texts("uppercase", "negative", "heldout")
    acc = judge.accuracy(P, N, "uppercase")
    assert acc.balanced_accuracy == 1.0 and acc.n_positive == acc.n_negative == 32
    assert judge.score(["HELLO there", "", "ÉTÉ 42 ok"], "uppercase").tolist() == [0.5, 0.0, 0.6]
    assert best_judge("uppercase") == "case"
    assert judge_for("uppercase", "probe") == "case" and judge_for("uppercase", "llm") == "llm"
    assert judge_for("joy", "probe") == "probe"
    with pytest.raises(InputError, match="case judge judges uppercase only"):
        judge.score(["x"], "joy")


def test_judge_accuracy_on_the_same_texts_is_not_recomputed_unless_the_judge_was_recalibrated(monkeypatch):
    """The concept stage measures one judge once per layer on the same P and N: the second call reuses the first."""
    from steerstrength.judges import LexiconJudge, judge_accuracy

    judge = LexiconJudge()
    calls = []
    original = judge.accuracy
    monkeypatch.setattr(judge, "accuracy", lambda *a, **k: calls.append(1) or original(*a, **k))
    P, N = ["i am so happy and full of joy", "what a joyful day"] * 2, ["the table is brown", "a car is parked"] * 2
    first = judge_accuracy(judge, "joy", P, N)
    second = judge_accuracy(judge, "joy", P, N)
    assert len(calls) == 1 and second == first
    judge_accuracy(judge, "joy", P, N[:3])  # other texts: measured again
    assert len(calls) == 2
