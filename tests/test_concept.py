"""Concept probability: seeded steered sampling, binomial intervals, the tanh fit of Thm 3.6, degeneration, the CLI."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from steerstrength import InputError, SteeringVector, concept_probability
from steerstrength.config import ConceptConfig
from steerstrength.metrics.concept import (
    SamplingSettings,
    completion_seed,
    concept_curve,
    curve_summary,
    degeneration,
    fit_range,
    fit_tanh,
    generate_rows,
    regenerate,
    tanh_curve,
    wilson_interval,
)
from cliutil import error_lines, run_cli
from tiny import tiny_model

JOYFUL = ["i am happy and glad", "joy and love and a smile", "we laugh in the sun", "so happy today"]
PLAIN = ["the table is in the house", "a dog walked to the kitchen", "the cat is on the table", "my friend left"]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def vector(model):
    torch.manual_seed(0)
    return SteeringVector(torch.randn(model.d_model), 1)


def section(**kw) -> ConceptConfig:
    """The concept section with small sizes for the tiny model."""
    return dataclasses.replace(ConceptConfig(judge="lexicon", max_new_tokens=6, completions=1, chat=False), **kw)


# ----------------------------------------------------------------------------- statistics


def test_wilson_interval_matches_scipy():
    from scipy.stats import binomtest

    for k, n in [(0, 10), (3, 10), (10, 10), (17, 48)]:
        lo, hi = wilson_interval(k, n)
        ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert lo == pytest.approx(ref.low, abs=1e-9) and hi == pytest.approx(ref.high, abs=1e-9)


def test_tanh_fit_recovers_known_parameters():
    alphas = np.linspace(-40, 40, 41)
    truth = dict(c=0.45, a=0.4, b=0.08, alpha0=6.0)
    fit = fit_tanh(alphas, tanh_curve(alphas, **truth))
    assert fit["status"] == "ok" and fit["r2"] > 0.9999
    for key, value in truth.items():
        assert fit[key] == pytest.approx(value, rel=1e-3, abs=1e-3)
    # A falling curve: a < 0 (b is kept >= 0 so the sign of a is the direction).
    falling = fit_tanh(alphas, tanh_curve(alphas, 0.5, -0.3, 0.1, -5.0))
    assert falling["a"] == pytest.approx(-0.3, abs=1e-3) and falling["b"] == pytest.approx(0.1, rel=1e-3)


def test_tanh_fit_on_noisy_binomial_data_is_close():
    rng = np.random.default_rng(0)
    alphas = np.linspace(-40, 40, 21)
    p = tanh_curve(alphas, 0.5, 0.4, 0.1, 0.0)
    fit = fit_tanh(alphas, rng.binomial(400, p) / 400)
    assert fit["status"] == "ok" and fit["r2"] > 0.95
    assert fit["a"] == pytest.approx(0.4, abs=0.05) and fit["alpha0"] == pytest.approx(0.0, abs=3.0)


def test_tanh_fit_reports_degenerate_curves_without_crashing():
    assert fit_tanh(np.linspace(-1, 1, 9), np.full(9, 0.25))["status"].startswith("flat")
    assert fit_tanh([0.0, 1.0, 2.0], [0.1, 0.2, 0.3])["status"].startswith("too few")
    # 4 parameters: on 4 or 5 alphas any curve fits exactly, so the fit is refused, not reported as R^2 = 1
    assert fit_tanh([-2.0, -1.0, 0.0, 1.0, 2.0], [0.0, 0.0, 0.0, 0.12, 0.0])["status"].startswith("too few alphas (5")
    assert fit_tanh(np.linspace(-1, 1, 9), np.full(9, 0.25))["r2"] is None


def test_concept_curve_counts_pooled_and_per_prompt():
    rows = []
    for alpha, hits in [(-1.0, [0, 0, 1, 0]), (1.0, [1, 1, 1, 0])]:
        for i, h in enumerate(hits):
            rows.append(dict(judge="lexicon", alpha=alpha, prompt_index=i % 2, judged=bool(h), score=0.9 * h))
    curve = concept_curve(pd.DataFrame(rows))
    pooled = curve[curve.scope == "pooled"].set_index("alpha")
    assert pooled.loc[-1.0, "k"] == 1 and pooled.loc[1.0, "k"] == 3 and (pooled["n"] == 4).all()
    assert pooled.loc[1.0, "p"] == 0.75 and pooled.loc[1.0, "mean_score"] == pytest.approx(0.675)
    assert (curve.ci_low <= curve.p).all() and (curve.p <= curve.ci_high).all()
    per = curve[(curve.scope == "prompt") & (curve.alpha == 1.0)].set_index("prompt_index")
    assert per.loc[0, "k"] == 2 and per.loc[1, "k"] == 1 and (per["n"] == 2).all()


# ----------------------------------------------------------------------------- degeneration


def test_a_repeated_word_is_degenerate():
    d = degeneration("the the the the the")
    assert d["degenerate"] and d["n_words"] == 5
    assert d["distinct2"] == 0.25 and d["repeat_share"] == 1.0 and d["nonword_share"] == 0.0


def test_strings_of_non_words_are_degenerate():
    d = degeneration("@@@@ #### ....")
    assert d["degenerate"] and d["nonword_share"] == 1.0
    assert d["distinct2"] == 1.0 and d["repeat_share"] == pytest.approx(1 / 3)  # not repetition: non-words
    assert degeneration("aaaaaaa hello world")["nonword_share"] == pytest.approx(1 / 3)  # a run of 4+
    assert degeneration("x" * 21 + " is a word")["nonword_share"] == pytest.approx(1 / 4)  # over 20 characters


def test_a_normal_sentence_is_not_degenerate():
    d = degeneration("The cat sat on the mat and looked out of the window.")
    assert not d["degenerate"]
    assert d["distinct2"] == 1.0 and d["repeat_share"] == pytest.approx(3 / 12) and d["nonword_share"] == 0.0
    # Short answers are too short to judge repetition.
    assert not degeneration("Sure!")["degenerate"] and not degeneration("Hi there")["degenerate"]


def test_an_empty_completion_is_degenerate():
    for text in ("", "   \n"):
        d = degeneration(text)
        assert d["degenerate"] and d["n_words"] == 0 and d["distinct2"] == 1.0


def degenerate_scores(alphas, p, bad_share, n=100, judge="lexicon"):
    """One prompt, n completions per alpha: round(p n) judged present, round(bad_share n) degenerate."""
    rows = []
    for alpha, pa, ba in zip(alphas, p, bad_share):
        k, b = round(pa * n), round(ba * n)
        for i in range(n):
            rows.append(dict(judge=judge, alpha=float(alpha), prompt_index=0, judged=i < k, score=float(i < k),
                             degenerate=i >= n - b))
    return pd.DataFrame(rows)


def test_concept_curve_reports_the_degenerate_share_per_alpha():
    rows = []
    for alpha, bad in [(-1.0, [1, 1, 1, 0]), (0.0, [0, 0, 0, 0]), (1.0, [1, 0, 1, 0])]:
        for i, b in enumerate(bad):
            rows.append(dict(judge="lexicon", alpha=alpha, prompt_index=i % 2, judged=False, score=0.0,
                             degenerate=bool(b)))
    curve = concept_curve(pd.DataFrame(rows))
    pooled = curve[curve.scope == "pooled"].set_index("alpha")
    assert pooled["degenerate_share"].tolist() == [0.75, 0.0, 0.5]
    assert pooled["degenerate"].tolist() == [True, False, False]  # more than half, not half
    per = curve[(curve.scope == "prompt") & (curve.alpha == 1.0)].set_index("prompt_index")
    assert per.loc[0, "degenerate_share"] == 1.0 and per.loc[0, "degenerate"]
    assert per.loc[1, "degenerate_share"] == 0.0 and not per.loc[1, "degenerate"]
    # Scores without the column (older tables): nothing is known, nothing is flagged.
    old = concept_curve(pd.DataFrame(rows).drop(columns="degenerate"))
    assert old["degenerate_share"].isna().all() and not old["degenerate"].any()


def test_the_fit_range_is_the_non_degenerate_run_around_zero():
    assert fit_range([-2, -1, 0, 1, 2], [1, 0, 0, 0, 1]) == (-1.0, 1.0)
    assert fit_range([2, 1, 0, -1, -2], [1, 0, 0, 0, 1]) == (-1.0, 1.0)  # any order
    assert fit_range([-2, -1, 1, 2], [0, 1, 0, 0]) == (1.0, 2.0)  # 0 off the grid: the nearest alpha's run
    assert fit_range([-1, 1], [0, 0]) == (-1.0, 1.0)  # a run spanning 0 contains it
    assert fit_range([-2, -1, 0, 1, 2], [0, 0, 1, 0, 1]) == (-2.0, -1.0)  # 0 degenerate: equal distance, longer run
    assert fit_range([0, 1], [1, 1]) is None


def test_the_non_degenerate_fit_excludes_the_degenerate_ends():
    # A sigmoid in |alpha| <= 25 that collapses where the text degenerates (|alpha| >= 30).
    alphas = np.linspace(-40, 40, 17)
    p = np.where(np.abs(alphas) >= 30, 0.05, tanh_curve(alphas, 0.5, 0.4, 0.1, 0.0))
    bad_share = np.where(np.abs(alphas) >= 30, 0.9, np.where(np.abs(alphas) == 25, 0.5, 0.0))
    summary = curve_summary(concept_curve(degenerate_scores(alphas, p, bad_share)))["lexicon"]
    assert summary["degenerate_alphas"] == [-40.0, -35.0, -30.0, 30.0, 35.0, 40.0]
    assert summary["degenerate_share"] == pytest.approx([0.9, 0.9, 0.9, 0.5] + [0] * 9 + [0.5, 0.9, 0.9, 0.9])
    assert summary["fit_range"] == [-25.0, 25.0]
    nd = summary["tanh_fit_nondegenerate"]
    inside = np.abs(alphas) <= 25
    assert nd == fit_tanh(alphas[inside], np.round(p[inside] * 100) / 100)  # the fit on the range, and only there
    assert nd["status"] == "ok" and nd["r2"] > 0.99 and nd["a"] == pytest.approx(0.4, abs=0.05)
    assert summary["spearman_rho_nondegenerate"] > 0.99  # monotone; rounding to 0.01 ties the flat ends
    # The full-range fit is kept; the collapse at the ends spoils it.
    assert summary["tanh_fit"]["status"] == "ok" and summary["tanh_fit"]["r2"] < 0.5
    assert abs(summary["spearman_rho"]) < 0.9


def test_when_every_alpha_is_degenerate_nothing_is_fit():
    alphas = np.linspace(-4, 4, 5)
    summary = curve_summary(concept_curve(degenerate_scores(alphas, np.full(5, 0.1), np.ones(5), n=10)))["lexicon"]
    assert summary["degenerate_alphas"] == alphas.tolist() and summary["fit_range"] is None
    assert summary["tanh_fit_nondegenerate"]["status"].startswith("every alpha is degenerate")
    assert np.isnan(summary["spearman_rho_nondegenerate"])


# ----------------------------------------------------------------------------- sampling


def test_a_completion_is_reproduced_from_its_seed_alone_or_in_another_batch(model, vector):
    settings = SamplingSettings(max_new_tokens=10, chat=False)
    long_prompt = "i walked into the kitchen this morning and saw my friend"
    rows = [("the cat is", 4.0, completion_seed(0, "the cat is", 0)),
            (long_prompt, -4.0, completion_seed(0, long_prompt, 1)),
            ("the cat is", 0.0, completion_seed(0, "the cat is", 2)),
            ("a", 8.0, 12345)]
    batch = generate_rows(model, vector, rows, settings, batch_size=4)
    # Alone, and inside a differently composed and padded batch.
    other = generate_rows(model, vector, [rows[3], ("you are", 1.0, 7), rows[1], rows[0], rows[2]], settings,
                          batch_size=2)
    for i, row in enumerate(rows):
        alone = regenerate(model, vector, *row, settings)
        assert alone == batch[i]["completion"]
    assert [o["completion"] for o in other] == [batch[3]["completion"], other[1]["completion"],
                                               batch[1]["completion"], batch[0]["completion"],
                                               batch[2]["completion"]]
    # Different seeds give different samples (the generator is really used).
    texts = {regenerate(model, vector, "the cat is", 0.0, s, settings) for s in range(6)}
    assert len(texts) > 1


def test_steering_reaches_decode_steps(model, vector):
    settings = SamplingSettings(max_new_tokens=8, chat=False)
    seed = completion_seed(0, "the cat is", 0)
    texts = {regenerate(model, vector, "the cat is", a, seed, settings) for a in (-30.0, 0.0, 30.0)}
    assert len(texts) == 3  # same uniforms, different alphas: the steered distributions differ


def test_seeds_are_shared_across_alphas_and_distinct_across_completions():
    assert completion_seed(0, "p", 0) == completion_seed(0, "p", 0)
    assert len({completion_seed(0, "p", i) for i in range(100)}) == 100
    assert completion_seed(0, "p", 0) != completion_seed(1, "p", 0) != completion_seed(0, "q", 0)


# ----------------------------------------------------------------------------- the measurement


def test_concept_probability_end_to_end_on_a_tiny_model(model, vector, tmp_path):
    prompts = ["the cat is", "i saw my friend"]
    result = concept_probability(model, vector, "joy", section(completions=3, batch_size=7),
                                 alphas=[-10.0, 0.0, 10.0], prompts=prompts, positive=JOYFUL, negative=PLAIN,
                                 setting="random")
    c = result.completions
    assert len(c) == 3 * 2 * 3 and c["completion_id"].is_unique
    assert set(c["alpha"]) == {-10.0, 0.0, 10.0} and (c["n_new_tokens"] <= 6).all()
    # Common random numbers: the same seed for a (prompt, completion index) at every alpha.
    assert (c.groupby(["prompt_index", "completion_index"])["seed"].nunique() == 1).all()
    s = result.scores
    assert len(s) == len(c) and set(s.columns) >= {"model", "concept", "layer", "setting", "alpha", "judge", "score",
                                                   "judged", "seed"}
    assert ((s.score >= 0) & (s.score <= 1)).all()
    # Every completion is measured for degeneration, in both tables, by the documented rule.
    for col in ("n_words", "distinct2", "repeat_share", "nonword_share", "degenerate"):
        assert col in c.columns and col in s.columns
    assert c["degenerate_rules"].tolist() == [degeneration(t)["degenerate"] for t in c["completion"]]
    # Degenerate: by the rules, or read as noise by the unsteered model (above the calibrated NLL threshold).
    threshold = result.summary["fluency_calibration"]["threshold"]
    assert c["degenerate"].tolist() == (c["degenerate_rules"] | (c["nll"] > threshold)).tolist()
    assert "degenerate_share" in result.curve.columns and result.curve["degenerate"].dtype == bool
    pooled = result.curve[result.curve.scope == "pooled"]
    assert len(pooled) == 3 and (pooled["n"] == 6).all()
    assert (pooled["k"] == s.groupby("alpha")["judged"].sum().to_numpy()).all()
    summary = result.summary
    assert summary["judge_accuracy"]["lexicon"]["n_positive"] == 2
    assert summary["curves"]["lexicon"]["alpha"] == [-10.0, 0.0, 10.0]
    assert {"degenerate_alphas", "fit_range", "tanh_fit_nondegenerate", "spearman_rho_nondegenerate",
            "tanh_fit"} <= set(summary["curves"]["lexicon"]) and "degeneration_rule" in summary
    paths = result.save(tmp_path)
    lines = paths["completions"].read_text().splitlines()
    assert len(lines) == len(c) and {"alpha", "prompt", "seed", "completion"} <= set(json.loads(lines[0]))
    assert pd.read_parquet(paths["scores"]).shape[0] == len(s)
    assert json.loads(paths["summary"].read_text())["concept"] == "joy"
    # A stored completion is regenerated from its recorded row.
    row = json.loads(lines[5])
    settings = SamplingSettings(**summary["sampling"])
    assert regenerate(model, vector, row["prompt"], row["alpha"], row["seed"], settings) == row["completion"]


def test_controls_sampled_beside_v_give_the_rows_each_direction_gives_alone(model, vector):
    """The concept direction and a random control in one decode loop: the `direction` column tells their rows apart,
    each direction's completions and curve are those it gives alone, and the summary is v's."""
    torch.manual_seed(2)
    control = SteeringVector(torch.randn(model.d_model), 1, meta={"direction": "random-0"})
    kw = dict(alphas=[-8.0, 0.0, 8.0], prompts=["the cat is", "i saw my friend"], positive=JOYFUL, negative=PLAIN)
    both = concept_probability(model, [vector, control], "joy", section(completions=2), **kw)
    assert both.summary["directions"] == ["v", "random-0"]
    for sv, d in ((vector, "v"), (control, "random-0")):
        alone = concept_probability(model, sv, "joy", section(completions=2), **kw)
        mine = both.completions[both.completions["direction"] == d]
        assert mine["completion"].tolist() == alone.completions["completion"].tolist()
        curve = both.curve[both.curve["direction"] == d].reset_index(drop=True)
        assert curve[["alpha", "k", "n"]].equals(alone.curve[["alpha", "k", "n"]])
    v_alone = concept_probability(model, vector, "joy", section(completions=2), **kw)
    assert json.dumps(both.summary["curves"], sort_keys=True) == json.dumps(v_alone.summary["curves"], sort_keys=True)
    with pytest.raises(InputError, match="one decode loop steers one layer"):
        concept_probability(model, [vector, SteeringVector(control.vector, 0, meta=control.meta)], "joy", section(),
                            prompts=["a"])
    with pytest.raises(InputError, match="directions repeat"):
        concept_probability(model, [vector, vector], "joy", section(), prompts=["a"])


def test_the_llm_judge_defaults_to_the_steered_model(model, vector):
    result = concept_probability(model, vector, "joy", section(judge="llm", completions=2, max_new_tokens=4),
                                 alphas=[0.0, 5.0], prompts=["the cat is"])
    assert result.summary["judges"]["llm"]["judge_model"] == model.name
    assert result.scores["score"].between(0, 1).all() and result.summary["judge_answer_mass"]["llm"] > 0


def test_bad_judge_input_fails_before_any_generation(model, vector):
    with pytest.raises(InputError, match="unknown judge"):
        concept_probability(model, vector, "joy", section(), judges=["oracle"], prompts=["a"])
    with pytest.raises(InputError, match="cannot judge 'lying'"):
        concept_probability(model, vector, "lying", section(), prompts=["a"])
    with pytest.raises(InputError, match="--positive / --negative"):
        concept_probability(model, vector, "joy", section(judge="embedding"), prompts=["a"])


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    """The tiny model saved as a transformers directory, so the CLI can load it."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model.hf.save_pretrained(path)
    model.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vector_file(model, vector, tmp_path_factory):
    from steerstrength.vectors import SteeringVectors

    path = tmp_path_factory.mktemp("vectors") / "joy.safetensors"
    SteeringVectors({1: vector.vector.clone()}, {"concept": "joy", "setting": "random"}).save(path)
    return path


