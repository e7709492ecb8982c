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
SMALL_CLI = ["layers=1", "model.device=cpu", "tokens.n_alphas=4", "tokens.n_contexts=2"]  # `run`'s key=value sizes
P = ["i am happy and glad today", "we laugh and smile in the sun", "my friend is very happy", "you love the morning",
     "the cat is glad to see you", "we smile at the house"]  # a run needs 6 texts a side (preflight.MIN_USER_TEXTS)
N = ["i am sad and angry today", "we cry in the rain", "my friend is very sad", "you hate the evening",
     "the cat is sad to see you", "we cry at the house"]


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
    write_texts(pos, ["the cat saw a dog", "the dog saw a cat", "a house in the rain", "the kitchen table",
                      "a dog in the house", "the morning table"])
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


def test_a_model_directory_changed_in_place_is_not_taken_for_the_same_model(tmp_path):
    """The stage keys carry the weights' fingerprint, not only the model's path."""
    from tiny import tiny_model

    model_dir = tmp_path / "model"
    first = tiny_model("llama")
    first.hf.save_pretrained(model_dir)
    first.tokenizer.save_pretrained(model_dir)
    cfg = config(model_dir)
    out = tmp_path / "run"
    run(cfg, out, only=FAST)
    before = pd.read_parquet(out / "tables" / "tokens.parquet")
    assert {s: r[0] for s, r in run(cfg, out, only=FAST).items()} == dict.fromkeys(FAST, "cached")
    import torch

    with torch.no_grad():  # fine-tuned in place: the same path, the same config, other weights
        for p in first.hf.parameters():
            p.mul_(1.5)
    first.hf.save_pretrained(model_dir)
    again = run(cfg, out, only=FAST)
    assert {s: r[0] for s, r in again.items()} == dict.fromkeys(FAST, "done")
    assert not before["p"].equals(pd.read_parquet(out / "tables" / "tokens.parquet")["p"])


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
    ("prompts.negative_file", lambda d: write_texts(d / "n.jsonl", N), lambda p: write_texts(p, N[::-1]),
     {"prompts", "vectors", "tokens", "logodds", "depth", "limit", "xent", "concept", "mmlu", "recommend"}),
], ids=["concept-prompts", "corpus-file", "mmlu-dir", "contexts", "negative-prompts"])
def test_editing_a_user_input_in_place_changes_exactly_the_keys_of_the_stages_that_read_it(tiny_dir, tmp_path, key,
                                                                                         make, edit, changed):
    path = make(tmp_path)
    pair = [f"prompts.positive_file={write_texts(tmp_path / 'p.jsonl', P)}"] if key == "prompts.negative_file" else []
    cfg = config(tiny_dir, f"{key}={path}", *pair)  # N only is refused: P comes with it
    before = stage_keys(cfg)
    assert stage_keys(cfg) == before  # the same bytes: the same keys
    edit(path)
    after = stage_keys(cfg)
    assert {s for s in before if before[s] != after[s]} == changed | DOWNSTREAM


# ----------------------------------------------------------------------------- item 3: nothing outside the output


