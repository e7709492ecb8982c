"""The strength travels with the vector: safetensors and GGUF metadata, and GGUF files pre-scaled for llama.cpp."""

import json
import math

import pytest
import torch

from steerstrength import InputError, SteeringVectors, difference_of_means
from steerstrength.steering import next_token_probs
from steerstrength.strength import recommended_alpha, strength_from, with_strength
from cliutil import error_lines, run_cli
from tiny import tiny_model

P = ["i am so happy and glad today", "joy and a smile , i laugh", "you are my friend and i love you"]
N = ["the table is in the kitchen", "a cat saw a dog in the house", "rain in the evening"]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def sv(model):
    return difference_of_means(model, P, N, [1, 2], concept="joy", setting="contrastive")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("tiny-llama")
    model.hf.save_pretrained(path)
    model.tokenizer.save_pretrained(path)
    return str(path)


def make_run(root, concept="joy"):
    """A run directory's tables as the recommend and concept stages write them (the parts strength.py reads)."""
    tables = root / "tables"
    tables.mkdir(parents=True)
    per_vector = {f"{concept}/2/sweet-spot": dict(method="sweet-spot", layer=2, concept=concept, budget=1.0,
                                                   mean_alpha=3.0, per_prompt=[]),
                  f"{concept}/2/iso-kl": dict(method="iso-kl", layer=2, concept=concept, budget=1.0, alpha=2.0,
                                              mean_alpha=2.0),
                  "other/2/iso-kl": dict(method="iso-kl", layer=2, concept="other", budget=1.0, alpha=99.0)}
    (tables / "recommend.json").write_text(json.dumps(dict(budget=1.0, methods=["sweet-spot", "iso-kl"],
                                                           per_vector=per_vector)))
    (tables / "concept.json").write_text(json.dumps({f"{concept}/2": {"curves": {"probe": {"fit_range": [-1.5, 2.5]}}}}))
    return root


def test_every_vector_file_says_model_layers_r_l_and_unit(sv, tmp_path):
    back = SteeringVectors.load(sv.save(tmp_path / "v.safetensors"))
    assert back.meta["model_fingerprint"] and back.meta["unit"] == "raw"
    assert set(back.meta["residual_norms"]) == {"1", "2"} and back.meta["layers"] == [1, 2]


def test_a_run_s_recommendation_and_fluent_range_travel_in_both_formats(sv, tmp_path):
    from gguf import GGUFReader

    strength = strength_from(make_run(tmp_path / "run"), sv)
    rec = strength["layers"]["2"]["recommended"]
    assert [(e["method"], e["alpha"], e["scope"]) for e in rec] == [("sweet-spot", 3.0, "mean over prompts"),
                                                                   ("iso-kl", 2.0, "one alpha")]  # not "other"'s 99
    scale = float(sv[2].vector.norm()) / sv.meta["residual_norms"]["2"]
    assert rec[1]["alpha_resid"] == pytest.approx(2.0 * scale, rel=1e-6)
    assert strength["layers"]["2"]["fluent_range"]["alpha"] == [-1.5, 2.5]
    assert strength["layers"]["1"]["recommended"] == []
    carried = with_strength(sv, strength)
    assert SteeringVectors.load(carried.save(tmp_path / "v.safetensors")).meta["strength"] == strength
    carried.to_gguf(tmp_path / "v.gguf", [2])
    fields = GGUFReader(str(tmp_path / "v.gguf")).fields
    assert fields["steerstrength.model_fingerprint"].contents() == sv.meta["model_fingerprint"]
    assert fields["steerstrength.layers"].contents() == [2]
    assert fields["steerstrength.residual_norms"].contents()[0] == pytest.approx(sv.meta["residual_norms"]["2"])
    assert json.loads(fields["steerstrength.recommended"].contents())["2"][1]["alpha"] == 2.0
    assert json.loads(fields["steerstrength.fluent_range"].contents())["2"]["alpha"] == [-1.5, 2.5]
    assert SteeringVectors.load(tmp_path / "v.gguf").meta["strength"] == strength
    assert recommended_alpha(strength, 2)["method"] == "iso-kl"  # the one-alpha method by default
    assert recommended_alpha(strength, 2, "sweet-spot")["alpha"] == 3.0
    with pytest.raises(InputError, match="layer 1"):
        recommended_alpha(strength, 1)


