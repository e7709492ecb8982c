"""Prompt sets P and N (Sec. 5, App. A): generated reproducibly, stopped at EOS, stored as JSONL."""

import json

import pytest
import torch

from steerstrength import InputError, concepts, generate_prompts, load_prompts
from steerstrength.prompts import (
    SYSTEM_PROMPT,
    clean_opposite,
    concept_prompt,
    generator_prompt_ids,
    resolve_opposite,
    sample_continuations,
)
from steerstrength.sampling import filtered_probs
from cliutil import run_cli
from tiny import tiny_model

FIELDS = {"concept", "kind", "setting", "text", "generator", "seed", "n_tokens", "finish"}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_the_papers_eight_concepts_have_a_definition_and_an_opposite():
    table = concepts()
    assert sorted(table) == ["apathetic", "depression", "evil", "humorous", "impolite", "joy", "lying", "optimistic"]
    for name, entry in table.items():
        assert entry["definition"].endswith(".") and entry["opposite"] and entry["opposite"] != name


def test_positive_prompts_are_reproducible_per_text_whatever_the_batch(model):
    rows = generate_prompts(model, "joy", "positive", 6, max_new_tokens=10, seed=7, batch_size=4)
    again = generate_prompts(model, "joy", "positive", 6, max_new_tokens=10, seed=7, batch_size=4)
    one_by_one = generate_prompts(model, "joy", "positive", 6, max_new_tokens=10, seed=7, batch_size=1)
    assert rows == again == one_by_one
    assert [r["seed"] for r in rows] == sorted(r["seed"] for r in rows)
    assert all(7 <= r["seed"] < 13 for r in rows)
    # Text i regenerates alone from its recorded seed.
    last = rows[-1]
    alone = sample_continuations(model, generator_prompt_ids(model, concept_prompt("joy")), [last["seed"]],
                                 max_new_tokens=10)
    assert alone[0]["text"] == last["text"]
    other = generate_prompts(model, "joy", "positive", 6, max_new_tokens=10, seed=8, batch_size=4)
    assert [r["text"] for r in other] != [r["text"] for r in rows]


def test_rows_carry_the_jsonl_fields_and_stop_at_eos(model):
    rows = generate_prompts(model, "joy", "positive", 16, max_new_tokens=12, seed=0, batch_size=8)
    assert rows and all(FIELDS <= set(r) for r in rows)
    assert all(r["kind"] == "positive" and r["setting"] is None and r["generator"] == "tiny-llama" for r in rows)
    stopped = [r for r in rows if r["finish"] == "stop"]
    assert stopped, "with ~80 tokens, some of 16 rows meet EOS within 12 steps"
    for r in rows:
        assert "<eos>" not in r["text"] and r["text"] == r["text"].strip() and r["text"]
        assert (r["n_tokens"] < 12) if r["finish"] == "stop" else (r["n_tokens"] == 12)


def test_top_k_one_is_greedy_decoding(model):
    prompt = generator_prompt_ids(model, concept_prompt("joy"))
    sampled = sample_continuations(model, prompt, [0, 1], max_new_tokens=8, top_k=1)
    enc = model.pad([prompt])
    greedy = model.hf.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=8,
                               do_sample=False, eos_token_id=2, pad_token_id=0)
    ids = greedy[0, len(prompt):].tolist()
    ids = ids[:ids.index(2)] if 2 in ids else ids
    assert sampled[0]["text"] == sampled[1]["text"] == model.decode(ids).strip()


def full_sort_reference(logits, temperature, top_p, top_k):
    """Temperature, then top-k on the logits, then the nucleus by a full sort of the vocabulary."""
    scaled = logits / temperature
    if top_k:
        scaled = scaled.masked_fill(scaled < torch.topk(scaled, top_k).values[:, -1:], float("-inf"))
    probs = torch.softmax(scaled, -1)
    ordered, order = torch.sort(probs, descending=True)
    ordered = ordered.masked_fill((ordered.cumsum(-1) - ordered) >= top_p, 0.0)
    probs = torch.zeros_like(probs).scatter(-1, order, ordered)
    return probs / probs.sum(-1, keepdim=True)


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 0.9, 0), (0.7, 0.5, 0), (1.0, 0.95, 50), (2.0, 0.99, 0),
                                                      (1.0, 0.9, 3000), (1.3, 1.0, 0)])