def test_cli_sweep_concept_writes_tables(monkeypatch, capsys, tmp_path, model_dir, vector_file):
    pos, neg = tmp_path / "P.txt", tmp_path / "N.txt"
    pos.write_text("\n".join(JOYFUL) + "\n")
    neg.write_text("\n".join(PLAIN) + "\n")
    code, _, err = run_cli(["sweep", "concept", "-v", vector_file, "--model", model_dir, "--device", "cpu",
                            "--judge", "lexicon", "--judge", "llm", "--preset", "demo", "--alpha-unit", "raw",
                            "--alpha-min", "-5", "--alpha-max", "5", "--n-prompts", "2", "--completions", "2",
                            "--max-new-tokens", "5", "--no-chat", "-p", pos, "-n", neg, "--out", tmp_path / "out"],
                           monkeypatch, capsys, quiet=True)
    assert code == 0, err
    assert "judge lexicon" in err and "judge llm" in err and "tanh fit" in err
    curve = pd.read_parquet(tmp_path / "out" / "concept_curve.parquet")
    # The demo preset's 9 alphas, over the range given (in raw units).
    assert set(curve["judge"]) == {"lexicon", "llm"}
    assert sorted(curve["alpha"].unique()) == pytest.approx(np.linspace(-5, 5, 9).tolist())
    assert (curve["layer"] == 1).all() and (curve["concept"] == "joy").all()
    summary = json.loads((tmp_path / "out" / "concept.json").read_text())
    assert set(summary["joy/1"]["judge_accuracy"]) == {"lexicon", "llm"}
    n = len((tmp_path / "out" / "concept_completions.jsonl").read_text().splitlines())
    assert n == 9 * 2 * 2


