"""Corpus sources and the `steerstrength sweep` stages: tidy Parquet tables, JSON summaries, one-line errors."""

import json

import pandas as pd
import pytest
import torch

from steerstrength import InputError, SteeringVectors
from steerstrength.corpus import cached_samples, hf_texts, load_corpus
from cliutil import run_cli
from tiny import tiny_model

REQUIRED = {"model", "concept", "layer", "setting", "alpha"}
TEXT = "i walked into the kitchen this morning and saw my friend at the table and we laugh"


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def files(tmp_path_factory, model):
    """The tiny model as a directory, a vector file, contexts, P/N and a corpus, for the CLI."""
    root = tmp_path_factory.mktemp("sweeps")
    model.hf.save_pretrained(root / "model")
    model.tokenizer.save_pretrained(root / "model")
    torch.manual_seed(0)
    SteeringVectors({1: torch.randn(model.d_model), 2: torch.randn(model.d_model)},
                    dict(concept="joy", setting="random", model=model.name)).save(root / "v.safetensors")
    (root / "contexts.txt").write_text("i walked into the kitchen\nthe cat saw a dog and\n")
    (root / "p.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["i am happy and glad", "joy and a smile"]))
    (root / "n.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["the table is in the kitchen", "rain"]))
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": TEXT + " " + TEXT}) + "\n" for _ in range(3)))
    return root


def common(files):
    return ["--model", files / "model", "--vectors", files / "v.safetensors", "--device", "cpu"]


# ----------------------------------------------------------------------------- corpus sources


def test_corpus_files_of_every_kind(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("first text\n\nsecond text\n")
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(pa.table({"text": ["x", "y"], "id": [1, 2]}), shards / "000.parquet")
    pq.write_table(pa.table({"text": ["z"], "id": [3]}), shards / "001.parquet")
    assert load_corpus(tmp_path / "a.txt") == ["first text", "second text"]
    assert load_corpus(tmp_path / "a.jsonl") == ["one", "two"]
    assert load_corpus(shards / "000.parquet") == ["x", "y"]
    assert load_corpus(shards) == ["x", "y", "z"]
    assert load_corpus(shards, max_texts=2) == ["x", "y"]


def test_corpus_bad_sources_give_one_clear_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "empty.jsonl").write_text("")
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "no_text.parquet")
    (tmp_path / "blank.txt").write_text("  \n\n")
    with pytest.raises(InputError, match="empty"):
        load_corpus(tmp_path / "empty.jsonl")
    with pytest.raises(InputError, match="no 'text' column.*content"):
        load_corpus(tmp_path / "no_text.parquet")
    with pytest.raises(InputError, match="empty"):
        load_corpus(tmp_path / "blank.txt")
    with pytest.raises(InputError, match="does not exist"):
        load_corpus(tmp_path / "missing.parquet")


def test_hf_dataset_loading_code_on_a_local_parquet(tmp_path):
    """The `datasets` path, offline: its packaged Parquet builder over a local file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [f"doc {i}" for i in range(5)]}), tmp_path / "d.parquet")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
    assert hf_texts("parquet", data_files=str(tmp_path / "d.parquet"), max_texts=3) == ["doc 0", "doc 1", "doc 2"]
    with pytest.raises(InputError, match="no 'text' column"):
        hf_texts("parquet", data_files=str(tmp_path / "bad.parquet"))


def test_model_samples_are_seeded_and_cached(tmp_path, model, monkeypatch):
    a = cached_samples(model, tmp_path, 3, 12, seed=5)
    assert len(a) == 3 and all(t.strip() for t in a)
    assert (tmp_path / "corpus_samples.jsonl").is_file()

    def fail(*args, **kwargs):
        raise AssertionError("the cache was not reused")

    monkeypatch.setattr("steerstrength.corpus.sample_texts", fail)
    assert cached_samples(model, tmp_path, 3, 12, seed=5) == a  # same key: read back
    monkeypatch.undo()
    assert load_corpus(None, model=model, n_samples=3, sample_tokens=12, seed=5) == a  # same seed, same texts
    assert load_corpus(None, model=model, n_samples=3, sample_tokens=12, seed=6) != a


# ----------------------------------------------------------------------------- CLI stages


def test_cli_tokens_writes_tables_and_summary(files, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(["sweep", "tokens", *common(files), "--layers", "1,2", "--contexts", files / "contexts.txt",
                            "--n-alphas", "6", "--top-k", "4", "--out", tmp_path], monkeypatch, capsys, quiet=True)
    assert code in (0, None), err
    curves = pd.read_parquet(tmp_path / "tokens.parquet")
    top = pd.read_parquet(tmp_path / "tokens_top.parquet")
    assert REQUIRED | {"context_id", "token_id", "token", "delta_p", "peak_alpha", "shape"} <= set(curves.columns)
    assert REQUIRED | {"side", "rank", "token"} <= set(top.columns)
    # The grid is in residual units (the preset's): one grid for both layers, different raw alphas at each.
    assert set(curves["layer"]) == {1, 2} and curves["alpha_resid"].round(9).nunique() == 7  # 6 + 0
    assert curves.groupby("layer")["alpha"].nunique().tolist() == [7, 7]
    assert (curves[curves["alpha"] == 0]["delta_p"] == 0).all()
    assert len(top) == 2 * 2 * 2 * 4  # layers x contexts x sides x k
    summary = json.loads((tmp_path / "tokens.json").read_text())
    assert summary["concept"] == "joy" and len(summary["alphas"]) == 7 and summary["alpha_unit"] == "resid"
    assert set(summary["per_concept"]["joy"]) == {"1", "2"}


def test_cli_logodds_computes_the_sweep_it_needs(files, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(["sweep", "logodds", *common(files), "--layers", "1", "--positive", files / "p.jsonl",
                            "--negative", files / "n.jsonl", "--contexts", files / "contexts.txt", "--n-alphas", "6",
                            "--top-k", "4", "--n-target", "5", "--out", tmp_path], monkeypatch, capsys, quiet=True)
    assert code in (0, None), err
    table = pd.read_parquet(tmp_path / "logodds.parquet")
    assert {"model", "concept", "setting", "token_id", "token", "M", "rank", "extremal"} <= set(table.columns)
    assert len(table) == 72 and not {"layer", "alpha"} & set(table.columns)  # M depends on neither
    summary = json.loads((tmp_path / "logodds.json").read_text())
    layer = summary["joy"]["per_layer"]["1"]
    assert layer["dominant_at_alpha_max_extremal_high"]["total"] == 2 * 4
    assert (tmp_path / "tokens.parquet").is_file()
    # reuse the token tables
    out2 = tmp_path / "again"
    code, _, err = run_cli(["sweep", "logodds", "--model", files / "model", "--device", "cpu", "--positive",
                            files / "p.jsonl", "--negative", files / "n.jsonl", "--tokens-dir", tmp_path,
                            "--n-target", "5", "--out", out2], monkeypatch, capsys, quiet=True)
    assert code in (0, None), err
    again = json.loads((out2 / "logodds.json").read_text())
    assert again["joy"] == summary["joy"] and again["concept"] == "joy"


def test_cli_limit_and_xent_write_tables(files, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(["sweep", "limit", *common(files), "--layers", "1", "--contexts", files / "contexts.txt",
                            "--alphas=-1e4,-1e3,-1e2,1e2,1e3,1e4", "--alpha-unit", "raw", "--out", tmp_path],
                           monkeypatch, capsys, quiet=True)
    assert code in (0, None), err
    limit = pd.read_parquet(tmp_path / "limit.parquet")
    assert REQUIRED | {"context_id", "tv", "top1_match"} <= set(limit.columns) and len(limit) == 2 * 6
    assert json.loads((tmp_path / "limit.json").read_text())["joy/1"]["tv_shrinks"]["positive"]
    code, _, err = run_cli(["sweep", "xent", *common(files), "--layers", "1", "--corpus", files / "corpus.jsonl",
                            "--seq-len", "8", "--alphas=-2,-0.5,0.5,2", "--alpha-unit", "raw", "--out", tmp_path],
                           monkeypatch, capsys,
                           quiet=True)
    assert code in (0, None), err
    xent = pd.read_parquet(tmp_path / "xent.parquet")
    assert REQUIRED | {"ce", "delta_ce", "n_tokens"} <= set(xent.columns)
    assert sorted(xent["alpha"]) == [-2, -0.5, 0, 0.5, 2]  # 0 inserted
    summary = json.loads((tmp_path / "xent.json").read_text())["per_vector"]["joy/1"]
    assert summary["inserted_zero"] and summary["curvature"]["jvp"] is not None
    assert summary["n_tokens"] == 3 * ((2 * 17 - 1) // 8) * 8


def test_cli_xent_defaults_to_the_packaged_wikipedia_packed(files, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(["sweep", "xent", *common(files), "--layers", "1", "--seq-len", "8", "--max-tokens", "64",
                            "--n-alphas", "4", "--no-curvature", "--out", tmp_path], monkeypatch, capsys, quiet=True)
    assert code in (0, None), err
    summary = json.loads((tmp_path / "xent.json").read_text())
    assert summary["corpus"] == "wikipedia" and summary["packing"] is True
    assert summary["per_vector"]["joy/1"]["n_tokens"] == 64  # 8 windows of the packed paragraphs
    assert not (tmp_path / "corpus_samples.jsonl").exists()


def test_cli_xent_on_model_samples_and_bad_inputs(files, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(["sweep", "xent", *common(files), "--layers", "1", "--corpus", "model", "--n-samples", "2",
                            "--sample-tokens", "20", "--seq-len", "8", "--n-alphas", "4", "--no-curvature", "--out",
                            tmp_path], monkeypatch, capsys, quiet=True)
    assert code in (0, None), err
    assert (tmp_path / "corpus_samples.jsonl").is_file()
    summary = json.loads((tmp_path / "xent.json").read_text())
    assert "KL" in summary["corpus"] and summary["packing"] is False
    code, _, err = run_cli(["sweep", "xent", *common(files), "--layers", "1", "--n-samples", "2", "--out",
                            tmp_path / "bad"], monkeypatch, capsys, quiet=True)
    assert code == 2 and "--corpus model" in err and not (tmp_path / "bad" / "xent.parquet").exists()
    (tmp_path / "short.jsonl").write_text('{"text": "too short"}\n')
    code, _, err = run_cli(["sweep", "xent", *common(files), "--layers", "1", "--corpus", tmp_path / "short.jsonl",
                            "--seq-len", "8", "--out", tmp_path / "bad"], monkeypatch, capsys, quiet=True)
    assert code == 2 and "seq_len + 1" in err and not (tmp_path / "bad" / "xent.parquet").exists()
    code, _, err = run_cli(["sweep", "tokens", *common(files), "--layers", "7", "--out", tmp_path / "bad"],
                           monkeypatch, capsys, quiet=True)
    assert code == 2 and "layer" in err
