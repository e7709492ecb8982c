"""Alpha sweeps: each quantity equals a plain computation of its definition, on tiny models and on the default one."""

import random
import warnings

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from steerstrength.vectors import SteeringVector
from steerstrength import InputError, cross_entropy_curve, limit_check, log_odds, next_token_probs, token_curves
from steerstrength.grid import AlphaGrid
from steerstrength.metrics.limits import LimitCheck, limit_logits, total_variation
from steerstrength.metrics.logodds import extremal_thresholds, log_odds_analysis
from steerstrength.metrics.tokens import shape_classes
from steerstrength.metrics.xent import (
    ce_derivatives,
    plateau,
    quadratic_fit,
    quadratic_range,
    windows,
    xent_sweep,
)
from steerstrength.steering import steer
from tiny import WORDS, tiny_model

CONTEXT = "i walked into the kitchen this morning and saw my friend"


def word_texts(lengths, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS[:-12]) for _ in range(n)) for n in lengths]


def hand_windows(model, texts, seq_len):
    """The windowing definition written out: per text, windows [k T, k T + T + 1) while they fit; with a BOS
    convention, BOS + the text's tokens [k T, k T + T) (every window led by BOS)."""
    out = []
    for text in texts:
        ids = model.token_ids(text)
        bos, ids = (ids[:1], ids[1:]) if model.add_bos else ([], ids)
        k = 0
        while k * seq_len + seq_len + 1 - len(bos) <= len(ids):
            out.append(bos + ids[k * seq_len: k * seq_len + seq_len + 1 - len(bos)])
            k += 1
    return torch.tensor(out)


def plain_ce(model, v, layer, ids, alphas, positions="all"):
    """What a user of today's steering libraries writes: a hook, a full forward per alpha, logits everywhere,
    F.cross_entropy on them (float32 per token, like the sweep; the mean in float64)."""
    out = []
    for a in alphas:
        with torch.no_grad(), steer(model, v, layer, float(a), positions=positions):
            logits = model.hf(input_ids=ids[:, :-1]).logits
        ce = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        out.append(ce.double().mean().item())
    return torch.tensor(out, dtype=torch.float64)


def plain_probs(model, v, layer, context, alphas):
    enc = model.encode([context])
    rows = []
    with torch.no_grad():
        for a in alphas:
            with steer(model, v, layer, float(a)):
                rows.append(torch.softmax(model.hf(input_ids=enc.input_ids).logits[0, -1].float(), -1))
    return torch.stack(rows)


# ----------------------------------------------------------------------------- cross-entropy


def test_windows_follow_the_definition():
    model = tiny_model("llama", add_bos=True)
    texts = word_texts([20, 7, 16, 17])  # 20, 7, 16, 17 text tokens after BOS
    ids = windows(model, texts, 8)
    assert torch.equal(ids, hand_windows(model, texts, 8))
    # BOS + 8 text tokens per window: 20 -> 2 windows; 7 -> none; 16 -> 2 (exactly); 17 -> 2
    assert ids.shape == (6, 9)
    # every window starts with BOS; consecutive windows of a text cover consecutive tokens (each predicted once)
    assert (ids[:, 0] == model.tokenizer.bos_token_id).all()
    first = model.token_ids(texts[0])
    assert ids[0, 1:].tolist() + ids[1, 1:].tolist() == first[1:17]
    packed = windows(model, texts, 8, packing=True)  # the texts joined by EOS, BOS-less, then cut
    assert packed.shape[0] == (20 + 7 + 16 + 17 + 4) // 8 and (packed[:, 0] == model.tokenizer.bos_token_id).all()


def test_windows_without_bos_convention_start_at_the_first_word():
    model = tiny_model("llama", add_bos=False)
    text = word_texts([9])[0]
    assert windows(model, [text], 8)[0].tolist() == model.tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "qwen3"])
