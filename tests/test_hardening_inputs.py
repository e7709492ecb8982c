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
from test_hardening_cli import files, one_line, quiet_cli, tiny  # noqa: F401  (files: the module's fixture)


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


# ----------------------------------------------------------------------------- item 6: files of the wrong kind


@pytest.mark.parametrize("norms, message", [
    ("abc", "residual_norms is a str, not an object"),
    ([1.0, 2.0], "residual_norms is a list, not an object"),
    ({"1": "abc"}, "residual_norms['1'] is 'abc'"),
    ({"1": [3.0]}, "residual_norms['1'] is [3.0]"),
    ({"1": float("nan")}, "residual_norms['1'] is nan"),
])
def test_residual_norm_metadata_that_is_not_a_number_per_layer_is_one_line(files, tmp_path, monkeypatch, capsys,
                                                                           norms, message):
    path = tmp_path / "v.safetensors"
    _save_raw_meta(path, dict(concept="joy", residual_norms=norms))
    with pytest.raises(InputError, match="residual_norms"):
        SteeringVectors.load(path)
    args = ["sweep", "tokens", "--model", files / "model", "--vectors", path, "--device", "cpu", "--n-alphas", "4",
            "--alpha-unit", "resid", "--out", tmp_path / "out"]
    code, _, err = quiet_cli(args, monkeypatch, capsys)
    assert code == 2 and one_line(err) and message in err and str(path) in err, err
    assert not (tmp_path / "out").exists()


def _save_raw_meta(path, meta: dict) -> None:
    """A vector file whose metadata says anything (as a file edited by hand or another tool would)."""
    from safetensors.torch import save_file

    save_file({"layer.1": torch.ones(32)}, str(path), metadata={"steerstrength": json.dumps(meta)})


