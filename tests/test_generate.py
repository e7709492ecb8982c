"""`steerstrength generate` / SteeringVector.generate: steered completions side by side, one batched generation for
every alpha, each with its per-token KL to the unsteered model and the degeneration flag."""

import json

import pytest
import torch

from steerstrength import difference_of_means, generate_completions
from steerstrength.metrics.concept import SamplingSettings, degeneration
from steerstrength.steering import steer
from cliutil import error_lines, run_cli
from tiny import tiny_model

P = ["i am so happy and glad today", "joy and a smile , i laugh", "you are my friend and i love you"]
N = ["the table is in the kitchen", "a cat saw a dog in the house", "rain in the evening"]
SETTINGS = SamplingSettings(max_new_tokens=6, temperature=1.0, top_p=1.0, chat=True)
PROMPTS = ["i am happy", "the cat"]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def sv(model):
    return difference_of_means(model, P, N, [1, 2], concept="joy", setting="contrastive")


@pytest.fixture(scope="module")
def frame(model, sv):
    return generate_completions(model, sv[2], PROMPTS, [0.0, 1.0, 4.0], unit="resid", settings=SETTINGS, seed=3)


@pytest.fixture(scope="module")
def files(tmp_path_factory, model, sv):
    root = tmp_path_factory.mktemp("generate")
    model.hf.save_pretrained(root / "tiny")
    model.tokenizer.save_pretrained(root / "tiny")
    sv.save(root / "v.safetensors")
    return root


def test_every_alpha_shares_one_batched_generation(model, sv, monkeypatch):
    from steerstrength import sampling

    calls = []
    real = sampling.sample_steered
    monkeypatch.setattr(sampling, "sample_steered", lambda *a, **k: calls.append([r[2] for r in a[2]]) or real(*a, **k))
    generate_completions(model, sv[2], PROMPTS, [0.0, 0.5, 1.0], unit="raw", settings=SETTINGS, completions=2)
    assert len(calls) == 1 and sorted(set(calls[0])) == [0.0, 0.5, 1.0] and len(calls[0]) == 2 * 3 * 2


def test_alphas_are_in_the_unit_asked_and_both_columns_are_kept(frame, sv):
    scale = sv[2].resid_scale()
    assert frame["alpha_resid"].tolist() == pytest.approx([0.0, 1.0, 4.0] * 2)
    assert frame["alpha"].tolist() == pytest.approx([0.0, 1 / scale, 4 / scale] * 2)
    assert (frame["layer"] == 2).all() and (frame["concept"] == "joy").all()


def test_a_completion_depends_on_its_seed_not_on_the_batch(model, sv, frame):
    alone = generate_completions(model, sv[2], ["the cat"], [4.0], unit="resid", settings=SETTINGS, seed=3)
    both = frame[(frame["prompt"] == "the cat") & (frame["alpha_resid"] == 4.0)]
    assert alone["completion"].iloc[0] == both["completion"].iloc[0]
    other_seed = generate_completions(model, sv[2], PROMPTS, [0.0, 1.0, 4.0], unit="resid", settings=SETTINGS, seed=4)
    assert other_seed["completion"].tolist() != frame["completion"].tolist()


def test_kl_is_zero_unsteered_and_equals_a_hand_computation_steered(model, sv, frame):
    assert (frame.loc[frame["alpha"] == 0, "kl_mean"] == 0).all()
    row = frame[frame["alpha_resid"] == 4.0].iloc[0]
    prompt = model.token_ids(row["prompt"], chat=True)
    completion = model.tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        with steer(model, sv[2].vector, 2, float(row["alpha"])):
            steered = torch.log_softmax(model.hf(input_ids=ids).logits[0].double(), -1)
        plain = torch.log_softmax(model.hf(input_ids=ids).logits[0].double(), -1)
    at = slice(len(prompt) - 1, len(prompt) + len(completion) - 1)  # the positions that predict the completion
    kl = (steered[at].exp() * (steered[at] - plain[at])).sum(-1)
    assert row["kl_mean"] == pytest.approx(float(kl.mean()), rel=1e-4, abs=1e-7)
    assert row["kl_mean"] > 0 and row["n_kl_tokens"] == len(completion)


def test_the_degeneration_flag_is_the_concept_stage_s_rule(frame):
    assert frame["degenerate"].tolist() == [degeneration(t)["degenerate"] for t in frame["completion"]]


def test_cli_prints_one_column_per_alpha_with_kl_and_flags(files, monkeypatch, capsys):
    code, out, err = run_cli(["generate", "-v", files / "v.safetensors", "--layer", "2", "--alpha", "0,0.5,1",
                              "-m", files / "tiny", "--max-new-tokens", "5", "i am happy", "the cat"],
                             monkeypatch, capsys)
    assert code == 0, err
    for head in ("α = 0 (resid)", "α = 0.5 (resid)", "α = 1 (resid)"):
        assert head in out
    assert out.count("nats/token") == 6 and "i am happy" in out and "the cat" in out


def test_cli_json_rows_and_the_stream_agree_with_the_table(files, monkeypatch, capsys):
    args = ["generate", "-v", files / "v.safetensors", "--layer", "2", "-m", files / "tiny", "--max-new-tokens", "5",
            "--seed", "7"]
    code, out, err = run_cli(args + ["--alpha", "0,2", "--json", "i am happy"], monkeypatch, capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["alpha_resid"] for r in rows] == pytest.approx([0.0, 2.0])
    assert {"completion", "kl_mean", "degenerate", "seed"} <= set(rows[0])
    code, out, err = run_cli(args + ["--alpha", "2", "i am happy"], monkeypatch, capsys)  # one alpha: streamed
    assert code == 0, err
    assert rows[1]["completion"] in out and "KL" in err + out


def test_cli_reads_the_recommended_alphas_of_a_run(files, tmp_path, monkeypatch, capsys):
    from test_strength import make_run

    run = make_run(tmp_path / "run")
    code, out, err = run_cli(["generate", "-v", files / "v.safetensors", "--layer", "2", "--recommended", run,
                              "-m", files / "tiny", "--max-new-tokens", "3", "--json", "i am"], monkeypatch, capsys)
    assert code == 0, err
    assert [json.loads(line)["alpha"] for line in out.splitlines()] == pytest.approx([0.0, 3.0, 2.0])


@pytest.mark.parametrize("extra, needle", [
    (["--layer", "7", "--alpha", "1", "hi"], "no steering vector for layer 7"),
    (["--alpha", "1", "hi"], "pick one with --layer"),
    (["--layer", "2", "--alpha", "x,1", "hi"], "--alpha 'x,1' must be numbers"),
    (["--layer", "2", "hi"], "--alpha"),
    (["--layer", "2", "--alpha", "1", " "], "prompt is empty"),
    (["--layer", "2", "--alpha", "1", "--n", "0", "hi"], "--n must be at least 1"),
    (["--layer", "2", "--alpha", "1", "--top-p", "2", "hi"], "top-p"),
    (["--layer", "2", "--alpha", "1", "--alpha-unit", "cubits", "hi"], "alpha unit"),
    (["--layer", "2", "--recommended", "nowhere", "hi"], "does not exist"),
    (["--layer", "2", "--alpha-unit", "raw", "hi"], "unit of --alpha"),
    (["--layer", "2", "--alpha", "nan", "hi"], "NaN"),
])
def test_cli_bad_input_is_one_line_and_exit_2(files, monkeypatch, capsys, extra, needle):
    code, _, err = run_cli(["generate", "-v", files / "v.safetensors", "-m", files / "tiny", *extra], monkeypatch,
                           capsys)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
