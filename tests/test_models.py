"""The model layer: architectures, BOS conventions, the embedded default model and its cache, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from steerstrength import ArchitectureError, ModelLoadError, load_model
from steerstrength.models import find_parts, wrap
from tiny import ARCHITECTURES, tiny_hf, tiny_model, tiny_tokenizer

CLI = [sys.executable, "-m", "steerstrength.cli"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_exposes_blocks_norm_and_unembedding(arch):
    model = tiny_model(arch)
    assert model.n_layers == 3
    assert model.d_model == 32
    assert model.vocab_size >= 70
    # The blocks are the ones the forward pass runs: a hook on each fires once per forward.
    fired = []
    handles = [b.register_forward_hook(lambda *a, i=i: fired.append(i)) for i, b in enumerate(model.blocks)]
    norm_fired = []
    handles.append(model.final_norm.register_forward_hook(lambda *a: norm_fired.append(1)))
    enc = model.encode(["the cat is happy"])
    with torch.no_grad():
        logits = model.hf(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
    for h in handles:
        h.remove()
    assert fired == [0, 1, 2]
    assert norm_fired == [1]
    assert logits.shape[-1] == model.vocab_size


def test_gemma3_multimodal_blocks_sit_under_the_language_model():
    model = tiny_model("gemma3")
    assert model.blocks_path == "model.language_model.layers"


def test_unknown_architecture_names_the_override_and_the_override_works():
    hf = tiny_hf("llama")
    inner = hf.model
    hf.model = torch.nn.Module()  # hide the usual path
    hf.model.decoder_stack = inner
    with pytest.raises(ArchitectureError, match="--blocks-path"):
        find_parts(hf)
    path, blocks, norm, _ = find_parts(hf, "model.decoder_stack.layers")
    assert path == "model.decoder_stack.layers" and len(blocks) == 3 and norm is inner.norm


def test_bos_convention_follows_the_tokenizer_and_is_never_doubled():
    with_bos = wrap(tiny_hf("llama"), tiny_tokenizer(add_bos=True), name="t", source="t")
    without = wrap(tiny_hf("llama"), tiny_tokenizer(add_bos=False), name="t", source="t")
    assert with_bos.add_bos and not without.add_bos
    assert with_bos.token_ids("the cat")[0] == 1
    assert without.token_ids("the cat")[0] != 1
    assert with_bos.token_ids("<bos> the cat")[:2] != [1, 1]
    # The chat template writes its own BOS; encode must not add another.
    chat_ids = with_bos.token_ids("the cat", chat=True)
    assert chat_ids[:2] != [1, 1] and chat_ids[0] == 1


def test_left_padding_does_not_change_the_next_token_distribution():
    model = tiny_model("llama")
    short, long = "the cat", "i saw the dog in the house today"
    enc = model.encode([short, long], padding_side="left")
    assert enc.attention_mask[0].sum() < enc.attention_mask[1].sum()
    with torch.no_grad():
        batched = model.hf(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                           position_ids=enc.position_ids).logits[:, -1]
        alone = model.hf(input_ids=model.encode([short]).input_ids).logits[0, -1]
    torch.testing.assert_close(batched[0], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_default_model_facts(default_model):
    facts = default_model.describe()
    assert (facts["n_layers"], facts["d_model"], facts["vocab_size"]) == (30, 576, 49152)
    assert facts["chat_template"] is True
    # The GGUF says add_bos_token=False.
    assert default_model.add_bos is False


@pytest.mark.slow
def test_models_show_cli_loads_from_cache_quickly(default_model):
    out = subprocess.run(CLI + ["models", "show"], capture_output=True, text=True, check=True)
    facts = json.loads(out.stdout)
    assert facts["n_layers"] == 30 and facts["d_model"] == 576 and facts["vocab_size"] == 49152
    assert facts["load_seconds"] < 3.0


def test_cache_conversion_is_atomic_and_survives_a_stale_temp_dir(tmp_path, monkeypatch):
    from steerstrength import models

    monkeypatch.setenv("STEERSTRENGTH_CACHE", str(tmp_path))
    gguf = models.embedded_gguf("smollm2-135m-instruct")
    target = models.gguf_cache_dir(gguf)
    # A temp dir left by a process killed mid-write must not be mistaken for a finished cache.
    target.parent.mkdir(parents=True, exist_ok=True)
    (target.parent / f".{target.name}.killed").mkdir()
    assert not (target / "steerstrength.json").exists()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no-such-thing", "is not an embedded model"),
        ("/definitely/missing/model.gguf", "does not exist"),
    ],
)
def test_bad_specs_raise_model_load_error(spec, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(spec)


def test_corrupt_and_truncated_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        load_model(bad)
    from steerstrength.models import embedded_gguf

    real = embedded_gguf("smollm2-135m-instruct").read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(real[: 1 << 20])
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_model(truncated)


def test_directory_without_a_causal_lm(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "not-a-real-model"}')
    with pytest.raises(ModelLoadError, match="does not hold a causal LM"):
        load_model(tmp_path)


@pytest.mark.parametrize("kwargs, message", [({"dtype": "float7"}, "unknown dtype"),
                                             ({"device": "tpu9"}, "unknown device")])
def test_bad_dtype_and_device(kwargs, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(None, **kwargs)


def test_cli_bad_input_is_one_line_exit_2_and_debug_shows_traceback(tmp_path):
    out = subprocess.run(CLI + ["models", "show", str(tmp_path / "x.gguf")], capture_output=True, text=True)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "does not exist" in out.stderr
    dbg = subprocess.run(CLI + ["--debug", "models", "show", str(tmp_path / "x.gguf")], capture_output=True, text=True)
    assert "Traceback" in dbg.stderr