@pytest.mark.parametrize("positions", ["all", "last"])
def test_cross_entropy_curve_matches_a_full_forward(arch, positions):
    model = tiny_model(arch)
    torch.manual_seed(0)
    v = torch.randn(model.d_model)
    texts = word_texts([30, 12, 25])
    alphas = torch.tensor([-6.0, 0.0, 1.5, 9.0])
    ref = plain_ce(model, v, 1, hand_windows(model, texts, 8), alphas, positions)
    # tiny budgets force several window batches and alpha chunks
    fast = cross_entropy_curve(model, SteeringVector(v, 1), texts, alphas, seq_len=8, positions=positions, token_budget=24)
    assert fast.dtype == torch.float64 and fast.shape == (4,)
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=0)


def test_xent_sweep_inserts_zero_and_reports_delta_against_it():
    model = tiny_model("llama")
    v = torch.randn(model.d_model)
    with pytest.warns(UserWarning, match="inserted alpha = 0"):
        result = xent_sweep(model, SteeringVector(v, 1), word_texts([30, 30]), [-4.0, -1.0, 2.0, 4.0], seq_len=8, curvature=False)
    assert result.inserted_zero and 0.0 in result.alphas.tolist()
    assert result.delta_ce[result.alphas.tolist().index(0.0)] == 0
    frame = result.frame(model="m", concept="c", setting="s", layer=1)
    assert {"model", "concept", "layer", "setting", "alpha", "ce", "delta_ce"} <= set(frame.columns)


def fd_derivatives(model, v, layer, ids, h):
    """Five-point finite differences of the mean CE (float64 model), for checking the jvp."""
    a = torch.tensor([-2 * h, -h, 0.0, h, 2 * h])
    f = plain_ce(model, v, layer, ids, a)
    d1 = (-f[4] + 8 * f[3] - 8 * f[1] + f[0]) / (12 * h)
    d2 = (-f[4] + 16 * f[3] - 30 * f[2] + 16 * f[1] - f[0]) / (12 * h * h)
    return float(f[2]), float(d1), float(d2)


# (architecture, scale of v, step h): Gemma 2's eager attention computes its softmax in float32,
# so its differences need a larger step, and a larger v to stay above that noise.
@pytest.mark.parametrize("arch,scale,h", [("gpt2", 1, 3e-4), ("llama", 1, 3e-4), ("phi", 1, 3e-4), ("gemma2", 20, 3e-3)])
def test_jvp_curvature_equals_finite_differences(arch, scale, h):
    """Thm 3.8's curvature, computed by forward-over-forward AD (LayerNorm, SiLU, soft-capped attention)."""
    model = tiny_model(arch)
    model.hf.double()
    torch.manual_seed(1)
    v = scale * torch.randn(model.d_model, dtype=torch.float64)
    ids = hand_windows(model, word_texts([30, 20]), 8)
    ce0, d1, d2 = fd_derivatives(model, v, 1, ids, h)
    got = ce_derivatives(model, SteeringVector(v, 1), ids, token_budget=16)  # several window batches
    assert got["ce"] == pytest.approx(ce0, rel=1e-12)
    assert got["slope"] == pytest.approx(d1, rel=1e-4)
    assert got["curvature"] == pytest.approx(d2, rel=1e-3)


def test_quadratic_fit_plateau_and_range_read_a_known_curve():
    a = AlphaGrid.linspace(-50, 50, 100).values
    y = 0.3 * a + 0.8 * a**2  # exactly quadratic
    fit = quadratic_fit(a, y)
    assert fit["slope"] == pytest.approx(0.3) and fit["curvature"] == pytest.approx(1.6)
    assert quadratic_range(a, y, 0.3, 1.6)["max_abs_alpha"] == 50
    sat = 5 * torch.tanh(a / 5) ** 2  # quadratic near 0, flat far out
    pl = plateau(a, sat)
    assert pl["positive"]["growth"] == pytest.approx(1.0, abs=1e-3) and pl["negative"]["mean"] == pytest.approx(5, rel=1e-3)
    assert pl["positive"]["relative_spread"] < 1e-3
    assert 0 < quadratic_range(a, sat, 0.0, 2 / 5)["max_abs_alpha"] < 5


