"""Bad inputs, second round (issue 27, items 5-8): configuration files built to exhaust the parser, integers past what
the code represents, files of the wrong kind, options that were silently ignored. Each is one line on stderr and exit
code 2 (an InputError from the API), before any compute, with nothing written."""

import json
from pathlib import Path

import pytest
import torch

from steerstrength import InputError, SteeringVectors
from steerstrength.config import MAX_CONFIG_BYTES, SEED_MAX, build_config
from cliutil import error_lines, run_cli
from tiny import tiny_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model directory, a vector file and good P/N texts."""
    root = tmp_path_factory.mktemp("inputs")
    model = tiny_model("llama")
    model.hf.save_pretrained(root / "model")
    model.tokenizer.save_pretrained(root / "model")
    torch.manual_seed(0)
    SteeringVectors({1: torch.randn(model.d_model)}, dict(concept="joy", setting="random")).save(root / "v.safetensors")
    (root / "p.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["i am happy and glad", "joy"]))
    (root / "n.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["the table", "rain"]))
    return root


def quiet_cli(args, monkeypatch, capsys):
    return run_cli(args, monkeypatch, capsys, quiet=True)


def one_line(err: str) -> bool:
    return len(error_lines(err)) == 1 and "Traceback" not in err


def tiny(files, *args):
    return [*args, "--model", files / "model", "--vectors", files / "v.safetensors", "--device", "cpu"]


# ----------------------------------------------------------------------------- item 5: the config reader is bounded


HOSTILE_TOML = {  # name: (text, what the error says)
    "dotted key of 100,000 parts (24 GB before)": ("a" + ".a" * 100_000 + " = 1\n", "a dotted key has 100001 parts"),
    "dotted key of 3000 parts": ("tokens" + ".x" * 2999 + " = 1\n", "a dotted key has 3000 parts"),
    "inline tables 3000 deep": ("x = " + "{a = " * 3000 + "1" + "}" * 3000 + "\n", "nest 3000 levels deep"),
    "arrays 3000 deep": ("x = " + "[" * 3000 + "]" * 3000 + "\n", "nest 3000 levels deep"),
    "a 5000-digit integer": ("seed = " + "9" * 5000 + "\n", "a number has 5000 digits"),
    "a 2 MB file": ("# padding\n" * (MAX_CONFIG_BYTES // 10 + 1), "bytes (at most"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_TOML))
def test_a_config_file_past_what_a_configuration_holds_is_one_line_before_parsing(tmp_path, monkeypatch, capsys, name):
    text, message = HOSTILE_TOML[name]
    path = tmp_path / "hostile.toml"
    path.write_text(text)
    code, _, err = quiet_cli(["run", "--config", path, "--out", tmp_path / "out"], monkeypatch, capsys)
    assert code == 2 and one_line(err) and message in err, err
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="hostile.toml"):
        build_config("demo", str(path), [])


def test_what_a_configuration_does_hold_still_reads(tmp_path):
    """Strings with brackets, dots and long digit runs, comments, table headers: none of them trips the scan."""
    path = tmp_path / "ok.toml"
    path.write_text('# a comment with [[[ and a.b.c.d.e.f.g.h.i.j.k.l.m.n.o.p.q.r and ' + "9" * 200 + '\n'
                    '[model]\nspec = "a/b.' + "c." * 40 + '[[[{{{' + "1" * 300 + '"\n'
                    '[tokens]\nalpha_max = 1.25e0\nn_alphas = 1_024\n[limit]\nalphas = [10.0, 100.0, 1000.5]\n')
    cfg = build_config("demo", str(path), [])
    assert cfg.model.spec.startswith("a/b.c.") and cfg.tokens.n_alphas == 1024 and cfg.limit.alphas[-1] == 1000.5


@pytest.mark.parametrize("override, message", [
    ("tokens.n_alphas=" + "[" * 3000 + "]" * 3000, "nest 3000 levels deep"),
    ("seed=" + "9" * 5000, "a number has 5000 digits"),
    ("seed=" + str(10**29), f"seed must be at most {SEED_MAX}"),
    ("seed=" + str(SEED_MAX + 1), f"seed must be at most {SEED_MAX}"),
    ("tokens.n_alphas=" + str(10**29), "tokens.n_alphas must be at most"),
    ("xent.n_alphas=" + str(10**9), "xent.n_alphas must be at most"),
    ("xent.n_tokens=" + str(2**31), "xent.n_tokens must be at most 2147483647"),
    ("prompts.batch_size=" + str(10**19), "prompts.batch_size must be at most"),
])
def test_integers_past_what_the_code_represents_are_refused_by_validation(tmp_path, monkeypatch, capsys, override,
                                                                          message):
    with pytest.raises(InputError, match=message[:40].replace("[", r"\[")):
        build_config("demo", None, [override])
    code, _, err = quiet_cli(["run", override, "--out", tmp_path / "out"], monkeypatch, capsys)
    assert code == 2 and one_line(err) and message in err, err
    assert not (tmp_path / "out").exists()
    assert build_config("demo", None, [f"seed={SEED_MAX}"]).seed == SEED_MAX  # the largest seed is valid


@pytest.mark.parametrize("command", ["prompts", "vectors", "xent", "concept", "recommend", "train-tiny", "theory"])
@pytest.mark.parametrize("seed", [10**29, -1])
def test_a_seed_no_generator_takes_is_one_line(files, tmp_path, monkeypatch, capsys, command, seed):
    args = {
        "prompts": ["prompts", "--concept", "joy", "--out", tmp_path / "out" / "p.jsonl", "--n", "2",
                    "--model", files / "model", "--device", "cpu"],
        "vectors": ["vectors", "--concept", "joy", "--model", files / "model", "--device", "cpu", "--layers", "1",
                    "--resamples", "2", "--out", tmp_path / "out" / "v.safetensors"],
        "xent": tiny(files, "sweep", "xent", "--corpus", "model", "--out", tmp_path / "out"),
        "concept": tiny(files, "sweep", "concept", "--judge", "lexicon", "--out", tmp_path / "out"),
        "recommend": tiny(files, "recommend", "--method", "iso-kl", "--out", tmp_path / "out"),
        "train-tiny": ["train-tiny", "--out", tmp_path / "out", "--steps", "1"],
        "theory": ["theory", "figures", "--steps", "5", "--out", tmp_path / "out"],
    }[command]
    code, _, err = quiet_cli([*args, "--seed", seed], monkeypatch, capsys)
    assert code == 2 and one_line(err) and f"--seed must be in [0, {SEED_MAX}], not {seed}" in err, err
    assert not (tmp_path / "out").exists()
