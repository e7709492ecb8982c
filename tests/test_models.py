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
def test_models_show_cli_loads_the_embedded_model_from_its_cache(default_model):
    # How fast it loads is measured by benchmarks/bench_load.py, not asserted here.
    out = subprocess.run(CLI + ["models", "show"], capture_output=True, text=True, check=True)
    facts = json.loads(out.stdout)
    assert facts["n_layers"] == 30 and facts["d_model"] == 576 and facts["vocab_size"] == 49152
    assert facts["source"].startswith("gguf:") and facts["load_seconds"] > 0


# ----------------------------------------------------------------------------- the GGUF cache


def bytes_to_unicode() -> list[str]:
    """GPT-2's byte-level alphabet: the 256 characters a byte-level BPE vocabulary is spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A 2-block llama GGUF (d_model 16, byte-level BPE), F32: converts in well under a second."""
    import numpy as np
    from gguf import GGUFWriter

    rng = np.random.default_rng(seed)
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *bytes_to_unicode(), "he", "ll"]
    d, ff, heads, kv, layers = 16, 32, 2, 1, 2
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(d // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(["h e", "l l"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    w.add_tensor("token_embd.weight", rand(len(tokens), d))
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    for i in range(layers):
        for name, shape in (("attn_q", (d, d)), ("attn_k", (kv * d // heads, d)), ("attn_v", (kv * d // heads, d)),
                            ("attn_output", (d, d)), ("ffn_gate", (ff, d)), ("ffn_up", (ff, d)),
                            ("ffn_down", (d, ff))):
            w.add_tensor(f"blk.{i}.{name}.weight", rand(*shape))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(d, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture()
def tiny_gguf(tmp_path, monkeypatch):
    """A tiny GGUF, and an empty model cache for it."""
    monkeypatch.setenv("STEERSTRENGTH_CACHE", str(tmp_path / "cache"))
    return write_tiny_gguf(tmp_path / "tiny.gguf")


def test_cache_conversion_is_atomic_and_survives_a_stale_temp_dir(tiny_gguf, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    from steerstrength import loading

    target = loading.gguf_cache_dir(tiny_gguf)
    # A temp dir left by a process killed mid-write must not be mistaken for a finished cache.
    target.parent.mkdir(parents=True, exist_ok=True)
    stale = target.parent / f".{target.name}.killed"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")

    class Killed(BaseException):
        """Stands for the process dying: no `except Exception` may swallow it."""

    written = []

    def killed(self, directory, *args, **kwargs):  # the weights are on disk by now, the tokenizer is not
        written.extend(sorted(p.name for p in Path(directory).iterdir()))
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(PreTrainedTokenizerBase, "save_pretrained", killed)
        with pytest.raises(Killed):
            loading.convert_gguf(tiny_gguf, target)
    assert "model.safetensors" in written  # it did die half-way through the conversion
    assert not target.exists()
    assert sorted(p.name for p in target.parent.iterdir() if p.name.startswith(".")) == [stale.name]

    model = load_model(tiny_gguf, device="cpu")
    assert (target / "steerstrength.json").is_file() and (target / "model.safetensors").is_file()
    assert (model.n_layers, model.d_model) == (2, 16)


def test_gguf_cache_is_keyed_on_the_files_content_not_its_path(tiny_gguf, tmp_path, monkeypatch):
    from steerstrength import loading

    first = load_model(tiny_gguf, device="cpu")
    # The same file in another folder (another virtualenv): found in the cache, never converted again.
    copy = tmp_path / "venv2" / "site-packages" / "tiny.gguf"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(tiny_gguf.read_bytes())
    assert loading.gguf_cache_dir(copy) == loading.gguf_cache_dir(tiny_gguf)

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(loading, "convert_gguf", no_conversion)
    again = load_model(copy, device="cpu")
    assert torch.equal(again.unembed.weight, first.unembed.weight)
    # Other content, another entry; the hash of a file is remembered by path, size and mtime.
    other = write_tiny_gguf(tmp_path / "other.gguf", seed=1)
    assert loading.gguf_cache_dir(other) != loading.gguf_cache_dir(tiny_gguf)
    index = json.loads((loading.cache_root() / "sha256.json").read_text())
    assert {key.rsplit("|", 2)[0] for key in index} == {str(p.resolve()) for p in (tiny_gguf, copy, other)}


# ----------------------------------------------------------------------------- model identity


def test_fingerprint_identifies_the_weights_not_the_folder(tmp_path):
    tiny = tiny_model("llama")
    for folder in ("run-a", "somewhere-else"):
        tiny.hf.save_pretrained(tmp_path / folder)
        tiny.tokenizer.save_pretrained(tmp_path / folder)
    a = load_model(tmp_path / "run-a", device="cpu")
    b = load_model(tmp_path / "somewhere-else", device="cpu")
    assert a.name != b.name and a.fingerprint() == b.fingerprint()
    assert load_model(tmp_path / "run-a", dtype="bfloat16", device="cpu").fingerprint() == a.fingerprint()
    assert tiny_model("llama", seed=1).fingerprint() != a.fingerprint()
    with torch.no_grad():
        b.blocks[-1].mlp.down_proj.weight[0, 0] += 1.0  # one weight of the last block
    assert b.fingerprint() != a.fingerprint()


# ----------------------------------------------------------------------------- Hugging Face ids without network


def test_hub_id_without_network_is_one_line_at_once_and_a_cached_one_loads_offline(tmp_path):
    """No network (the endpoint is a closed local port): no retries, one line; the local cache needs no request."""
    import socket

    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    tiny = tiny_model("llama")
    tiny.hf.save_pretrained(repo / "snapshots" / commit)
    tiny.tokenizer.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the socket is: connections are refused
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_ENDPOINT=f"http://127.0.0.1:{port}", NO_PROXY="*")
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(var, None)
    missing = subprocess.run(CLI + ["models", "show", "tiny-org/not-downloaded"], capture_output=True, text=True,
                             env=env)
    lines = missing.stderr.strip().splitlines()
    assert missing.returncode == 2 and len(lines) == 1, missing.stderr
    assert "not in the local Hugging Face cache" in lines[0] and "cannot be reached" in lines[0]
    cached = subprocess.run(CLI + ["models", "show", "tiny-org/tiny-llama", "--device", "cpu"], capture_output=True,
                            text=True, env=env)
    assert cached.returncode == 0 and cached.stderr.strip() == "", cached.stderr
    assert json.loads(cached.stdout)["n_layers"] == 3


def test_transformers_is_bounded_to_the_tested_versions():
    """The KV cache keyword changed within 5.x (`past_key_values` goes in 5.40): admit only what the suite ran on."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    import transformers
    from packaging.requirements import Requirement

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    (spec,) = [Requirement(r).specifier for r in pyproject["project"]["dependencies"]
               if Requirement(r).name == "transformers"]
    assert transformers.__version__ in spec
    assert "5.40.0" not in spec and "6.0.0" not in spec


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
    from steerstrength.loading import embedded_gguf

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


@pytest.mark.slow
def test_the_embedded_gemma3_270m(tmp_path, monkeypatch, capsys):
    """Assembled from its four pieces (sha256-pinned), converted once, then loaded from the cache."""
    import json

    from steerstrength.cli import app
    from steerstrength.loading import EMBEDDED, embedded_gguf, file_sha256
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["models", "show", "gemma3-270m"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.output[result.output.index("{"):])
    assert (facts["architecture"], facts["n_layers"], facts["d_model"]) == ("Gemma3ForCausalLM", 18, 640)
    assert facts["vocab_size"] == 262_144 and facts["add_bos"] and "Gemma Terms of Use" in facts["license"]
    path = embedded_gguf("gemma3-270m")
    assert file_sha256(path) == EMBEDDED["gemma3-270m"].sha256
    # A damaged assembled file is noticed and joined again, atomically (no temporary file left behind).
    monkeypatch.setenv("STEERSTRENGTH_CACHE", str(tmp_path))
    target = embedded_gguf("gemma3-270m")
    target.write_bytes(b"GGUF damaged")
    assert file_sha256(embedded_gguf("gemma3-270m")) == EMBEDDED["gemma3-270m"].sha256
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


@pytest.mark.slow
def test_gemma3_270m_predicts_wikipedia_text():
    """The converted model is the real one: ~3.5 nats/token on packed Wikipedia windows (uniform: 12.5)."""
    import math

    from steerstrength.corpus import wikipedia_texts
    from steerstrength.metrics.xent import cross_entropy_curve
    from steerstrength.vectors import SteeringVector

    model = load_model("gemma3-270m", device="cpu")
    assert model.n_layers == 18 and model.d_model == 640 and model.add_bos
    sv = SteeringVector(torch.zeros(model.d_model), layer=9)
    ce = cross_entropy_curve(model, sv, wikipedia_texts("test")[:24], [0.0], seq_len=64, packing=True)
    assert float(ce[0]) < 3.6 < math.log(model.vocab_size)  # 3.46 measured (packed 64-token windows)