@pytest.mark.parametrize("unit", ["raw", "resid"])
def test_a_prescaled_vector_at_scale_1_steers_like_v_at_that_alpha(model, sv, tmp_path, unit):
    alpha = 0.5
    pre = sv.prescaled(alpha, unit, layers=[2])
    raw = alpha / sv.resid_scale(2) if unit == "resid" else alpha
    pre.to_gguf(tmp_path / "pre.gguf")
    back = SteeringVectors.load(tmp_path / "pre.gguf")
    assert back.meta["prescaled"]["raw_alpha"]["2"] == pytest.approx(raw)
    if unit == "resid":  # alpha_resid 0.5: the added vector has half the layer's median residual norm
        assert float(back[2].vector.norm()) == pytest.approx(alpha * sv.meta["residual_norms"]["2"], rel=1e-5)
    at_one = next_token_probs(model, back[2], "i am", [1.0])
    want = next_token_probs(model, sv[2], "i am", [raw])
    assert float((at_one - want).abs().max()) < 1e-6
    assert float((want - next_token_probs(model, sv[2], "i am", [0.0])).abs().max()) > 1e-4  # steering moved it


def test_prescaling_refuses_zero_and_layers_the_file_lacks(sv):
    with pytest.raises(InputError, match="finite and nonzero"):
        sv.prescaled(0.0)
    with pytest.raises(InputError, match="layer 7"):
        sv.prescaled(1.0, layers=[7])


def test_cli_export_prescales_at_the_recommended_alpha(sv, tmp_path, monkeypatch, capsys):
    run = make_run(tmp_path / "run")
    sv.save(tmp_path / "v.safetensors")
    code, _, err = run_cli(["export-gguf", tmp_path / "v.safetensors", tmp_path / "v.gguf", "--layers", "2",
                            "--recommended", run], monkeypatch, capsys)
    assert code == 0, err
    back = SteeringVectors.load(tmp_path / "v.gguf")
    torch.testing.assert_close(back[2].vector, 2.0 * sv[2].vector)  # iso-kl's alpha 2
    assert back.meta["strength"]["layers"]["2"]["fluent_range"]["alpha"] == [-1.5, 2.5]
    code, _, err = run_cli(["export-gguf", tmp_path / "v.safetensors", tmp_path / "r.gguf", "--layers", "2",
                            "--alpha", "0.5", "--alpha-unit", "resid"], monkeypatch, capsys)
    assert code == 0, err
    got = SteeringVectors.load(tmp_path / "r.gguf")[2].vector
    assert float(got.norm()) == pytest.approx(0.5 * sv.meta["residual_norms"]["2"], rel=1e-5)


@pytest.mark.parametrize("extra, needle", [
    (["--recommended", "nowhere"], "does not exist"),
    (["--recommended", "RUN", "--layers", "2", "--method", "curvature"], "no 'curvature' recommendation"),
    (["--method", "iso-kl"], "--recommended"),
    (["--alpha", "0"], "nonzero"),
    (["--alpha", "1", "--alpha-unit", "furlongs"], "alpha unit"),
    (["--recommended", "RUN", "--layers", "1"], "no recommended alpha is recorded for layer 1"),
])
def test_cli_export_bad_strength_options_are_one_line_and_no_file(sv, tmp_path, monkeypatch, capsys, extra, needle):
    run = make_run(tmp_path / "run")
    sv.save(tmp_path / "v.safetensors")
    args = [str(run) if a == "RUN" else a for a in extra]
    code, _, err = run_cli(["export-gguf", tmp_path / "v.safetensors", tmp_path / "x.gguf", *args], monkeypatch, capsys)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "x.gguf").exists()


def test_a_run_for_another_concept_is_refused(sv, tmp_path):
    with pytest.raises(InputError, match="no recommendation or fluent range"):
        strength_from(make_run(tmp_path / "run", concept="evil"), sv)
    assert math.isfinite(sv.resid_scale(2))


# ----------------------------------------------------------------------------- peers' objects


def test_steering_vectors_round_trip_steers_the_same_and_takes_the_metadata_back(model, sv):
    pytest.importorskip("steering_vectors")
    theirs = sv.to_steering_vectors()
    ids = torch.tensor([model.token_ids("i am happy")])
    with torch.no_grad(), theirs.apply(model.hf, multiplier=3.0):
        their_logits = model.hf(input_ids=ids).logits
    with torch.no_grad(), sv[2].apply(model, 3.0), sv[1].apply(model, 3.0):
        our_logits = model.hf(input_ids=ids).logits
    torch.testing.assert_close(their_logits, our_logits, atol=1e-5, rtol=1e-5)  # same layer numbering
    back = SteeringVectors.from_steering_vectors(theirs, meta=sv.meta)
    assert back.layers == [1, 2] and torch.equal(back[2].vector, sv[2].vector)
    assert back.meta["residual_norms"] == sv.meta["residual_norms"]  # only because we handed it back


def test_a_repeng_control_vector_reads_in_without_metadata(sv):
    from types import SimpleNamespace

    cv = SimpleNamespace(model_type="llama", directions={2: sv[2].vector.numpy()})
    back = SteeringVectors.from_repeng(cv)
    assert back.layers == [2] and back.meta == {"model_type": "llama"}
    torch.testing.assert_close(back[2].vector, sv[2].vector)