def test_cli_sweep_concept_takes_its_sizes_from_the_run_preset(monkeypatch, capsys, tmp_path, model_dir, vector_file):
    """One preset system: `sweep concept` measures what `steerstrength run`'s concept stage measures (config.py)."""
    from steerstrength.config import preset
    from steerstrength.grid import AlphaGrid

    code, _, err = run_cli(["sweep", "concept", "-v", vector_file, "--model", model_dir, "--device", "cpu",
                            "--judge", "lexicon", "--no-chat", "--n-prompts", "1", "--out", tmp_path],
                           monkeypatch, capsys, quiet=True)
    assert code == 0, err
    demo = preset("demo").concept  # the default preset, as for `run`
    summary = json.loads((tmp_path / "concept.json").read_text())
    assert summary["preset"] == "demo" and summary["alpha_unit"] == preset("demo").alpha_unit == "resid"
    assert summary["sizes"] == dict(n_alphas=demo.n_alphas, n_prompts=1, completions=demo.completions,
                                    max_new_tokens=demo.max_new_tokens)
    curve = pd.read_parquet(tmp_path / "concept_curve.parquet")
    grid = AlphaGrid.linspace(-demo.alpha_max, demo.alpha_max, demo.n_alphas, zero=False).values.tolist()
    assert sorted(curve["alpha_resid"].unique()) == pytest.approx(grid)
    rows = [json.loads(line) for line in (tmp_path / "concept_completions.jsonl").read_text().splitlines()]
    assert len(rows) == demo.n_alphas * 1 * demo.completions


