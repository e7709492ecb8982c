"""The layer scan (`--layers auto`) and alpha in residual units, against plain computations on tiny models."""

import pytest
import torch

from steerstrength.errors import InputError
from steerstrength.judges import roc_auc
from steerstrength.grid import add_resid_column, resid_scale, to_raw
from steerstrength.metrics.limits import limit_logits
from steerstrength.metrics.logodds import extremal_thresholds, log_odds
from steerstrength.scan import scan_layers
from steerstrength.vectors import difference_of_means, mean_activations, residual_norms
from cliutil import run_cli
from tiny import tiny_model

P = ["i am so happy and glad today", "joy and a smile , i laugh", "you are my friend and i love you",
     "the sun is good and i am glad", "i laugh and smile in the morning", "so glad , so happy , my friend"]
N = ["i am so sad and angry today", "rain and a cry , i hate", "you are not my friend and i hate you",
     "the rain is bad and i am sad", "i cry and cry in the evening", "so sad , so angry , no friend"]
HP = ["a happy friend and a good morning", "i smile , i laugh , i love"]
HN = ["a sad evening and bad rain", "i cry , i hate , i am angry"]


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def model(request):
    return tiny_model(request.param)


def test_scan_matches_plain_computations_of_auc_log_odds_and_lens(model):
    scan = scan_layers(model, P, N, heldout_positive=HP, heldout_negative=HN, top_k=5)
    layers = list(range(model.n_layers))
    assert scan.table["layer"].tolist() == layers
    # M from the scan's single pass equals Def. 3.2 computed with the model's own logits.
    assert torch.allclose(scan.log_odds, log_odds(model, P, N), atol=1e-5)
    train_p, train_n = mean_activations(model, P, layers), mean_activations(model, N, layers)
    held_p, held_n = mean_activations(model, HP, layers), mean_activations(model, HN, layers)
    high, _ = extremal_thresholds(scan.log_odds, 0.01)
    for layer in layers:
        row = scan.table.set_index("layer").loc[layer]
        v = train_p[layer].mean(0) - train_n[layer].mean(0)
        assert row["heldout_auc"] == pytest.approx(roc_auc((held_p[layer] @ v).numpy(), (held_n[layer] @ v).numpy()))
        ids = limit_logits(model, v.float()).topk(5).indices
        assert row["lens_share"] == pytest.approx(float((scan.log_odds[ids] >= high).double().mean()))
        assert row["score"] == pytest.approx(max(0.0, 2 * row["heldout_auc"] - 1) * row["lens_share"])


def test_the_chosen_layer_has_the_best_score_among_eligible_layers(model):
    scan = scan_layers(model, P, N, heldout_positive=HP, heldout_negative=HN, top_k=5)
    eligible = scan.table[scan.table["eligible"]]
    assert scan.chosen in eligible["layer"].tolist()
    assert eligible.set_index("layer").loc[scan.chosen, "score"] == eligible["score"].max()
    assert scan.table["chosen"].sum() == 1
    assert scan.summary()["chosen"] == scan.chosen


def test_without_held_out_texts_every_third_text_is_held_out(model):
    a = scan_layers(model, P, N, top_k=5)
    b = scan_layers(model, [t for i, t in enumerate(P) if i % 3 != 2], [t for i, t in enumerate(N) if i % 3 != 2],
                    heldout_positive=P[2::3], heldout_negative=N[2::3], top_k=5)
    assert a.table["heldout_auc"].tolist() == b.table["heldout_auc"].tolist()


def test_identical_sets_have_no_direction_and_score_zero(model):
    scan = scan_layers(model, P, P, heldout_positive=HP, heldout_negative=HP, top_k=5)
    assert (scan.table["score"] == 0).all() and (scan.table["heldout_auc"] == 0.5).all()


def test_too_few_texts_is_an_input_error(model):
    with pytest.raises(InputError, match="at least 2"):
        scan_layers(model, P[:1], N, heldout_positive=HP, heldout_negative=HN)


# ----------------------------------------------------------------------------- residual units


def test_residual_norms_are_the_median_token_norm_without_the_first_token(model):
    texts = P + N
    got = residual_norms(model, [0, 2], texts)
    for layer in (0, 2):
        norms = []
        # A plain forward hook on the block (transformers' last hidden state is after the final norm).
        handle = model.blocks[layer].register_forward_hook(
            lambda _m, _i, out: norms.append((out[0] if isinstance(out, tuple) else out)[0, 1:].detach().norm(dim=-1)))
        try:
            for t in texts:
                model.hf(input_ids=model.encode([t]).input_ids)
        finally:
            handle.remove()
        assert got[layer] == pytest.approx(float(torch.cat(norms).double().median()), rel=1e-5)


def test_a_residual_unit_grid_adds_alpha_times_the_residual_norm(model):
    sv = difference_of_means(model, P, N, [1])
    r = sv.residual_norm(1)
    assert r == pytest.approx(residual_norms(model, [1])[1])  # recorded when the vector was made
    scale = sv.resid_scale(1)
    assert scale == pytest.approx(float(sv[1].vector.double().norm()) / r)
    grid = torch.tensor([-2.0, 0.0, 0.5, 1.0], dtype=torch.float64)
    raw = to_raw(grid, "resid", scale)
    added = (raw[:, None] * sv[1].vector.double()[None, :]).norm(dim=-1)
    assert torch.allclose(added, grid.abs() * r)
    assert raw[1] == 0 and torch.equal(to_raw(grid, "raw", scale), grid)
    import pandas as pd

    frame = add_resid_column(pd.DataFrame({"layer": 1, "alpha": raw.numpy()}), scale)
    assert list(frame.columns) == ["layer", "alpha", "alpha_resid"]
    assert frame["alpha_resid"].to_numpy() == pytest.approx(grid.numpy())


