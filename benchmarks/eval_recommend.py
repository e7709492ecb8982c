"""Which alpha, round 2: every method on held-out prompts, at matched distortion, per concept and model.

For one model, layer and each concept (sizes are the defaults; every one is a flag):
1. The vector: difference of means of the curated train pairs at the layer (contrastive); log-odds M of the same
   P vs N (sweet-spot's target tokens); the probe judge (trained on the curated train split), its held-out
   balanced accuracy measured on the curated held-out P vs contrastive N and neutral held-out texts.
2. Prompts: the neutral evaluation prompts, train split (16; iso-kl and global choose on them) and held-out split
   (32; never used to choose a global alpha; the per-prompt rules read the held-out prompt itself, as in use;
   grid-judge's own completions have seed 0, the evaluation's seed 1).
3. Each method at several budgets (a curve, not one point): sweet-spot (rule mass, and rule between: Thm 3.3's
   midpoint of the peaks), curvature (scope prompt and corpus), iso-kl, global, grid-judge. Its alphas on the
   held-out prompts are evaluated on 5 new completions per prompt (160 per point): judged concept probability
   (Wilson 95% CI and a prompt-clustered bootstrap CI), Delta CE on Wikipedia test paragraphs (mean over prompts of
   Delta CE(alpha_prompt)), the mean and p95 per-token KL(steered || unsteered) of the completions.
4. The constant-alpha frontier (the grid alphas on the same held-out prompts and seeds): any constant-alpha rule
   (iso-kl, global, curvature corpus, at any budget) lands on it. Each method point is compared with the frontier
   interpolated at the same Delta CE, with a paired prompt-clustered bootstrap 95% CI of the difference.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/eval_recommend.py --model smollm2-135m-instruct --layer 28
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/eval_recommend.py --model gemma3-270m --layer 14 --span 0.25
    .venv/bin/python benchmarks/eval_recommend.py --summarize [--docs]     # tables (markdown) and figures

Within one process, the next-token sweeps and the corpus curvature are computed once per (prompt, vector) and
reused across budgets (a memo: the same inputs give the same tensors); each method's wall time is the first budget's
uncached call (and, for the generation methods, the generations they need).
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "eval_recommend2"
COLORS = {"sweet-spot": "crimson", "sweet-spot (between)": "darkorange", "curvature (prompt)": "purple",
          "curvature (corpus)": "tab:brown", "iso-kl": "tab:blue", "global": "tab:green", "grid-judge": "olive"}


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def memoize(module, name: str, key) -> None:
    """Replace module.name by a memo keyed by key(*args, **kwargs): the same inputs give the same tensor."""
    fn, cache = getattr(module, name), {}

    @functools.wraps(fn)
    def cached(*args, **kwargs):
        k = key(*args, **kwargs)
        if k not in cache:
            cache[k] = fn(*args, **kwargs)
        return cache[k]

    setattr(module, name, cached)


def vec_key(v) -> tuple:
    t = v if isinstance(v, torch.Tensor) else v.vector
    return (tuple(t.shape), float(t.double().sum()), float(t.double().norm()))


def bootstrap(per_prompt: dict, picks_list, frontier_alphas, ce_of, n_boot: int, seed: int = 0):
    """Prompt-clustered bootstrap: per resample, each method's concept p and its difference with the frontier
    interpolated at the method's Delta CE. per_prompt[(i, alpha)] = (k, n)."""
    rng = np.random.default_rng(seed)
    prompts = sorted({i for i, _ in per_prompt})
    out = np.zeros((n_boot, len(picks_list), 2))
    fa = np.asarray(frontier_alphas)
    fce = np.array([ce_of(a) for a in fa])
    for b in range(n_boot):
        idx = rng.choice(prompts, size=len(prompts), replace=True)
        fk = np.array([sum(per_prompt[(i, a)][0] for i in idx) for a in fa])
        fn = np.array([sum(per_prompt[(i, a)][1] for i in idx) for a in fa])
        fp = fk / fn
        for m, picks in enumerate(picks_list):
            k = sum(per_prompt[(i, picks[i])][0] for i in idx)
            n = sum(per_prompt[(i, picks[i])][1] for i in idx)
            ce = float(np.mean([ce_of(picks[i]) for i in idx]))
            out[b, m] = (k / n, k / n - np.interp(ce, fce, fp, right=np.nan))  # nan: beyond the frontier
    return out


