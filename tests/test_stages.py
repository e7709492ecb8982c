"""One home per idea: `sweep X` and the run's stage X are one function writing the same tables; one alpha grid; a
SteeringVector that knows its layer. A bare tensor is refused with one line."""


import pandas as pd
import pytest
import torch

from steerstrength.grid import AlphaGrid
from steerstrength.vectors import SteeringVector, SteeringVectors
from cliutil import run_cli
from test_pipeline import config, run, tiny_dir  # noqa: F401 - the fixture
from tiny import tiny_model

# ----------------------------------------------------------------------------- sweep X == run's stage X


@pytest.fixture(scope="module")
def finished_run(tiny_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("run")
    statuses = run(config(tiny_dir), out)
    assert statuses["mmlu"][0] == "done" and statuses["concept"][0] == "done"
    return out


def same_table(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), check_categorical=False)


# The run's sizes (test_pipeline.SMALL) as the sweep commands' options; everything else is the demo preset's.
# The random directions too: the demo's controls section (n_random 4, n_xent 2, n_concept 2, n_mmlu 2).
SWEEPS = {
    "tokens": (["--n-alphas", "16", "--n-contexts", "2", "--top-k", "5", "--controls", "4"],
               ["tokens.parquet", "tokens_top.parquet"]),
    "limit": (["--n-contexts", "2", "--controls", "4"], ["limit.parquet"]),
    "xent": (["--max-tokens", "96", "--seq-len", "8", "--n-alphas", "6", "--controls", "2"], ["xent.parquet"]),
    "concept": (["--n-alphas", "3", "--completions", "1", "--n-prompts", "1", "--max-new-tokens", "4", "--controls",
                 "2"], ["concept_scores.parquet", "concept_curve.parquet", "concept_completions.jsonl"]),
    "mmlu": (["--limit", "2", "--n-alphas", "3", "--k-shots", "1", "--controls", "2"],
             ["mmlu.parquet", "mmlu_questions.parquet"]),
}


@pytest.mark.parametrize("stage", list(SWEEPS))
def test_sweep_writes_the_tables_the_run_writes(stage, finished_run, tiny_dir, tmp_path, monkeypatch,  # noqa: F811
                                                capsys):
    options, names = SWEEPS[stage]
    code, _, err = run_cli(["sweep", stage, "--vectors", finished_run / "vectors" / "joy.safetensors", "--model",
                            tiny_dir, "--device", "cpu", *options, "--out", tmp_path], monkeypatch, capsys, quiet=True)
    assert code in (0, None), err
    for name in names:
        ours, theirs = tmp_path / name, finished_run / "tables" / name
        if name.endswith(".jsonl"):
            assert ours.read_text() == theirs.read_text(), name
        else:
            same_table(pd.read_parquet(ours), pd.read_parquet(theirs))


def test_sweep_logodds_writes_the_table_the_run_writes(finished_run, tiny_dir, tmp_path, monkeypatch,  # noqa: F811
                                                       capsys):
    prompts = finished_run / "prompts"
    from steerstrength.prompts import curated_texts

    held = {}
    for kind in ("positive", "negative"):  # the run's M_heldout: the curated held-out pairs
        held[kind] = tmp_path / f"heldout.{kind}.txt"
        held[kind].write_text("\n".join(curated_texts("joy", kind, "heldout")) + "\n")
    code, _, err = run_cli(["sweep", "logodds", "-p", prompts / "joy.positive.jsonl", "-n",
                            prompts / "joy.negative.jsonl", "--tokens-dir", finished_run / "tables", "--model",
                            tiny_dir, "--device", "cpu", "--heldout-positive", held["positive"], "--heldout-negative",
                            held["negative"], "--out", tmp_path / "out"], monkeypatch, capsys, quiet=True)
    assert code in (0, None), err
    same_table(pd.read_parquet(tmp_path / "out" / "logodds.parquet"),
               pd.read_parquet(finished_run / "tables" / "logodds.parquet"))


# ----------------------------------------------------------------------------- AlphaGrid


