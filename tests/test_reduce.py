"""Sweeps reduced block by block equal the full [alphas, vocab] matrix; half-precision curves carry a measured bound."""

import math

import pandas as pd
import pytest
import torch

from steerstrength import InputError, SteeringVectors, next_token_probs, token_curves
from steerstrength.config import TokensConfig
from steerstrength.grid import AlphaGrid
from steerstrength.metrics.reduce import KL, Entropy, Rows, TopK, Track, blocks, next_token_reduce
from steerstrength.metrics.tokens import check_alphas
from steerstrength.stages import row_labels, tokens_stage
from tiny import FLOAT32, tiny_model

CONTEXT = "i walked into the kitchen this morning and saw my friend"


def vector(model, layer=1, seed=2):
    torch.manual_seed(seed)
    return SteeringVectors({layer: torch.randn(model.d_model)}, dict(concept="joy"))[layer]


@pytest.mark.parametrize("positions", ["all", "last"])
def test_reductions_equal_the_full_matrix(positions):
    model = tiny_model("llama")
    sv = vector(model)
    alphas = AlphaGrid.linspace(-20, 20, 30).values  # 31 alphas: blocks of 4 leave a short last one
    probs = next_token_probs(model, sv, CONTEXT, alphas, positions=positions)
    p0 = probs[alphas.tolist().index(0.0)]
    out = next_token_reduce(model, sv, CONTEXT, alphas, {"kl": KL(), "H": Entropy(), "top": TopK(5),
                                                         "p": Track([3, 7, 11]), "ends": Rows([0, -1]), "all": Rows()},
                            positions=positions, block=4)
    p, q = probs.double(), p0.double()
    torch.testing.assert_close(out["kl"], (p * (p.log() - q.log())).sum(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["H"], -(p * p.log()).sum(-1), rtol=1e-5, atol=1e-6)
    assert out["kl"].dtype == out["H"].dtype == torch.float64
    # Blocks of 4 alphas and one batch of 31 run different matmul shapes: no BLAS promises the same bits, so
    # probabilities agree to float32 rounding through the blocks (FLOAT32), and top-k is checked by what it
    # means (the returned ids hold the k largest probabilities), which a swap of two near-tied ids keeps.
    top = probs.topk(5, dim=1)
    torch.testing.assert_close(out["top"][1], top.values, **FLOAT32)
    torch.testing.assert_close(probs.gather(1, out["top"][0]), top.values, **FLOAT32)
    torch.testing.assert_close(out["p"], probs[:, [3, 7, 11]], **FLOAT32)
    torch.testing.assert_close(out["ends"], probs[[0, -1]], **FLOAT32)
    torch.testing.assert_close(out["all"], probs, **FLOAT32)
    assert out["kl"][alphas.tolist().index(0.0)] == 0.0  # p_0 is the alpha = 0 row itself


def test_the_block_holding_zero_runs_first_and_a_grid_without_zero_gets_p0():
    assert blocks(10, 4, first=5) == [slice(4, 8), slice(0, 4), slice(8, 10)]
    model = tiny_model("gpt2")
    sv = vector(model)
    alphas = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    kl = next_token_reduce(model, sv, CONTEXT, alphas, {"kl": KL()}, block=2)["kl"]
    p, q = next_token_probs(model, sv, CONTEXT, alphas).double(), next_token_probs(model, sv, CONTEXT, [0.0]).double()
    torch.testing.assert_close(kl, (p * (p.log() - q.log())).sum(-1), rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="block"):
        next_token_reduce(model, sv, CONTEXT, alphas, {"kl": KL()}, block=0)
    with pytest.raises(InputError, match="tracked token ids"):
        next_token_reduce(model, sv, CONTEXT, alphas, {"p": Track([model.vocab_size])})


def frames(result, model):
    return result.curves_frame(model, model="m"), result.top_frame(model, model="m")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
@pytest.mark.parametrize("positions", ["all", "last"])
@pytest.mark.parametrize("block", [None, 5])
def test_streamed_token_curves_give_identical_tables(arch, positions, block):
    """A budget of 1 byte forces the two-pass, block-by-block path: the same tables (the same rows, tokens and
    shapes; probabilities to float32 rounding, as the two paths may batch the alphas differently)."""
    model = tiny_model(arch)
    sv = vector(model)
    alphas = AlphaGrid.linspace(-20, 20, 32).values
    kw = dict(positions=positions, top_k=5, top_each=3, tokens=[7], block=block)
    one_pass = token_curves(model, sv, [CONTEXT, "the cat saw a dog and"], alphas, **kw)
    streamed = token_curves(model, sv, [CONTEXT, "the cat saw a dog and"], alphas, memory_budget=1, **kw)
    for a, b in zip(frames(one_pass, model), frames(streamed, model)):
        pd.testing.assert_frame_equal(a, b, check_exact=False, **FLOAT32)
    full = next_token_probs(model, sv, CONTEXT, alphas, positions=positions)
    s = streamed.sets[0]
    torch.testing.assert_close(s.delta_p + s.p0, full[:, s.token_ids], rtol=0, atol=1e-6)
    assert all(set(row.topk(3).indices.tolist()) <= set(s.token_ids.tolist()) for row in full)


def test_certified_bfloat16_curves_report_the_measured_error_at_the_check_alphas():
    model = tiny_model("llama")
    half = tiny_model("llama")
    half.hf.to(torch.bfloat16)
    sv = vector(model, seed=3)
    alphas = AlphaGrid.linspace(-5, 5, 40).values
    res = token_curves(half, sv, [CONTEXT], alphas, top_k=5)
    s = res.sets[0]
    reference = half.in_dtype(torch.float32)
    assert reference is half.in_dtype("float32") and reference.dtype == torch.float32 and half.dtype == torch.bfloat16
    assert model.in_dtype(torch.float32) is model  # nothing to copy
    i0 = alphas.tolist().index(0.0)
    idx = check_alphas(len(alphas), i0)
    assert len(idx) == 11 and {0, i0, len(alphas) - 1} <= set(idx.tolist())  # 9 inside (0 among them), both ends
    assert check_alphas(40, 3).tolist() == [0, 3, 4, 8, 12, 16, 20, 23, 27, 31, 35, 39]
    p32 = next_token_probs(reference, sv, CONTEXT, alphas[idx])[:, s.token_ids]
    assert s.p_error_bound == pytest.approx(float(((s.delta_p + s.p0)[idx] - p32).abs().max()), abs=1e-7)
    assert 0 < s.p_error_bound < 0.5
    frame = res.curves_frame(half)
    assert (frame["p_error_bound"] == s.p_error_bound).all()
    assert res.summary(half)["p_error_bound"] == s.p_error_bound
    # off, or a float32 model: NaN, nothing re-run
    assert math.isnan(token_curves(half, sv, [CONTEXT], alphas, top_k=5, certify=False).sets[0].p_error_bound)
    plain = token_curves(model, sv, [CONTEXT], alphas, top_k=5)
    assert plain.curves_frame(model)["p_error_bound"].isna().all() and plain.summary(model)["p_error_bound"] is None


def test_the_tokens_stage_writes_the_bound_per_layer_and_context():
    half = tiny_model("llama")
    half.hf.to(torch.bfloat16)
    sv = vector(half)
    contexts = [dict(id="a", text=CONTEXT, kind="user"), dict(id="b", text="the cat saw a dog and", kind="user")]
    labels = row_labels(half.name, "joy", "random", "all")
    res = tokens_stage(half, [sv], TokensConfig(alpha_max=1.0, n_alphas=16, top_k=4), contexts=contexts,
                       labels=labels, unit="raw")
    bound = res.summary()["p_error_bound"]["joy"]
    curves = res.tables()["tokens.parquet"]
    per = curves.drop_duplicates("context_id").set_index("context_id")["p_error_bound"]
    assert bound["dtype"] == "bfloat16" and bound["per_layer"]["1"] == per.to_dict()
    assert bound["max"] == per.max() > 0
    off = tokens_stage(half, [sv], TokensConfig(alpha_max=1.0, n_alphas=16, top_k=4, certify=False),
                       contexts=contexts, labels=labels, unit="raw")
    assert off.summary()["p_error_bound"] == {"joy": None}
    assert off.tables()["tokens.parquet"]["p_error_bound"].isna().all()


def test_a_saved_model_is_loaded_again_for_its_float32_reference(tmp_path):
    """The reference of a bfloat16 run is what a float32 run computes: the stored weights, not the rounded ones."""
    from steerstrength import load_model

    model = tiny_model("llama")
    model.hf.save_pretrained(tmp_path / "m")
    model.tokenizer.save_pretrained(tmp_path / "m")
    half = load_model(tmp_path / "m", dtype="bfloat16", device="cpu")
    reference = half.in_dtype(torch.float32)
    assert reference is half.in_dtype(torch.float32) and reference.name == half.name
    for (name, p), q in zip(model.hf.named_parameters(), reference.hf.parameters()):
        assert torch.equal(p, q), name
    assert half.dtype == torch.bfloat16  # the model itself is left as it was


@pytest.mark.parametrize("flag, certified", [(None, True), ("--no-certify", False)])
def test_sweep_tokens_certifies_a_bfloat16_sweep_unless_told_not_to(tmp_path, monkeypatch, capsys, flag, certified):
    import json

    from cliutil import run_cli

    model = tiny_model("llama")
    model.hf.save_pretrained(tmp_path / "m")
    model.tokenizer.save_pretrained(tmp_path / "m")
    torch.manual_seed(0)
    vectors = SteeringVectors({1: torch.randn(model.d_model)}, dict(concept="joy", setting="random"))
    vectors.save(tmp_path / "v.safetensors")
    (tmp_path / "contexts.txt").write_text(CONTEXT + "\nthe cat saw a dog and\n")
    args = ["sweep", "tokens", "--model", tmp_path / "m", "--vectors", tmp_path / "v.safetensors", "--device", "cpu",
            "--dtype", "bfloat16", "--contexts", tmp_path / "contexts.txt", "--n-alphas", "12", "--top-k", "4",
            "--out", tmp_path / "out", *([flag] if flag else [])]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    bounds = pd.read_parquet(tmp_path / "out" / "tokens.parquet")["p_error_bound"]
    summary = json.loads((tmp_path / "out" / "tokens.json").read_text())["p_error_bound"]["joy"]
    if certified:
        assert bounds.notna().all() and summary["max"] == bounds.max() and "p - p_float32| <=" in err
    else:
        assert bounds.isna().all() and summary is None and "p_float32" not in err
