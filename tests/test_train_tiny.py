"""train-tiny: a 1-layer GPT trained here loads like any model and steers; the derived concept "uppercase"."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from steerstrength import InputError, difference_of_means, load_model
from steerstrength.config import TrainTinyConfig
from steerstrength.corpus import wikipedia_texts
from steerstrength.prompts import curated_pairs, curated_texts
from steerstrength.train_tiny import base_tokenizer, gpt_config, mean_loss, pack, train_tiny
from cliutil import error_lines, run_cli

MICRO = dict(d_model=16, n_head=2, seq_len=32, batch_size=4, lr=1e-2, eval_every=5, eval_windows=4)


@pytest.fixture(scope="module")
def texts():
    return wikipedia_texts("train")[:40], wikipedia_texts("test")[:8]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, texts):
    out = tmp_path_factory.mktemp("tiny") / "gpt"
    summary = train_tiny(out, TrainTinyConfig(minutes=None, steps=15, **MICRO), texts=texts[0], test_texts=texts[1])
    return out, summary


def test_training_lowers_the_loss_on_the_training_windows(trained, texts):
    out, summary = trained
    tok = base_tokenizer()
    windows = pack(tok, texts[0], MICRO["seq_len"])[:16]
    torch.manual_seed(0)  # the seed the run started from: the same initial weights
    from transformers import GPT2LMHeadModel

    initial = GPT2LMHeadModel(gpt_config(len(tok), tok.eos_token_id, d_model=16, n_head=2, seq_len=32))
    model = load_model(str(out), device="cpu")
    before, after = mean_loss(initial, windows, 4), mean_loss(model.hf, windows, 4)
    assert after < before - 0.1
    assert summary["final_train_loss"] < summary["first_train_loss"]
    assert summary["steps"] == 15 and summary["tokens_seen"] == 15 * 4 * 32


def test_the_directory_holds_the_model_its_summary_and_its_loss_curve(trained):
    out, summary = trained
    assert {"config.json", "model.safetensors", "tokenizer.json", "train_tiny.json", "loss.parquet",
            "loss.png"} <= {p.name for p in out.iterdir()}
    assert [p.name for p in out.parent.iterdir()] == ["gpt"]  # no temp directory left beside it
    saved = json.loads((out / "train_tiny.json").read_text())
    assert saved["parameters"] == summary["parameters"] == sum(p.numel() for p in load_model(str(out)).hf.parameters())
    losses = pd.read_parquet(out / "loss.parquet")
    assert {"step", "tokens", "train_loss", "test_loss", "test_loss_upper"} <= set(losses.columns)
    assert losses["step"].tolist() == list(range(16))
    assert losses["test_loss"].notna().sum() == 4  # steps 0, 5, 10 and the final 15


def test_the_full_size_model_has_about_nine_million_parameters():
    from transformers import GPT2LMHeadModel

    config = gpt_config(49_152, 0, d_model=176, n_head=4, seq_len=256)
    with torch.device("meta"):
        n = sum(p.numel() for p in GPT2LMHeadModel(config).parameters())
    assert n == 9_070_160


def test_the_trained_model_loads_as_a_one_block_base_model_and_steers(trained):
    out, _ = trained
    model = load_model(str(out), device="cpu")
    assert (model.n_layers, model.d_model, model.vocab_size) == (1, 16, 49_152)
    assert not model.has_chat_template and model.start_ids == [model.tokenizer.eos_token_id]
    sv = difference_of_means(model, curated_texts("uppercase", "positive")[:8],
                             curated_texts("uppercase", "negative")[:8], [0], concept="uppercase", max_length=32)
    ids = torch.tensor([model.token_ids("The cat sat on the")])
    with torch.inference_mode():
        plain = model.hf(input_ids=ids).logits[0, -1]
        with sv[0].apply(model, 0.0):
            zero = model.hf(input_ids=ids).logits[0, -1]
        with sv[0].apply(model, 20.0):
            steered = model.hf(input_ids=ids).logits[0, -1]
    assert torch.equal(plain, zero)
    assert not torch.allclose(plain, steered)


def test_seeded_runs_are_identical_and_a_killed_run_leaves_nothing(tmp_path, texts):
    a = train_tiny(tmp_path / "a", TrainTinyConfig(minutes=10, steps=3, **MICRO), texts=texts[0], test_texts=texts[1])
    train_tiny(tmp_path / "b", TrainTinyConfig(minutes=10, steps=3, **MICRO), texts=texts[0], test_texts=texts[1])
    assert a["steps_planned"] == 3 and set(a["timing"]) == {"step_seconds", "eval_seconds", "steps_that_fit"}
    assert pd.read_parquet(tmp_path / "a" / "loss.parquet")["train_loss"].equals(
        pd.read_parquet(tmp_path / "b" / "loss.parquet")["train_loss"])

    def killed(description, total):
        def advance(n=1):
            raise KeyboardInterrupt

        import contextlib

        return contextlib.nullcontext(advance)

    with pytest.raises(KeyboardInterrupt):
        train_tiny(tmp_path / "c", TrainTinyConfig(minutes=None, steps=3, **MICRO), texts=texts[0], test_texts=texts[1],
                   progress=killed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_bad_options_are_refused_before_any_work(tmp_path):
    with pytest.raises(InputError, match="multiple of"):
        train_tiny(tmp_path / "x", TrainTinyConfig(steps=2, d_model=16, n_head=3))
    with pytest.raises(InputError, match="upper-fraction"):
        train_tiny(tmp_path / "x", TrainTinyConfig(steps=2, upper_fraction=1.5))
    assert not (tmp_path / "x").exists()


def test_uppercase_pairs_are_the_same_sentence_upper_and_lower():
    pairs = curated_pairs("uppercase")
    assert [p["split"] for p in pairs] == ["train"] * 64 + ["heldout"] * 32
    for p in pairs:
        assert p["positive"] == p["positive"].upper() and p["negative"] == p["negative"].lower()
        assert p["positive"].lower() == p["negative"] and p["positive"] != p["negative"]
    assert curated_texts("Uppercase", "positive", "heldout") == [p["positive"] for p in pairs[64:]]
    test_split = " ".join(wikipedia_texts("test"))
    assert all(p["situation"].startswith("wikipedia test paragraph") for p in pairs)
    assert pairs[0]["negative"] in test_split.lower()


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    for args, needle in ((["--d-model", "16", "--n-head", "3"], "multiple of --n-head"),
                         (["--minutes", "0"], "--minutes must be a positive"),
                         (["--steps", "0"], "--steps must be at least 1")):
        code, _, err = run_cli(["train-tiny", "--out", tmp_path / "new", *args], monkeypatch, capsys)
        assert code == 2 and len(error_lines(err)) == 1 and needle in err, err
    code, _, err = run_cli(["train-tiny", "--out", tmp_path / "full"], monkeypatch, capsys)
    assert code == 2 and len(error_lines(err)) == 1 and "--force" in err
    assert not (tmp_path / "new").exists() and [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


def test_cli_vectors_for_uppercase_on_the_trained_model(trained, tmp_path, monkeypatch, capsys):
    out, _ = trained
    code, _, err = run_cli(["vectors", "--concept", "uppercase", "--model", out, "--layers", "0",
                            "--max-length", "32", "--out", tmp_path / "up.safetensors"], monkeypatch, capsys,
                           quiet=True)
    assert code == 0, err
    from steerstrength import SteeringVectors

    sv = SteeringVectors.load(tmp_path / "up.safetensors")
    assert sv.layers == [0] and sv.meta["concept"] == "uppercase"
