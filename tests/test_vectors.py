"""Difference-of-means vectors (Eq. 3): what they average, how they are saved, and the errors users can cause."""

import json

import pytest
import torch

from steerstrength import InputError, SteeringVectors, difference_of_means
from steerstrength.vectors import bootstrap, mean_activations, parse_layers
from cliutil import error_lines, run_cli
from tiny import tiny_model

P = ["i am so happy and glad today", "joy and a smile , i laugh", "you are my friend and i love you",
     "the sun is good and i am glad"]
N = ["the table is in the kitchen", "a cat saw a dog in the house", "rain in the evening", "he left at the note"]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def sv(model):
    return difference_of_means(model, P, N, [0, 1, 2], resamples=4, seed=3, concept="joy", setting="contrastive")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, model):
    """The tiny model saved as a transformers directory, so the CLI can load it by path."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model.hf.save_pretrained(path)
    model.tokenizer.save_pretrained(path)
    return str(path)


def hand_mean(model, text, layer, skip_first_token):
    """A text's token-averaged block-`layer` output, from transformers' own hidden states (no padding)."""
    ids = torch.tensor([model.token_ids(text)])
    with torch.no_grad():
        hs = model.hf(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1][0].double()
    return hs[1:].mean(0) if skip_first_token else hs.mean(0)


# ----------------------------------------------------------------------------- what is averaged


@pytest.mark.parametrize("skip_first_token", [True, False])
def test_difference_of_means_equals_a_hand_computation_from_hidden_states(model, skip_first_token):
    got = difference_of_means(model, P, N, [0, 1], skip_first_token=skip_first_token, batch_size=3)
    for layer in (0, 1):
        want = torch.stack([hand_mean(model, t, layer, skip_first_token) for t in P]).mean(0) - \
            torch.stack([hand_mean(model, t, layer, skip_first_token) for t in N]).mean(0)
        torch.testing.assert_close(got[layer].vector.double(), want, atol=1e-6, rtol=1e-5)


def test_skip_first_token_keeps_an_attention_sink_out_of_the_vector():
    # Like the real model's first token (~100x the others' norm): a huge BOS embedding leaks into
    # plain token averages in proportion to 1/length, which differs between short P and long N texts.
    sink = tiny_model("llama")
    with torch.no_grad():
        sink.hf.get_input_embeddings().weight[sink.tokenizer.bos_token_id] *= 1000.0
    short, long = ["i am glad", "joy and a smile"], ["the table is in the kitchen and the cat is on it",
                                                     "a cat saw a dog in the house in the evening rain"]
    bos_dir = hand_mean(sink, "the", 1, skip_first_token=False)  # 2 tokens: dominated by BOS
    plain = difference_of_means(sink, short, long, 1, skip_first_token=False)[1].vector.double()
    skipped = difference_of_means(sink, short, long, 1)[1].vector.double()
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
    assert abs(cos(plain, bos_dir)) > 0.99
    assert abs(cos(skipped, bos_dir)) < 0.5
    assert plain.norm() > 20 * skipped.norm()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_a_texts_mean_activation_does_not_depend_on_padding(arch):
    m = tiny_model(arch)
    text = "i am glad"
    alone = mean_activations(m, [text], [1], batch_size=1)[1][0]
    padded = mean_activations(m, ["the table is in the kitchen and the cat is on it today", text, "a dog"], [1],
                              batch_size=3)[1][1]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)


def test_rows_and_texts_give_the_same_vectors(model):
    rows = [{"text": t, "concept": "joy"} for t in P]
    a = difference_of_means(model, rows, N, 1)
    b = difference_of_means(model, P, N, 1)
    assert torch.equal(a[1].vector, b[1].vector)


def test_normalize_gives_unit_vectors_along_the_same_direction(model, sv):
    unit = difference_of_means(model, P, N, [0, 1, 2], normalize=True, resamples=4, seed=3)
    for layer in sv.layers:
        assert abs(float(unit[layer].vector.double().norm()) - 1.0) < 1e-6
        torch.testing.assert_close(unit[layer].vector, sv[layer].vector / sv[layer].norm(), atol=1e-6, rtol=0)
        assert torch.allclose(unit.resamples[layer].norm(dim=-1), torch.ones(4), atol=1e-6)


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_replicates_have_the_right_shape_and_are_reproducible(model, sv):
    again = difference_of_means(model, P, N, [0, 1, 2], resamples=4, seed=3)
    other = difference_of_means(model, P, N, [0, 1, 2], resamples=4, seed=4)
    for layer in sv.layers:
        assert sv.resamples[layer].shape == (4, model.d_model)
        assert torch.equal(sv.resamples[layer], again.resamples[layer])
        assert not torch.equal(sv.resamples[layer], other.resamples[layer])
    assert sv.meta["resamples"] == 4 and sv.meta["seed"] == 3


def test_bootstrap_resamples_texts_with_replacement():
    torch.manual_seed(0)
    pos, neg = torch.randn(50, 3, dtype=torch.float64), torch.randn(40, 3, dtype=torch.float64)
    reps = bootstrap(pos, neg, 4000, seed=1)
    full = pos.mean(0) - neg.mean(0)
    # Each replicate is a mean of resampled rows; their average is the full estimate and their
    # spread is the standard error sqrt(var_P / n_P + var_N / n_N).
    se = (pos.var(0, unbiased=False) / 50 + neg.var(0, unbiased=False) / 40).sqrt()
    assert ((reps.mean(0) - full).abs() < 4 * se / 4000 ** 0.5).all()
    torch.testing.assert_close(reps.std(0), se, rtol=0.06, atol=0)
    same = bootstrap(torch.ones(5, 3, dtype=torch.float64), torch.zeros(5, 3, dtype=torch.float64), 7)
    assert torch.equal(same, torch.ones(7, 3, dtype=torch.float64))


# ----------------------------------------------------------------------------- files


def test_safetensors_round_trip_is_bit_for_bit(sv, tmp_path):
    sv.save(tmp_path / "v.safetensors")
    back = SteeringVectors.load(tmp_path / "v.safetensors")
    assert back.layers == sv.layers and back.meta == sv.meta
    for layer in sv.layers:
        assert back[layer].vector.dtype == sv[layer].vector.dtype and torch.equal(back[layer].vector, sv[layer].vector)
        assert torch.equal(back.resamples[layer], sv.resamples[layer])
    assert back.meta["concept"] == "joy" and back.meta["setting"] == "contrastive"
    assert back.meta["skip_first_token"] is True and back.meta["n_positive"] == 4
    assert len(back.meta["config_hash"]) == 16


def test_gguf_export_has_llama_cpp_control_vector_layout(sv, tmp_path):
    from gguf import GGMLQuantizationType, GGUFReader

    sv.to_gguf(tmp_path / "v.gguf")
    reader = GGUFReader(str(tmp_path / "v.gguf"))
    fields = {name: f.contents() for name, f in reader.fields.items()}
    assert fields["general.architecture"] == "controlvector"
    assert fields["controlvector.model_hint"] == "llama"
    assert fields["controlvector.layer_count"] == 2
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == ["direction.1", "direction.2"]  # layer 0 is never steered by llama.cpp
    for layer in (1, 2):
        t = tensors[f"direction.{layer}"]
        assert t.tensor_type == GGMLQuantizationType.F32 and list(t.shape) == [sv.d_model]
        assert torch.equal(torch.from_numpy(t.data.copy()), sv[layer].vector)
    back = SteeringVectors.load(tmp_path / "v.gguf")
    assert back.layers == [1, 2] and torch.equal(back[2].vector, sv[2].vector) and back.meta == sv.meta


def test_gguf_export_refuses_layer_zero(sv, tmp_path):
    with pytest.raises(InputError, match="layer 0"):
        sv.to_gguf(tmp_path / "v.gguf", layers=[0, 1])
    assert not any(tmp_path.iterdir())


def test_to_moves_and_casts_every_tensor(sv):
    half = sv.to(dtype=torch.float64)
    assert all(half[layer].vector.dtype == torch.float64 for layer in half.layers)
    assert half.resamples[1].dtype == torch.float64 and sv[1].vector.dtype == torch.float32
    assert half.meta == sv.meta


# ----------------------------------------------------------------------------- bad input (API)


def test_layers_parse_and_check():
    assert parse_layers("5, 15,25", 30) == [5, 15, 25]
    assert parse_layers("middle", 30) == [15] and parse_layers("all", 3) == [0, 1, 2]
    for bad in ("30", "-1", "x", ""):
        with pytest.raises(InputError):
            parse_layers(bad, 30)


def test_vectors_that_do_not_fit_are_refused(model):
    with pytest.raises(InputError, match="NaN or inf"):
        SteeringVectors({1: torch.tensor([1.0, float("nan")])})
    with pytest.raises(InputError, match="d_model"):
        SteeringVectors({1: torch.ones(7)}).check(model)
    with pytest.raises(InputError, match="outside"):
        SteeringVectors({5: torch.ones(model.d_model)}).check(model)
    with pytest.raises(InputError, match="at least 2"):
        difference_of_means(model, P[:1], N, 1)


# ----------------------------------------------------------------------------- the CLI


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t, "concept": "joy"}) + "\n" for t in texts))
    return path


def test_cli_vectors_writes_safetensors_gguf_and_a_norm_table(tiny_dir, tmp_path, monkeypatch, capsys):
    pos, neg = write_jsonl(tmp_path / "p.jsonl", P), tmp_path / "n.txt"
    neg.write_text("\n".join(N) + "\n")  # plain text, one per line
    code, out, _ = run_cli(["vectors", "--positive", pos, "--negative", neg, "--layers", "0,2", "--model", tiny_dir,
                            "--out", tmp_path / "v.safetensors", "--gguf-out", tmp_path / "v.gguf",
                            "--resamples", 3, "--device", "cpu"], monkeypatch, capsys)
    assert code == 0
    assert "norm" in out and "mean cos to v" in out
    sv = SteeringVectors.load(tmp_path / "v.safetensors")
    assert sv.layers == [0, 2] and sv.meta["concept"] == "joy" and sv.resamples[2].shape == (3, 32)
    assert SteeringVectors.load(tmp_path / "v.gguf").layers == [2]


def assert_one_line_error(code, err, *needles):
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_cli_bad_prompt_files_give_one_line_and_no_output(tiny_dir, tmp_path, monkeypatch, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", P)
    (tmp_path / "empty.jsonl").write_text("")
    write_jsonl(tmp_path / "one.jsonl", P[:1])
    (tmp_path / "broken.jsonl").write_text(json.dumps({"text": "a b"}) + "\n" + json.dumps({"text": "c"}) + "\n{oops\n")
    cases = [
        ("empty.jsonl", ["empty.jsonl", "0 text"]),
        ("missing.jsonl", ["missing.jsonl", "does not exist"]),
        ("broken.jsonl", ["broken.jsonl:3", "malformed JSON"]),
        ("one.jsonl", ["one.jsonl", "1 text", "at least 2"]),
    ]
    out_dir = tmp_path / "out"
    for name, needles in cases:
        code, _, err = run_cli(["vectors", "--positive", good, "--negative", tmp_path / name, "--model", tiny_dir,
                                "--out", out_dir / "v.safetensors"], monkeypatch, capsys)
        assert_one_line_error(code, err, *needles)
        assert not out_dir.exists() or not any(out_dir.iterdir())


def test_cli_layer_outside_the_model_is_one_line_and_no_output(tiny_dir, tmp_path, monkeypatch, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", P)
    for layers, needle in (("3", "outside [0, 3)"), ("0", "layer 0")):
        code, _, err = run_cli(["vectors", "-p", good, "-n", good, "--layers", layers, "--model", tiny_dir,
                                "--out", tmp_path / "v.safetensors", "--gguf-out", tmp_path / "v.gguf"],
                               monkeypatch, capsys)
        assert_one_line_error(code, err, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.jsonl"]


def test_cli_export_refuses_wrong_size_and_non_finite_vectors(tiny_dir, tmp_path, monkeypatch, capsys):
    from safetensors.torch import save_file

    save_file({"layer.1": torch.ones(7)}, str(tmp_path / "small.safetensors"))
    save_file({"layer.1": torch.tensor([1.0] * 31 + [float("inf")])}, str(tmp_path / "inf.safetensors"))
    for name, needle in (("small", "size 7"), ("inf", "NaN or inf")):
        code, _, err = run_cli(["export-gguf", tmp_path / f"{name}.safetensors", tmp_path / "x.gguf",
                                "--model", tiny_dir], monkeypatch, capsys)
        assert_one_line_error(code, err, needle)
    assert not (tmp_path / "x.gguf").exists()
    save_file({"layer.1": torch.ones(32)}, str(tmp_path / "ok.safetensors"))
    code, _, _ = run_cli(["export-gguf", tmp_path / "ok.safetensors", tmp_path / "x.gguf", "--model", tiny_dir],
                         monkeypatch, capsys)
    assert code == 0 and SteeringVectors.load(tmp_path / "x.gguf").layers == [1]


def test_texts_longer_than_the_model_allows_are_refused_unless_truncated(model):
    long = " ".join(["the"] * (model.max_length + 5))
    with pytest.raises(InputError, match="max-length"):
        difference_of_means(model, [long, long], N[:2], 1)
    truncated = difference_of_means(model, [long, long], N[:2], 1, max_length=16)
    assert truncated.meta["max_length"] == 16 and torch.isfinite(truncated[1].vector).all()


# ----------------------------------------------------------------------------- files that are not ours


def test_vector_file_metadata_must_be_a_json_object(tmp_path):
    from safetensors.torch import save_file

    for name, meta in (("list", "[1, 2]"), ("string", '"joy"'), ("number", "3")):
        save_file({"layer.1": torch.ones(4)}, str(tmp_path / f"{name}.safetensors"), metadata={"steerstrength": meta})
        with pytest.raises(InputError, match="metadata is a JSON"):
            SteeringVectors.load(tmp_path / f"{name}.safetensors")
    with pytest.raises(InputError, match="metadata"):
        SteeringVectors({1: torch.ones(4)}, ["not", "a", "dict"])


@pytest.mark.parametrize("extra", ["layer.1.bias", "layer.1.resamples.old", "layer.01", "layer.1x", "direction.1",
                                   "weight"])
def test_vector_file_with_an_unknown_tensor_is_refused_not_read_into_a_layer(tmp_path, extra):
    from safetensors.torch import save_file

    save_file({"layer.1": torch.ones(4), extra: torch.zeros(4)}, str(tmp_path / "v.safetensors"))
    with pytest.raises(InputError, match=f"tensor '{extra}'.*only `layer.N` and `layer.N.resamples`"):
        SteeringVectors.load(tmp_path / "v.safetensors")


def test_integer_vectors_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"layer.1": torch.arange(4)}, str(tmp_path / "int.safetensors"))
    with pytest.raises(InputError, match="layer 1 has dtype int64.*floating point"):
        SteeringVectors.load(tmp_path / "int.safetensors")
    with pytest.raises(InputError, match="dtype bool"):
        SteeringVectors({2: torch.ones(4, dtype=torch.bool)})
    with pytest.raises(InputError, match="resamples for layer 1 have dtype int32"):
        SteeringVectors({1: torch.ones(4)}, resamples={1: torch.ones((2, 4), dtype=torch.int32)})


def test_identical_p_and_n_with_normalize_is_a_zero_vector_error(model):
    with pytest.raises(InputError, match="P and N hold the same texts, so the difference of means is the zero vector"):
        difference_of_means(model, P, P[::-1], 1, normalize=True)  # refused before any forward pass
    # Different texts with the same mean (each text twice in N), batched differently: zero up to rounding.
    with pytest.raises(InputError, match="layer 1: the difference of means is the zero vector"):
        difference_of_means(model, P[:2], [P[1], P[0], P[0], P[1]], 1, normalize=True, batch_size=3)
    assert float(difference_of_means(model, P, P, 1)[1].norm()) == 0.0  # not normalized: a zero vector, as asked
    with pytest.raises(InputError, match="bootstrap replicate .* zero vector"):
        bootstrap(torch.ones(2, 3, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64), 3, normalize=True)


def test_cli_identical_p_and_n_with_normalize_names_the_zero_vector(tiny_dir, tmp_path, monkeypatch, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", P)
    code, _, err = run_cli(["vectors", "-p", good, "-n", good, "--layers", "1", "--normalize", "--model", tiny_dir,
                            "--out", tmp_path / "out" / "v.safetensors"], monkeypatch, capsys, quiet=True)
    assert_one_line_error(code, err, "zero vector")
    assert "overflow" not in err and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- llama.cpp control vectors, read as llama.cpp reads them


def write_control_vector(path, tensors: dict, meta: str | None = None):
    """A GGUF control vector with exactly these tensors (numpy arrays, any type), in this order."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_int32("controlvector.layer_count", len(tensors))
    if meta is not None:
        writer.add_string("steerstrength.meta", meta)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("tensors, message", [
    ({"direction.0": "f32", "direction.1": "f32"}, "refuses direction.0"),
    ({"direction.1": "f16"}, "direction.1 is F16; llama.cpp reads only F32"),
    ({"direction.1": "f32", "direction.2": "f16"}, "direction.2 is F16"),
    ({"direction.1": "f32", "output.weight": "f32"}, "tensor 'output.weight'"),
    ({"direction.-1": "f32"}, "tensor 'direction.-1'"),
    ({"direction.x": "f32"}, "tensor 'direction.x'"),
    ({"direction.1": "2d"}, "one-dimensional"),
    ({"direction.1": "f32", "direction.2": "short"}, "direction.2 has 3 values but an earlier direction has 4"),
    ({}, "holds no direction.N tensors"),
])
def test_gguf_files_llama_cpp_refuses_are_refused_whole(tmp_path, tensors, message):
    import numpy as np

    arrays = {"f32": np.ones(4, np.float32), "f16": np.ones(4, np.float16), "2d": np.ones((2, 4), np.float32),
              "short": np.ones(3, np.float32)}
    path = write_control_vector(tmp_path / "v.gguf", {name: arrays[kind] for name, kind in tensors.items()})
    with pytest.raises(InputError, match=message):
        SteeringVectors.load(path)