def evaluate_concept(model, args, concept: str, out: Path) -> None:
    from steerstrength import difference_of_means, log_odds
    from steerstrength.corpus import wikipedia_texts
    from steerstrength.io import write_json, write_jsonl, write_parquet
    from steerstrength.judges import make_judge, scores_accuracy
    from steerstrength.metrics.concept import wilson_interval
    from steerstrength.metrics.xent import xent_sweep
    from steerstrength.prompts import curated_texts, evaluation_prompts, neutral_texts
    from steerstrength.recommend import (KL_PERCENTILE, Curvature, Global, GridJudge, IsoKL, SweetSpot,
                                         generate_and_measure, measure_pairs, recommend_alpha)

    seconds = {}
    t0 = time.perf_counter()
    P, N = curated_texts(concept, "positive", "train"), curated_texts(concept, "negative", "train")
    sv = difference_of_means(model, P, N, [args.layer], concept=concept, setting="contrastive")[args.layer]
    seconds["vector"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    M = log_odds(model, P, N)
    seconds["log_odds"] = time.perf_counter() - t0
    judge = make_judge("probe")
    sp = judge.score(curated_texts(concept, "positive", "heldout"), concept)
    sn = judge.score(curated_texts(concept, "negative", "heldout") + neutral_texts("heldout"), concept)
    accuracy = scores_accuracy(judge, concept, sp, sn).to_dict()
    train = evaluation_prompts("train")[: args.n_train]
    heldout = evaluation_prompts("heldout")[: args.n_heldout]
    per_resid = sv.resid_scale(model)  # alpha_resid per raw alpha
    grid = [r / per_resid for r in np.linspace(0.0, args.span, args.n_grid).tolist()]
    common = dict(concept=concept)
    chat = model.has_chat_template  # a base model (Gemma-3-270M) completes the prompt as text
    sizes = dict(n_completions=args.train_completions, max_new_tokens=args.max_new_tokens)
    sampling = dict(sizes, chat=chat)
    corpus = wikipedia_texts("test")
    picks, seconds_of, info = {}, {}, {}

    def add(label, budget, rec, extra_seconds=0.0):
        if label not in seconds_of:
            seconds_of[label] = rec.summary["seconds"] + extra_seconds
        picks[(label, budget)] = {i: round(float(a), 10) for i, a in enumerate(rec.table["alpha"])}
        info[(label, budget)] = {}
        if label.startswith("curvature"):
            t = rec.table
            info[(label, budget)].update(kappa_mean=float(t["kappa"].mean()), kappa_cv=float(t["kappa"].std(ddof=0)
                                                                                              / t["kappa"].mean()),
                                         measured_over_predicted=float(t["measured_over_predicted"].mean()),
                                         quadratic_up_to_over_alpha=float((t["quadratic_up_to"] / t["alpha"]).mean()))
        print(f"  {label} B={budget:g}: mean alpha_resid {np.mean(list(picks[(label, budget)].values())) * per_resid:.3f}"
              f" ({rec.summary['seconds']:.1f} s)", flush=True)

    for b in floats(args.sweet_budgets):
        add("sweet-spot", b, recommend_alpha(model, sv, heldout, SweetSpot(log_odds=M, n_target=100), budget=b,
                                             **common))
    for b in floats(args.between_budgets):
        between = SweetSpot(log_odds=M, n_target=100, rule="between")
        add("sweet-spot (between)", b, recommend_alpha(model, sv, heldout, between, budget=b, **common))
    for b in floats(args.curvature_budgets):
        add("curvature (prompt)", b, recommend_alpha(model, sv, heldout, Curvature(), budget=b, **common))
    for b in floats(args.curvature_budgets):
        add("curvature (corpus)", b, recommend_alpha(model, sv, heldout, Curvature(scope="corpus", corpus=corpus),
                                                     budget=b, **common))
    t0 = time.perf_counter()
    gens_pos = generate_and_measure(model, sv, train, grid[1:], judge=judge, concept=concept, **sampling)
    t_pos = time.perf_counter() - t0
    t0 = time.perf_counter()
    gens_zero = generate_and_measure(model, sv, train, grid[:1], judge=judge, concept=concept, **sampling)
    t_zero = time.perf_counter() - t0
    for b in floats(args.kl_budgets):
        add("iso-kl", b, recommend_alpha(model, sv, train, IsoKL(generations=gens_pos, refine_steps=0, **sizes),
                                         budget=b, chat=chat, **common), t_pos)
        rec = recommend_alpha(model, sv, train, Global(judge=judge, generations=gens_zero.extend(gens_pos), **sizes),
                              budget=b, chat=chat, **common)
        rec.table = pd.DataFrame(dict(alpha=[rec.summary["alpha"]] * len(heldout)))  # the global alpha, held out
        add("global", b, rec, t_pos + t_zero)
    for label in ("iso-kl",):
        for b in floats(args.kl_budgets):
            a = picks[(label, b)][0]
            picks[(label, b)] = {i: a for i in range(len(heldout))}
    t0 = time.perf_counter()
    gens_gj = generate_and_measure(model, sv, heldout, grid, judge=judge, concept=concept, seed=0,
                                   n_completions=args.gj_completions, max_new_tokens=args.max_new_tokens, chat=chat)
    t_gj = time.perf_counter() - t0
    for b in floats(args.kl_budgets):
        add("grid-judge", b, recommend_alpha(model, sv, heldout, GridJudge(judge=judge, generations=gens_gj, **sizes),
                                             budget=b, chat=chat, **common), t_gj)

    # Evaluation completions (seed 1) at every (held-out prompt, alpha) the frontier or a method needs.
    frontier = [round(a, 10) for a in grid]
    pairs = {(i, a) for i in range(len(heldout)) for a in frontier}
    pairs |= {(i, a) for p in picks.values() for i, a in p.items()}
    t0 = time.perf_counter()
    ev = measure_pairs(model, sv, [(i, heldout[i], a) for i, a in sorted(pairs)], judge=judge,
                       concept=concept, seed=1, n_completions=args.completions, max_new_tokens=args.max_new_tokens,
                       chat=chat)
    seconds["evaluation_generations"] = time.perf_counter() - t0
    f = ev.frame.assign(alpha=ev.frame["alpha"].round(10))
    per_prompt = {(int(i), float(a)): (int(g["judged"].sum()), len(g)) for (i, a), g in f.groupby(["prompt_index",
                                                                                                    "alpha"])}
    tokens_of = {}
    for r, (i, a) in enumerate(zip(f["prompt_index"], f["alpha"])):
        tokens_of.setdefault((int(i), float(a)), []).append(ev.kl_tokens[r])

    t0 = time.perf_counter()
    top = max(a for _, a in pairs)
    ce_alphas = sorted(set(frontier) | {a for p in picks.values() for a in p.values()
                                        if len(set(p.values())) == 1}
                       | {round(a, 10) for a in np.linspace(0.0, top, args.ce_points).tolist()})
    xs = xent_sweep(model, sv, corpus, torch.tensor(ce_alphas, dtype=torch.float64), seq_len=args.seq_len,
                    packing=True, max_tokens=args.ce_tokens, curvature=False)
    dce = xs.delta_ce.numpy()
    seconds["delta_ce"] = time.perf_counter() - t0

    def ce_of(alpha: float) -> float:
        return float(np.interp(alpha, ce_alphas, dce))

    def point(p: dict) -> dict:
        k = sum(per_prompt[(i, a)][0] for i, a in p.items())
        n = sum(per_prompt[(i, a)][1] for i, a in p.items())
        toks = np.concatenate([t for i, a in p.items() for t in tokens_of[(i, a)]] + [np.zeros(0)])
        lo, hi = wilson_interval(k, n)
        scores = f[np.logical_or.reduce([(f["prompt_index"] == i) & (f["alpha"] == a) for i, a in p.items()])]["score"]
        al = np.array(list(p.values())) * per_resid
        return dict(mean_alpha_resid=float(al.mean()), min_alpha_resid=float(al.min()), max_alpha_resid=float(al.max()),
                    k=k, n=n, concept_p=k / n, wilson_low=float(lo), wilson_high=float(hi),
                    mean_score=float(scores.mean()), delta_ce=float(np.mean([ce_of(a) for a in p.values()])),
                    mean_kl=float(toks.mean()) if toks.size else 0.0,
                    p95_kl=float(np.percentile(toks, KL_PERCENTILE)) if toks.size else 0.0)

    front = pd.DataFrame([dict(alpha=a, alpha_resid=a * per_resid, **point({i: a for i in range(len(heldout))}))
                          for a in frontier])
    keys = sorted(picks, key=lambda k: (list(COLORS).index(k[0]), k[1]))
    boot = bootstrap(per_prompt, [picks[k] for k in keys], frontier, ce_of, args.n_boot)
    rows = []
    for m, (label, budget) in enumerate(keys):
        row = dict(model=model.name, concept=concept, layer=args.layer, method=label, budget=budget,
                   seconds=seconds_of[label], **point(picks[(label, budget)]), **info[(label, budget)])
        row["frontier_p_at_ce"] = float(np.interp(row["delta_ce"], front["delta_ce"], front["concept_p"], right=np.nan))
        row["diff_vs_frontier"] = row["concept_p"] - row["frontier_p_at_ce"]
        row["boot_low"], row["boot_high"] = np.percentile(boot[:, m, 0], [2.5, 97.5]).tolist()
        row["diff_low"], row["diff_high"] = np.nanpercentile(boot[:, m, 1], [2.5, 97.5]).tolist() \
            if np.isfinite(boot[:, m, 1]).mean() > 0.95 else (np.nan, np.nan)
        rows.append(row)
    table = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    write_parquet(out / "table.parquet", table)
    write_parquet(out / "frontier.parquet", front.assign(model=model.name, concept=concept, layer=args.layer))
    write_jsonl(out / "generations.jsonl", f.to_dict(orient="records"))
    write_json(out / "picks.json", {f"{label}|{budget:g}": {str(i): a for i, a in p.items()}
                                    for (label, budget), p in picks.items()})  # each method's alpha per prompt
    write_json(out / "eval.json", dict(
        machine=dict(platform=platform.platform(), torch=torch.__version__, threads=torch.get_num_threads()),
        model=model.name, concept=concept, layer=args.layer, judge=accuracy, seconds=seconds, grid=grid,
        grid_resid=[a * per_resid for a in grid], per_resid=per_resid, ce_alphas=ce_alphas, delta_ce=dce.tolist(),
        ce_tokens=int(xs.n_windows * args.seq_len), train=train, heldout=heldout, args=vars(args) | {"out": str(args.out)},
        vector_norm=float(sv.vector.norm())))
    show = ["method", "budget", "mean_alpha_resid", "concept_p", "wilson_low", "wilson_high", "delta_ce", "mean_kl",
            "frontier_p_at_ce", "diff_low", "diff_high", "seconds"]
    print(table[show].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(front[["alpha_resid", "concept_p", "wilson_low", "wilson_high", "delta_ce", "mean_kl", "p95_kl"]]
          .to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"judge: {accuracy['balanced_accuracy']:.3f}; seconds {json.dumps({k: round(v, 1) for k, v in seconds.items()})}",
          flush=True)


def figure(table: pd.DataFrame, front: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.4))
    for ax, x, label in ((axes[0], "delta_ce", "Delta CE on Wikipedia test paragraphs (nats)"),
                         (axes[1], "mean_kl", "mean per-token KL of the completions (nats)")):
        fr = front.sort_values("alpha")
        ax.fill_between(fr[x], fr["wilson_low"], fr["wilson_high"], color="grey", alpha=0.2, lw=0)
        ax.plot(fr[x], fr["concept_p"], "-o", color="grey", ms=3, lw=1, label="constant alpha (grid)")
        for _, r in fr.iterrows():
            ax.annotate(f"{r['alpha_resid']:.2g}", (r[x], r["concept_p"]), fontsize=6, color="grey",
                        xytext=(2, -8), textcoords="offset points")
        for method, g in table.groupby("method", sort=False):
            g = g.sort_values(x)
            ax.errorbar(g[x], g["concept_p"], yerr=[g["concept_p"] - g["wilson_low"], g["wilson_high"] - g["concept_p"]],
                        fmt="-o", ms=4, lw=1, capsize=2, color=COLORS[method], label=method, alpha=0.85)
        ax.set_xlabel(label)
        ax.set_ylabel("judged concept probability (Wilson 95% CI)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarize(out: Path, docs: bool) -> None:
    tables = sorted(out.glob("*/*/table.parquet"))
    figs = ROOT / "docs" / "figures" if docs else out
    pooled = []
    for t in tables:
        table, front = pd.read_parquet(t), pd.read_parquet(t.parent / "frontier.parquet")
        meta = json.loads((t.parent / "eval.json").read_text())
        name = f"recommend2_{t.parent.parent.name}_{t.parent.name}.png"
        figure(table, front, figs / name, f"{meta['model']}, layer {meta['layer']}, concept {meta['concept']}: "
               f"{len(meta['heldout'])} held-out prompts x {meta['args']['completions']} completions per point, "
               f"probe judge (held-out balanced accuracy {meta['judge']['balanced_accuracy']:.2f})")
        print(f"\n### {meta['model']} · {meta['concept']} (layer {meta['layer']}; judge balanced accuracy "
              f"{meta['judge']['balanced_accuracy']:.2f}; figure {name})\n")
        print("| method | budget | alpha (r_l; mean, range) | concept p [Wilson 95%] | bootstrap 95% | Delta CE | "
              "mean KL | p95 KL | frontier p at same Delta CE | difference [bootstrap 95%] | seconds to choose |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for _, r in table.iterrows():
            if r["delta_ce"] > front["delta_ce"].max():  # the constant alphas end below this distortion
                r["frontier_p_at_ce"] = r["diff_vs_frontier"] = r["diff_low"] = r["diff_high"] = np.nan
            pooled.append(r)
            print(f"| {r['method']} | {r['budget']:g} | {r['mean_alpha_resid']:.3f} ({r['min_alpha_resid']:.3f}–"
                  f"{r['max_alpha_resid']:.3f}) | {r['concept_p']:.3f} [{r['wilson_low']:.3f}, {r['wilson_high']:.3f}] | "
                  f"[{r['boot_low']:.3f}, {r['boot_high']:.3f}] | {r['delta_ce']:.3f} | {r['mean_kl']:.3f} | "
                  f"{r['p95_kl']:.2f} | {r['frontier_p_at_ce']:.3f} | {r['diff_vs_frontier']:+.3f} "
                  f"[{r['diff_low']:+.3f}, {r['diff_high']:+.3f}] | {r['seconds']:.0f} |")
        curv = table[table["method"].str.startswith("curvature")]
        print("\n| curvature | budget | kappa: CV across prompts | measured / predicted (its own distortion) | "
              "quadratic holds up to (x alpha) |")
        print("| --- | --- | --- | --- | --- |")
        for _, r in curv.iterrows():
            print(f"| {r['method']} | {r['budget']:g} | {r['kappa_cv']:.3f} | {r['measured_over_predicted']:.3f} | "
                  f"{r['quadratic_up_to_over_alpha']:.2f} |")
        print("\n| constant alpha (r_l) | " + " | ".join(f"{a:.3f}" for a in front["alpha_resid"]) + " |")
        print("| --- | " + " | ".join("---" for _ in front["alpha_resid"]) + " |")
        for col, fmt in (("concept_p", "{:.3f}"), ("delta_ce", "{:.3f}"), ("mean_kl", "{:.3f}"), ("p95_kl", "{:.2f}")):
            print(f"| {col} | " + " | ".join(fmt.format(x) for x in front[col]) + " |")
        print(f"\nseconds: {json.dumps({k: round(v) for k, v in meta['seconds'].items()})}")
    # Every point of every concept: how each method stands against the frontier at its own Delta CE.
    allp = pd.DataFrame(pooled)
    allp = allp[allp["diff_vs_frontier"].notna()]
    print("\n| model | method | points | mean difference with the frontier | above (CI > 0) | below (CI < 0) | "
          "median seconds to choose |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (model, method), g in allp.groupby(["model", "method"], sort=False):
        print(f"| {model} | {method} | {len(g)} | {g['diff_vs_frontier'].mean():+.3f} | {(g['diff_low'] > 0).sum()} | "
              f"{(g['diff_high'] < 0).sum()} | {g['seconds'].median():.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--layer", type=int, default=28)
    ap.add_argument("--concepts", default="joy,evil,humorous")
    ap.add_argument("--span", type=float, default=0.8, help="the grid's end in residual units (alpha ||v|| / r_l)")
    ap.add_argument("--n-grid", type=int, default=6)
    ap.add_argument("--n-train", type=int, default=16)
    ap.add_argument("--n-heldout", type=int, default=32)
    ap.add_argument("--completions", type=int, default=5, help="evaluation completions per held-out prompt and alpha")
    ap.add_argument("--train-completions", type=int, default=4)
    ap.add_argument("--gj-completions", type=int, default=3, help="grid-judge's own completions per prompt and alpha")
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--sweet-budgets", default="0.25,0.5,1,2", help="next-token KL (nats)")
    ap.add_argument("--between-budgets", default="1,2,4")
    ap.add_argument("--curvature-budgets", default="0.1,0.25,0.5,1", help="the quadratic's distortion (nats)")
    ap.add_argument("--kl-budgets", default="0.5,1,2,3", help="p95 per-token KL of generations (nats)")
    ap.add_argument("--ce-points", type=int, default=21)
    ap.add_argument("--ce-tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--summarize", action="store_true", help="print the tables of every evaluated concept; figures")
    ap.add_argument("--docs", action="store_true", help="with --summarize: figures into docs/figures/")
    args = ap.parse_args()
    if args.summarize:
        return summarize(args.out, args.docs)

    import steerstrength.metrics.xent as xent
    import steerstrength.recommend as rec
    from steerstrength import load_model

    memoize(rec, "next_token_probs", lambda model, v, layer, prompt, alphas, positions="all", chat=False, **_:
            (vec_key(v), layer, prompt, tuple(torch.as_tensor(alphas).tolist()), positions, chat))
    memoize(xent, "ce_derivatives", lambda model, v, layer, ids, positions="all", **_:
            (vec_key(v), layer, tuple(ids.shape), int(ids.sum()), positions))
    model = load_model(args.model, dtype="float32", device="cpu")
    for concept in args.concepts.split(","):
        t0 = time.perf_counter()
        print(f"{model.name} layer {args.layer} concept {concept}", flush=True)
        evaluate_concept(model, args, concept, args.out / model.name / concept)
        print(f"{concept}: {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