def test_quadratic_fit_depends_on_the_points_not_their_order():
    """Bit for bit: xent.json's fitted values are identical across runs whatever the order of the grid."""
    g = torch.Generator().manual_seed(0)
    a = torch.linspace(-3, 3, 41, dtype=torch.float64)
    y = 0.3 * a + 0.8 * a**2 + 0.01 * torch.randn(41, dtype=torch.float64, generator=g)
    fit = quadratic_fit(a, y, radius=3.0)
    for seed in range(5):
        order = torch.randperm(41, generator=torch.Generator().manual_seed(seed))
        assert quadratic_fit(a[order], y[order], radius=3.0) == fit
    import numpy as np

    design = np.stack([a.numpy(), a.numpy() ** 2], axis=1)
    ref = np.linalg.lstsq(design, y.numpy(), rcond=None)[0]
    assert fit["slope"] == pytest.approx(ref[0], rel=1e-12) and fit["curvature"] == pytest.approx(2 * ref[1], rel=1e-12)


# ----------------------------------------------------------------------------- next-token curves


def test_token_curves_store_delta_p_top_k_and_shapes():
    model = tiny_model("llama")
    torch.manual_seed(2)
    v = torch.randn(model.d_model)
    alphas = AlphaGrid.linspace(-20, 20, 16).values
    result = token_curves(model, SteeringVector(v, 1), [CONTEXT], alphas, top_k=5, tokens=[7])
    s = result.sets[0]
    probs = next_token_probs(model, SteeringVector(v, 1), CONTEXT, alphas)
    i0 = alphas.tolist().index(0.0)
    # Def. 3.1 and the stored top-k
    torch.testing.assert_close(s.delta_p, probs[:, s.token_ids] - probs[i0, s.token_ids])
    assert s.top_max.tolist() == probs[-1].topk(5).indices.tolist()
    assert s.top_min.tolist() == probs[0].topk(5).indices.tolist()
    assert 7 in s.token_ids.tolist()
    peak, shapes = shape_classes(s.delta_p)
    assert shapes == s.shapes and torch.equal(peak, s.delta_p.argmax(0))
    # the long table: one row per (context, layer, token, alpha)
    frame = result.curves_frame(model, model="m", concept="c", setting="s")
    assert len(frame) == len(s.token_ids) * len(alphas)
    assert {"model", "concept", "layer", "setting", "alpha", "token", "delta_p", "peak_alpha", "shape"} <= set(frame)
    top = result.top_frame(model, model="m")
    assert len(top) == 10 and set(top["alpha"]) == {-20.0, 20.0}
    # the top tokens at every alpha are tracked too (default top_each=10); top_each=0 keeps only the ends
    kept = set(s.token_ids.tolist())
    assert all(set(row.topk(10).indices.tolist()) <= kept for row in probs)
    ends = token_curves(model, SteeringVector(v, 1), [CONTEXT], alphas, top_k=5, tokens=[7], top_each=0).sets[0].token_ids
    assert set(ends.tolist()) == set(s.top_max.tolist()) | set(s.top_min.tolist()) | {7}


def test_token_curves_warn_and_insert_a_missing_zero():
    model = tiny_model("llama")
    with pytest.warns(UserWarning, match="inserted alpha = 0"):
        result = token_curves(model, SteeringVector(torch.ones(model.d_model), 1), [CONTEXT], [-1.0, 1.0, 2.0], top_k=3)
    assert result.inserted_zero and result.alphas.tolist() == [-1.0, 0.0, 1.0, 2.0]


def test_shape_classes_on_synthetic_curves():
    a = torch.linspace(-10, 10, 201)
    curves = torch.stack([
        torch.exp(-((a - 3) ** 2)),  # bump
        torch.sigmoid(a),  # increasing
        torch.sigmoid(-a),  # decreasing
        torch.exp(-((a - 3) ** 2)) + torch.exp(-((a + 3) ** 2)),  # two bumps
        torch.clamp(a, max=2.0),  # rises then saturates exactly: increasing, not a bump
        torch.zeros_like(a),  # flat
        torch.exp(-((a - 3) ** 2)) + 0.002 * torch.sin(5 * a),  # a bump with wiggles below 1% of its range
    ], dim=1)
    peak, shapes = shape_classes(curves)
    assert shapes == ["bump", "increasing", "decreasing", "other", "increasing", "other", "bump"]
    assert float(a[peak[0]]) == pytest.approx(3.0)