def test_gguf_directions_for_one_layer_are_added_like_llama_cpp(tmp_path):
    import numpy as np

    a, b, c = (np.arange(4, dtype=np.float32) + k for k in (0.0, 10.0, 100.0))
    path = write_control_vector(tmp_path / "v.gguf", {"direction.1": a, "direction.01": b, "direction.2": c,
                                                      "direction.3": c[None, :]})  # [1, 4]: ggml counts 1 dim
    sv = SteeringVectors.load(path)
    assert sv.layers == [1, 2, 3]
    assert torch.equal(sv[1].vector, torch.from_numpy(a + b)) and torch.equal(sv[2].vector, torch.from_numpy(c))
    assert torch.equal(sv[3].vector, torch.from_numpy(c))


def test_gguf_metadata_must_be_a_json_object(tmp_path):
    import numpy as np

    path = write_control_vector(tmp_path / "v.gguf", {"direction.1": np.ones(4, np.float32)}, meta="[1, 2]")
    with pytest.raises(InputError, match="steerstrength.meta is a JSON list"):
        SteeringVectors.load(path)


def test_cli_refuses_a_gguf_llama_cpp_refuses_in_one_line(tiny_dir, tmp_path, monkeypatch, capsys):
    import numpy as np

    path = write_control_vector(tmp_path / "v.gguf", {"direction.1": np.ones(32, np.float16)})
    code, _, err = run_cli(["sweep", "tokens", "-v", path, "--model", tiny_dir, "--alphas=-1,0,1",
                            "--out", tmp_path / "out"], monkeypatch, capsys, quiet=True)
    assert_one_line_error(code, err, "F16")
    assert not (tmp_path / "out").exists()
