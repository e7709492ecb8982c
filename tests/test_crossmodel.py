"""A run over several models: each model's pipeline in RUN/models/<name>, Fig. 6 across models, badges per model."""

import json

import pandas as pd
import pytest

from cliutil import run_cli
from steerstrength.config import build_config
from steerstrength.crossmodel import model_runs, run_models
from steerstrength.errors import InputError, ModelLoadError
from test_pipeline import SMALL, Quiet, run, tables
from tiny import save_tiny_models


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


FAST = ["concept.enabled=false", "mmlu.enabled=false"]  # the comparison needs some badges, not all of them


def multi(paths, *extra):
    return build_config("demo", None, SMALL + FAST + ["models=" + ",".join(map(str, paths))] + list(extra))


def test_each_model_runs_as_alone_and_the_comparison_is_drawn(two_models, tmp_path, monkeypatch, capsys):
    cfg = multi(two_models)
    out = tmp_path / "multi"
    run_models(cfg, out, progress=Quiet(), log=lambda m: None)
    # a model's tables are exactly those of a run of that model alone
    path = two_models[1]
    run(build_config("demo", None, SMALL + FAST + [f"model.spec={path}"]), tmp_path / "alone")
    a, b = tables(tmp_path / "alone"), tables(out / "models" / path.name)
    assert a.keys() == b.keys() and a
    for name in a:
        if isinstance(a[name], str):
            assert a[name] == b[name], name
        else:
            pd.testing.assert_frame_equal(a[name], b[name], obj=name)
    models = model_runs(out)
    assert [m["name"] for m in models] == sorted((m["name"] for m in models),
                                                 key=lambda n: next(x["n_params"] for x in models if x["name"] == n))
    assert all(m["n_params"] and m["finished"] for m in models)
    badges = pd.read_parquet(out / "tables" / "badges.parquet")
    assert set(badges["model"]) == {"tiny-gpt2", "tiny-llama"}
    assert {"Thm 3.3", "Thm 3.8", "Prop. 4.1 (limit)"} <= set(badges["claim"])
    assert set(badges["verdict"]) <= {"agrees", "disagrees", "unclear"}
    assert (out / "figures" / "fig6_models_joy.png").is_file()
    page = (out / "report.html").read_text()
    assert 'href="models/tiny-llama/report.html"' in page and "Fig. 6 across models" in page
    assert json.loads((out / "models.json").read_text())["models"] == models
    # `plot` redraws the comparison from the tables alone, byte for byte the same badges
    before = (out / "tables" / "badges.parquet").read_bytes()
    (out / "report.html").unlink()
    code, _, err = run_cli(["plot", out], monkeypatch, capsys, quiet=True)
    assert code in (0, None), err
    assert (out / "report.html").is_file() and (out / "tables" / "badges.parquet").read_bytes() == before
    # a second run reuses every model's finished stages
    seen = []
    run_models(cfg, out, progress=Quiet(), log=seen.append)
    assert any("cached" in line or "reused" in line for line in seen) and not any("done in" in line and
                                                                                  "[vectors]" in line for line in seen)


@pytest.mark.parametrize("extra, message", [
    (["model.spec=smollm2-135m-instruct"], "not both"),
    (None, "twice"),
])
def test_bad_model_lists_are_refused_before_anything_is_written(two_models, tmp_path, extra, message):
    cfg = multi(two_models, *(extra or [])) if extra else multi([two_models[0], two_models[0]])
    with pytest.raises(InputError, match=message):
        run_models(cfg, tmp_path / "out", progress=Quiet(), log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_a_spec_that_is_no_model_is_one_error_before_any_model_runs(two_models, tmp_path, monkeypatch, capsys):
    cfg = multi([two_models[0], tmp_path / "nowhere"])
    with pytest.raises(ModelLoadError, match="nowhere"):
        run_models(cfg, tmp_path / "out", progress=Quiet(), log=lambda m: None)
    assert not (tmp_path / "out").exists()
    code, _, err = run_cli(["run", f"models={two_models[0]},{tmp_path / 'nowhere'}", "--out", tmp_path / "cli"],
                           monkeypatch, capsys, quiet=True)
    assert code == 2 and [line for line in err.splitlines() if "error" in line] == [
        line for line in err.splitlines() if "nowhere" in line] and len([l for l in err.splitlines() if "error" in l]) == 1
    assert not (tmp_path / "cli").exists()


def test_a_model_entry_can_carry_its_own_overrides(two_models, tmp_path):
    """"SPEC key=value": that model's stages use it (its keys change, the other model's do not)."""
    from steerstrength.crossmodel import check_models, model_config
    from steerstrength.pipeline import stage_keys

    small, large = map(str, two_models)
    cfg = multi([small, f"{large} concept.alpha_max=0.4 xent.n_alphas=4"])
    (_, name_a), (entry_b, name_b) = check_models(cfg)
    assert (name_a, name_b) == ("tiny-gpt2", "tiny-llama")
    b = model_config(cfg, entry_b)
    assert b.model.spec == large and b.concept.alpha_max == 0.4 and b.xent.n_alphas == 4
    plain = build_config("demo", None, SMALL + FAST + [f"model.spec={large}"])
    assert stage_keys(b)["xent"] != stage_keys(plain)["xent"] and stage_keys(b)["tokens"] == stage_keys(plain)["tokens"]
    assert stage_keys(model_config(cfg, small)) == stage_keys(build_config("demo", None, SMALL + FAST + [
        f"model.spec={small}"]))
    for entry, message in ((f"{large} concept.alpha_max", "not key=value"), (f"{large} ray.max_retries=1", "the run's"),
                           (f"{large} concept.alpha_max=-1", "concept.alpha_max"), (f"{large} nope.key=1", "unknown")):
        with pytest.raises(InputError, match=message):
            run_models(multi([small, entry]), tmp_path / "out", progress=Quiet(), log=lambda m: None)
        assert not (tmp_path / "out").exists()
