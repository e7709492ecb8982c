"""Figures from a run directory: every figure drawn from the tables, missing stages named, no model loaded.

The synthetic run is built with the metric modules' own table writers (TokenCurves.curves_frame, LimitCheck.frame,
XentSweep.frame, concept_curve, accuracy_table, log_odds_frame), over the closed form of Lemma B.3:
p_alpha(z) ∝ p(z) exp(alpha s M(z)), so the curves have the bumps of Thm 3.3.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from steerstrength.config import build_config, to_toml
from steerstrength.errors import InputError
from steerstrength.io import write_json, write_parquet
from steerstrength.metrics.concept import concept_curve, tanh_curve
from steerstrength.grid import AlphaGrid
from steerstrength.metrics.limits import LimitCheck
from steerstrength.metrics.logodds import log_odds_analysis, log_odds_frame
from steerstrength.metrics.mmlu import accuracy_table
from steerstrength.metrics.tokens import CurveSet, TokenCurves, shape_classes
from steerstrength.metrics.xent import XentSweep, plateau, quadratic_fit
from steerstrength.plots import (
    N_TOP,
    draw_all,
    fig_concept_xent,
    fig_delta_p,
    save_figure,
    token_label,
)
from steerstrength.run_tables import RunTables
from steerstrength.vectors import SteeringVectors

WORDS = [" joy", " happy", " glad", " delight", " smile", " cheer", " bliss", " grin", " sad", " gloom", " grief",
         " dull", " the", " a", " and", " of", "\n", " coffee", " morning", " bus", " rain", " table", " dog", " cat",
         " walk", " tired", " calm", " fine", " ok", " good", " bad", " very", ",", ".", "!", " I", " we", " it",
         " so", " then"]
V = len(WORDS)
CONTEXTS = [dict(id="neutral-01", kind="neutral", text="I walked into the kitchen this morning"),
            dict(id="neutral-02", kind="neutral", text="The bus was a few minutes late"),
            dict(id="joy-1", kind="concept", text="We won the championship!")]
ALL_STAGES = ("prompts", "vectors", "tokens", "logodds", "depth", "limit", "xent", "concept", "mmlu", "recommend")
MODEL = "fake-lm"
SETTING = "random"


class FakeModel:
    """What the frame writers need from a model: its name and token strings."""

    name = MODEL
    vocab_size = V

    def token_strings(self, ids):
        return [WORDS[int(i)] for i in ids]


def log_odds_of(concept: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(map(ord, concept)))
    M = torch.randn(V, generator=g, dtype=torch.float64)
    M[:8] += 3.0  # the concept words
    return M


def layer_scale(layer: int) -> float:
    return 0.01 * (1 + layer / 4)


def next_token_probs(concept: str, layer: int, c: int, alphas: torch.Tensor) -> torch.Tensor:
    """Lemma B.3: p(z|context) e^{alpha s M(z)} / Z, [A, V]."""
    g = torch.Generator().manual_seed(100 * c + layer)
    logp0 = torch.log_softmax(2 * torch.randn(V, generator=g, dtype=torch.float64), -1)
    return torch.softmax(logp0[None] + alphas[:, None] * layer_scale(layer) * log_odds_of(concept)[None], -1)


def token_tables(concept: str, layers, alphas: torch.Tensor, top_k: int = 10):
    model = FakeModel()
    curves, tops = [], []
    for layer in layers:
        for c, ctx in enumerate(CONTEXTS):
            probs = next_token_probs(concept, layer, c, alphas)
            top_max, top_min = probs[-1].topk(top_k).indices, probs[0].topk(top_k).indices
            ids = torch.unique(torch.cat([top_max, top_min]))
            i0 = int((alphas == 0).nonzero()[0])
            p0 = probs[i0, ids].float()
            delta = probs[:, ids].float() - p0[None]
            peak, shapes = shape_classes(delta)
            res = TokenCurves(alphas, [CurveSet(layer, ctx, ids, delta, p0, top_max, top_min, peak, shapes)], top_k)
            labels = dict(model=MODEL, concept=concept, setting=SETTING, positions="all")
            cur, top = res.curves_frame(model, **labels), res.top_frame(model, **labels)
            cur["table"], top["table"] = "curves", "top"
            both = pd.concat([cur, top], ignore_index=True)  # as pipeline.stage_tokens stores a chunk
            curves.append(both[both["table"] == "curves"].dropna(axis=1, how="all").drop(columns="table"))
            tops.append(both[both["table"] == "top"].dropna(axis=1, how="all").drop(columns="table"))
    return pd.concat(curves, ignore_index=True), pd.concat(tops, ignore_index=True)


def xent_sweep_of(layer: int) -> XentSweep:
    """Delta CE = L (1 - exp(-kappa alpha^2 / 2L)): curvature kappa at 0, plateau L (Thm 3.8, Prop. 4.1)."""
    a = AlphaGrid.linspace(-100, 100, 16).values
    kappa, L = 0.002 * (1 + layer), 3.0 + layer / 10
    ce = 3.5 + L * (1 - torch.exp(-kappa * a**2 / (2 * L)))
    d = ce - 3.5
    return XentSweep(a, ce, 8, 64, 8, 8, False, derivatives=dict(ce=3.5, slope=0.0, curvature=kappa, n_tokens=512),
                     fit=quadratic_fit(a, d), plateau=plateau(a, d), limit=dict(positive=L + 0.2, negative=L + 0.4))


def concept_tables(concept: str, layer: int, rng: np.random.Generator):
    """Judged completions from p(alpha) = 0.5 + 0.5 tanh((alpha - 5) / 12); the summary carries that curve as its fit
    (curve_summary's keys; its least-squares fit takes seconds per curve on 2 cores, too slow for this fixture)."""
    alphas = np.linspace(-40, 40, 9)
    rows = []
    for alpha in alphas:
        p = 0.5 + 0.5 * np.tanh((alpha - 5) / 12)
        for prompt_index in range(3):
            for completion in range(6):
                judged = bool(rng.random() < p)
                rows.append(dict(judge="lexicon", alpha=float(alpha), prompt_index=prompt_index, judged=judged,
                                 score=float(judged), completion_index=completion))
    curve = concept_curve(pd.DataFrame(rows))
    base = dict(model=MODEL, concept=concept, layer=layer, setting=SETTING)
    curve = curve.assign(**base)[list(base) + list(curve.columns)]
    pooled = curve[curve["scope"] == "pooled"].sort_values("alpha")
    fit = dict(status="ok", c=0.5, a=0.5, b=1 / 12, alpha0=5.0)
    resid = pooled["p"] - tanh_curve(pooled["alpha"], fit["c"], fit["a"], fit["b"], fit["alpha0"])
    fit["r2"] = float(1 - (resid**2).sum() / ((pooled["p"] - pooled["p"].mean()) ** 2).sum())
    curves = {"lexicon": dict(alpha=pooled["alpha"].tolist(), p=pooled["p"].tolist(), n_per_alpha=pooled["n"].tolist(),
                              spearman_rho=float(pooled[["alpha", "p"]].corr("spearman").iloc[0, 1]), tanh_fit=fit)}
    summary = dict(concept=concept, layer=layer, curves=curves, notes=[],
                   judge_accuracy={"lexicon": dict(balanced_accuracy=0.9, accuracy=0.9)})
    return curve, summary


def mmlu_tables(concept: str, layer: int, rng: np.random.Generator):
    rows = []
    for alpha in np.linspace(-40, 40, 5):
        p = 0.7 - 0.4 * abs(alpha) / 40
        for subject in ("astronomy", "virology"):
            for q in range(10):
                rows.append(dict(model=MODEL, concept=concept, layer=layer, setting=SETTING, alpha=float(alpha),
                                 subject=subject, question_index=q, correct=bool(rng.random() < p), letter_mass=0.9,
                                 logp_answer=float(np.log(max(p, 1e-6)))))
    acc = accuracy_table(pd.DataFrame(rows))
    overall = acc[acc["subject"] == "ALL"].sort_values("alpha")
    summary = dict(n_questions=20, k_shots=2, accuracy=dict(alpha=overall["alpha"].tolist(),
                                                            accuracy=overall["accuracy"].tolist()))
    return acc, summary


def limit_check_of(layer: int) -> LimitCheck:
    alphas = torch.tensor([-1e4, -1e3, -1e2, 1e2, 1e3, 1e4], dtype=torch.float64)
    tv = torch.tensor([[0.01, 0.1, 0.6, 0.5, 0.08, 0.01]], dtype=torch.float64).repeat(len(CONTEXTS), 1)
    top1 = torch.tensor([[3, 3, 9, 0, 0, 0]]).repeat(len(CONTEXTS), 1)
    return LimitCheck(alphas, CONTEXTS, tv * (1 + 0.01 * layer), top1, {1: 0, -1: 3})


def make_run(root: Path, *, concepts=("joy",), layers=(3, 5), stages=ALL_STAGES, skipped: dict | None = None,
             failed=(), resamples: int = 4, n_alphas: int = 48) -> Path:
    """A run directory with the pipeline's layout and the metric modules' schemas; `stages` ran, `skipped`
    {stage: note} were skipped, `failed` stages started and never finished."""
    root = Path(root)
    tables = root / "tables"
    rng = np.random.default_rng(0)
    cfg = build_config("demo", None, [f"concepts={','.join(concepts)}", f"layers={','.join(map(str, layers))}"])
    (root / "config.toml").parent.mkdir(parents=True, exist_ok=True)
    (root / "config.toml").write_text(to_toml(cfg))
    outputs: dict[str, list[str]] = {s: [] for s in ALL_STAGES}

    def put(stage, name, obj):
        path = tables / name
        (write_parquet if name.endswith(".parquet") else write_json)(path, obj)
        outputs[stage].append(f"tables/{name}")

    if "vectors" in stages:
        for concept in concepts:
            g = torch.Generator().manual_seed(1)
            vecs = {layer: torch.randn(16, generator=g) for layer in layers}
            res = {layer: vecs[layer] + 0.3 * torch.randn(resamples, 16, generator=g) for layer in layers} \
                if resamples else {}
            SteeringVectors(vecs, {"concept": concept}, res).save(root / "vectors" / f"{concept}.safetensors")
            outputs["vectors"].append(f"vectors/{concept}.safetensors")
    if "tokens" in stages:
        alphas = AlphaGrid.linspace(-200, 200, n_alphas).values
        parts = [token_tables(c, layers, alphas) for c in concepts]
        put("tokens", "tokens.parquet", pd.concat([p[0] for p in parts], ignore_index=True))
        put("tokens", "tokens_top.parquet", pd.concat([p[1] for p in parts], ignore_index=True))
        put("tokens", "tokens.json", dict(alphas=alphas.tolist()))
    if "logodds" in stages:
        frames, analysis = [], {}
        top = pd.read_parquet(tables / "tokens_top.parquet")
        cur = pd.read_parquet(tables / "tokens.parquet")
        for concept in concepts:
            M = log_odds_of(concept)
            frames.append(log_odds_frame(FakeModel(), M, model=MODEL, concept=concept, setting=SETTING))
            analysis[concept] = log_odds_analysis(M, top[top["concept"] == concept], cur[cur["concept"] == concept],
                                                  n_target=8, extremal_fraction=0.1)
        put("logodds", "logodds.parquet", pd.concat(frames, ignore_index=True))
        put("logodds", "logodds.json", analysis)
    if "depth" in stages:  # metrics/depth.py's and scan.py's schemas
        rows = [dict(model=MODEL, concept=c, layer=layer, residual_norm=10.0 + layer, alpha_resid_max=1.5,
                     concept_word_share=layer / 8, unimodal_share=0.5 + layer / 16, bump_share=0.3,
                     spearman_M_peak=0.5, target_later=0.6, top_words="a | b", steered=layer in layers)
                for c in concepts for layer in range(0, 8)]
        put("depth", "depth.parquet", pd.DataFrame(rows))
        scan = pd.DataFrame([dict(model=MODEL, concept=c, layer=layer, heldout_auc=0.9, lens_share=layer / 8,
                                  score=0.8 * layer / 8, vector_norm=1.0, residual_norm=10.0 + layer, lens_top="a",
                                  eligible=True, chosen=layer == 5) for c in concepts for layer in range(0, 8)])
        put("vectors", "layer_scan.parquet", scan)
        put("vectors", "layer_scan.json", {c: dict(chosen=5, rule="a rule", per_layer=scan[scan["concept"] == c][
            ["layer", "heldout_auc", "lens_share", "score"]].to_dict(orient="list")) for c in concepts})
    if "limit" in stages:
        frames, summary = [], {}
        for concept in concepts:
            for layer in layers:
                check = limit_check_of(layer)
                frames.append(check.frame(FakeModel(), model=MODEL, concept=concept, layer=layer, setting=SETTING,
                                          positions="all"))
                summary[f"{concept}/{layer}"] = check.summary()
        put("limit", "limit.parquet", pd.concat(frames, ignore_index=True))
        put("limit", "limit.json", summary)
    if "xent" in stages:
        frames, summary = [], {}
        for concept in concepts:
            for layer in layers:
                sweep = xent_sweep_of(layer)
                frames.append(sweep.frame(model=MODEL, concept=concept, layer=layer, setting=SETTING, positions="all"))
                summary[f"{concept}/{layer}"] = sweep.summary()
        put("xent", "xent.parquet", pd.concat(frames, ignore_index=True))
        put("xent", "xent.json", dict(corpus="samples of fake-lm", per_vector=summary))
    if "concept" in stages:
        curves, summary = [], {}
        for concept in concepts:
            for layer in layers:
                curve, s = concept_tables(concept, layer, rng)
                curves.append(curve)
                summary[f"{concept}/{layer}"] = s
        put("concept", "concept_curve.parquet", pd.concat(curves, ignore_index=True))
        put("concept", "concept.json", summary)
    if "mmlu" in stages:
        accs, summary = [], {}
        for concept in concepts:
            for layer in layers:
                acc, s = mmlu_tables(concept, layer, rng)
                accs.append(acc)
                summary[f"{concept}/{layer}"] = s
        put("mmlu", "mmlu.parquet", pd.concat(accs, ignore_index=True))
        put("mmlu", "mmlu.json", dict(source="sample", per_vector=summary))
    if "recommend" in stages:
        rows = [dict(model=MODEL, concept=c, layer=layer, setting=SETTING, method=m, budget=1.0, prompt_index=i,
                     prompt=f"prompt {i}", alpha=0.5 + i + (layer / 10), status="ok")
                for c in concepts for layer in layers for m in ("sweet-spot", "iso-kl") for i in range(2)]
        put("recommend", "recommend.parquet", pd.DataFrame(rows))
        put("recommend", "recommend.json", dict(budget=1.0, methods=["sweet-spot", "iso-kl"], notes=["a note"]))
    manifest_stages = {}
    for stage in ALL_STAGES:
        if stage in stages:
            manifest_stages[stage] = dict(status="done", key="k", seconds=1.5, outputs=outputs[stage])
        elif skipped and stage in skipped:
            manifest_stages[stage] = dict(status="skipped", note=skipped[stage])
        elif stage in failed:
            manifest_stages[stage] = dict(status="running", key="k", started=0.0)
    write_json(root / "manifest.json", dict(stages=manifest_stages, config=cfg.to_dict(),
                                            versions={"steerstrength": "0.1.0"}, model={"name": MODEL}))
    return root


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run") / "full")


@pytest.fixture(scope="module")
def drawn(full_run) -> list[Path]:
    return draw_all(full_run)


# ----------------------------------------------------------------------------- tests


def test_every_figure_is_drawn_as_png_and_pdf(full_run, drawn):
    index = json.loads((full_run / "figures" / "index.json").read_text())
    assert index["missing"] == []
    stems = {e["stem"] for e in index["figures"]}
    assert stems == {"fig6_delta_p_max_joy_L3", "fig6_delta_p_max_joy_L5", "figA10_delta_p_min_joy_L3",
                     "figA10_delta_p_min_joy_L5", "fig7_joy", "figA3_resamples_joy", "figA6_mmlu", "figP41_limit",
                     "figdepth_joy"}
    for e in index["figures"]:
        png, pdf = (full_run / f for f in e["files"])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert pdf.read_bytes()[:5] == b"%PDF-"
        assert png in drawn and pdf in drawn
    assert "Figs. A.11-A.13" in next(e["paper"] for e in index["figures"] if e["stem"] == "fig7_joy")


def test_saving_a_figure_twice_gives_identical_files(full_run, tmp_path):
    fig = fig_concept_xent(RunTables(full_run), "joy", [3, 5])
    first = [p.read_bytes() for p in save_figure(fig, tmp_path, "a")]
    second = [p.read_bytes() for p in save_figure(fig, tmp_path, "b")]
    assert first == second


def test_fig6_panels_hold_the_top8_tokens_at_alpha_max_with_their_curves(full_run):
    run = RunTables(full_run)
    fig = fig_delta_p(run, "joy", 3, "alpha_max")
    top = pd.read_parquet(full_run / "tables" / "tokens_top.parquet")
    top = top[(top["layer"] == 3) & (top["side"] == "alpha_max") & (top["rank"] < N_TOP)]
    curves = pd.read_parquet(full_run / "tables" / "tokens.parquet")
    lo = pd.read_parquet(full_run / "tables" / "logodds.parquet")
    target = set(lo.loc[lo["rank"] < 8, "token_id"])  # n_target = 8 in logodds.json
    colour_of = {}
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == len(CONTEXTS)
    for ax, ctx in zip(axes, CONTEXTS):
        rows = top[top["context_id"] == ctx["id"]].sort_values("rank")
        lines = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
        assert [ln.get_label().removesuffix(" ★") for ln in lines] == [token_label(t) for t in rows["token"]]
        for ln, (_, r) in zip(lines, rows.iterrows()):
            want = curves[(curves["layer"] == 3) & (curves["context_id"] == ctx["id"]) &
                          (curves["token_id"] == r["token_id"]) & (curves["alpha"] >= 0)].sort_values("alpha")
            np.testing.assert_allclose(ln.get_xdata(), want["alpha"])
            np.testing.assert_allclose(ln.get_ydata(), want["delta_p"])
            assert (ln.get_linestyle() == "-") == (int(r["token_id"]) in target)
            assert colour_of.setdefault(ln.get_label(), ln.get_color()) == ln.get_color()  # one colour per token
    assert len(set(colour_of.values())) == len(colour_of)
    assert any(label.endswith("★") for label in colour_of)


def test_fig7_draws_the_sigmoid_fit_and_the_measured_curvature(full_run):
    run = RunTables(full_run)
    fig = fig_concept_xent(run, "joy", [3, 5])
    top, bottom = fig.axes[:2]
    xent = json.loads((full_run / "tables" / "xent.json").read_text())["per_vector"]
    quads = [ln for ln in bottom.get_lines() if ln.get_label().startswith("local quadratic")]
    assert len(quads) == 2
    for ln, layer in zip(quads, (3, 5)):
        kappa = xent[f"joy/{layer}"]["curvature"]["jvp"]
        x = np.asarray(ln.get_xdata())
        np.testing.assert_allclose(ln.get_ydata(), 0.5 * kappa * x**2, atol=1e-12)
    concept = json.loads((full_run / "tables" / "concept.json").read_text())
    fits = [ln for ln in top.get_lines() if ln.get_label().startswith("sigmoid fit")]
    assert len(fits) == 2
    for ln, layer in zip(fits, (3, 5)):
        fit = concept[f"joy/{layer}"]["curves"]["lexicon"]["tanh_fit"]
        assert fit["status"] == "ok" and fit["a"] > 0  # the synthetic judge follows a rising sigmoid
        want = tanh_curve(ln.get_xdata(), fit["c"], fit["a"], fit["b"], fit["alpha0"])
        np.testing.assert_allclose(ln.get_ydata(), want)
    measured = [ln for ln in top.get_lines() if ln.get_label().startswith("layer")]
    assert [ln.get_label() for ln in measured] == ["layer 3", "layer 5"]
    # The fluent concept probability (degenerate completions excluded) is drawn beside the judge's rate.
    curve = pd.read_parquet(full_run / "tables" / "concept_curve.parquet").query("scope == 'pooled'")
    fluent = [ln for ln in top.get_lines() if ln.get_label().startswith("fluent only")]
    assert [ln.get_label() for ln in fluent] == ["fluent only, layer 3", "fluent only, layer 5"]
    for ln, layer in zip(fluent, (3, 5)):
        want = curve[curve["layer"] == layer].sort_values("alpha")["p_fluent"].to_numpy()
        np.testing.assert_allclose(ln.get_ydata(), want)


def test_missing_stages_are_named_and_nothing_crashes(tmp_path):
    run = make_run(tmp_path / "part", layers=(3,), stages=("vectors", "tokens", "xent"), resamples=0,
                   skipped={"mmlu": "no MMLU data: set mmlu.source", "limit": "disabled (limit.enabled=false)"},
                   failed=("concept",))
    draw_all(run)
    index = json.loads((run / "figures" / "index.json").read_text())
    drawn = {e["stem"] for e in index["figures"]}
    missing = {m["stem"]: m["reason"] for m in index["missing"]}
    assert drawn == {"fig6_delta_p_max_joy_L3", "figA10_delta_p_min_joy_L3", "fig7_joy"}  # ΔCE alone still drawn
    assert "skipped: no MMLU data" in missing["figA6_mmlu"]
    assert "skipped: disabled (limit.enabled=false)" in missing["figP41_limit"]
    assert "resamples" in missing["figA3_resamples_joy"]
    fig = fig_concept_xent(RunTables(run), "joy", [3])
    assert "did not finish" in " ".join(t.get_text() for t in fig.axes[0].texts)


def test_a_run_without_tables_draws_nothing_and_says_why(tmp_path):
    run = make_run(tmp_path / "empty", stages=())
    paths = draw_all(run)
    index = json.loads((run / "figures" / "index.json").read_text())
    assert paths == [run / "figures" / "index.json"] and index["figures"] == []
    assert "has not run" in index["missing"][0]["reason"]


def test_a_redraw_removes_figures_whose_tables_are_gone(tmp_path):
    run = make_run(tmp_path / "stale", layers=(4,), stages=("xent", "mmlu"))
    draw_all(run)
    assert (run / "figures" / "figA6_mmlu.png").is_file()
    (run / "tables" / "mmlu.parquet").unlink()
    draw_all(run)
    assert not (run / "figures" / "figA6_mmlu.png").exists() and not (run / "figures" / "figA6_mmlu.pdf").exists()
    assert (run / "figures" / "fig7_joy.png").is_file()


def test_cli_plot_redraws_without_loading_a_model(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import steerstrength.loading
    from steerstrength.cli import app

    def no_model(*args, **kwargs):
        raise AssertionError("plot must not load a model")

    monkeypatch.setattr(steerstrength.loading, "load_model", no_model)
    monkeypatch.setattr(steerstrength, "load_model", no_model)
    run = make_run(tmp_path / "cli", concepts=("evil",), layers=(2,), stages=("tokens", "xent"), n_alphas=16)
    result = CliRunner().invoke(app, ["plot", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "figures" / "fig6_delta_p_max_evil_L2.png").is_file()
    assert (run / "report.html").is_file()
    empty = tmp_path / "nothing"
    empty.mkdir()
    result = CliRunner().invoke(app, ["plot", str(empty)])
    assert isinstance(result.exception, InputError) and "no tables/ directory" in str(result.exception)


def test_a_concept_name_that_is_no_file_name_never_names_a_figure(tmp_path):
    run = make_run(tmp_path / "hostile", layers=(3,), stages=("tokens",), resamples=0)
    top = pd.read_parquet(run / "tables" / "tokens_top.parquet")
    top["concept"] = "../../escaped"
    top.to_parquet(run / "tables" / "tokens_top.parquet")
    draw_all(run)
    assert not list(tmp_path.rglob("*escaped*"))


def test_fig7_puts_every_layer_on_one_axis_in_residual_units(tmp_path):
    run_dir = make_run(tmp_path / "resid", layers=(3, 5), stages=("xent", "concept"), resamples=0)
    scales = {3: 0.01, 5: 0.002}  # alpha_resid / alpha per layer, as the pipeline writes them
    for name in ("xent", "concept_curve"):
        path = run_dir / "tables" / f"{name}.parquet"
        frame = pd.read_parquet(path)
        frame["alpha_resid"] = frame["alpha"] * frame["layer"].map(scales)
        frame.to_parquet(path)
    run = RunTables(run_dir)
    fig = fig_concept_xent(run, "joy", [3, 5])
    top, bottom = fig.axes[:2]
    assert "residual norm" in top.get_xlabel() and "residual norm" in bottom.get_xlabel()
    xent = json.loads((run_dir / "tables" / "xent.json").read_text())["per_vector"]
    quads = [ln for ln in bottom.get_lines() if ln.get_label().startswith("local quadratic")]
    for ln, layer in zip(quads, (3, 5)):
        kappa = xent[f"joy/{layer}"]["curvature"]["jvp"]
        raw = np.asarray(ln.get_xdata()) / scales[layer]
        np.testing.assert_allclose(ln.get_ydata(), 0.5 * kappa * raw**2, atol=1e-12)
    curve = pd.read_parquet(run_dir / "tables" / "concept_curve.parquet")
    measured = [ln for ln in top.get_lines() if ln.get_label().startswith("layer")]
    for ln, layer in zip(measured, (3, 5)):
        want = curve[(curve["layer"] == layer) & (curve["scope"] == "pooled")].sort_values("alpha")["alpha_resid"]
        np.testing.assert_allclose(ln.get_xdata(), want.to_numpy())