@pytest.mark.parametrize("option, value", [("--completions", "0"), ("--max-new-tokens", "0"), ("--n-prompts", "-1"),
                                           ("--n-alphas", "0")])
def test_cli_sweep_concept_refuses_sizes_below_one(monkeypatch, capsys, tmp_path, model_dir, vector_file, option,
                                                   value):
    """0 is not replaced by the preset's size, and -1 does not slice from the end: one line, exit 2, nothing written."""
    code, _, err = run_cli(["sweep", "concept", "-v", vector_file, "--model", model_dir, "--device", "cpu",
                            "--judge", "lexicon", "--n-prompts", "1", "--completions", "1", "--max-new-tokens", "2",
                            option, value, "--out", tmp_path / "out"], monkeypatch, capsys, quiet=True)
    assert code == 2 and f"{option} must be at least 1, not {value}" in err and len(error_lines(err)) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--judge", "oracle"], "unknown judge 'oracle'"),
    (["--judge", "lexicon", "--concept", "lying"], "cannot judge 'lying'"),
    (["--judge", "embedding", "--concept", "sunsets"], "--positive / --negative"),  # no held-out curated pairs
    (["--judge", "lexicon", "--preset", "huge"], "unknown preset"),
    (["--judge", "lexicon", "--preset", "demo", "--alpha-unit", "raw"], "give --alpha-max (and --alpha-min)"),
])
def test_cli_sweep_concept_errors_exit_2(monkeypatch, capsys, tmp_path, model_dir, vector_file, args, message):
    code, _, err = run_cli(["sweep", "concept", "-v", vector_file, "--model", model_dir, "--device", "cpu",
                            "--n-prompts", "1", "--completions", "1", "--max-new-tokens", "2", "--out", tmp_path,
                            *args], monkeypatch, capsys, quiet=True)
    assert code == 2 and message in err and "Traceback" not in err
    assert not list(tmp_path.glob("concept*"))  # nothing half-written


