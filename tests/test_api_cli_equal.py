"""One home for defaults: a stage called from Python with no options and its `steerstrength sweep` command with no
options read the same config section (config.defaults(), the CLI's --preset), so they write the same tables."""

import pandas as pd
import pytest
import torch

from cliutil import run_cli
from steerstrength.loading import load_model
from steerstrength.runs import write_result
from steerstrength.stages import limit_stage, row_labels, tokens_stage
from steerstrength.vectors import SteeringVectors
from tiny import FLOAT32, save_tiny_models

DISCRETE = ("model", "concept", "setting", "positions", "direction", "layer", "context_id", "context_kind", "kind",
            "token_id", "token", "side", "rank", "shape", "top1")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny model directory and a vector file of the concept joy (its built-in contexts are the default ones)."""
    root = tmp_path_factory.mktemp("defaults")
    (path,) = save_tiny_models(root, (("llama", "tiny-llama"),))
    model = load_model(str(path))
    torch.manual_seed(0)
    SteeringVectors({1: torch.randn(model.d_model), 2: torch.randn(model.d_model)},
                    dict(concept="joy", setting="contrastive", model=model.name)).save(root / "v.safetensors")
    return root, path, model


def api_tables(model, vectors_file, stage, out) -> dict:
    """The stage from Python with no options: the file's vectors (r_l measured as the CLI measures it) and labels."""
    sv = SteeringVectors.load(vectors_file)
    labels = row_labels(model.name, sv.meta["concept"], sv.meta["setting"], "all")
    write_result(out, stage(model, sv.select(model=model), labels=labels))
    return {p.name: pd.read_parquet(p) for p in sorted(out.glob("*.parquet"))}


def assert_same(api: dict, cli: dict) -> None:
    assert sorted(api) == sorted(cli) and api
    for name, a in api.items():
        b = cli[name]
        assert list(a.columns) == list(b.columns) and len(a) == len(b), name
        for column in a.columns:
            if column in DISCRETE or not pd.api.types.is_float_dtype(a[column]):
                pd.testing.assert_series_equal(a[column], b[column], check_exact=True, obj=f"{name}:{column}")
            else:
                pd.testing.assert_series_equal(a[column], b[column], check_exact=False, obj=f"{name}:{column}",
                                               **FLOAT32)


@pytest.mark.parametrize("stage, command", [(tokens_stage, "tokens"), (limit_stage, "limit")])
def test_a_stage_without_options_writes_the_tables_of_its_command_without_options(inputs, stage, command, tmp_path,
                                                                                  monkeypatch, capsys):
    root, path, model = inputs
    code, _, err = run_cli(["sweep", command, "--model", path, "--vectors", root / "v.safetensors", "--out",
                            tmp_path / "cli"], monkeypatch, capsys, quiet=True)
    assert code == 0, err
    cli = {p.name: pd.read_parquet(p) for p in sorted((tmp_path / "cli").glob("*.parquet"))}
    assert_same(api_tables(model, root / "v.safetensors", stage, tmp_path / "api"), cli)