def test_our_own_control_vector_given_as_the_model_is_one_line_and_not_cached(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STEERSTRENGTH_CACHE", str(tmp_path / "cache"))
    control = tmp_path / "joy.gguf"
    code, _, err = quiet_cli(["vectors", "--concept", "joy", "--model", files / "model", "--device", "cpu", "--layers",
                              "1", "--out", tmp_path / "v.safetensors", "--gguf-out", control], monkeypatch, capsys)
    assert code == 0 and control.is_file(), err
    code, _, err = quiet_cli(["sweep", "tokens", "--model", control, "--vectors", files / "v.safetensors", "--device",
                              "cpu", "--n-alphas", "4", "--out", tmp_path / "out"], monkeypatch, capsys)
    assert code == 2 and one_line(err) and "is a llama.cpp control vector" in err and "--vectors" in err, err
    assert not (tmp_path / "out").exists()
    index = tmp_path / "cache" / "sha256.json"
    assert not index.exists() or str(control.resolve()) not in index.read_text()


def test_a_refused_gguf_is_not_recorded_in_the_cache_index(tmp_path, monkeypatch, capsys):
    """Item 8: a file refused as a model leaves no sha256 entry behind (it was hashed before it was checked)."""
    monkeypatch.setenv("STEERSTRENGTH_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    code, _, err = quiet_cli(["models", "show", bad, "--device", "cpu"], monkeypatch, capsys)
    assert code == 2 and one_line(err) and "not a GGUF file" in err, err
    assert not (tmp_path / "cache" / "sha256.json").exists()


@pytest.mark.parametrize("config, message", [("[1, 2]", "config.json is a JSON list, not an object"),
                                             ('"llama"', "config.json is a JSON str, not an object"),
                                             ("{broken", "config.json is not readable JSON")])
def test_a_model_directory_whose_config_is_not_an_object_is_one_line(tmp_path, monkeypatch, capsys, config, message):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(config)
    code, _, err = quiet_cli(["models", "show", tmp_path / "model", "--device", "cpu"], monkeypatch, capsys)
    assert code == 2 and one_line(err) and message in err, err


def test_an_unknown_model_type_is_one_line_without_a_transformers_warning(files, tmp_path):
    """Item 8: transformers logs a warning line of its own before the error; a separate process sees the real stderr."""
    import shutil
    import subprocess
    import sys

    shutil.copytree(files / "model", tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    (tmp_path / "model" / "config.json").write_text(json.dumps(dict(config, model_type="not-a-real-model")))
    out = subprocess.run([sys.executable, "-m", "steerstrength.cli", "models", "show", str(tmp_path / "model"),
                          "--device", "cpu"], capture_output=True, text=True, env=_env())
    assert out.returncode == 2 and "does not hold a causal LM" in out.stderr
    assert error_lines(out.stderr) == [out.stderr.strip()] and "[transformers]" not in out.stderr, out.stderr


def _env() -> dict:
    import os

    root = Path(__file__).resolve().parents[1]
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")]))


@pytest.mark.parametrize("manifest, message", [
    ("[1, 2]", "manifest.json is a JSON list, not an object"),
    ('"done"', "manifest.json is a JSON str, not an object"),
    ('{"stages": [1]}', "its 'stages' is a list"),
    ('{"model": "tiny"}', "its 'model' is a str"),
    ('{"stages": {"tokens": 3}}', "its stage 'tokens' is a int"),
    ('{"config": {"tokens": [1]}}', "its config section 'tokens' is a list"),
])
def test_plot_on_a_damaged_manifest_is_one_line_naming_the_repair(small_run, tmp_path, monkeypatch, capsys, manifest,
                                                                  message):
    run = copy_run(small_run, tmp_path)
    (run / "manifest.json").write_text(manifest)
    code, _, err = quiet_cli(["plot", run], monkeypatch, capsys)
    assert code == 2 and one_line(err) and message in err and "steerstrength run" in err, err
    assert not (run / "report.html").exists()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """A run directory with the vectors and tokens stages' tables (tests/test_plots.py's synthetic run)."""
    from test_plots import make_run

    run = tmp_path_factory.mktemp("small") / "run"
    make_run(run, stages=("vectors", "tokens"))
    return run


def copy_run(run: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, tmp_path / "run"))


DAMAGED_INDEX = ["[1]", "{broken", '{"figures": [{"files": 3}]}', '{"figures": [{"files": [3]}]}']


def test_a_damaged_figure_index_is_redrawn_by_plot_and_skipped_by_the_report(small_run, tmp_path, monkeypatch, capsys):
    from steerstrength.run_tables import RunTables
    from steerstrength.report import section_figures

    run = copy_run(small_run, tmp_path)
    (run / "figures").mkdir()
    for index in DAMAGED_INDEX:  # the report alone (the run's report stage) reads the index as it is
        (run / "figures" / "index.json").write_text(index)
        assert "<img" not in section_figures(RunTables(run))
    code, _, err = quiet_cli(["plot", run], monkeypatch, capsys)  # plot redraws over the last one
    assert code == 0 and "Traceback" not in err, err
    assert isinstance(json.loads((run / "figures" / "index.json").read_text())["figures"], list)


@pytest.mark.parametrize("gguf", [False, True])
def test_a_disk_full_while_writing_vectors_is_one_line_with_nothing_written(files, tmp_path, monkeypatch, capsys, gguf):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")  # what a full disk leaves before the error
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "out"
    out.mkdir()
    args = ["vectors", "--concept", "joy", "--model", files / "model", "--device", "cpu", "--layers", "1",
            "--out", out / "v.safetensors", *(["--gguf-out", out / "v.gguf"] if gguf else [])]
    code, _, err = quiet_cli(args, monkeypatch, capsys)
    assert code == 2 and one_line(err) and "No space left on device" in err and str(out) in err, err
    assert list(out.iterdir()) == []
    sv = SteeringVectors({1: torch.ones(4)})
    with pytest.raises(OSError, match="No space left"):
        sv.save(out / "v.safetensors")
    assert list(out.iterdir()) == []


# ----------------------------------------------------------------------------- item 8: smaller


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_vector_files_get_the_mode_of_every_other_output(tmp_path, umask):
    """safetensors writes a file of its own (mode 0600) and renames it; ours follow the umask like every output."""
    import os

    from steerstrength.io import write_json
    from steerstrength.vectors import save_vectors

    old = os.umask(umask)
    try:
        sv = SteeringVectors({1: torch.ones(4)}, dict(concept="joy"))
        sv.save(tmp_path / "a.safetensors")
        save_vectors(sv, tmp_path / "b.safetensors", tmp_path / "b.gguf")
        write_json(tmp_path / "c.json", {})
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["a.safetensors", "b.safetensors", "b.gguf", "c.json"], 0o666 & ~umask)


def test_run_user_errors_are_one_line_without_a_banner(files, tmp_path, monkeypatch, capsys):
    code, _, err = quiet_cli(["run", f"model.spec={tmp_path / 'no-such-model'}", "--out", tmp_path / "run"],
                             monkeypatch, capsys)
    assert code == 2 and one_line(err) and "no-such-model" in err, err


def test_only_prompts_does_not_point_at_a_report_it_did_not_write(files, tmp_path, monkeypatch, capsys):
    code, _, err = quiet_cli(["run", f"model.spec={files / 'model'}", "layers=1", "--only", "prompts", "--out",
                              tmp_path / "run"], monkeypatch, capsys)
    assert code == 0, err
    assert not (tmp_path / "run" / "report.html").exists() and "report.html" not in err, err


# ----------------------------------------------------------------------------- item 7: options silently ignored


def contexts_file(tmp_path, n: int = 20) -> Path:
    path = tmp_path / "contexts.txt"
    path.write_text("".join(f"the cat saw {i} dogs and\n" for i in range(n)))
    return path


def test_a_users_contexts_file_is_swept_whole_unless_n_contexts_is_given(files, tmp_path, monkeypatch, capsys):
    """`sweep tokens` kept the preset's 6 of 20 contexts without a word (`sweep limit` swept all 20)."""
    import pandas as pd

    path = contexts_file(tmp_path)
    for command, table in (("tokens", "tokens_top.parquet"), ("limit", "limit.parquet")):
        for extra, n in (([], 20), (["--n-contexts", "3"], 3)):
            out = tmp_path / f"{command}-{n}"
            code, _, err = quiet_cli([*tiny(files, "sweep", command, "--contexts", path, "--out", out), *extra,
                                      *(["--n-alphas", "2"] if command == "tokens" else [])], monkeypatch, capsys)
            assert code == 0, err
            assert pd.read_parquet(out / table)["context_id"].nunique() == n, (command, extra)
    # The run: a contexts file set without tokens.n_contexts is used whole; both set, the count holds.
    assert build_config("demo", None, [f"tokens.contexts_file={path}"]).tokens.n_contexts is None
    assert build_config("demo", None, [f"tokens.contexts_file={path}", "tokens.n_contexts=4"]).tokens.n_contexts == 4
    assert build_config("demo", None, []).tokens.n_contexts == 6  # the built-in contexts keep the preset's count


def test_the_layer_scan_reads_texts_as_the_vectors_do_with_max_length(files):
    from steerstrength.config import VectorsConfig
    from steerstrength.loading import load_model
    from steerstrength.stages import scan_stage

    model = load_model(str(files / "model"), device="cpu")
    long = ["i am happy and glad and the sun is good today my friend " * 3] * 6
    other = ["the table was in the kitchen and the rain on the house " * 3] * 6
    full = scan_stage(model, long, other, VectorsConfig())[1].table
    cut = scan_stage(model, long, other, VectorsConfig(max_length=4))[1].table
    assert not full["vector_norm"].equals(cut["vector_norm"])


@pytest.mark.parametrize("extra, message", [
    (["--split", "test"], "--corpus wikipedia:test"),
    (["--field", "body"], "--field selects a column or split of a dataset; the wikipedia corpus has none"),
    (["--seed", "3"], "--seed seeds the model-samples corpus"),
    (["--corpus", "model", "--field", "body"], "the model corpus has none"),
])
def test_xent_options_the_corpus_does_not_read_are_refused(files, tmp_path, monkeypatch, capsys, extra, message):
    code, _, err = quiet_cli([*tiny(files, "sweep", "xent", "--out", tmp_path / "out"), *extra], monkeypatch, capsys)
    assert code == 2 and one_line(err) and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra", [["--model", "/no/such"], ["--n", "7"], ["--temperature", "0.5"],
                                   ["--generator", "x"], ["--seed", "1"]])