def _link(path: Path, target: Path) -> Path:
    """Replace `path` (a folder or file of ours) with a symbolic link to `target`."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    path.symlink_to(target, target_is_directory=target.is_dir())
    return target


def test_a_tables_folder_linked_elsewhere_is_refused_before_anything_is_written(tiny_dir, tmp_path):
    from steerstrength.errors import RunError

    cfg = config(tiny_dir)
    out = tmp_path / "run"
    run(cfg, out, only=["prompts"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _link(out / "tables", elsewhere)
    manifest = (out / "manifest.json").read_bytes()
    with pytest.raises(RunError, match="tables is a symbolic link"):
        run(cfg, out, only=FAST)
    assert list(elsewhere.iterdir()) == [] and (out / "manifest.json").read_bytes() == manifest


def test_an_output_file_linked_elsewhere_is_refused_and_its_target_kept(tiny_dir, tmp_path):
    from steerstrength.errors import RunError

    cfg = config(tiny_dir)
    out = tmp_path / "run"
    run(cfg, out, only=["prompts"])
    victim = tmp_path / "victim.jsonl"
    victim.write_text("mine\n")
    _link(out / "prompts" / "joy.positive.jsonl", victim)
    with pytest.raises(RunError, match="joy.positive.jsonl is a symbolic link"):
        run(cfg, out, only=["prompts"])
    assert victim.read_text() == "mine\n"


def test_the_temp_file_sweep_never_follows_a_linked_folder(tiny_dir, tmp_path):
    from steerstrength.runs import RunDir

    out = tmp_path / "run"
    run(config(tiny_dir), out, only=["prompts"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    outside = elsewhere / ".fig.png.abcd1234.tmp"  # named as our temp files are
    outside.write_bytes(b"not ours")
    run_dir = RunDir(out)
    _link(out / "figures", elsewhere)  # a link made after the run directory was checked
    run_dir.sweep_temp_files()
    assert outside.read_bytes() == b"not ours"


def test_the_cli_refuses_a_linked_run_folder_with_one_line_and_exit_code_2(tiny_dir, tmp_path, monkeypatch, capsys):
    from cliutil import error_lines, run_cli

    out = tmp_path / "run"
    run(config(tiny_dir), out, only=["prompts"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / ".x.png.abcd1234.tmp").write_bytes(b"not ours")
    _link(out / "figures", elsewhere)
    code, _, err = run_cli(["run", "--out", out, f"model.spec={tiny_dir}", *SMALL_CLI, "--only", "prompts"],
                           monkeypatch, capsys, quiet=True)
    errors = [line for line in error_lines(err) if line.startswith("error")]
    assert code == 2 and len(errors) == 1 and "figures is a symbolic link" in errors[0] and "Traceback" not in err
    assert [p.name for p in elsewhere.iterdir()] == [".x.png.abcd1234.tmp"]


def test_plot_refuses_a_linked_figures_folder(tiny_dir, tmp_path, monkeypatch, capsys):
    from cliutil import run_cli

    out = tmp_path / "run"
    run(config(tiny_dir), out, only=FAST)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _link(out / "figures", elsewhere)
    code, _, err = run_cli(["plot", out], monkeypatch, capsys, quiet=True)
    assert code == 2 and "figures is a symbolic link" in err
    assert list(elsewhere.iterdir()) == []


# ----------------------------------------------------------------------------- sweeps: --out


@pytest.fixture(scope="module")
def vectors_file(tmp_path_factory):
    import torch

    from steerstrength.vectors import SteeringVectors

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vectors") / "joy.safetensors"
    SteeringVectors({1: torch.randn(32)}, dict(concept="joy")).save(path)
    return path


def sweep_tokens(tiny_dir, vectors_file, out, monkeypatch, capsys, *extra):
    from cliutil import run_cli

    return run_cli(["sweep", "tokens", "--vectors", vectors_file, "--model", tiny_dir, "--device", "cpu",
                    "--n-contexts", "2", "--top-k", "5", "--n-alphas", "4", *extra, "--out", out],
                   monkeypatch, capsys, quiet=True)


def sweep_logodds(tiny_dir, tokens_dir, out, monkeypatch, capsys):
    from cliutil import run_cli

    pos, neg = write_texts(out.parent / "p.jsonl", P), write_texts(out.parent / "n.jsonl", N)
    return run_cli(["sweep", "logodds", "-p", pos, "-n", neg, "--tokens-dir", tokens_dir, "--model", tiny_dir,
                    "--device", "cpu", "--out", out], monkeypatch, capsys, quiet=True)


@pytest.mark.parametrize("name", ["tokens.parquet", ".lock"])
def test_a_sweep_refuses_an_out_whose_files_link_elsewhere(tiny_dir, vectors_file, tmp_path, monkeypatch, capsys,
                                                           name):
    from cliutil import error_lines

    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("mine")
    (out / name).symlink_to(victim)
    code, _, err = sweep_tokens(tiny_dir, vectors_file, out, monkeypatch, capsys)
    assert code == 2 and len(error_lines(err)) == 1 and f"{name} is a symbolic link" in err, err
    assert victim.read_text() == "mine" and (out / name).is_symlink()
    assert sorted(p.name for p in out.iterdir()) == [name]


# ----------------------------------------------------------------------------- item 4: one writer, one set


def test_a_second_writer_into_a_sweeps_out_gets_one_line_and_exit_code_2(tiny_dir, vectors_file, tmp_path,
                                                                          monkeypatch, capsys):
    from cliutil import error_lines

    from steerstrength.runs import RunDir

    out = tmp_path / "out"
    with RunDir(out).lock():  # the lock a run or another sweep holds while it writes
        code, _, err = sweep_tokens(tiny_dir, vectors_file, out, monkeypatch, capsys)
    assert code == 2 and len(error_lines(err)) == 1 and "another steerstrength run or sweep is writing" in err, err
    assert not (out / "tokens.parquet").exists()
    code, _, err = sweep_tokens(tiny_dir, vectors_file, out, monkeypatch, capsys)  # free again
    assert code == 0, err


def _killed_after(n_writes: int, monkeypatch, writer: str = "write_parquet"):
    """The writer `runs.<writer>` dies (as a SIGKILL would stop the process) after `n_writes` files were written."""
    from steerstrength import runs

    real, calls = getattr(runs, writer), []

    def write(path, *args, **kwargs):
        if len(calls) == n_writes:
            raise KeyboardInterrupt
        calls.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(runs, writer, write)


def test_a_sweep_killed_between_two_files_leaves_a_set_the_reader_refuses_and_a_rerun_completes(
        tiny_dir, vectors_file, tmp_path, monkeypatch, capsys):
    from cliutil import error_lines

    out = tmp_path / "tokens"
    assert sweep_tokens(tiny_dir, vectors_file, out, monkeypatch, capsys)[0] == 0
    with monkeypatch.context() as m:
        _killed_after(1, m)  # the new tokens.parquet is written; the old tokens_top.parquet and tokens.json stay
        code, _, _ = sweep_tokens(tiny_dir, vectors_file, out, monkeypatch, capsys, "--alpha-max", "3")
    assert code == 130
    code, _, err = sweep_logodds(tiny_dir, out, tmp_path / "logodds", monkeypatch, capsys)
    assert code == 2 and len(error_lines(err)) == 1 and "tokens.parquet is not the file" in err, err
    assert "sweep tokens --out" in err and not (tmp_path / "logodds" / "logodds.parquet").exists()
    assert sweep_tokens(tiny_dir, vectors_file, out, monkeypatch, capsys, "--alpha-max", "3")[0] == 0
    code, _, err = sweep_logodds(tiny_dir, out, tmp_path / "logodds", monkeypatch, capsys)
    assert code == 0 and (tmp_path / "logodds" / "logodds.parquet").is_file(), err


def test_a_first_sweep_killed_before_its_index_leaves_nothing_the_reader_takes(tiny_dir, vectors_file, tmp_path,
                                                                                monkeypatch, capsys):
    out = tmp_path / "tokens"
    with monkeypatch.context() as m:
        _killed_after(0, m, "write_json")  # both tables written, the summary and the set's index not
        assert sweep_tokens(tiny_dir, vectors_file, out, monkeypatch, capsys)[0] == 130
    assert (out / "tokens.parquet").is_file() and (out / "tokens_top.parquet").is_file()
    code, _, err = sweep_logodds(tiny_dir, out, tmp_path / "logodds", monkeypatch, capsys)
    assert code == 2 and "holds no finished set of tokens results" in err, err


def test_a_sweep_removes_the_temp_files_a_killed_writer_left_and_only_those(tiny_dir, vectors_file, tmp_path,
                                                                             monkeypatch, capsys):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    ours = [out / ".tokens.parquet.k3j2ab1x.tmp", out / ".tokens.json.a8f1zz0q.tmp"]
    kept = [out / ".notes.tmp", out / "notes.tmp", out / "sub" / ".x.parquet.k3j2ab1x.tmp"]
    for path in ours + kept:
        path.write_bytes(b"half")
    assert sweep_tokens(tiny_dir, vectors_file, out, monkeypatch, capsys)[0] == 0
    assert not any(p.exists() for p in ours) and all(p.read_bytes() == b"half" for p in kept)


def test_the_reader_refuses_a_damaged_index(tiny_dir, vectors_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "tokens"
    assert sweep_tokens(tiny_dir, vectors_file, out, monkeypatch, capsys)[0] == 0
    (out / "tokens.set.json").write_bytes(b"\xff{not json")
    code, _, err = sweep_logodds(tiny_dir, out, tmp_path / "logodds", monkeypatch, capsys)
    assert code == 2 and "tokens.set.json is missing or damaged" in err, err


WRITER = """
import os, signal, sys
import pandas as pd
from steerstrength.runs import StageResult, output_folder, write_result

