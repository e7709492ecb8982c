"""The run configuration: presets, TOML files, key=value overrides, clear errors."""

import re

import pytest

from steerstrength import InputError, RunError
from steerstrength.config import build_config, preset, resolve_layers, to_toml
from steerstrength.runs import RunDir


def test_presets_differ_in_size_not_in_shape():
    demo, paper = preset("demo"), preset("paper")
    assert paper.prompts.n == 500 and paper.prompts.max_new_tokens == 300
    assert paper.tokens.n_alphas == 1024 and paper.xent.n_tokens == 1_000_000
    assert (paper.concept.n_prompts, paper.concept.completions) == (12, 32)
    assert len(paper.concepts) == 8 and paper.layers == ["early", "middle", "late", "auto"]
    assert demo.prompts.n < paper.prompts.n and demo.concepts == ["joy"]


def test_presets_steer_the_scanned_layer_with_curated_pairs_in_residual_units():
    for cfg in (preset("demo"), preset("paper")):
        assert "auto" in cfg.layers and cfg.prompts.source == "curated" and cfg.setting == "contrastive"
        assert cfg.alpha_unit == "resid"
        # One grid means the same at any layer: strengths of order the residual norm, not raw hundreds.
        assert cfg.tokens.alpha_max <= 4 and cfg.concept.alpha_max <= 2
        # A log grid is dense near 0 and reaches the plateau of Prop. 4.1 (docs/fidelity.md).
        assert cfg.xent.alpha_max <= (16 if cfg.xent.spacing == "log" else 2)
    assert preset("demo").layers == ["auto", "middle"]


def test_auto_is_left_to_the_scan_and_names_resolve_everywhere():
    assert resolve_layers(["auto", "middle"], 30) == [15]
    assert resolve_layers(["early", "late", "3"], 30) == [3, 5, 25]
    from steerstrength.vectors import parse_layers

    assert parse_layers("early,middle,late", 30) == [5, 15, 25]
    with pytest.raises(InputError, match="alpha_unit"):
        build_config("demo", None, ["alpha_unit=furlongs"])
    with pytest.raises(InputError, match="prompts.source"):
        build_config("demo", None, ["prompts.source=web"])
    with pytest.raises(InputError, match="recommend.curvature_scope"):
        build_config("demo", None, ["recommend.curvature_scope=everywhere"])
    with pytest.raises(InputError, match="recommend.sweet_spot_rule"):
        build_config("demo", None, ["recommend.sweet_spot_rule=peak"])


def test_overrides_parse_types_and_nested_keys():
    cfg = build_config("demo", None, ["concepts=joy,evil", "xent.n_tokens=4096", "tokens.alpha_max=50",
                                      "layers=3,10", "vectors.normalize=true", "model.spec=none"])
    assert cfg.concepts == ["joy", "evil"]
    assert cfg.xent.n_tokens == 4096 and cfg.tokens.alpha_max == 50.0
    assert cfg.layers == [3, 10] and cfg.vectors.normalize is True and cfg.model.spec is None


def test_toml_round_trip(tmp_path):
    cfg = build_config("demo", None, ["concepts=joy,evil", "xent.seq_len=32"])
    path = tmp_path / "run.toml"
    path.write_text(to_toml(cfg))
    again = build_config("demo", str(path), [])
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("override, message", [
    ("xent.n_tokenz=3", "unknown config key"),
    ("xent=3", "is a section"),
    ("xent.n_tokens=abc", "takes an integer"),
    ("vectors.normalize=maybe", "true or false"),
    ("setting=sideways", "random or contrastive"),
    ("tokens.n_alphas=1", "at least 2"),
    ("tokens.alpha_max=nan", "positive finite"),
    ("noequals", "key=value"),
])
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(InputError, match=message):
        build_config("demo", None, [override])


@pytest.mark.parametrize("override, message", [
    ("layers=", "layers is empty"),
    ("layers=3,sideways", "'sideways' is not a layer"),
    ("mmlu.n_alphas=0", "mmlu.n_alphas must be at least 2, not 0"),
    ("limit.alphas=[]", "limit.alphas must be a non-empty list"),
    ("limit.alphas=10,-5", "limit.alphas must be a non-empty list"),
    ("xent.chunk_windows=0", "xent.chunk_windows must be at least 1, not 0"),
    ("concept.completions=0", "concept.completions must be at least 1, not 0"),
    ("recommend.kl_budget=0", "recommend.kl_budget must be a positive finite number"),
    ("recommend.kl_budget=inf", "recommend.kl_budget must be a positive finite number"),
    ("recommend.n_alphas=1", "recommend.n_alphas must be at least 2"),
    ("tokens.n_contexts=abc", "tokens.n_contexts takes an integer"),
    ("prompts.top_p=1.5", "prompts.top_p must be in (0, 1]"),
    ("seed=-1", "seed must be at least 0"),
    ("concept.judge=oracle", "concept.judge must be one of"),
    ("xent.n_tokens=10", "xent.n_tokens (10) must be at least xent.seq_len"),
    ("concept.prompts_file=/no/such/file.txt", "concept.prompts_file /no/such/file.txt is not a file"),
])
def test_every_section_is_checked_before_any_stage_naming_the_key(override, message):
    with pytest.raises(InputError, match=re.escape(message)):
        build_config("demo", None, [override])


def test_every_numeric_key_has_a_valid_range():
    """A new numeric key cannot slip past `validate`: each int or float field has its range in config.py."""
    import dataclasses

    from steerstrength.config import MINIMUM, POSITIVE, UNIT_INTERVAL, RunConfig

    numeric = set()
    for section in dataclasses.fields(RunConfig):
        value = getattr(RunConfig(), section.name)
        fields = dataclasses.fields(value) if dataclasses.is_dataclass(value) else [section]
        prefix = f"{section.name}." if dataclasses.is_dataclass(value) else ""
        numeric |= {prefix + f.name for f in fields
                    if str(f.type).replace("Optional[", "").rstrip("]") in ("int", "float")}
    assert numeric == set(MINIMUM) | set(POSITIVE) | set(UNIT_INTERVAL)
    for name in ("demo", "paper"):
        build_config(name)  # the presets themselves are valid


def test_a_bad_value_in_a_toml_file_is_one_error_naming_the_key(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[xent]\nchunk_windows = 0\n")
    with pytest.raises(InputError, match="xent.chunk_windows must be at least 1"):
        build_config("demo", str(path), [])


def test_run_with_a_bad_key_writes_nothing(tmp_path, monkeypatch, capsys):
    from cliutil import run_cli

    out = tmp_path / "run"
    code, _, err = run_cli(["run", "--out", out, "mmlu.n_alphas=0"], monkeypatch, capsys)
    assert code == 2 and "mmlu.n_alphas" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_missing_and_invalid_config_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        build_config("demo", str(tmp_path / "nope.toml"), [])
    bad = tmp_path / "bad.toml"
    bad.write_text("concepts = [")
    with pytest.raises(InputError, match="not valid TOML"):
        build_config("demo", str(bad), [])
    with pytest.raises(InputError, match="unknown preset"):
        build_config("huge", None, [])


def test_layer_names_resolve_against_the_model_depth():
    assert resolve_layers(["early", "middle", "late"], 30) == [5, 15, 25]
    with pytest.raises(InputError):
        resolve_layers([30], 30)


def test_a_second_writer_gets_a_clear_error(tmp_path):
    run = RunDir(tmp_path)
    with run.lock():
        with pytest.raises(RunError, match="another steerstrength run"):
            with RunDir(tmp_path).lock():
                pass
    with RunDir(tmp_path).lock():  # released
        pass
