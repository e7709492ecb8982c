"""The steering engine agrees with the plain full-forward computation, on every architecture."""

import pytest
import torch

from steerstrength.vectors import SteeringVector

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
    """Every forward of `generate` (the prompt, then each decode step) gets exactly alpha * v added after the layer."""
    model = tiny_model("llama")
    enc = model.encode([CONTEXT])
    torch.manual_seed(2)
    v, alpha = torch.randn(model.d_model), 3.0
    block_out, next_in = [], []  # block 1's own output (our hook runs before steer's), block 2's input

    def record_output(module, inputs, output):
        block_out.append((output[0] if isinstance(output, tuple) else output)[:, -1].clone())

    def record_input(module, args, kwargs):
        next_in.append((args[0] if args else kwargs["hidden_states"])[:, -1].clone())

    hooks = [model.blocks[1].register_forward_hook(record_output),
             model.blocks[2].register_forward_pre_hook(record_input, with_kwargs=True)]
    try:
        with torch.no_grad():
            steered_generate(model, enc, v, 1, [alpha], max_new_tokens=3, do_sample=False)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(block_out) == len(next_in) == 3  # the prompt, then two decode steps
    for raw, steered in zip(block_out, next_in):
        torch.testing.assert_close(steered - raw, alpha * v[None, :], atol=1e-5, rtol=1e-5)


def test_sweeps_pass_the_kv_cache_without_deprecation_warnings(capfd):
    """The prefix cache goes in under the forward's current keyword (`cache` on transformers 5.24), silently."""
    import inspect
    import warnings

    model = tiny_model("llama")
    if "cache" in inspect.signature(model.hf.forward).parameters:
        assert model.cache_arg == "cache"
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        next_token_probs(model, SteeringVector(torch.ones(model.d_model), 1), CONTEXT, [0.0, 2.0], positions="last")
    messages = [str(w.message) for w in caught] + capfd.readouterr().err.splitlines()
    assert not [m for m in messages if "deprecat" in m.lower() or "past_key_values" in m], messages


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
