"""The steering engine agrees with the plain full-forward computation, on every architecture."""

import pytest
import torch

from steerstrength.vectors import SteeringVector

from steerstrength import InputError
from steerstrength.sampling import steered_generate
from steerstrength.steering import next_token_probs, steer
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
        fast = next_token_probs(model, SteeringVector(v, layer), CONTEXT, alphas, positions=positions, token_budget=40)
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
    next_token_probs(model, SteeringVector(torch.ones(model.d_model), 1), CONTEXT, [0.0, 1.0])
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
        next_token_probs(model, SteeringVector(args["vector"], args["layer"]), CONTEXT, args["alphas"],
                         positions=args["positions"])


@pytest.mark.slow
def test_default_model_fast_path_matches_plain_code(default_model):
    torch.manual_seed(0)
    v = torch.randn(default_model.d_model)
    alphas = torch.linspace(-50, 50, 5)
    for positions in ("all", "last"):
        fast = next_token_probs(default_model, SteeringVector(v, 15), CONTEXT, alphas, positions=positions)
        ref = plain_probs(default_model, v, 15, CONTEXT, alphas, positions)
        assert (fast - ref).abs().max() < 1e-5


# ----------------------------------------------------------------------------- last-token sweeps at long context

# Longer than the tiny models' 8-token sliding windows, so windowed layers really drop part of the prefix.
LONG_CONTEXT = CONTEXT + " and the dog and the cat on the table at home today , so i left a note on the table"


def forbid_the_concatenating_path(monkeypatch):
    from steerstrength import steering

    def concatenating(*args, **kwargs):
        raise AssertionError("fell back to the concatenating cache")

    monkeypatch.setattr(steering, "_last_token_probs_concat", concatenating)


def assert_last_token_sweep_is_exact(model, context=LONG_CONTEXT):
    torch.manual_seed(1)
    v = torch.randn(model.d_model)
    alphas = torch.linspace(-8, 8, 7)
    implementation = model.hf.config._attn_implementation
    for layer in range(model.n_layers):
        # token_budget=4: chunks of 4 and 3 alphas share one cache.
        fast = next_token_probs(model, SteeringVector(v, layer), context, alphas, positions="last", token_budget=4)
        ref = plain_probs(model, v, layer, context, alphas, "last")
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
    assert model.hf.config._attn_implementation == implementation  # the user's model is left as it was


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_last_token_sweep_attends_to_the_shared_prefix_uncopied_and_exactly(arch, monkeypatch):
    """positions="last" takes the no-copy attention on every architecture (grouped-query heads, sliding
    windows, soft-capping, the multimodal layout) and equals the plain full forward beyond the window."""
    model = tiny_model(arch)
    assert model.encode([LONG_CONTEXT]).input_ids.shape[1] > 3 * 8
    forbid_the_concatenating_path(monkeypatch)
    assert_last_token_sweep_is_exact(model)


def test_shared_prefix_attention_soft_caps_attention_logits_like_the_model(monkeypatch):
    """Gemma 2's attention-logit soft-capping, made to bite, is reproduced (it changes the probabilities)."""
    model = tiny_model("gemma2")
    with torch.no_grad():
        for module in model.hf.modules():
            if hasattr(module, "attn_logit_softcapping"):
                for proj in (module.q_proj, module.k_proj, module.v_proj, module.o_proj):
                    proj.weight.mul_(20.0)  # attention logits well beyond a cap of 2, and outputs that count
                module.attn_logit_softcapping = 2.0
    v, alphas = torch.ones(model.d_model), [0.0, 4.0]
    capped = plain_probs(model, v, 1, LONG_CONTEXT, alphas, "last")
    for module in model.hf.modules():
        if hasattr(module, "attn_logit_softcapping"):
            module.attn_logit_softcapping = None
    assert (plain_probs(model, v, 1, LONG_CONTEXT, alphas, "last") - capped).abs().max() > 1e-3
    for module in model.hf.modules():
        if hasattr(module, "attn_logit_softcapping"):
            module.attn_logit_softcapping = 2.0
    forbid_the_concatenating_path(monkeypatch)
    assert_last_token_sweep_is_exact(model)