def test_prompts_from_a_file_refuses_the_generation_options(files, tmp_path, monkeypatch, capsys, extra):
    out = tmp_path / "p.jsonl"
    code, _, err = quiet_cli(["prompts", "--concept", "joy", "--from-file", files / "p.jsonl", "--out", out, *extra],
                             monkeypatch, capsys)
    assert code == 2 and one_line(err) and f"{extra[0]} has no effect with --from-file" in err, err
    assert not out.exists()


@pytest.mark.parametrize("only", [",", " , ,", ""])
def test_run_only_naming_no_stage_is_refused(tmp_path, monkeypatch, capsys, only):
    code, _, err = quiet_cli(["run", "--only", only, "--out", tmp_path / "run"], monkeypatch, capsys)
    assert code == 2 and one_line(err) and "names no stage" in err, err
    assert not (tmp_path / "run").exists()


def test_vectors_and_gguf_to_the_same_path_is_refused(files, tmp_path, monkeypatch, capsys):
    (tmp_path / "sub").mkdir()
    for gguf in (tmp_path / "v.out", tmp_path / "sub" / ".." / "v.out"):
        code, _, err = quiet_cli(["vectors", "--concept", "joy", "--model", files / "model", "--device", "cpu",
                                  "--layers", "1", "--out", tmp_path / "v.out", "--gguf-out", gguf], monkeypatch, capsys)
        assert code == 2 and one_line(err) and "--out and --gguf-out are both" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]