out, value, die = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "die"
real, calls = pd.DataFrame.to_parquet, []

def to_parquet(self, *args, **kwargs):
    calls.append(1)
    if die and len(calls) == 2:  # in the second file's write: its temp file exists, not yet renamed
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, *args, **kwargs)

pd.DataFrame.to_parquet = to_parquet
frames = {"tokens.parquet": pd.DataFrame({"p": [value]}), "tokens_top.parquet": pd.DataFrame({"p": [value]})}
with output_folder(out):
    write_result(out, StageResult("tokens", frames, {"value": value}))
"""


def test_a_writer_killed_by_sigkill_mid_set_is_refused_cleaned_and_completed_by_the_next(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from steerstrength.errors import InputError
    from steerstrength.runs import check_result_set

    out, names = tmp_path / "out", ("tokens.parquet", "tokens_top.parquet")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))

    def writer(value: int, mode: str) -> int:
        return subprocess.run([sys.executable, "-c", WRITER, str(out), str(value), mode], env=env).returncode

    assert writer(1, "ok") == 0
    check_result_set(out, "tokens", names, "rerun")
    assert writer(2, "die") == -signal.SIGKILL
    assert [p.name for p in out.glob(".tokens_top.parquet.*.tmp")]  # what the kill left
    with pytest.raises(InputError, match="tokens.parquet is not the file"):
        check_result_set(out, "tokens", names, "rerun")
    assert writer(2, "ok") == 0
    check_result_set(out, "tokens", names, "rerun")
    assert not list(out.glob(".*.tmp"))
    assert pd.read_parquet(out / "tokens_top.parquet")["p"].tolist() == [2]