def test_rows_of_several_vectors_share_one_decode_and_match_each_vector_alone(model, vector):
    """(prompt, vector_index, alpha, seed) rows over several SteeringVectors of one layer: each row's text is the
    text its own vector gives alone, whatever else shares the batch (a control direction beside v)."""
    torch.manual_seed(1)
    control = SteeringVector(torch.randn(model.d_model), 1, meta={"direction": "random-0"})
    settings = SamplingSettings(max_new_tokens=8, chat=False)
    rows = [("the cat is", 0, 6.0, 11), ("the cat is", 1, 6.0, 11), ("i saw my friend", 1, -6.0, 12),
            ("i saw my friend", 0, 0.0, 13), ("the cat is", 1, 6.0, 14)]
    mixed = generate_rows(model, [vector, control], rows, settings, batch_size=5)
    for (prompt, k, alpha, seed), got in zip(rows, mixed):
        alone = generate_rows(model, [vector, control][k], [(prompt, alpha, seed)], settings)[0]
        assert got["completion"] == alone["completion"]
    # The two directions steer differently at the same alpha and seed.
    assert mixed[0]["completion"] != mixed[1]["completion"]
    with pytest.raises(InputError, match="names vector 2"):
        generate_rows(model, [vector, control], [("the cat is", 2, 1.0, 0)], settings)