def test_alpha_grids_hold_their_values_zero_and_unit():
    g = AlphaGrid.linspace(-1.5, 1.5, 4, unit="resid")
    assert g.tolist() == [-1.5, -0.5, 0.0, 0.5, 1.5] and g.zero == 2 and g.unit == "resid" and not g.inserted_zero
    listed = AlphaGrid.parse("-5,5")
    assert listed.tolist() == [-5.0, 0.0, 5.0] and listed.inserted_zero  # 0 added to what the user listed
    assert AlphaGrid.parse("-5,5", zero=False).tolist() == [-5.0, 5.0]
    assert AlphaGrid.both_signs([10, 100]).tolist() == [-100.0, -10.0, 10.0, 100.0]
    assert AlphaGrid.from_zero(0.6, 4).tolist() == pytest.approx([0.0, 0.2, 0.4, 0.6])
    log = AlphaGrid.log(16.0, 8)
    assert log.tolist()[-1] == 16.0 and 8.0 in log.tolist() and log.zero == 4
    with pytest.raises(Exception, match="repeated"):
        AlphaGrid.parse("1,1")


def test_an_odd_symmetric_grid_holds_zero_exactly_once():
    for n in (5, 9, 41, 61, 1025):
        g = AlphaGrid.linspace(-1.5, 1.5, n)
        assert len(g) == n and g.zero == n // 2 and (g.values.abs() < 1e-12).sum() == 1


def test_units_convert_to_the_raw_alphas_steer_adds():
    v = SteeringVector(torch.tensor([3.0, 4.0]), layer=2, residual_norm=10.0)
    resid = AlphaGrid.linspace(-1, 1, 3, unit="resid")
    raw = v.raw_alphas(resid)
    added = (raw[:, None] * v.vector.double()[None, :]).norm(dim=-1)
    assert added.tolist() == pytest.approx([10.0, 0.0, 10.0])  # one residual norm at +/-1
    unit = v.raw_alphas(AlphaGrid.linspace(-1, 1, 3, unit="unit"))
    assert unit.tolist() == pytest.approx([-0.2, 0.0, 0.2])  # ||v|| = 5
    assert v.raw_alphas(AlphaGrid.linspace(-1, 1, 3)).tolist() == [-1.0, 0.0, 1.0]


def test_a_sweep_refuses_a_raw_unit_over_a_resid_preset_grid(tiny_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    torch.manual_seed(0)
    SteeringVectors({1: torch.randn(32)}, dict(concept="joy")).save(tmp_path / "v.safetensors")
    code, _, err = run_cli(["sweep", "tokens", "--vectors", tmp_path / "v.safetensors", "--model", tiny_dir,
                            "--alpha-unit", "raw", "--out", tmp_path / "out"], monkeypatch, capsys, quiet=True)
    assert code == 2 and "resid units" in err and "--alpha-max" in err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- SteeringVector


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_a_steering_vector_knows_its_layer_and_applies_itself(model):
    import steerstrength as ss

    torch.manual_seed(0)
    sv = SteeringVectors({1: torch.randn(model.d_model), 2: torch.randn(model.d_model)},
                         dict(concept="joy", residual_norms={"1": 3.0}))
    v = sv[1]
    assert v.layer == 1 and v.residual_norm == 3.0 and v.meta["concept"] == "joy" and sv[2].residual_norm is None
    assert list(sv) == [1, 2] and [x.layer for x in sv.values()] == [1, 2]
    enc = model.encode(["the cat saw"])
    with v.apply(model, 2.0):
        applied = model.hf(input_ids=enc.input_ids).logits
    with ss.steer(model, v.vector, 1, 2.0):
        hooked = model.hf(input_ids=enc.input_ids).logits
    assert torch.equal(applied, hooked)
    plain = model.hf(input_ids=enc.input_ids).logits  # the hook is gone
    assert not torch.equal(plain, applied)
    assert torch.equal((-v).vector, -v.vector) and torch.equal((2 * v).vector, 2 * v.vector)
    assert (-v).layer == 1 and float(v.normalized().norm()) == pytest.approx(1.0)
    with pytest.raises(ss.InputError, match="takes a SteeringVector"):  # a bare tensor does not know its layer
        ss.next_token_probs(model, v.vector, "the cat", [0.0, 1.0])

