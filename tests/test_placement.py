"""A model placed over several devices (load_model(device_map=...), docs/scale.md): the same numbers as one device.

No GPU here: the placement is accelerate's own dispatch with two blocks offloaded to disk, so those blocks run
behind accelerate's hooks (weights loaded at call time, inputs moved to each block's execution device), which is
the machinery a multi-GPU device_map uses.
"""

import numpy as np
import pytest
import torch

from steerstrength import InputError, difference_of_means, next_token_probs
from steerstrength.errors import ModelLoadError
from steerstrength.metrics.xent import ce_derivatives, cross_entropy_sums, windows
from steerstrength.loading import load_model
from steerstrength.recommend import prompt_curvature, token_kl
from steerstrength.steering import steer
from tiny import save_tiny_models

JOYFUL = ["i am happy and glad", "joy and love and a smile", "we laugh in the sun"]
PLAIN = ["the table is in the house", "a dog walked to the kitchen", "the cat is on the table"]
LAYER = 1


PLACES = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk",
          "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(one device, two blocks offloaded to disk by load_model's device_map, every module behind accelerate's
    device-moving hooks without offload: what a multi-GPU device_map builds, on one CPU)."""
    from accelerate import dispatch_model

    root = tmp_path_factory.mktemp("placement")
    path = save_tiny_models(root, archs=(("llama", "tiny-llama"),))[0]
    plain = load_model(str(path), device="cpu")
    offloaded = load_model(str(path), device_map=PLACES, offload_folder=root / "offload")
    assert len(set(offloaded.hf.hf_device_map.values())) == 2 and hasattr(offloaded.blocks[2], "_hf_hook")
    assert offloaded.device == torch.device("cpu")
    hooked = load_model(str(path), device="cpu")
    dispatch_model(hooked.hf, device_map={k: "cpu" for k in PLACES}, main_device="cpu", force_hooks=True)
    assert hasattr(hooked.blocks[1], "_hf_hook")
    return plain, offloaded, hooked


def test_forward_mode_ad_runs_through_accelerate_hooks(models):
    plain, offloaded, hooked = models
    v = difference_of_means(plain, JOYFUL, PLAIN, [LAYER])[LAYER]
    ids = windows(plain, [" ".join(JOYFUL + PLAIN)] * 3, 16, packing=True)
    assert ce_derivatives(hooked, v, ids) == pytest.approx(ce_derivatives(plain, v, ids), rel=1e-5, abs=1e-7)
    np.testing.assert_allclose(prompt_curvature(hooked, v, ["i am"], chat=False),
                               prompt_curvature(plain, v, ["i am"], chat=False), rtol=1e-5)
    with pytest.raises(InputError, match="offloaded"):  # weights loaded inside the forward: one clear line
        ce_derivatives(offloaded, v, ids)


@pytest.mark.parametrize("which", [1, 2], ids=["offloaded", "hooked"])
def test_a_placed_model_steers_and_measures_as_one_device(models, which):
    plain, placed = models[0], models[which]
    pair = (plain, placed)
    sv = [difference_of_means(m, JOYFUL, PLAIN, [LAYER])[LAYER] for m in pair]
    torch.testing.assert_close(sv[0].vector, sv[1].vector)
    v = sv[0]
    alphas = [0.0, 1.0, 4.0]
    torch.testing.assert_close(next_token_probs(placed, v, "i walked into the", alphas),
                               next_token_probs(plain, v, "i walked into the", alphas))
    ids = windows(plain, [" ".join(JOYFUL + PLAIN)] * 3, 16, packing=True)
    torch.testing.assert_close(cross_entropy_sums(placed, v, ids, alphas), cross_entropy_sums(plain, v, ids, alphas))
    prompt, completion = plain.token_ids("i am", chat=False), plain.token_ids("happy so", chat=False)[1:]
    np.testing.assert_allclose(token_kl(placed, v, [prompt], [completion], [2.0])[0],
                               token_kl(plain, v, [prompt], [completion], [2.0])[0], rtol=1e-5, atol=1e-8)
    # Generation under the steering hook: the same greedy tokens.
    enc = plain.encode(["i am"])
    outs = []
    for m in pair:
        with torch.no_grad(), steer(m, v, LAYER, 3.0):
            outs.append(m.hf.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=6,
                                      do_sample=False, pad_token_id=m.pad_id))
    assert outs[0].tolist() == outs[1].tolist()


def test_bad_placement_is_one_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="device_map must be one of"):
        load_model(None, device_map="everywhere")
    with pytest.raises(ModelLoadError, match="offload_folder"):
        load_model(None, device_map={"": "disk"})
    with pytest.raises(ModelLoadError, match="give device_map"):
        load_model(None, max_memory={0: "1GiB"})
    from steerstrength.config import build_config

    with pytest.raises(InputError, match="model.device_map"):
        build_config("demo", None, ["model.device_map=everywhere"])