def test_sampling_candidates_equal_a_full_sort_of_the_vocabulary(temperature, top_p, top_k):
    torch.manual_seed(0)
    # Peaked rows (nucleus within the top 256) and flat rows (it needs the whole vocabulary).
    logits = torch.cat([torch.randn(3, 5000) * 4, torch.randn(3, 5000) * 0.2])
    want = full_sort_reference(logits, temperature, top_p, top_k)
    torch.testing.assert_close(filtered_probs(logits, temperature, top_p, top_k), want, atol=1e-6, rtol=0)


def test_nucleus_and_top_k_filters():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    torch.testing.assert_close(filtered_probs(scores, 1.0, 0.75, 0), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    torch.testing.assert_close(filtered_probs(scores, 1.0, 1.0, 3), torch.tensor([[0.5, 0.3, 0.15]]) / 0.95 @
                               torch.eye(3, 4))
    torch.testing.assert_close(filtered_probs(scores, 1.0, 0.1, 0), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_generator_prompt_uses_the_chat_template_with_a_system_turn(model):
    ids = generator_prompt_ids(model, concept_prompt("joy"))
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": concept_prompt("joy")}]
    rendered = model.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ids == model.token_ids(rendered)
    assert "joy" in concept_prompt("joy") and "first-person" in concept_prompt("joy")


def test_random_negatives_are_unconditional_samples_from_bos(model):
    rows = generate_prompts(model, "joy", "negative", 4, setting="random", max_new_tokens=8, seed=2)
    assert rows and all(r["setting"] == "random" and r["kind"] == "negative" and "opposite" not in r for r in rows)
    plain = sample_continuations(model, model.start_ids, [r["seed"] for r in rows], max_new_tokens=8)
    assert [r["text"] for r in rows] == [p["text"] for p in plain]


def test_contrastive_negatives_record_the_opposite_and_where_it_came_from(model, monkeypatch):
    rows = generate_prompts(model, "joy", "negative", 3, setting="contrastive", max_new_tokens=6, opposite="sad")
    assert all(r["opposite"] == "sad" and r["opposite_source"] == "user" for r in rows)
    seeds = [1_000_000, 1_000_001, 1_000_002]  # N's seeds never meet P's
    texts = sample_continuations(model, generator_prompt_ids(model, concept_prompt("sad")), seeds, max_new_tokens=6)
    assert [r["text"] for r in rows] == [t["text"] for t in texts if t["text"]]
    assert {r["seed"] for r in rows} <= set(seeds)
    word, source = resolve_opposite(model, "joy")
    assert source == "generator" and word and word != "joy"
    monkeypatch.setattr("steerstrength.prompts.ask_opposite", lambda m, c: None)
    assert resolve_opposite(model, "joy") == ("sorrow", "default")
    with pytest.raises(InputError, match="--opposite"):
        resolve_opposite(model, "grumpiness")


def test_opposite_answers_are_cleaned_to_one_word():
    assert clean_opposite(" Sadness.\nJoy is", "joy") == "sadness"
    assert clean_opposite("**Honesty**", "lying") == "honesty"
    assert clean_opposite(" **anxiety** or", "depression") == "anxiety"
    assert clean_opposite("Joy!", "joy") is None and clean_opposite("...", "joy") is None
    assert clean_opposite(' "humor" or', "humorous") is None and clean_opposite(" not funny", "humorous") is None


def test_bad_sampling_settings_are_refused(model):
    for kwargs in (dict(n=0), dict(top_p=0.0), dict(top_p=1.5), dict(temperature=0.0), dict(top_k=-1),
                   dict(max_new_tokens=0)):
        args = dict(n=2, max_new_tokens=4) | kwargs
        with pytest.raises(InputError):
            generate_prompts(model, "joy", "positive", args.pop("n"), **args)
    with pytest.raises(InputError, match="kind"):
        generate_prompts(model, "joy", "neutral", 2)
    with pytest.raises(InputError, match="setting"):
        generate_prompts(model, "joy", "negative", 2, setting="other")


def test_load_prompts_reads_jsonl_and_plain_text(tmp_path):
    rows = json.dumps({"text": "a b", "seed": 1}) + "\n\n" + json.dumps({"text": "c"}) + "\n"
    (tmp_path / "p.jsonl").write_text(rows)
    (tmp_path / "p.txt").write_text("first text\nsecond text\n")
    assert [r["text"] for r in load_prompts(tmp_path / "p.jsonl")] == ["a b", "c"]
    assert [r["text"] for r in load_prompts(tmp_path / "p.txt")] == ["first text", "second text"]
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"text": " "}) + "\n")
    with pytest.raises(InputError, match="empty"):
        load_prompts(tmp_path / "blank.jsonl")


