"""Which alpha? Selection rules on curves with known answers, per-token KL, every method on a tiny model, the CLI."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from steerstrength import InputError, SteeringVectors, difference_of_means, next_token_probs, recommend_alpha
from steerstrength.recommend import (
    METHODS,
    QUADRATIC_CHECK,
    Curvature,
    Global,
    GridJudge,
    IsoKL,
    SweetSpot,
    bisect_crossing,
    budget_alpha,
    departure,
    constrained_argmax,
    feasible_run,
    first_crossing,
    method_options,
    next_token_readings,
    peak_report,
    prompt_curvature,
    prompt_kl,
    token_kl,
)
from steerstrength.steering import steer
from tiny import tiny_model

JOYFUL = ["i am happy and glad", "joy and love and a smile", "we laugh in the sun", "so happy today"]
PLAIN = ["the table is in the house", "a dog walked to the kitchen", "the cat is on the table", "my friend left"]
PROMPTS = ["i walked into the kitchen", "the cat saw a dog and"]
LAYER = 1
GRID = [0.0, 0.5, 1.0, 2.0, 4.0]
SMALL = dict(n_completions=2, max_new_tokens=4, alphas=GRID)


@pytest.fixture(scope="module")
def model():
    m = tiny_model("llama")
    with torch.no_grad():
        m.final_norm.weight.mul_(30.0)  # peaked next-token distributions, so steering moves them
    return m


@pytest.fixture(scope="module")
def vector(model):
    v = difference_of_means(model, JOYFUL, PLAIN, [LAYER])[LAYER]
    return 0.05 * v / v.norm()  # residual norms are ~0.1 at this layer


@pytest.fixture(scope="module")
def M(model, vector):
    """Log-odds whose top tokens are those the vector promotes (as Def. 3.2 gives on a real model)."""
    p = next_token_probs(model, vector, PROMPTS[0], [0.0, 4.0], chat=True).double()
    return p[1].log() - p[0].log()


# ----------------------------------------------------------------------------- selection rules


def test_sweet_spot_rule_picks_the_constrained_argmax():
    alphas = np.linspace(0, 10, 11)
    mass = np.exp(-0.5 * (alphas - 7) ** 2)  # target mass peaks at alpha = 7
    kl = 0.05 * alphas ** 2  # distortion grows: kl <= 1 up to alpha = 4.47
    assert constrained_argmax(mass, kl, 1.0) == 4  # the budget binds: alpha 4, not the unconstrained peak 7
    assert constrained_argmax(mass, kl, 100.0) == 7  # a loose budget: the peak itself
    # A later dip below the budget does not count: feasibility is the run from alpha = 0.
    dip = kl.copy()
    dip[8] = 0.0
    assert constrained_argmax(mass, dip, 1.0) == 4
    # Entropy floor: the distribution collapses (entropy falls) from alpha = 3 on.
    entropy = np.where(alphas < 3, 2.0, 0.1)
    assert constrained_argmax(mass, kl, 1.0, entropy=entropy, entropy_floor=1.0) == 2
    assert constrained_argmax(mass, kl, 1.0, entropy=entropy, entropy_floor=5.0) is None  # alpha = 0 already fails
    # Ties go to the smaller alpha: a flat objective means "do not steer".
    assert constrained_argmax(np.ones(11), kl, 1.0) == 0
    assert feasible_run(kl, 1.0).tolist() == [True] * 5 + [False] * 6


def test_iso_kl_crossing_recovers_a_known_alpha():
    def kl(a):
        return (a / 2.0) ** 2  # equals 1 nat at alpha = 2

    grid = np.linspace(0, 5, 5)  # 0, 1.25, 2.5, ...: 2 is not a grid point
    values = kl(grid)
    alpha, i = first_crossing(grid, values, 1.0)
    assert i == 1 and 1.25 < alpha < 2.5 and alpha != pytest.approx(2.0, abs=0.05)  # the chord is off ...
    refined, measured = bisect_crossing(kl, grid[i], grid[i + 1], values[i], values[i + 1], 1.0, 30)
    assert refined == pytest.approx(2.0, abs=1e-6) and len(measured) == 30  # ... bisection recovers it
    # A linear curve is recovered exactly by interpolation alone.
    assert first_crossing(grid, 0.4 * grid, 1.0) == (pytest.approx(2.5), 1)
    # The first crossing counts, and a curve that never reaches the target says so.
    assert first_crossing([0, 1, 2, 3], [0, 2, 0.5, 3], 1.0)[0] == pytest.approx(0.5)
    assert first_crossing([0, 1, 2], [0, 0.1, 0.2], 1.0) == (2.0, None)


def test_next_token_readings_and_peak_order_follow_thm_3_3():
    # The UFM closed form p(z | alpha) = p0(z) e^{alpha M(z)} / Z (Lemma B.3): Thm 3.3 holds exactly.
    M = torch.tensor([3.0, 2.0, 1.0, 0.5, -3.0, -4.0], dtype=torch.float64)  # E[M] < 0.5 at alpha = 0
    alphas = torch.linspace(0, 6, 241, dtype=torch.float64)
    probs = torch.softmax(alphas[:, None] * M[None, :], dim=-1)  # p0 uniform
    r = next_token_readings(probs, torch.tensor([0, 1]))
    assert r["kl"][0] == 0 and np.all(np.diff(r["kl"]) > 0)
    assert r["entropy"][0] == pytest.approx(math.log(6)) and r["target_mass"][0] == pytest.approx(2 / 6)
    report = peak_report(alphas, probs, torch.tensor([0, 1]), alpha=1.0, top_k=6)
    # Token 0 (max M) only increases; token 1 (target) bumps after tokens 2, 3 (off-target); 4, 5 only fall.
    assert report["n_target_bumps"] == 1 and report["n_off_target_bumps"] == 2
    assert report["target_peaks_later"] is True
    lo, hi = report["off_target_peak_alpha"], report["target_peak_alpha"]
    assert lo < hi
    assert peak_report(alphas, probs, torch.tensor([0, 1]), alpha=(lo + hi) / 2, top_k=6)["between_peaks"] is True
    assert peak_report(alphas, probs, torch.tensor([0, 1]), alpha=hi + 1, top_k=6)["between_peaks"] is False


# ----------------------------------------------------------------------------- per-token KL


def test_token_kl_matches_a_plain_steered_forward(model, vector):
    prompts = [model.token_ids(p, chat=True) for p in PROMPTS]
    completions = [model.token_ids("i am happy", chat=False)[1:], model.token_ids("so", chat=False)[1:]]
    alphas = [3.0, 3.0]
    got = token_kl(model, vector, prompts, completions, alphas)
    for p, c, a, kl in zip(prompts, completions, alphas, got):
        ids = torch.tensor([p + c])
        with torch.no_grad(), steer(model, vector, LAYER, a):
            steered = torch.log_softmax(model.hf(input_ids=ids).logits[0].double(), -1)
        with torch.no_grad():
            plain = torch.log_softmax(model.hf(input_ids=ids).logits[0].double(), -1)
        positions = range(len(p) - 1, len(p) + len(c) - 1)  # the logits that predict the completion tokens
        want = [float((steered[t].exp() * (steered[t] - plain[t])).sum()) for t in positions]
        assert kl.shape == (len(c),)
        np.testing.assert_allclose(kl, want, rtol=1e-4, atol=1e-6)
    assert np.all(token_kl(model, vector, prompts, completions, [0.0, 0.0])[0] == 0)


# ----------------------------------------------------------------------------- every method on a tiny model


BUDGETS = {"sweet-spot": 0.08, "curvature": 0.02, "iso-kl": 0.5, "grid-judge": 1.0, "global": 1.0}


@pytest.fixture(scope="module")
def recs(model, vector, M):
    out = {"sweet-spot": recommend_alpha(model, vector, PROMPTS, SweetSpot(log_odds=M, n_target=5, alphas=GRID),
                                         budget=BUDGETS["sweet-spot"], concept="joy")}
    out["curvature"] = recommend_alpha(model, vector, PROMPTS, Curvature(), budget=BUDGETS["curvature"],
                                       concept="joy")
    for method in (GridJudge(judge="lexicon", refine_steps=2, **SMALL), Global(judge="lexicon", **SMALL),
                   IsoKL(refine_steps=2, **SMALL)):
        out[method.name] = recommend_alpha(model, vector, PROMPTS, method, budget=BUDGETS[method.name],
                                           concept="joy", positive=JOYFUL, negative=PLAIN)
    return out


def test_every_method_gives_one_alpha_per_prompt_with_its_curve(recs):
    for method in METHODS:
        rec = recs[method]
        t = rec.table
        assert len(t) == len(PROMPTS) and set(t["method"]) == {method}
        assert {"model", "concept", "layer", "setting", "alpha", "prompt_index", "budget"} <= set(t.columns)
        assert t["alpha"].between(0, max(GRID)).all() or method == "curvature"  # curvature: no grid
        assert len(rec.curve) and set(rec.curve["method"]) == {method}
        assert rec.summary["seconds"] > 0 and "seconds" not in t.columns  # timings: JSON only, tables reproducible


def test_sweet_spot_stays_within_its_budget_and_bisects_to_its_edge(recs):
    rec = recs["sweet-spot"]
    for _, row in rec.table.iterrows():
        assert row["kl"] <= BUDGETS["sweet-spot"]
        curve = rec.curve[rec.curve["prompt_index"] == row["prompt_index"]].sort_values("alpha")
        chosen = curve[curve["chosen"]]
        assert len(chosen) == 1 and chosen["alpha"].iloc[0] == row["alpha"]
        # Nothing feasible on the curve has more target mass than the chosen alpha.
        assert row["target_mass"] >= curve[curve["feasible"]]["target_mass"].max() - 1e-12
    # On the first prompt the target mass still rises where the budget binds (between grid alphas 2 and 4):
    # two bisection steps put the alpha within a quarter grid step of the edge.
    first = rec.table.iloc[0]
    curve = rec.curve[rec.curve["prompt_index"] == 0]
    assert first["status"] == "ok" and len(curve) == len(GRID) + 2
    assert 2.0 <= first["alpha"] < 4.0
    nearest_infeasible = curve[~curve["feasible"] & (curve["alpha"] > first["alpha"])]["alpha"].min()
    assert nearest_infeasible - first["alpha"] <= (4.0 - 2.0) / 4 + 1e-12
    assert first["target_mass"] > first["target_mass0"]
    assert "theory" in rec.summary and {"between_peaks", "target_peak_alpha"} <= set(rec.table.columns)


def test_judged_methods_respect_the_fluency_budget(recs):
    grid_judge, glob = recs["grid-judge"], recs["global"]
    assert glob.table["alpha"].nunique() == 1  # one alpha for all prompts
    assert set(grid_judge.table["alpha"]) <= set(GRID) and set(glob.table["alpha"]) <= set(GRID)
    for rec, scope in ((grid_judge, None), (glob, -1)):
        chosen = rec.curve[rec.curve["chosen"]]
        assert (chosen["p95_kl"] <= BUDGETS["global"]).all()
        for _, pick in chosen.iterrows():  # the judge's best within the run of grid alphas that keep the budget
            own = rec.curve[rec.curve["prompt_index"] == pick["prompt_index"]].sort_values("alpha")
            run = own[np.cumprod(own["p95_kl"] <= BUDGETS["global"]).astype(bool)]
            assert pick["concept_p"] == run["concept_p"].max() and pick["alpha"] == run[
                run["concept_p"] == run["concept_p"].max()]["alpha"].min()
        if scope is not None:
            assert chosen["prompt_index"].tolist() == [scope]
    assert glob.summary["judge_accuracy"]["judge"] == "lexicon"


def test_iso_kl_lands_on_the_budget(recs):
    rec = recs["iso-kl"]
    pooled = rec.curve[rec.curve["prompt_index"] == -1].sort_values("alpha")
    alpha = rec.summary["alpha"]
    assert rec.table["alpha"].nunique() == 1 and rec.table["alpha"].iloc[0] == alpha
    assert rec.summary["status"] == "ok"
    below = pooled[pooled["p95_kl"] < BUDGETS["iso-kl"]]["alpha"]
    above = pooled[pooled["p95_kl"] >= BUDGETS["iso-kl"]]["alpha"]
    # The bracket around the crossing: measured below the budget just before it, at or above just after.
    assert below.max() < alpha < above.min() and above.min() - below.max() <= (1.0 - 0.5) / 4 + 1e-12
    assert len(pooled) == len(GRID) - 1 + 2  # the positive grid (0 needs no generation) plus two bisection points


def test_curvature_is_the_second_derivative_of_the_measured_kl(model, vector):
    """Thm 3.8 on a prompt: KL(p_0 || p_alpha) = kappa alpha^2 / 2 + O(alpha^3), kappa from one forward-mode pass."""
    kappa = prompt_curvature(model, vector, PROMPTS, chat=True)
    assert kappa.shape == (len(PROMPTS),) and np.all(kappa > 0)
    for prompt, k in zip(PROMPTS, kappa):
        h = 1e-2 * budget_alpha(1.0, k)  # small against the alpha where the KL is 1 nat
        kl = prompt_kl(model, vector, prompt, [h, 2 * h], chat=True)
        np.testing.assert_allclose(2 * kl / np.square([h, 2 * h]), k, rtol=2e-2)
        # Steering the last position only is another (smaller) curvature: the direction is zero elsewhere.
    last = prompt_curvature(model, vector, PROMPTS, chat=True, positions="last")
    assert np.all(last < kappa)


def test_budget_alpha_and_departure_on_known_curves():
    assert budget_alpha(2.0, 4.0) == pytest.approx(1.0)  # 4 a^2 / 2 = 2 at a = 1
    assert budget_alpha(3.0, 2.0, slope=2.0) == pytest.approx(1.0)  # 2 a + a^2 = 3 at a = 1
    with pytest.raises(InputError, match="not positive"):
        budget_alpha(1.0, -0.5)
    a = np.array([0.5, 1.0, 1.5, 2.0])
    measured = 0.5 * a ** 2 * (1 + 0.15 * np.maximum(a - 1.0, 0))  # +7.5% at 1.5, +15% at 2: departs at 2
    d = departure(a, measured, 0.0, 1.0)
    assert d == {"quadratic_up_to": 1.5, "departs_at": 2.0}
    assert departure(a, 0.5 * a ** 2, 0.0, 1.0)["departs_at"] is None


def test_curvature_method_lands_on_its_budget(recs, model, vector, tmp_path):
    from steerstrength.corpus import load_corpus

    rec = recs["curvature"]
    t = rec.table
    assert (t["measured_over_predicted"].between(0.8, 1.25)).all()  # a small budget: the quadratic holds
    assert t["alpha"].tolist() == pytest.approx([budget_alpha(BUDGETS["curvature"], k) for k in t["kappa"]])
    for pi in range(len(PROMPTS)):
        own = rec.curve[rec.curve["prompt_index"] == pi].sort_values("alpha")
        assert len(own) == len(QUADRATIC_CHECK) and own["chosen"].sum() == 1
        assert own[own["chosen"]]["predicted"].iloc[0] == pytest.approx(BUDGETS["curvature"])
    # Scope corpus: one alpha from Delta CE's curvature and slope on the texts; its measured Delta CE is the budget's.
    # The texts are the model's own samples (Thm 3.8's kappa > 0 is an expectation under the model).
    corpus = load_corpus(None, model=model, n_samples=8, sample_tokens=80, seed=0, cache_dir=tmp_path)
    glob = recommend_alpha(model, vector, PROMPTS, Curvature(scope="corpus", corpus=corpus), budget=0.01)
    assert glob.table["alpha"].nunique() == 1 and set(glob.curve["prompt_index"]) == {-1}
    assert 0.8 < glob.table["measured_over_predicted"].iloc[0] < 1.25
    with pytest.raises(InputError, match="corpus"):
        recommend_alpha(model, vector, PROMPTS, Curvature(scope="corpus"))
    with pytest.raises(InputError, match="curvature_scope"):
        recommend_alpha(model, vector, PROMPTS, Curvature(scope="everywhere"))


def test_sweet_spot_between_rule_stays_within_the_budget_below_the_peaks_midpoint(model, vector, M):
    fine = np.linspace(0, 12, 49).tolist()
    for budget in (BUDGETS["sweet-spot"], 50.0):
        mass = recommend_alpha(model, vector, PROMPTS, SweetSpot(log_odds=M, n_target=5, alphas=fine), budget=budget)
        between = recommend_alpha(model, vector, PROMPTS, SweetSpot(log_odds=M, n_target=5, alphas=fine,
                                                                    rule="between"), budget=budget)
        for (_, m), (_, b) in zip(mass.table.iterrows(), between.table.iterrows()):
            mid = 0.5 * (m["off_target_peak_alpha"] + m["target_peak_alpha"])
            assert b["kl"] <= budget
            if math.isnan(mid):
                assert b["status"].startswith("no bump peaks") and b["alpha"] == m["alpha"]
            elif b["status"] == "between the peaks":
                assert b["alpha"] == pytest.approx(mid) and b["between_peaks"] is True
            else:
                assert b["alpha"] < mid
    with pytest.raises(InputError, match="sweet_spot_rule"):
        recommend_alpha(model, vector, PROMPTS, SweetSpot(log_odds=M, rule="peak"))


def test_save_writes_tables_json_texts_and_figure(recs, tmp_path):
    from steerstrength.plots import plot_recommendations

    paths = recs["global"].save(tmp_path)
    paths["figure"] = plot_recommendations(recs["global"].table, recs["global"].curve, tmp_path / "recommend.png")
    assert pd.read_parquet(paths["table"])["method"].tolist() == ["global"] * len(PROMPTS)
    assert len(pd.read_parquet(paths["curve"]))
    summary = json.loads(paths["summary"].read_text())
    assert summary["methods"] == ["global"] and list(summary["per_vector"]) == [f"joy/{LAYER}/global"]
    assert paths["figure"].stat().st_size > 1000
    rows = [json.loads(line) for line in paths["generations"].read_text().splitlines()]
    assert len(rows) == len(PROMPTS) * len(GRID) * 2 and {"completion", "p95_kl", "judged"} <= set(rows[0])


def test_bad_input_is_one_clear_error(model, vector):
    with pytest.raises(InputError, match="unknown method"):
        method_options(["magic"])
    with pytest.raises(InputError, match="option objects"):
        recommend_alpha(model, vector, PROMPTS, "sweet-spot")  # a name is not an option object
    with pytest.raises(InputError, match="prompt list is empty"):
        recommend_alpha(model, vector, [], IsoKL())
    for bad in (-1.0, 0.0, float("nan"), float("inf")):
        with pytest.raises(InputError, match="budget"):
            recommend_alpha(model, vector, PROMPTS, budget=bad)
    with pytest.raises(InputError, match="alphas must be >= 0"):
        recommend_alpha(model, vector, PROMPTS, SweetSpot(alphas=[-1, 0, 1]), positive=JOYFUL, negative=PLAIN)
    with pytest.raises(InputError, match="log-odds"):
        recommend_alpha(model, vector, PROMPTS, SweetSpot())
    with pytest.raises(InputError, match="name the concept"):
        recommend_alpha(model, vector, PROMPTS, Global(judge="lexicon", **SMALL))
    with pytest.raises(InputError, match="positions='all'"):
        recommend_alpha(model, vector, PROMPTS, IsoKL(), positions="last")


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def files(tmp_path_factory, model, vector):
    root = tmp_path_factory.mktemp("recommend")
    model.hf.save_pretrained(root / "model")
    model.tokenizer.save_pretrained(root / "model")
    SteeringVectors({LAYER: vector, 2: -vector}, dict(concept="joy", setting="random")).save(root / "v.safetensors")
    (root / "p.txt").write_text("\n".join(JOYFUL) + "\n")
    (root / "n.txt").write_text("\n".join(PLAIN) + "\n")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def run_cli(args, monkeypatch, capsys):
    """`steerstrength --quiet recommend ARGS` through the shared helper: (exit code, stderr)."""
    from cliutil import run_cli as run

    code, _, err = run(["recommend", *args], monkeypatch, capsys, quiet=True)
    return code, err


def test_cli_writes_its_table_and_errors_exit_2(files, monkeypatch, capsys, tmp_path):
    common = ["--model", files / "model", "--device", "cpu", "--vectors", files / "v.safetensors",
              "--prompts", files / "prompts.txt", "-p", files / "p.txt", "-n", files / "n.txt"]
    out = tmp_path / "out"
    code, err = run_cli(common + ["--layer", LAYER, "--method", "sweet-spot", "--method", "global", "--method",
                                  "curvature", "--budget", "0.5",
                                  "--alphas", "0,2,4,8", "--completions", "1", "--max-new-tokens", "3",
                                  "--judge", "lexicon", "--out", out], monkeypatch, capsys)
    assert code in (0, None), err
    table = pd.read_parquet(out / "recommend.parquet")
    assert sorted(set(table["method"])) == ["curvature", "global", "sweet-spot"] and len(table) == 3 * len(PROMPTS)
    assert (out / "recommend.png").is_file() and (out / "recommend.json").is_file()
    for args, message in ((["--layer", LAYER, "--method", "magic"], "unknown method"),
                          (["--method", "sweet-spot"], "pick one with --layer"),
                          (["--layer", LAYER, "--budget", "-1"], "budget"),
                          (["--layer", LAYER, "--method", "curvature", "--curvature-scope", "all"], "--curvature-scope"),
                          (["--layer", LAYER, "--sweet-spot-rule", "peak"], "--sweet-spot-rule"),
                          (["--layer", LAYER, "--corpus", "wikipedia"], "--corpus feeds curvature"),
                          (["--layer", 7], "layer")):
        code, err = run_cli(common + args + ["--out", tmp_path / "bad"], monkeypatch, capsys)
        assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------- the pipeline stage


def test_pipeline_stage_writes_its_tables(model, vector, tmp_path):
    from contextlib import contextmanager
    from types import SimpleNamespace

    from steerstrength.config import preset
    from steerstrength.pipeline import stage_recommend
    from steerstrength.runs import RunDir
    from steerstrength.stages import row_labels

    cfg = preset("demo")
    cfg.concept.judge = "lexicon"
    cfg.recommend.n_prompts, cfg.recommend.completions, cfg.recommend.max_new_tokens = 2, 1, 3

    @contextmanager
    def progress(description, total):
        yield lambda n=1: None

    sv = SteeringVectors({LAYER: vector}, dict(concept="joy"))
    ctx = SimpleNamespace(cfg=cfg, concepts=list(cfg.concepts), one_vector=None, run=RunDir(tmp_path), model=model,
                          layers=[LAYER], vectors=lambda concept: sv,
                          prompt_texts=lambda concept: (JOYFUL, PLAIN), progress=progress, log=lambda message: None,
                          labels=lambda concept: row_labels(model.name, concept, cfg.setting, cfg.positions))
    paths = stage_recommend(ctx)
    assert [p.name for p in paths] == ["recommend.parquet", "recommend_curve.parquet", "recommend_generations.jsonl",
                                       "recommend.json", "recommend.set.json"]
    table = pd.read_parquet(paths[0])
    assert sorted(set(table["method"])) == ["curvature", "global", "iso-kl", "sweet-spot"] and len(table) == 4 * 2
    assert {"model", "concept", "layer", "setting", "alpha", "alpha_resid"} <= set(table.columns)
    assert "seconds" not in table.columns
    summary = json.loads(paths[3].read_text())
    assert summary["budget"] == cfg.recommend.kl_budget and any("grid-judge" in n for n in summary["notes"])
    assert summary["methods"] == ["sweet-spot", "curvature", "iso-kl", "global"]
    # iso-kl and global read one grid of generations: each counts its time
    shared = [summary["per_vector"][f"joy/{LAYER}/{m}"]["seconds_shared_generations"] for m in ("iso-kl", "global")]
    assert shared[0] == shared[1] > 0


def test_the_cli_and_the_run_write_the_same_tables(files, monkeypatch, capsys, tmp_path):
    """`steerstrength recommend` and the run's recommend stage are one function (stages.recommend_stage): the same
    inputs give the same recommend.parquet, recommend_curve.parquet and recommend_generations.jsonl."""
    from steerstrength.config import preset
    from steerstrength.io import write_jsonl
    from steerstrength.loading import load_model
    from steerstrength.pipeline import Context, stage_recommend
    from steerstrength.prompts import rows_from_texts
    from steerstrength.runs import RunDir
    from steerstrength.stages import no_progress

    # The run: the demo preset with small sizes, its prompts from the same file, P / N and the layer's vector.
    cfg = preset("demo")
    cfg.concepts, cfg.setting, cfg.seed = ["joy"], "random", 0
    cfg.concept.judge, cfg.concept.prompts_file = "lexicon", str(files / "prompts.txt")
    r = cfg.recommend
    r.kl_budget, r.completions, r.max_new_tokens, r.refine_steps, r.sweet_spot_refine_steps = 0.5, 1, 3, 1, 1
    run = RunDir(tmp_path / "run")
    stored = SteeringVectors.load(files / "v.safetensors")
    SteeringVectors({LAYER: stored.vectors[LAYER]}, dict(stored.meta)).save(run.path("vectors", "joy.safetensors"))
    for kind, texts in (("positive", JOYFUL), ("negative", PLAIN)):
        write_jsonl(run.path("prompts", f"joy.{kind}.jsonl"), rows_from_texts(texts, "joy", kind))
    lm = load_model(str(files / "model"), device="cpu")
    ctx = Context(cfg=cfg, run=run, progress=no_progress, log=lambda message: None, model=lm, layers=[LAYER])
    stage_recommend(ctx)

    # The command: the same inputs as options (the preset supplies the rest, as it does for the run).
    out = tmp_path / "cli"
    code, err = run_cli(["--model", files / "model", "--device", "cpu", "--vectors", files / "v.safetensors",
                         "--layer", LAYER, "--prompts", files / "prompts.txt", "-p", files / "p.txt", "-n",
                         files / "n.txt", "--method", "sweet-spot", "--method", "curvature", "--method", "iso-kl",
                         "--method", "global",
                         "--judge", "lexicon", "--budget", "0.5", "--completions", "1", "--max-new-tokens", "3",
                         "--refine-steps", "1", "--preset", "demo", "--out", out], monkeypatch, capsys)
    assert code in (0, None), err

    tables = run.root / "tables"
    for name in ("recommend.parquet", "recommend_curve.parquet"):
        by_run, by_cli = pd.read_parquet(tables / name), pd.read_parquet(out / name)
        assert len(by_run) and sorted(set(by_run["method"])) == ["curvature", "global", "iso-kl", "sweet-spot"]
        pd.testing.assert_frame_equal(by_cli, by_run, check_exact=True)
    texts = [pd.DataFrame([json.loads(line) for line in (d / "recommend_generations.jsonl").read_text().splitlines()])
             for d in (tables, out)]
    assert len(texts[0]) > len(PROMPTS) * cfg.recommend.n_alphas  # the shared grid, and iso-kl's bisection
    pd.testing.assert_frame_equal(texts[1], texts[0], check_exact=True)
    summaries = [json.loads((d / "recommend.json").read_text()) for d in (tables, out)]
    for key in ("budget", "methods", "prompts"):
        assert summaries[0][key] == summaries[1][key]
    assert list(summaries[0]["per_vector"]) == list(summaries[1]["per_vector"])