def test_the_batched_engine_samples_what_hf_generate_samples(model, vector):
    from steerstrength import sampling

    settings = SamplingSettings(max_new_tokens=8, chat=False)
    rows = [("the cat is", a, completion_seed(0, "the cat is", c)) for a in (-8.0, 0.0, 8.0) for c in range(2)]
    rows.append(("i walked into the kitchen this morning", 3.0, 5))
    ours = generate_rows(model, vector, rows, settings, batch_size=7)
    try:
        sampling.GENERATION_ENGINE = "hf"
        theirs = generate_rows(model, vector, rows, settings, batch_size=7)
    finally:
        sampling.GENERATION_ENGINE = "batched"
    assert ours == theirs


def test_completion_nll_is_the_unsteered_models_teacher_forced_loss(model):
    from steerstrength.sampling import completion_nll

    prompts = [model.token_ids("the cat is"), model.token_ids("i walked into the kitchen this morning")]
    rows = [(0, model.token_ids("happy and glad")[1:]), (1, model.token_ids("a dog")[1:]), (0, [])]
    got = completion_nll(model, prompts, rows)
    for (p, ids), nll in zip(rows, got):
        assert nll.shape == (len(ids),)
        if not ids:
            continue
        full = torch.tensor([prompts[p] + ids])
        with torch.no_grad():
            logp = torch.log_softmax(model.hf(input_ids=full).logits[0].float(), -1)
        want = [-float(logp[len(prompts[p]) - 1 + j, t]) for j, t in enumerate(ids)]
        assert np.allclose(nll, want, atol=1e-4)