def test_cli_prompts_writes_jsonl_rows(tmp_path, monkeypatch, capsys, model):
    model_dir = tmp_path / "tiny"
    model.hf.save_pretrained(model_dir)
    model.tokenizer.save_pretrained(model_dir)
    out = tmp_path / "n.jsonl"
    code, _, err = run_cli(["prompts", "--concept", "joy", "--kind", "negative", "--opposite", "sad", "--n", 3,
                            "--max-new-tokens", 6, "--generator", model_dir, "--device", "cpu", "--out", out],
                           monkeypatch, capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(FIELDS | {"opposite"} <= set(r) and r["setting"] == "contrastive" for r in rows)
    assert "opposite: sad (user)" in err
    # Bad settings: one line, exit 2, no file.
    for bad in (["--n", 0], ["--top-p", 2], ["--kind", "neutral"]):
        code, _, err = run_cli(["prompts", "-c", "joy", "--generator", model_dir, "--out", tmp_path / "x.jsonl", *bad],
                               monkeypatch, capsys)
        assert code == 2 and len([x for x in err.splitlines() if x.strip()]) == 1, err
    code, _, err = run_cli(["prompts", "-c", "joy", "--setting", "random", "--kind", "negative", "--generator",
                            model_dir, "--out", tmp_path / "x.jsonl"], monkeypatch, capsys)
    assert code == 2 and "--model" in err
    assert not (tmp_path / "x.jsonl").exists()
    (tmp_path / "mine.txt").write_text("my own happy text\nanother glad one\n")
    code, _, _ = run_cli(["prompts", "-c", "joy", "--from-file", tmp_path / "mine.txt",
                          "--out", tmp_path / "mine.jsonl"], monkeypatch, capsys)
    mine = [json.loads(line) for line in (tmp_path / "mine.jsonl").read_text().splitlines()]
    assert code == 0 and [r["text"] for r in mine] == ["my own happy text", "another glad one"]
    assert mine[0]["generator"] == "user" and mine[0]["kind"] == "positive"


@pytest.mark.slow
def test_the_default_model_writes_positive_prompts_for_joy(default_model):
    rows = generate_prompts(default_model, "joy", "positive", 2, max_new_tokens=24, seed=0, batch_size=2)
    assert 1 <= len(rows) <= 2
    prompt = default_model.decode(generator_prompt_ids(default_model, concept_prompt("joy")))
    assert default_model.tokenizer.decode(generator_prompt_ids(default_model, "x")[-3:]).endswith("assistant\n")
    for r in rows:
        assert r["generator"] == "smollm2-135m-instruct" and r["text"] and r["n_tokens"] <= 24
        assert "Write about the concept" not in r["text"] and "assistant" not in r["text"][:12]
    assert "joy" in prompt
