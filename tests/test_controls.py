"""Controls are rows: random directions of v's norm, orthogonal to v, steered through every stage beside v."""

import numpy as np
import pandas as pd
import pytest
import torch

from steerstrength.vectors import SteeringVector, direction_of, random_controls


def test_random_controls_are_norm_matched_orthogonal_to_v_and_seeded():
    v = SteeringVector(torch.randn(64, generator=torch.Generator().manual_seed(1)) * 3.0, 5, 2.5, {"concept": "joy"})
    controls = random_controls(v, 6, seed=0)
    assert [direction_of(c) for c in controls] == [f"random-{k}" for k in range(6)]
    assert direction_of(v) == "v"
    unit = v.vector.double() / v.vector.double().norm()
    for c in controls:
        assert c.layer == v.layer and c.residual_norm == v.residual_norm
        assert float(c.vector.double().norm()) == pytest.approx(float(v.vector.double().norm()), rel=1e-5)
        assert abs(float(c.vector.double() @ unit)) < 1e-5 * float(v.vector.double().norm())
    # distinct directions, not copies
    gram = torch.stack([c.vector.double() / c.vector.double().norm() for c in controls])
    off = gram @ gram.T - torch.eye(6, dtype=torch.float64)
    assert off.abs().max() < 0.9
    again = random_controls(v, 3, seed=0)  # the same first ones for any n: reruns and larger K extend, not redraw
    assert all(torch.equal(a.vector, b.vector) for a, b in zip(again, controls))
    other = random_controls(v, 1, seed=1)
    assert not torch.allclose(other[0].vector, controls[0].vector)


# ----------------------------------------------------------------------------- verdict logic on synthetic inputs

from steerstrength import verdicts as V  # noqa: E402


def noisy(rng, centre, n, sd=0.05):
    return centre + sd * rng.standard_normal(n)


def test_a_clear_effect_against_controls_agrees():
    rng = np.random.default_rng(0)
    v = noisy(rng, 0.55, 24)
    controls = np.stack([noisy(rng, 0.02, 24) for _ in range(8)])
    res = V.effect_verdict(v, controls, V.CONCEPT_WORD_LEAD, seed=0)
    assert res["verdict"] == V.AGREES
    assert res["low"] > V.CONCEPT_WORD_LEAD and res["estimate"] == pytest.approx(0.53, abs=0.05)


def test_no_effect_against_controls_disagrees():
    rng = np.random.default_rng(1)
    v = noisy(rng, 0.02, 40, 0.02)
    controls = np.stack([noisy(rng, 0.02, 40, 0.02) for _ in range(8)])
    res = V.effect_verdict(v, controls, V.CONCEPT_WORD_LEAD, seed=0)
    assert res["verdict"] == V.DISAGREES and res["high"] < V.CONCEPT_WORD_LEAD


def test_a_small_sample_is_inconclusive_and_says_how_many_more_would_decide():
    rng = np.random.default_rng(2)
    v = noisy(rng, 0.25, 4, 0.3)
    controls = np.stack([noisy(rng, 0.0, 4, 0.3) for _ in range(4)])
    res = V.effect_verdict(v, controls, V.CONCEPT_WORD_LEAD, seed=0)
    assert res["verdict"] == V.INCONCLUSIVE
    assert res["low"] < V.CONCEPT_WORD_LEAD < res["high"]
    assert res["n_more"] >= 1 and np.isfinite(res["n_more"])
    # two units decide nothing, whatever their values
    assert V.effect_verdict([0.9, 0.9], np.zeros((4, 2)), 0.1)["verdict"] == V.INCONCLUSIVE


def test_one_direction_spread_widens_the_interval_past_the_threshold():
    """v is one direction: a v that sits inside the random directions' spread is not concept-specific, however
    many contexts agree on the contrast with their mean."""
    rng = np.random.default_rng(3)
    levels = [-0.4, 0.3, -0.2, 0.1]  # random directions differ from each other by as much as v from their mean
    controls = np.stack([noisy(rng, m, 30, 0.01) for m in levels])
    v = noisy(rng, 0.2, 30, 0.01)
    res = V.effect_verdict(v, controls, V.SPEARMAN_LEAD, seed=0)
    assert res["verdict"] == V.INCONCLUSIVE and res["wider"] == "directions"


def test_level_and_outlier_verdicts():
    assert V.level_verdict(np.full(10, 1.0), 0.75)["verdict"] == V.AGREES
    assert V.level_verdict(np.full(10, 0.5), 0.75)["verdict"] == V.DISAGREES
    far = V.outlier_verdict(10.0, [1.0, 1.1, 0.9, 1.05], V.CURVATURE_RATIO)
    assert far["verdict"] == V.AGREES and far["estimate"] == pytest.approx(np.log(10 / np.exp(np.mean(np.log(
        [1.0, 1.1, 0.9, 1.05])))))
    same = V.outlier_verdict(1.0, [1.0, 1.01, 0.99, 1.0, 1.02, 0.98], V.CURVATURE_RATIO)
    assert same["verdict"] == V.DISAGREES
    assert V.outlier_verdict(10.0, [1.0], V.CURVATURE_RATIO)["verdict"] == V.INCONCLUSIVE


def _scores(rate, n_prompts, n_completions=8, seed=0):
    """Synthetic concept_scores rows: at each alpha, each prompt's completions judged with probability rate(alpha)."""
    rng = np.random.default_rng(seed)
    rows = [dict(prompt_index=p, alpha=a, judged=bool(rng.random() < rate(a)), score=0.0, degenerate=False,
                 judge="probe")
            for a in np.linspace(-1, 1, 9) for p in range(n_prompts) for _ in range(n_completions)]
    return pd.DataFrame(rows)