# ----------------------------------------------------------------------------- log-odds


def test_log_odds_equal_a_hand_computation():
    model = tiny_model("llama")
    P = ["i am so happy and glad today", "joy", "you are my friend and i love you and the sun is good"]
    N = ["the table is in the kitchen", "a cat saw a dog in the house at the evening"]

    def hand(texts, max_tokens):  # one unpadded forward per text
        rows = []
        for t in texts:
            ids = torch.tensor([model.token_ids(t)[:max_tokens]])
            with torch.no_grad():
                rows.append(torch.log_softmax(model.hf(input_ids=ids).logits[0, -1].double(), -1))
        return torch.stack(rows).mean(0)

    for max_tokens in (100, 4):
        M = log_odds(model, P, N, max_tokens=max_tokens, batch_size=2)
        torch.testing.assert_close(M, hand(P, max_tokens) - hand(N, max_tokens), atol=1e-5, rtol=0)


def test_log_odds_analysis_counts_by_definition():
    M = torch.arange(200, dtype=torch.float64)  # token z has M(z) = z
    hi, lo = extremal_thresholds(M, 0.01)
    assert (hi, lo) == (198.0, 1.0)
    top = pd.DataFrame(dict(layer=1, context_id="c", side=["alpha_max"] * 3 + ["alpha_min"] * 3, rank=[0, 1, 2] * 2,
                            token_id=[199, 198, 50, 0, 100, 1]))
    curves = pd.DataFrame(dict(layer=1, context_id="c", token_id=[199, 150, 10, 20, 5],
                               peak_alpha=[9.0, 5.0, 1.0, 6.0, 0.0], shape=["bump"] * 4 + ["increasing"]))
    out = log_odds_analysis(M, top, curves, n_dominant=3, n_target=60)["per_layer"]["1"]
    assert out["dominant_at_alpha_max_extremal_high"] == dict(count=2, total=3, fraction=2 / 3)
    assert out["dominant_at_alpha_max_argmax_M"]["count"] == 1
    assert out["dominant_at_alpha_min_extremal_low"]["count"] == 2
    # targets (top 60 M): 199, 150 peak at 9, 5; off-target bumps 10, 20 peak at 1, 6 -> 3 of 4 pairs later
    assert out["peak_position"]["pairs"] == dict(target_later=3, tie=0, target_earlier=1)


# ----------------------------------------------------------------------------- large-alpha limit


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_limit_tv_shrinks_with_alpha(arch):
    model = tiny_model(arch)
    torch.manual_seed(4)
    v = torch.randn(model.d_model)
    # tiny random models have small hidden states: v dominates from |alpha| ~ 1 on
    check = limit_check(model, SteeringVector(v, 1), [CONTEXT, "the cat saw a dog"], [-1e4, -1e2, -1, 0.1, 1, 1e2, 1e4])
    summary = check.summary()
    assert summary["tv_shrinks"] == {"positive": True, "negative": True}
    assert summary["limit_reached"] == {"positive": True, "negative": True}
    assert summary["tv_at_largest"]["negative"]["alpha"] == -1e4
    # a TV that decreases but stays near 1 (alphas too small for the vector) is not "reached"
    far = LimitCheck(torch.tensor([-1e4, -1e2, 1e2, 1e4], dtype=torch.float64), [{"text": CONTEXT}],
                     torch.tensor([[0.34, 0.98, 0.99, 0.05]], dtype=torch.float64),
                     torch.zeros(1, 4, dtype=torch.long), {1: 0, -1: 0}).summary()
    assert far["tv_shrinks"] == {"positive": True, "negative": True}
    assert far["limit_reached"] == {"positive": True, "negative": False}
    assert float(check.tv[:, [0, -1]].max()) < 1e-4 and float(check.tv[:, 3].min()) > 1e-2
    assert (summary["softcap"] is not None) == (arch == "gemma2")


