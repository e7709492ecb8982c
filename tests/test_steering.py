"""The steering engine agrees with the plain full-forward computation, on every architecture."""

import pytest
import torch

from steerstrength import InputError
from steerstrength.steering import next_token_probs, steer, steered_generate
from tiny import ARCHITECTURES, tiny_model

CONTEXT = "i walked into the kitchen this morning and saw my friend"


def plain_probs(model, v, layer, context, alphas, positions):
    """What a user of today's steering libraries writes: a hook, a full forward per alpha."""
    enc = model.encode([context])
    rows = []
    with torch.no_grad():
        for a in alphas:
            with steer(model, v, layer, float(a), positions=positions):
                logits = model.hf(input_ids=enc.input_ids).logits
            rows.append(torch.softmax(logits[0, -1].float(), -1))
    return torch.stack(rows)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("positions", ["all", "last"])
def test_next_token_probs_matches_a_full_forward(arch, positions):
    model = tiny_model(arch)
    torch.manual_seed(1)
    v = torch.randn(model.d_model)
    alphas = torch.linspace(-8, 8, 7)
    for layer in (0, 1, model.n_layers - 1):
        fast = next_token_probs(model, v, layer, CONTEXT, alphas, positions=positions, token_budget=40)
        ref = plain_probs(model, v, layer, CONTEXT, alphas, positions)
        assert fast.shape == (7, model.vocab_size)
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_alpha_zero_leaves_logits_bit_identical(arch):
    model = tiny_model(arch)
    enc = model.encode([CONTEXT])
    v = torch.randn(model.d_model)
    with torch.no_grad():
        base = model.hf(input_ids=enc.input_ids).logits
        with steer(model, v, 1, 0.0):
            steered = model.hf(input_ids=enc.input_ids).logits
    assert torch.equal(base, steered)


def test_hooks_are_removed_even_when_an_exception_is_raised():
    model = tiny_model("llama")
    with pytest.raises(RuntimeError, match="boom"):
        with steer(model, torch.ones(model.d_model), 1, 5.0):
            raise RuntimeError("boom")
    assert all(len(b._forward_hooks) == 0 for b in model.blocks)


def test_engine_restores_blocks_after_a_sweep():
    model = tiny_model("llama")
    blocks = list(model.blocks)
    next_token_probs(model, torch.ones(model.d_model), 1, CONTEXT, [0.0, 1.0])
    assert list(model.blocks) == blocks
    assert all(len(b._forward_hooks) == 0 and len(b._forward_pre_hooks) == 0 for b in model.blocks)


def test_per_row_alpha_generation_equals_one_generation_per_alpha():
    model = tiny_model("llama")
    torch.manual_seed(3)
    v = torch.randn(model.d_model)
    alphas = [-4.0, 0.0, 4.0]
    enc = model.encode([CONTEXT] * 3)
    batched = steered_generate(model, enc, v, 1, alphas, max_new_tokens=5, do_sample=False)
    for i, a in enumerate(alphas):
        single = steered_generate(model, model.encode([CONTEXT]), v, 1, [a], max_new_tokens=5, do_sample=False)
        assert torch.equal(batched[i], single[0])


def test_steering_applies_at_decode_steps():
    model = tiny_model("llama")
    enc = model.encode([CONTEXT])
    v = torch.randn(model.d_model) * 50
    seen = []
    hook = model.blocks[2].register_forward_hook(lambda m, i, o: seen.append(o[0, -1].clone()))
    with torch.no_grad():
        steered_generate(model, enc, v, 1, [3.0], max_new_tokens=3, do_sample=False)
    hook.remove()
    assert len(seen) == 3  # the prompt, then two decode steps, all passed through the steered model


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(vector=torch.ones(7)), "needs \\[32\\]"),
        (dict(vector=torch.full((32,), float("nan"))), "NaN or inf"),
        (dict(layer=3), "outside \\[0, 3\\)"),
        (dict(layer=-1), "outside"),
        (dict(alphas=[]), "empty"),
        (dict(alphas=[0.0, float("inf")]), "NaN or inf"),
        (dict(positions="middle"), "'all' or 'last'"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, message):
    model = tiny_model("llama")
    args = dict(vector=torch.ones(32), layer=1, alphas=[0.0, 1.0], positions="all")
    args.update(kwargs)
    with pytest.raises(InputError, match=message):
        next_token_probs(model, args["vector"], args["layer"], CONTEXT, args["alphas"], positions=args["positions"])


@pytest.mark.slow
def test_default_model_fast_path_matches_plain_code(default_model):
    torch.manual_seed(0)
    v = torch.randn(default_model.d_model)
    alphas = torch.linspace(-50, 50, 5)
    for positions in ("all", "last"):
        fast = next_token_probs(default_model, v, 15, CONTEXT, alphas, positions=positions)
        ref = plain_probs(default_model, v, 15, CONTEXT, alphas, positions)
        assert (fast - ref).abs().max() < 1e-5