def test_degenerate_completions_are_counted_apart_from_the_fluent_concept_probability():
    scores = pd.DataFrame(dict(judge="lexicon", alpha=[1.0] * 4 + [2.0] * 4, prompt_index=0, score=1.0,
                               judged=[True, True, False, False, True, True, True, True],
                               degenerate=[False, False, False, True, True, True, True, False]))
    pooled = concept_curve(scores).query("scope == 'pooled'").set_index("alpha")
    assert pooled.loc[1.0, "p"] == 0.5 and pooled.loc[2.0, "p"] == 1.0  # the judge's rate, as before
    assert pooled.loc[1.0, "n_fluent"] == 3 and pooled.loc[1.0, "p_fluent"] == pytest.approx(2 / 3)
    assert pooled.loc[2.0, "degenerate_share"] == 0.75 and pooled.loc[2.0, "p_fluent"] == 1.0
    assert pooled.loc[2.0, "ci_low_fluent"] < 0.5  # one fluent completion decides nothing


@pytest.mark.slow
def test_the_fluency_check_separates_fluent_from_scrambled_text_on_held_out_texts(default_model):
    """Issue 24 item 3: fit on the train split's fluent texts vs their token shuffles, measured on the held-out split."""
    from steerstrength.metrics.concept import calibrate_fluency, mean_nll

    cal = calibrate_fluency(default_model, chat=True, n_texts=16, max_tokens=16, splits=("train", "heldout"))
    assert cal["n_heldout"] == 32 and cal["heldout_accuracy"] >= 0.9
    # Word salad of the kind steering produces reads as noise; a plain sentence does not.
    salad = "derWordstritbodied ACRIMACROzu MACHATA-ERUSONUS derWordstrincdeath fragments blissfulREAM"
    plain = "I spent the morning at the library and then walked home through the park."
    nll = mean_nll(default_model, ["Tell me about your day."] * 2, [salad, plain], chat=True, max_tokens=16)
    assert nll[0] > cal["threshold"] > nll[1]


def test_the_fluency_read_during_the_decode_is_the_unsteered_models_nll_of_the_tokens(model, vector):
    """sample_steered(read_tokens=k) reruns only blocks l+1.. on the recorded residual stream; it must equal a plain
    teacher-forced unsteered forward of prompt + the first k generated tokens."""
    from steerstrength.sampling import completion_nll, sample_steered

    prompts = [model.token_ids("the cat is"), model.token_ids("i walked into the kitchen this morning")]
    rows = [(0, 0, 9.0, 1), (1, 0, -9.0, 2), (0, 0, 0.0, 3), (1, 0, 30.0, 4)]
    done = sample_steered(model, prompts, rows, max_new_tokens=7, temperature=1.0, top_p=1.0, top_k=0, stops=[2],
                          vectors=vector.vector[None, :], layer=1, read_tokens=5)
    want = completion_nll(model, prompts, [(r[0], d["ids"][:5]) for r, d in zip(rows, done)])
    for d, w in zip(done, want):
        assert d["nll"].shape == w.shape and np.allclose(d["nll"], w, atol=1e-4)