@pytest.mark.parametrize("command", ["tokens", "logodds", "xent", "concept", "mmlu", "recommend"])
@pytest.mark.parametrize("linspace", [["--alpha-max", "2"], ["--n-alphas", "5"], ["--alpha-min", "-1"]])
def test_alphas_with_a_linspace_option_is_refused(files, tmp_path, monkeypatch, capsys, command, linspace):
    if command == "recommend" and linspace[0] == "--alpha-min":
        pytest.skip("recommend has no --alpha-min")
    args = {
        "tokens": tiny(files, "sweep", "tokens"),
        "logodds": tiny(files, "sweep", "logodds", "-p", files / "p.jsonl", "-n", files / "n.jsonl"),
        "xent": tiny(files, "sweep", "xent"),
        "concept": tiny(files, "sweep", "concept", "--judge", "lexicon"),
        "mmlu": tiny(files, "sweep", "mmlu", "--source", "sample"),
        "recommend": tiny(files, "recommend", "--method", "iso-kl"),
    }[command]
    code, _, err = quiet_cli([*args, "--alphas=-1,0,1", *linspace, "--out", tmp_path / "out"], monkeypatch, capsys)
    assert code == 2 and one_line(err) and f"--alphas gives the grid itself; drop {linspace[0]}" in err, err
    assert not (tmp_path / "out").exists()


def test_xent_alphas_with_spacing_is_refused(files, tmp_path, monkeypatch, capsys):
    code, _, err = quiet_cli([*tiny(files, "sweep", "xent"), "--alphas=-1,0,1", "--spacing", "log", "--out",
                              tmp_path / "out"], monkeypatch, capsys)
    assert code == 2 and one_line(err) and "drop --spacing" in err, err


def test_a_json_file_of_json_lines_is_read_as_json_lines(files, tmp_path, monkeypatch, capsys):
    from steerstrength.io import read_texts

    path = tmp_path / "texts.json"
    path.write_text("".join(json.dumps({"text": t, "id": f"c{i}"}) + "\n" for i, t in enumerate(["a b", "c d"])))
    assert [r["text"] for r in read_texts(path)] == ["a b", "c d"]
    out = tmp_path / "p.jsonl"
    code, _, err = quiet_cli(["prompts", "--concept", "joy", "--from-file", path, "--out", out], monkeypatch, capsys)
    assert code == 0, err
    assert [json.loads(line)["text"] for line in out.read_text().splitlines()] == ["a b", "c d"]
    array = tmp_path / "array.json"
    array.write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=1))  # a JSON array: one line, not texts
    with pytest.raises(InputError, match="array.json:1: malformed JSON"):
        read_texts(array)
