"""What a careless user can give the CLI: binary files, unwritable outputs, absurd sizes, Ctrl-C. Each is one line on
stderr and exit code 2 (130 for Ctrl-C), before any compute, with nothing written."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from steerstrength import InputError, SteeringVectors
from steerstrength.io import read_texts
from cliutil import error_lines, run_cli
from tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model directory, a vector file, good P/N texts and a gallery of files that are not UTF-8 text."""
    root = tmp_path_factory.mktemp("hardening")
    model = tiny_model("llama")
    model.hf.save_pretrained(root / "model")
    model.tokenizer.save_pretrained(root / "model")
    torch.manual_seed(0)
    SteeringVectors({1: torch.randn(model.d_model)}, dict(concept="joy", setting="random")).save(root / "v.safetensors")
    (root / "p.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["i am happy and glad", "joy"]))
    (root / "n.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["the table", "rain"]))
    (root / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (root / "latin1.jsonl").write_bytes('{"text": "un café"}\n'.encode("latin-1"))
    (root / "utf16.txt").write_text("a text\nanother\n", encoding="utf-16")
    (root / "nul.txt").write_bytes(b"a text\nwith a \x00 inside\n")
    (root / "a_file").write_text("not a directory\n")
    return root


def quiet_cli(args, monkeypatch, capsys):
    return run_cli(args, monkeypatch, capsys, quiet=True)


def one_line(err: str) -> bool:
    return len(error_lines(err)) == 1 and "Traceback" not in err


def tiny(files, *args):
    return [*args, "--model", files / "model", "--vectors", files / "v.safetensors", "--device", "cpu"]


# ----------------------------------------------------------------------------- item 7: non-UTF-8 and binary input


BAD_TEXT = {"binary.txt": "a binary file", "latin1.jsonl": "latin1.jsonl:1: byte 0xe9 is not UTF-8",
            "utf16.txt": "UTF-16", "nul.txt": "nul.txt:2: a NUL byte"}


@pytest.mark.parametrize("name", sorted(BAD_TEXT))
@pytest.mark.parametrize("command", ["contexts", "positive", "corpus", "prompts", "vectors", "config"])
def test_files_that_are_not_utf8_text_are_one_line(files, tmp_path, monkeypatch, capsys, name, command):
    bad = files / name
    args = {
        "contexts": tiny(files, "sweep", "tokens", "--contexts", bad, "--n-alphas", "4"),
        "positive": tiny(files, "sweep", "logodds", "-p", bad, "-n", files / "n.jsonl", "--n-alphas", "4"),
        "corpus": tiny(files, "sweep", "xent", "--corpus", bad, "--seq-len", "4", "--n-alphas", "4"),
        "prompts": tiny(files, "sweep", "concept", "--prompts", bad, "--judge", "lexicon", "--completions", "1"),
        "vectors": ["vectors", "-p", bad, "-n", files / "n.jsonl", "--model", files / "model", "--device", "cpu",
                    "--layers", "1"],
        "config": ["run", "--config", bad],
    }[command]
    code, _, err = quiet_cli([*args, "--out", tmp_path / "out"], monkeypatch, capsys)
    assert code == 2 and one_line(err), err
    assert str(bad) in err and BAD_TEXT[name] in err
    assert not (tmp_path / "out").exists()


def test_text_files_are_read_as_utf8_with_a_byte_order_mark_tolerated(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + '{"text": "déjà vu"}\n'.encode())  # what Windows editors write
    assert read_texts(path) == [{"text": "déjà vu"}]
    with pytest.raises(InputError, match="is a directory"):
        read_texts(tmp_path)


# ----------------------------------------------------------------------------- item 8: outputs that cannot be written


def unwritable_dirs(tmp_path) -> list:
    """Directories that refuse new files: a read-only one (root ignores modes), and /sys (refuses even root)."""
    out = []
    if os.geteuid() != 0:
        ro = tmp_path / "read-only"
        ro.mkdir()
        ro.chmod(0o555)
        out.append(ro)
    if Path("/sys/kernel").is_dir():
        try:
            os.rmdir(__import__("tempfile").mkdtemp(dir="/sys"))
        except OSError:
            out.append(Path("/sys"))
    return out


@pytest.mark.parametrize("command", ["tokens", "concept", "mmlu", "recommend", "run"])
def test_an_output_directory_that_is_a_file_or_lies_under_one_is_refused_before_computing(files, monkeypatch, capsys,
                                                                                          command):
    args = {
        "tokens": tiny(files, "sweep", "tokens", "--n-alphas", "4"),
        "concept": tiny(files, "sweep", "concept", "--judge", "lexicon", "--completions", "1", "--n-prompts", "1"),
        "mmlu": tiny(files, "sweep", "mmlu", "--source", "sample", "--limit", "1"),
        "recommend": tiny(files, "recommend", "--method", "iso-kl", "--n-prompts", "1", "--completions", "1"),
        "run": ["run", f"model.spec={files / 'model'}", "layers=1"],
    }[command]
    for out, message in ((files / "a_file", "is a file, not a directory"),
                         (files / "a_file" / "sub", "lies under")):
        code, _, err = quiet_cli([*args, "--out", out], monkeypatch, capsys)
        assert code == 2 and one_line(err) and "--out" in err and message in err, err
    assert (files / "a_file").read_text() == "not a directory\n"


def test_unwritable_output_directories_are_refused_before_computing(files, tmp_path, monkeypatch, capsys):
    dirs = unwritable_dirs(tmp_path)
    if not dirs:
        pytest.skip("no directory here refuses new files")
    for d in dirs:
        code, _, err = quiet_cli([*tiny(files, "sweep", "tokens", "--n-alphas", "4"), "--out", d / "out"], monkeypatch,
                               capsys)
        assert code == 2 and one_line(err) and f"cannot write in {d}" in err, err
        from steerstrength.io import check_output_file

        with pytest.raises(InputError, match="cannot write in"):
            check_output_file(d / "v.safetensors")


def test_an_output_file_path_that_is_a_directory_or_a_device_is_refused(files, tmp_path, monkeypatch, capsys):
    taken = tmp_path / "v.safetensors"
    taken.mkdir()
    code, _, err = quiet_cli(["vectors", "--concept", "joy", "--model", files / "model", "--device", "cpu",
                            "--layers", "1", "--out", taken], monkeypatch, capsys)
    assert code == 2 and one_line(err) and "--out" in err and "is a directory" in err
    from steerstrength.io import check_output_file

    with pytest.raises(InputError, match="not a regular file"):
        check_output_file("/dev/null")  # os.replace would put a regular file in place of the device
    code, _, err = quiet_cli(["theory", "verify", "--steps", "10", "--json", files / "a_file" / "v.json"], monkeypatch,
                           capsys)
    assert code == 2 and one_line(err) and "--json" in err and "lies under" in err
    # A result whose file name is taken by a directory: refused before computing, nothing else written.
    (tmp_path / "sweep" / "tokens.json").mkdir(parents=True)
    code, _, err = quiet_cli([*tiny(files, "sweep", "tokens", "--n-alphas", "4"), "--out", tmp_path / "sweep"],
                           monkeypatch, capsys)
    assert code == 2 and one_line(err) and "tokens.json is a directory" in err
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["tokens.json"]


def test_checks_leave_nothing_on_disk(tmp_path):
    from steerstrength.io import check_output_dir, check_output_file

    check_output_dir(tmp_path / "a" / "b", names=("x.parquet",))
    check_output_file(tmp_path / "c" / "v.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_any_other_file_system_error_is_one_line(files, tmp_path, monkeypatch, capsys):
    """A write that fails mid-command (here: a figure's file name taken by a directory) is one line, not a traceback."""
    (tmp_path / "fig2_dataset.png").mkdir()
    code, _, err = quiet_cli(["theory", "figures", "--steps", "10", "--out", tmp_path], monkeypatch, capsys)
    assert code == 2 and one_line(err) and "fig2_dataset.png" in err


# ----------------------------------------------------------------------------- item 9: sizes that cannot fit


@pytest.mark.parametrize("n", [10_000_000, 10**12])
def test_a_token_sweep_too_large_for_memory_is_refused_up_front(files, tmp_path, monkeypatch, capsys, n):
    code, _, err = quiet_cli([*tiny(files, "sweep", "tokens"), "--n-alphas", n, "--out", tmp_path], monkeypatch, capsys)
    assert code == 2 and one_line(err), err
    assert "--n-alphas" in err and "of memory" in err
    fits = int(err.split("use --n-alphas ")[1].split()[0])
    assert 0 < fits < n
    assert list(tmp_path.iterdir()) == []


def test_the_memory_check_counts_a_block_not_the_full_matrix_past_the_budget(monkeypatch):
    """16,385 alphas at vocabulary 49,152 stream in blocks (metrics/reduce.py): only the table must fit."""
    from steerstrength import stages

    monkeypatch.setattr(stages, "available_memory", lambda: 2 * 10**9)
    stages.check_token_memory(16385, "--n-alphas", 49152, 1, 1, 100)  # the full matrix alone would be 3.2 GB
    with pytest.raises(InputError, match="use --n-alphas") as info:
        stages.check_token_memory(200_000, "--n-alphas", 49152, 1, 1, 100)  # 200,000 x 100 table rows do not fit
    fits = int(str(info.value).split("use --n-alphas ")[1].split()[0])
    stages.check_token_memory(fits, "--n-alphas", 49152, 1, 1, 100)  # the advice is a size that passes


# ----------------------------------------------------------------------------- item 12: sizes below one


@pytest.mark.parametrize("args, message", [
    (["recommend", "--method", "iso-kl", "--n-prompts", "-1"], "--n-prompts must be at least 1, not -1"),
    (["recommend", "--method", "iso-kl", "--completions", "0"], "--completions must be at least 1, not 0"),
    (["sweep", "mmlu", "--source", "sample", "--token-budget", "0"], "--token-budget must be at least 1, not 0"),
])
def test_sizes_below_one_are_refused(files, tmp_path, monkeypatch, capsys, args, message):
    code, _, err = quiet_cli([*tiny(files, *args), "--out", tmp_path / "out"], monkeypatch, capsys)
    assert code == 2 and one_line(err) and message in err, err
    assert not (tmp_path / "out").exists()


def test_theory_verify_bad_settings_error_before_any_progress_bar(monkeypatch, capsys):
    from steerstrength.cli.common import state

    monkeypatch.setitem(state, "quiet", False)  # bars on, as in a terminal
    code, _, err = run_cli(["theory", "verify", "--groups", "0"], monkeypatch, capsys)
    assert code == 2 and one_line(err) and "groups" in err and "training UFM" not in err, err


# ----------------------------------------------------------------------------- item 13: Ctrl-C, run advice, sample MMLU


def test_ctrl_c_exits_130_with_an_interrupted_line():
    """A real SIGINT to a separate process while `theory verify` trains (10^6 steps take minutes)."""
    import subprocess
    import sys
    import time

    # A shell that runs the tests in the background ignores SIGINT, and Python keeps an inherited SIG_IGN: restore
    # the default (what a terminal's Ctrl-C meets) in the child.
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from steerstrength.cli import main; "
            "sys.argv = ['steerstrength', '--quiet', 'theory', 'verify', '--steps', '1000000']; "
            "print('ready', flush=True); main()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(1.0)  # inside main(): training has started
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err


def test_plot_on_an_unfinished_run_gives_the_command_that_resumes_it(tmp_path, monkeypatch, capsys):
    from steerstrength.config import build_config, preset, to_toml

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(to_toml(preset("paper")))  # what `run --preset paper` wrote before a kill
    code, _, err = quiet_cli(["plot", run], monkeypatch, capsys)
    assert code == 2 and one_line(err)
    assert f"steerstrength run --config {run / 'config.toml'} --out {run}" in err
    # That command runs the paper configuration even under the default (demo) preset: config.toml holds every key.
    assert build_config("demo", str(run / "config.toml"), []).to_dict() == preset("paper").to_dict()
    for bad, what in ((tmp_path / "missing", "does not exist"), (run / "config.toml", "is a file")):
        code, _, err = quiet_cli(["plot", bad], monkeypatch, capsys)
        assert code == 2 and one_line(err) and what in err


def test_sweep_mmlu_accepts_the_packaged_sample(files, tmp_path, monkeypatch, capsys):
    """`--source sample` reads the toy questions `run` reads with mmlu.source=sample (not MMLU)."""
    import pandas as pd

    code, _, err = quiet_cli([*tiny(files, "sweep", "mmlu", "--source", "sample"), "--n-alphas", "2", "--limit", "1",
                            "--k-shots", "0", "--out", tmp_path], monkeypatch, capsys)
    assert code == 0, err
    assert len(pd.read_parquet(tmp_path / "mmlu_questions.parquet")) > 0
