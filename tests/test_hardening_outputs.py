"""Run directories and the --out folders of sweeps: results are cached on the bytes of the user files they read, never
on a path; nothing is written or deleted outside the folder (symlinks in it are refused); one writer at a time, and a
sweep's files are read back only as the set one writer finished."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from steerstrength.pipeline import stage_keys
from test_pipeline import config, run, tiny_dir  # noqa: F401  (tiny_dir: the module's fixture)

FAST = ["prompts", "vectors", "tokens"]
P = ["i am happy and glad today", "we laugh and smile in the sun", "my friend is very happy", "you love the morning"]
N = ["i am sad and angry today", "we cry in the rain", "my friend is very sad", "you hate the evening"]


def write_texts(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


# ----------------------------------------------------------------------------- item 2: keyed on bytes, not paths


def test_a_prompts_file_edited_in_place_recomputes_prompts_vectors_and_the_tables(tiny_dir, tmp_path):
    pos, neg = write_texts(tmp_path / "p.jsonl", P), write_texts(tmp_path / "n.jsonl", N)
    cfg = config(tiny_dir, f"prompts.positive_file={pos}", f"prompts.negative_file={neg}")
    out = tmp_path / "run"
    run(cfg, out, only=FAST)
    before = pd.read_parquet(out / "tables" / "tokens.parquet")
    assert {s: r[0] for s, r in run(cfg, out, only=FAST).items()} == dict.fromkeys(FAST, "cached")
    write_texts(pos, ["the cat saw a dog", "the dog saw a cat", "a house in the rain", "the kitchen table"])
    again = run(cfg, out, only=FAST)  # the same config, the same path: only the file's bytes changed
    assert {s: r[0] for s, r in again.items()} == dict.fromkeys(FAST, "done")
    assert "cat" in (out / "prompts" / "joy.positive.jsonl").read_text()
    after = pd.read_parquet(out / "tables" / "tokens.parquet")
    assert not before["p"].equals(after["p"])


def test_a_contexts_file_edited_in_place_reruns_the_token_sweep_only(tiny_dir, tmp_path):
    contexts = write_texts(tmp_path / "contexts.jsonl", ["the cat saw a dog", "my friend is very"])
    cfg = config(tiny_dir, f"tokens.contexts_file={contexts}")
    out = tmp_path / "run"
    run(cfg, out, only=FAST)
    write_texts(contexts, ["the dog saw a cat", "my friend is very"])
    again = run(cfg, out, only=FAST)
    assert {s: r[0] for s, r in again.items()} == {"prompts": "cached", "vectors": "cached", "tokens": "done"}


def _mmlu_dir(tmp_path: Path) -> Path:
    from importlib.resources import files

    target = tmp_path / "mmlu"
    shutil.copytree(str(files("steerstrength") / "data" / "mmlu_sample"), target)
    return target


DOWNSTREAM = {"figures", "report"}


@pytest.mark.parametrize("key, make, edit, changed", [
    ("concept.prompts_file", lambda d: write_texts(d / "asks.jsonl", ["tell me about your day"]),
     lambda p: write_texts(p, ["tell me about the sea"]), {"concept", "recommend"}),
    ("xent.corpus", lambda d: write_texts(d / "corpus.jsonl", ["the cat saw a dog . " * 8]),
     lambda p: write_texts(p, ["the dog saw a cat . " * 8]), {"xent", "recommend"}),
    ("mmlu.source", _mmlu_dir, lambda d: (d / "test" / "astronomy_test.csv").write_text("Q?,a,b,c,d,A\n"), {"mmlu"}),
    ("tokens.contexts_file", lambda d: write_texts(d / "contexts.jsonl", ["the cat"]),
     lambda p: write_texts(p, ["the dog"]), {"tokens", "logodds", "depth", "limit", "recommend"}),
    ("prompts.negative_file", lambda d: write_texts(d / "n.jsonl", N), lambda p: write_texts(p, N[:3]),
     {"prompts", "vectors", "tokens", "logodds", "depth", "limit", "xent", "concept", "mmlu", "recommend"}),
], ids=["concept-prompts", "corpus-file", "mmlu-dir", "contexts", "negative-prompts"])
def test_editing_a_user_input_in_place_changes_exactly_the_keys_of_the_stages_that_read_it(tiny_dir, tmp_path, key,
                                                                                         make, edit, changed):
    path = make(tmp_path)
    cfg = config(tiny_dir, f"{key}={path}")
    before = stage_keys(cfg)
    assert stage_keys(cfg) == before  # the same bytes: the same keys
    edit(path)
    after = stage_keys(cfg)
    assert {s for s in before if before[s] != after[s]} == changed | DOWNSTREAM