def test_bad_units_and_zero_vectors_are_input_errors():
    with pytest.raises(InputError, match="raw or resid"):
        to_raw([1.0], "meters", 1.0)
    with pytest.raises(InputError, match="zero"):
        resid_scale(torch.zeros(4), 3.0)
    with pytest.raises(InputError, match="positive"):
        resid_scale(torch.ones(4), 0.0)


# ----------------------------------------------------------------------------- --layers auto from the CLI and the API


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    model = tiny_model("llama")
    path = tmp_path_factory.mktemp("tiny-llama")
    model.hf.save_pretrained(path)
    model.tokenizer.save_pretrained(path)
    return path


def test_api_layers_auto_is_the_scan_s_pick_given_as_a_number():
    model = tiny_model("llama")
    chosen = scan_layers(model, P + HP, N + HN).chosen
    sv = difference_of_means(model, P + HP, N + HN, [0, chosen])
    assert sv.layers == sorted({0, chosen})
    with pytest.raises(InputError, match="scan_layers"):
        difference_of_means(model, P + HP, N + HN, "auto,0")


def test_cli_vectors_layers_auto_and_vectors_scan(tiny_dir, tmp_path, monkeypatch, capsys):
    import json

    import pandas as pd

    from steerstrength.vectors import SteeringVectors

    pos, neg = tmp_path / "P.txt", tmp_path / "N.txt"
    pos.write_text("\n".join(P + HP))
    neg.write_text("\n".join(N + HN))
    code, _, err = run_cli(["--quiet", "vectors", "scan", "-p", pos, "-n", neg, "--model", tiny_dir, "--out", tmp_path / "scan",
                            "--top-k", "5"], monkeypatch, capsys)
    assert code in (0, None), err
    table = pd.read_parquet(tmp_path / "scan" / "layer_scan.parquet")
    chosen = int(table[table["chosen"]]["layer"].iloc[0])
    assert (tmp_path / "scan" / "layer_scan.png").is_file()
    assert json.loads((tmp_path / "scan" / "layer_scan.json").read_text())
    code, _, err = run_cli(["--quiet", "vectors", "-p", pos, "-n", neg, "--model", tiny_dir, "--layers", "auto,0",
                            "--out", tmp_path / "v.safetensors"], monkeypatch, capsys)
    assert code in (0, None), err
    sv = SteeringVectors.load(tmp_path / "v.safetensors")
    assert sv.layers == sorted({0, chosen}) and sv.meta["auto_layer"] == chosen
    assert set(sv.meta["residual_norms"]) == {str(x) for x in sv.layers}


def test_cli_vectors_scan_needs_texts_or_a_curated_concept(tiny_dir, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(["vectors", "scan", "--model", tiny_dir, "--out", tmp_path], monkeypatch, capsys)
    assert code == 2 and "--concept" in err
    code, _, err = run_cli(["vectors", "scan", "--concept", "grumpy", "--model", tiny_dir, "--out", tmp_path],
                           monkeypatch, capsys)
    assert code == 2 and "no curated texts" in err
    assert list(tmp_path.iterdir()) == []


def test_sweep_tokens_in_residual_units_carries_both_columns(tiny_dir, tmp_path, monkeypatch, capsys):
    import pandas as pd

    from steerstrength.vectors import SteeringVectors

    model = tiny_model("llama")
    difference_of_means(model, P, N, [1, 2]).save(tmp_path / "v.safetensors")
    sv = SteeringVectors.load(tmp_path / "v.safetensors")
    code, _, err = run_cli(["--quiet", "sweep", "tokens", "-v", tmp_path / "v.safetensors", "--model", tiny_dir,
                            "--alpha-unit", "resid", "--alphas=-2,-1,0,1,2", "--contexts", tmp_path / "c.txt",
                            "--out", tmp_path] if (tmp_path / "c.txt").write_text("i am\nthe cat") else [],
                           monkeypatch, capsys)
    assert code in (0, None), err
    top = pd.read_parquet(tmp_path / "tokens_top.parquet")
    for layer in (1, 2):
        rows = top[(top["layer"] == layer) & (top["side"] == "alpha_max")]
        assert rows["alpha_resid"].iloc[0] == pytest.approx(2.0)
        assert rows["alpha"].iloc[0] == pytest.approx(2.0 / sv.resid_scale(layer))
    curves = pd.read_parquet(tmp_path / "tokens.parquet")
    assert sorted(curves["alpha_resid"].round(9).unique()) == [-2.0, -1.0, 0.0, 1.0, 2.0]


def test_the_scan_considers_every_layer_including_the_last_block(model):
    scan = scan_layers(model, P, N, heldout_positive=HP, heldout_negative=HN, top_k=5)
    eligible = scan.table[scan.table["eligible"]]["layer"].tolist()
    assert model.n_layers - 1 in eligible  # the last block is steerable: it is scored and can be picked
    assert scan.rule.endswith(f"..{model.n_layers - 1}")


def test_the_summary_ranks_the_runner_up_layers_by_score(model):
    from steerstrength.scan import RUNNERS_UP

    scan = scan_layers(model, P, N, heldout_positive=HP, heldout_negative=HN, top_k=5)
    runners = scan.summary()["runners_up"]
    eligible = scan.table[scan.table["eligible"]].set_index("layer")
    assert len(runners) == min(RUNNERS_UP, len(eligible) - 1)
    assert scan.chosen not in [r["layer"] for r in runners]
    scores = [r["score"] for r in runners]
    assert scores == sorted(scores, reverse=True)
    assert all(s <= eligible.loc[scan.chosen, "score"] for s in scores)
    for r in runners:
        assert r["score"] == pytest.approx(eligible.loc[r["layer"], "score"])
