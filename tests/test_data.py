"""The shipped curated data: sizes, pairing, disjoint splits, no duplicates, lengths in tokens."""

import json
from collections import Counter

import pytest

from steerstrength.config import PAPER_CONCEPTS
from steerstrength.errors import InputError
from steerstrength.prompts import (curated_concepts, curated_pairs, curated_texts, evaluation_prompts,
                                   neutral_texts)


def test_every_paper_concept_has_a_curated_set():
    assert curated_concepts() == sorted(PAPER_CONCEPTS)


@pytest.mark.parametrize("concept", PAPER_CONCEPTS)
def test_curated_set_sizes_pairs_and_splits(concept):
    rows = curated_pairs(concept)
    assert [r["pair"] for r in rows] == list(range(96))
    assert all(set(r) == {"pair", "split", "situation", "positive", "negative"} for r in rows)
    train, held = curated_pairs(concept, "train"), curated_pairs(concept, "heldout")
    assert len(train) >= 64 and len(held) >= 32 and len(train) + len(held) == 96
    texts = [r["positive"] for r in rows] + [r["negative"] for r in rows]
    assert len(set(texts)) == len(texts), "a text appears twice"
    assert len({r["situation"] for r in rows}) == 96, "a situation appears twice"
    # Disjoint splits: no held-out text is also a training text.
    assert not ({r["positive"] for r in train} | {r["negative"] for r in train}) & (
        {r["positive"] for r in held} | {r["negative"] for r in held})
    for r in rows:
        for kind in ("positive", "negative"):
            assert 18 <= len(r[kind].split()) <= 45, (r["pair"], kind)
        # A pair differs in the concept, not in length.
        assert abs(len(r["positive"].split()) - len(r["negative"].split())) <= 6, r["pair"]
    assert len(curated_texts(concept, "positive", "heldout")) == len(held)


def test_no_text_is_shared_between_concepts():
    seen = Counter(t for c in PAPER_CONCEPTS for r in curated_pairs(c) for t in (r["positive"], r["negative"]))
    assert max(seen.values()) == 1


def test_neutral_texts_and_evaluation_prompts():
    neutral, prompts = neutral_texts(), evaluation_prompts()
    assert len(neutral) == 128 and len(set(neutral)) == 128
    assert len(prompts) == 64 and len(set(prompts)) == 64
    assert not set(neutral_texts("train")) & set(neutral_texts("heldout"))
    assert not set(evaluation_prompts("train")) & set(evaluation_prompts("heldout"))
    assert len(evaluation_prompts("heldout")) == 32


def test_unknown_concept_and_split_are_input_errors():
    with pytest.raises(InputError, match="no curated texts"):
        curated_pairs("grumpy")
    with pytest.raises(InputError, match="split must be"):
        neutral_texts("dev")


@pytest.mark.slow
def test_curated_texts_are_20_to_60_tokens_of_the_default_model(default_model):
    lengths = [len(default_model.token_ids(r[k])) for c in PAPER_CONCEPTS for r in curated_pairs(c)
               for k in ("positive", "negative")]
    assert 18 <= min(lengths) and max(lengths) <= 60, (min(lengths), max(lengths))