def test_shared_prefix_attention_keeps_attention_sinks(monkeypatch):
    """gpt-oss: a learned sink logit per head (s_aux), alternating sliding and full layers."""
    import transformers
    from transformers import AutoModelForCausalLM

    from steerstrength.models import wrap
    from tiny import SPECIALS, WORDS, tiny_tokenizer

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(
        "gpt_oss", vocab_size=len(SPECIALS) + len(WORDS), bos_token_id=1, eos_token_id=2, pad_token_id=0,
        num_hidden_layers=3, hidden_size=32, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, num_local_experts=2, num_experts_per_tok=1, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    hf = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for module in hf.modules():
            if hasattr(module, "sinks"):
                module.sinks.normal_(0.0, 2.0)  # sinks that take a real share of the attention
    forbid_the_concatenating_path(monkeypatch)
    assert_last_token_sweep_is_exact(wrap(hf, tiny_tokenizer(), name="tiny-gpt_oss", source="test"))


def test_an_attention_that_bypasses_the_interface_falls_back_to_the_exact_path(monkeypatch):
    """Where the no-copy attention is not the one that ran, the sweep recomputes with the concatenating cache."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    from steerstrength import steering

    model = tiny_model("llama")
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    monkeypatch.setattr(AttentionInterface, "get_interface", lambda self, name, default: sdpa)
    fallbacks = []
    concatenating = steering._last_token_probs_concat
    monkeypatch.setattr(steering, "_last_token_probs_concat",
                        lambda *args, **kwargs: fallbacks.append(1) or concatenating(*args, **kwargs))
    assert_last_token_sweep_is_exact(model)
    assert len(fallbacks) == model.n_layers - 1  # every layer with blocks above it; the last layer has none


def test_forcing_the_concatenating_path_gives_the_same_probabilities(monkeypatch):
    from steerstrength import steering

    model = tiny_model("mistral")
    sv, alphas = SteeringVector(torch.randn(model.d_model), 1), torch.linspace(-8, 8, 5)
    shared = next_token_probs(model, sv, LONG_CONTEXT, alphas, positions="last")
    monkeypatch.setattr(steering, "SHARED_PREFIX_ATTENTION", False)
    torch.testing.assert_close(next_token_probs(model, sv, LONG_CONTEXT, alphas, positions="last"), shared,
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("positions", ["all"])
def test_batched_steered_sampling_picks_the_tokens_of_a_hooked_full_forward(arch, positions):
    """sample_steered (prompt shared, per-row vectors, preallocated cache, finished rows leaving) against the plain
    computation: each row alone, a hooked full forward over prompt + its tokens so far at every step."""
    from steerstrength.sampling import sample_steered

    model = tiny_model(arch)
    torch.manual_seed(0)
    V = torch.randn(2, model.d_model)
    prompts = [model.token_ids("the cat is"), model.token_ids("i walked into the kitchen this morning and")]
    rows = [(0, 0, 4.0, 1), (1, 1, -4.0, 2), (0, 1, 4.0, 3), (1, 0, 0.0, 4), (0, 0, 4.0, 5)]
    done = sample_steered(model, prompts, rows, max_new_tokens=6, temperature=1.0, top_p=1.0, top_k=0,
                          stops=[2], vectors=V, layer=1, positions=positions)
    for (p, k, alpha, seed), got in zip(rows, done):
        g, ids = torch.Generator().manual_seed(seed), list(prompts[p])
        want = []
        for _ in range(6):
            with steer(model, V[k], 1, alpha, positions=positions), torch.no_grad():
                logits = model.hf(input_ids=torch.tensor([ids])).logits[:, -1].float()
            probs = torch.softmax(logits, -1)
            u = torch.rand(1, generator=g, dtype=torch.float64)
            cdf = probs.cumsum(-1)
            token = int(torch.searchsorted(cdf, (u.float() * cdf[:, -1]).unsqueeze(-1)).clamp(max=cdf.shape[-1] - 1))
            if token == 2:
                break
            want.append(token)
            ids.append(token)
        assert got["ids"] == want


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "gemma3"])
def test_batched_steered_sampling_with_last_position_steering_matches_hooked_generate(arch):
    """positions="last" steers each token when it is the newest (its keys above l stay steered): the reference is
    a hooked `generate`, row by row (a full forward would steer only the newest token)."""
    from steerstrength.sampling import sample_rows, sample_steered

    model = tiny_model(arch)
    torch.manual_seed(0)
    V = torch.randn(2, model.d_model)
    prompts = [model.token_ids("the cat is"), model.token_ids("i walked into the kitchen this morning and")]
    rows = [(0, 0, 4.0, 1), (1, 1, -4.0, 2), (0, 1, 4.0, 3), (1, 0, 0.0, 4)]
    kw = dict(max_new_tokens=6, temperature=1.0, top_p=1.0, top_k=0, stops=[2])
    done = sample_steered(model, prompts, rows, vectors=V, layer=1, positions="last", **kw)
    for (p, k, alpha, seed), got in zip(rows, done):
        want = sample_rows(model, model.pad([prompts[p]]), [seed], vector=V[k], layer=1, alphas=[alpha],
                           positions="last", **kw)[0]
        assert model.decode(got["ids"]).strip() == want["text"]