def _sigmoid(frame):
    from steerstrength.metrics.concept import concept_curve, curve_summary

    cur = next(iter(curve_summary(concept_curve(frame)).values()))
    return V.sigmoid_verdict(frame, cur, n_boot=500, seed=0)


def test_thm_3_6_gets_an_interval_over_prompts():
    rising = _sigmoid(_scores(lambda a: 0.5 + 0.45 * np.tanh(3 * a), 12))
    assert rising["verdict"] == V.AGREES and V.SIGMOID_SPEARMAN < rising["low"] <= rising["high"] <= 1
    flat = _sigmoid(_scores(lambda a: 0.3, 12))
    assert flat["verdict"] in (V.DISAGREES, V.INCONCLUSIVE) and flat["low"] < V.SIGMOID_SPEARMAN
    never = _sigmoid(_scores(lambda a: 0.0, 12))  # the judge finds the concept at no alpha: no rise
    assert never["verdict"] == V.DISAGREES and never["high"] == 0.0
    few = _sigmoid(_scores(lambda a: 0.5 + 0.3 * np.tanh(a), 2, n_completions=2))
    assert few["verdict"] == V.INCONCLUSIVE and few["n_more"] > 0


def test_mmlu_drops_are_paired_over_questions():
    costly = np.column_stack([np.ones(40), np.ones(40)])  # every question lost at both ends
    assert V.accuracy_drop_verdict(costly, n_boot=500, seed=0)["verdict"] == V.AGREES
    harmless = np.zeros((40, 2))
    harmless[:20, 0] = -1  # one end gains on half the questions
    assert V.accuracy_drop_verdict(harmless, n_boot=500, seed=0)["verdict"] == V.DISAGREES
    noisy = np.array([[1, 1], [0, -1], [1, 0]], dtype=float)
    res = V.accuracy_drop_verdict(noisy, n_boot=500, seed=0)
    assert res["verdict"] == V.INCONCLUSIVE and res["low"] <= 0 <= res["high"]


def test_decide_reads_the_interval_against_the_threshold():
    assert V.decide(0.2, 0.4, 0.1) == V.AGREES
    assert V.decide(-0.1, 0.05, 0.1) == V.DISAGREES
    assert V.decide(0.05, 0.3, 0.1) == V.INCONCLUSIVE
    assert V.more_samples(0.15, 0.05, 0.25, 0.1, 10) == pytest.approx(10 * (0.1 / 0.05) ** 2 - 10, abs=1)


# ----------------------------------------------------------------------------- a tiny run: rows, readers, null concept

from test_pipeline import config, run, tiny_dir  # noqa: E402,F401 - the fixture

CONTROLS = ["controls.n_random=3", "controls.n_xent=2", "controls.n_concept=2", "controls.n_mmlu=2",
            "tokens.n_contexts=6"]


@pytest.fixture(scope="module")
def null_run(tiny_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("null")
    statuses = run(config(tiny_dir, *CONTROLS, "prompts.null_split=true"), out)
    assert statuses["report"][0] == "done"
    return out


def test_controls_are_rows_of_every_table_and_readers_see_v(null_run):
    from steerstrength.run_tables import RunTables

    want = {"tokens": 4, "tokens_top": 4, "limit": 4, "xent": 3, "concept_scores": 3, "concept_curve": 3, "mmlu": 3,
            "mmlu_questions": 3, "depth": 2, "depth_top": 2}  # each stage's own count of random directions
    for name, n in want.items():
        t = pd.read_parquet(null_run / "tables" / f"{name}.parquet")
        assert sorted(t["direction"].unique()) == [f"random-{k}" for k in range(n - 1)] + ["v"], name
        assert set(RunTables(null_run).table(name)["direction"]) == {"v"}, name
    # the controls of one layer are steered on v's grid (same norm, same residual norm: same raw alphas)
    top = pd.read_parquet(null_run / "tables" / "tokens_top.parquet")
    ends = top[top["side"] == "alpha_max"].groupby("direction")["alpha"].max()
    assert ends.max() == pytest.approx(ends.min(), rel=1e-6)


def test_a_null_concept_never_reads_agrees_on_a_concept_specific_verdict(null_run):
    """P and N a random split of one set of texts: whatever v does is not a concept."""
    P = [r["text"] for r in pd.read_json(null_run / "prompts" / "joy.positive.jsonl", lines=True).to_dict("records")]
    N = [r["text"] for r in pd.read_json(null_run / "prompts" / "joy.negative.jsonl", lines=True).to_dict("records")]
    from steerstrength.prompts import curated_texts

    pooled = set(curated_texts("joy", "positive")) | set(curated_texts("joy", "negative"))
    assert set(P) | set(N) <= pooled and set(P) & set(curated_texts("joy", "negative"))  # a mix, not the concept
    table = pd.read_parquet(null_run / "tables" / "verdicts.parquet")
    specific = table[table["kind"] == V.SPECIFIC]
    assert len(specific) >= 5, specific[["claim", "verdict"]]
    assert not (specific["verdict"] == V.AGREES).any(), specific[["claim", "verdict", "why"]].to_string()


def test_the_report_says_each_verdict_with_its_kind_rule_and_measured_contrast(null_run):
    page = (null_run / "report.html").read_text()
    assert "Verdicts with controls" in page and "could not be read" not in page
    assert "<b>Generic</b>" in page and "<b>Concept-specific</b>" in page
    assert "random directions of the same norm at layer 1" in page  # a measured contrast, not a conjecture
    assert "does not carry" not in page and "Assumption 1" not in page
    table = pd.read_parquet(null_run / "tables" / "verdicts.parquet")
    assert set(table["verdict"]) <= {V.AGREES, V.DISAGREES, V.INCONCLUSIVE}
    assert set(table["kind"]) == {V.GENERIC, V.SPECIFIC}