def test_limit_logits_are_the_final_norm_and_unembedding_of_v():
    model = tiny_model("llama")
    v = torch.randn(model.d_model)
    with torch.no_grad():
        direct = model.unembed(model.final_norm(-7.0 * v[None, None]))[0, 0]
    torch.testing.assert_close(limit_logits(model, v, -1), direct, rtol=1e-4, atol=1e-4)
    assert float(total_variation(torch.softmax(direct, -1), torch.softmax(limit_logits(model, v, -1), -1))) < 1e-5


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_give_one_clear_error():
    model = tiny_model("gpt2")  # max length 128
    v = torch.ones(model.d_model)
    with pytest.raises(InputError, match="empty"):
        cross_entropy_curve(model, SteeringVector(v, 1), [], [0.0])
    with pytest.raises(InputError, match="at least seq_len"):
        cross_entropy_curve(model, SteeringVector(v, 1), word_texts([5, 6]), [0.0], seq_len=8)
    with pytest.raises(InputError, match="maximum length"):
        cross_entropy_curve(model, SteeringVector(v, 1), word_texts([300]), [0.0], seq_len=200)
    with pytest.raises(InputError, match="more than"):
        token_curves(model, SteeringVector(v, 1), [" ".join(["cat"] * 200)], [-1.0, 0.0, 1.0])
    with pytest.raises(InputError, match="more than"):
        limit_check(model, SteeringVector(v, 1), [CONTEXT, " ".join(["cat"] * 200)])
    with pytest.raises(InputError, match="alpha = 0"):
        limit_check(model, SteeringVector(v, 1), [CONTEXT], [0.0, 1e3])
    with pytest.raises(InputError, match="repeated"):
        AlphaGrid.explicit([1.0, 1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert AlphaGrid.explicit([-1.0, 0.0, 1.0]).inserted_zero is False  # no warning when 0 is there


# ----------------------------------------------------------------------------- the default model


@pytest.mark.slow
def test_default_model_cross_entropy_and_next_token_probs_match_a_full_forward(default_model):
    model = default_model
    torch.manual_seed(0)
    v = torch.randn(model.d_model) * 2
    texts = ["The old lighthouse keeper climbed the stairs every evening to light the lamp, and the ships that "
             "passed in the night trusted its beam to guide them safely past the rocks near the harbour entrance."]
    alphas = torch.tensor([-5.0, 0.0, 3.0])
    fast = cross_entropy_curve(model, SteeringVector(v, 15), texts, alphas, seq_len=16)
    ref = plain_ce(model, v, 15, hand_windows(model, texts, 16), alphas)
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=0)
    probs = next_token_probs(model, SteeringVector(v, 15), CONTEXT, alphas)
    torch.testing.assert_close(probs, plain_probs(model, v, 15, CONTEXT, alphas), atol=2e-6, rtol=0)


@pytest.mark.slow
def test_default_model_limit_and_curvature(default_model):
    model = default_model
    torch.manual_seed(0)
    v = torch.randn(model.d_model)
    check = limit_check(model, SteeringVector(v, 15), [CONTEXT, "The weather today is"], [-1e4, -1e3, -1e2, 1e2, 1e3, 1e4])
    assert check.summary()["tv_shrinks"] == {"positive": True, "negative": True}
    assert float(check.tv[:, [0, -1]].max()) < 0.05
    # Thm 3.8 on the real model: the jvp curvature against five-point differences of the sweep
    ids = hand_windows(model, ["The old lighthouse keeper climbed the stairs every evening to light the lamp."], 12)
    got = ce_derivatives(model, SteeringVector(v, 15), ids)
    ce0, d1, d2 = fd_derivatives(model, v, 15, ids, h=0.05)
    assert got["ce"] == pytest.approx(ce0, rel=1e-5)
    assert got["curvature"] == pytest.approx(d2, rel=2e-2)
