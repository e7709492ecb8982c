"""report.html: one self-contained page per run (figures, config, findings, next-token explorer).

Nothing is fetched when the page opens: figures are base64 PNGs, the explorer's data is JSON inside
the page, the script is inline, and a Content-Security-Policy forbids every other source.
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from pathlib import Path
from typing import Any

from steerstrength.io import atomic_path
from steerstrength.plots import token_label
from steerstrength.run_tables import RunTables
from steerstrength.verdicts import (RULE_CURVATURE, RULE_MMLU, RULE_PLATEAU, RULE_TOKENS, fmt, judge_caveat,
                                    plateau_growth, rule_concept, rule_concept_text, rule_curvature, rule_limit,
                                    rule_limit_text, rule_mmlu, rule_plateau, rule_tokens)

EXPLORER_ALPHAS = 61  # alpha points per slider (subsampled from the sweep's grid; 0 always kept)
EXPLORER_TOKENS = 32  # tokens kept per (concept, layer, context): the union of the top ones along the slider
EXPLORER_SHOW = 12  # bars shown at one alpha
P_SCALE = 10_000  # probabilities stored as integers in units of 1e-4

CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
       "base-uri 'none'; form-action 'none'")


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def table_html(header: list[str], rows: list[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def verdict(ok: bool | None | str, rule: str) -> str:
    """A badge saying whether a measurement agrees with the theory, and the rule that decided it (ok: True, False,
    None, or a verdicts.py word)."""
    word, cls = {True: ("agrees", "ok"), False: ("disagrees", "bad"), None: ("unclear", "meh"),
                 "agrees": ("agrees", "ok"), "disagrees": ("disagrees", "bad"),
                 "inconclusive": ("inconclusive", "meh")}[ok]
    return f'<span class="badge {cls}" title="{esc(rule)}">{word}</span> <span class="rule">{esc(rule)}</span>'


def na(reason: str) -> str:
    return f'<p class="na">Not available: {esc(reason)}.</p>'


# ----------------------------------------------------------------------------- findings


def findings_tokens(run: RunTables) -> str:
    """Thm 3.3 on the measured curves: shapes of the dominating tokens at both ends of the grid."""
    top = run.table("tokens_top")
    if top is None or top.empty:
        return na(run.why_missing("tokens_top"))
    out = []
    texts = run.context_texts()
    for concept, note in ((run.summary("tokens") or {}).get("contexts") or {}).items():
        kinds = [c.get("kind") for c in note.get("contexts") or []]
        own = [c for c in note.get("contexts") or [] if c.get("kind") == "concept"]
        out.append(f"<p>Contexts for {esc(concept)}: {len(kinds)} — {esc(note.get('origin'))}" +
                   (": " + "; ".join(f"“{esc(c.get('text'))}…”" for c in own) if own else "") + ".</p>")
    for (concept, layer), g in top.groupby(["concept", "layer"], sort=False):
        g = g[g["rank"] < 8]
        rows = []
        for side in ("alpha_max", "alpha_min"):
            s = g[g["side"] == side]
            counts = s["shape"].value_counts()
            n = len(s)
            unimodal = n - int(counts.get("other", 0))
            rows.append([f"top-8 at {side.replace('alpha_', 'α_')} = {fmt(float(s['alpha'].iloc[0])) if n else '–'}",
                         n, int(counts.get("bump", 0)), int(counts.get("increasing", 0)),
                         int(counts.get("decreasing", 0)), int(counts.get("other", 0)),
                         pct(unimodal / n if n else None)])
        dom = g[g["side"] == "alpha_max"]
        out.append(f"<h4>{esc(concept)}, layer {int(layer)}</h4>")
        out.append(table_html(["tokens", "n", "bump", "increasing", "decreasing", "other", "unimodal"], rows))
        out.append("<p class='rule'>Shapes are classified on the whole grid [α_min, α_max] (metrics.tokens): a token "
                   "that dominates at α_min rises towards α_min, so it reads as decreasing (or other when it also "
                   "moves at α &gt; 0).</p>")
        ok = rule_tokens(dom)
        out.append("<p>Thm 3.3: " + verdict(ok, RULE_TOKENS) + "</p>")
        out.append(_concept_words(run, concept, int(layer), dom))
        out.append(_contrast(run, concept, int(layer)))
        lines = []
        for cid, c in dom.groupby("context_id", sort=False):
            words = ", ".join(token_label(t, 24) for t in c.sort_values("rank")["token"].tolist())
            lines.append(f"<li><span class='ctx'>{esc(_short(texts.get(cid, cid)))}</span>: {esc(words)}</li>")
        out.append("<details><summary>Top-8 tokens at α_max per context</summary><ul>" + "".join(lines) +
                   "</ul></details>")
    return "\n".join(out)


def _concept_words(run: RunTables, concept: str, layer: int, dom) -> str:
    """The top-8 tokens at α_max that are concept words (log-odds M in the top 5% of the vocabulary), listed."""
    from steerstrength.metrics.depth import CONCEPT_WORD_FRACTION, concept_word_threshold

    lo = run.table("logodds", columns=["concept", "token_id", "M"])
    if lo is None or concept not in set(lo["concept"]):
        return ""
    lo = lo[lo["concept"] == concept].sort_values("token_id")
    import torch

    M = torch.tensor(lo["M"].to_numpy(), dtype=torch.float64)
    hi = concept_word_threshold(M, CONCEPT_WORD_FRACTION)
    words = dom[[float(M[t]) >= hi for t in dom["token_id"]]]["token"].value_counts()
    share = float(words.sum()) / len(dom) if len(dom) else float("nan")
    listed = ", ".join(f"{token_label(t, 20)} ×{c}" for t, c in words.head(16).items()) or "none"
    return (f"<p>Concept words among the top-8 at α_max: <b>{pct(share)}</b> (chance {pct(CONCEPT_WORD_FRACTION)}; "
            f"a concept word has log-odds M in the top {pct(CONCEPT_WORD_FRACTION)} of the vocabulary): "
            f"{esc(listed)}.</p>")


def _contrast(run: RunTables, concept: str, layer: int) -> str:
    """Why, as measured contrasts with the random directions of the same layer (verdicts.py), never a conjecture."""
    table = run_verdicts_cached(run)
    if table is None or table.empty:
        return ""
    rows = table[(table["concept"] == concept) & (table["layer"] == layer) &
                 table["claim"].isin(["Thm 3.3 (unimodal curves)", "concept words lead at α_max"])]
    whys = list(dict.fromkeys(rows["why"].tolist()))
    if not whys:
        return ""
    return "<p class='why'>Measured against random directions: " + "; ".join(esc(w) for w in whys) + ".</p>"


def run_verdicts_cached(run: RunTables):
    """verdicts.run_verdicts of the run, computed once per page."""
    if "verdicts" not in run._cache:
        from steerstrength.verdicts import run_verdicts

        run._cache["verdicts"] = run_verdicts(run)
    return run._cache["verdicts"]


def findings_verdicts(run: RunTables) -> str:
    """Every verdict with its rule, interval and controls, generic and concept-specific said apart (verdicts.py)."""
    from steerstrength.verdicts import GENERIC, INCONCLUSIVE

    table = run_verdicts_cached(run)
    if table is None or table.empty:
        return na("no random directions in this run's tables (controls.n_random = 0, or a run made before controls)")
    out = ["<p class='rule'>Generic: does the law hold as stated, for v and for random directions of v's norm at the "
           "same layer (then it is a property of steering, not of the concept)? Concept-specific: the effect of v "
           "against the random directions with a 95% interval (bootstrap over contexts or prompts, widened by where "
           "one more random direction would fall); <i>inconclusive</i> when the interval contains the threshold.</p>"]
    for (concept, layer), g in table.groupby(["concept", "layer"], sort=False):
        out.append(f"<h4>{esc(concept)}, layer {int(layer)}</h4>")
        for kind in (GENERIC, "concept-specific"):
            part = g[g["kind"] == kind]
            if part.empty:
                continue
            items = []
            for r in part.itertuples(index=False):
                interval = (f" [{fmt(r.low, 2)}, {fmt(r.high, 2)}]" if math.isfinite(r.low) and math.isfinite(r.high)
                            else "")
                more = ""
                if r.verdict == INCONCLUSIVE:
                    if r.wider == "directions":
                        more = " More random directions would narrow it (controls.n_random)."
                    elif math.isfinite(r.n_more) and 0 < r.n_more <= 100 * max(r.n, 1):
                        more = f" About {int(r.n_more)} more {r.unit} would decide."
                    elif r.n_more > 0:
                        more = (f" The estimate sits on the threshold: more than 100 times the {r.unit} would be "
                                "needed to decide.")
                who = {"v": "v", "random": "random directions", "v-vs-random": "v − random"}.get(r.direction,
                                                                                                 r.direction)
                items.append(f"<li><b>{esc(r.claim)}</b> ({esc(who)}): {verdict(r.verdict, r.rule)}<br>"
                             f"{esc(r.why)}{esc(interval and ' — interval' + interval)}.{esc(more)}</li>")
            out.append(f"<p><b>{esc(kind.capitalize())}</b></p><ul>" + "".join(items) + "</ul>")
    return "\n".join(out)


def findings_scan(run: RunTables) -> str:
    """The layer scan of `--layers auto` (scan.py)."""
    data = run.summary("layer_scan")
    depth = run.table("depth")
    if not data and depth is None:
        return na(run.why_missing("layer_scan"))
    out = []
    for concept, s in (data or {}).items():
        per = s.get("per_layer") or {}
        rows = [[layer, auc, share, score] for layer, auc, share, score in
                zip(per.get("layer", []), per.get("heldout_auc", []), per.get("lens_share", []), per.get("score", []))]
        chosen_score = dict(zip(per.get("layer", []), per.get("score", []))).get(s.get("chosen"))
        runners = ", ".join(f"layer {r['layer']} ({fmt(r['score'])})" for r in s.get("runners_up") or [])
        out.append(f"<h4>{esc(concept)}: the scan picks layer {esc(s.get('chosen'))}</h4>"
                   f"<p>Score of the pick: {fmt(chosen_score)}" + (f"; runners-up: {esc(runners)}" if runners else "") +
                   f".</p><p class='rule'>{esc(s.get('rule'))}</p>")
        out.append("<details><summary>Per-layer scan table</summary>" +
                   table_html(["layer", "held-out AUC", "lens share", "score"], rows) + "</details>")
    if depth is not None and not depth.empty:
        cols = ["concept", "layer", "concept_word_share", "bump_share", "unimodal_share", "spearman_M_peak",
                "target_later", "top_words"]
        out.append("<p>Steering each layer at the same strength in residual units (the depth figure):</p>" +
                   table_html(cols, [list(r) for r in depth[cols].itertuples(index=False)]))
    return "\n".join(out)


def findings_logodds(run: RunTables) -> str:
    """Def. 3.2 / Thm 3.3: dominating tokens against extremal log-odds; target peaks after off-target peaks."""
    data = run.summary("logodds")
    if not data:
        return na(run.why_missing("logodds"))
    out = []
    for concept, a in data.items():
        d = a.get("definitions", {})
        out.append(f"<h4>{esc(concept)}</h4><p>M ranges over [{fmt(d.get('M_min'))}, {fmt(d.get('M_max'))}]; "
                   f"extremal means the top or bottom {pct(d.get('extremal_fraction'))} of the vocabulary "
                   f"(M ≥ {fmt(d.get('extremal_high'))} or ≤ {fmt(d.get('extremal_low'))}); target tokens are the "
                   f"{esc(d.get('n_target'))} of largest M.</p>")
        rows = []
        for layer, L in a.get("per_layer", {}).items():
            pp = L.get("peak_position", {})
            sp = L.get("spearman_M_peak_alpha", {})
            rows.append([int(layer), pct(L["dominant_at_alpha_max_extremal_high"]["fraction"]),
                         pct(L["dominant_at_alpha_min_extremal_low"]["fraction"]),
                         pp.get("n_target_bumps"), pp.get("n_off_target_bumps"),
                         pct(pp.get("fraction_target_later")), sp.get("median")])
        out.append(table_html(["layer", "dominant at α_max with extremal-high M", "dominant at α_min with "
                               "extremal-low M", "target bumps", "off-target bumps", "target peaks later",
                               "median Spearman(M, peak α)"], rows))
        out.append("<p class='rule'>In the paper, dominating tokens match extremal log-odds at the final layer but "
                   "generally not at intermediate layers (App. A); Thm 3.3 places a target token's bump after the "
                   "off-target ones (fraction &gt; 50%) and orders peaks by M (Spearman near 1 in the UFM).</p>")
    return "\n".join(out)


def findings_limit(run: RunTables) -> str:
    data = run.summary("limit")
    if not data:
        return na(run.why_missing("limit"))
    out = []
    for key, s in data.items():
        rows = [[r["alpha"], r["tv_mean"], r["tv_max"], pct(r.get("top1_match"))] for r in s.get("per_alpha", [])]
        out.append(f"<h4>{esc(key)}</h4>" + table_html(["α", "mean TV", "max TV", "top-1 equals the limit's"], rows))
        out.append("<p>Prop. 4.1: " + verdict(rule_limit(s), rule_limit_text(s)) +
                   f" <span class='rule'>{esc(s.get('note', ''))}</span></p>")
    return "\n".join(out)


def findings_xent(run: RunTables) -> str:
    data = run.summary("xent")
    if not data:
        return na(run.why_missing("xent"))
    out = [f"<p>Corpus: {esc(data.get('corpus', '?'))}.</p>"]
    rows, verdicts = [], []
    for key, s in data.get("per_vector", {}).items():
        c = s.get("curvature") or {}
        limit = s.get("limit_delta_ce") or {}
        kappa = c.get("jvp")
        growth = plateau_growth(s)
        rows.append([key, s.get("n_tokens"), s.get("ce0"), kappa, c.get("fit"), c.get("relative_difference"),
                     (c.get("quadratic_range") or {}).get("max_abs_alpha"),
                     " / ".join(fmt(g) for g in growth),
                     " / ".join(fmt(limit.get(k)) for k in ("negative", "positive"))])
        local = verdict(rule_curvature(s), RULE_CURVATURE)
        flat = verdict(rule_plateau(s), RULE_PLATEAU)
        verdicts.append(f"<li>{esc(key)}: Thm 3.8 {local}; Prop. 4.1 {flat}</li>")
    out.append(table_html(["vector", "tokens", "CE(0)", "κ (jvp)", "κ (fit)", "relative difference",
                           "quadratic holds to |α|", "growth − / +", "Prop. 4.1 limit ΔCE − / +"], rows))
    out.append("<ul>" + "".join(verdicts) + "</ul>")
    return "\n".join(out)


def judge_training(s: dict, judge: str) -> str:
    """Where a judge was trained and measured, in words (the probe's training record and the accuracy counts)."""
    desc = (s.get("judges") or {}).get(judge) or {}
    acc = (s.get("judge_accuracy") or {}).get(judge) or {}
    concept = s.get("concept")
    trained = (desc.get("training") or {}).get(concept)
    out = []
    if trained:
        out.append(f"trained on {trained.get('source')} ({trained.get('n_positive')} P, {trained.get('n_negative')} N, "
                   f"{trained.get('n_neutral')} neutral texts)")
    if acc:
        out.append(f"measured on {acc.get('n_positive')} held-out P and {acc.get('n_negative')} held-out N texts "
                   f"(balanced accuracy {fmt(acc.get('balanced_accuracy'))}, AUC {fmt(acc.get('auc'))})")
    return "; ".join(out)


def findings_concept(run: RunTables) -> str:
    data = run.summary("concept")
    if not data:
        return na(run.why_missing("concept"))
    rows, verdicts = [], []
    for key, s in data.items():
        for judge, cur in (s.get("curves") or {}).items():
            fit = cur.get("tanh_fit") or {}
            acc = (s.get("judge_accuracy") or {}).get(judge, {})
            p = cur.get("p") or []
            rows.append([key, judge, acc.get("balanced_accuracy"), len(cur.get("alpha") or []),
                         (cur.get("n_per_alpha") or [None])[0], p[0] if p else None, p[-1] if p else None,
                         cur.get("spearman_rho"), fit.get("r2") if fit.get("status") == "ok" else fit.get("status")])
            bad = cur.get("degenerate_alphas") or []
            caveat = judge_caveat(run, s, judge)
            verdicts.append(f"<li>{esc(key)} ({esc(judge)}): Thm 3.6 " +
                            verdict(rule_concept(cur), rule_concept_text(cur)) +
                            (f" <b class='why'>{esc(caveat.removeprefix(' — '))}</b>" if caveat else "") +
                            (f" <span class='rule'>Degenerate text (repetition, non-words) at α = "
                             f"{esc(', '.join(fmt(a) for a in bad))}: the concept curve falls there because the "
                             "text has collapsed, not because the concept left.</span>" if bad else "") + "</li>")
    notes = [n for s in data.values() for n in (s.get("notes") or [])]
    trained = {f"{s.get('concept')} ({judge}): {judge_training(s, judge)}" for s in data.values()
               for judge in (s.get("curves") or {}) if judge_training(s, judge)}
    notes += sorted(f"the judge of {t}" for t in trained)
    out = table_html(["vector", "judge", "judge balanced accuracy on P/N", "alphas", "completions per α",
                      "p at α_min", "p at α_max", "Spearman(α, p)", "tanh fit R²"], rows)
    return out + "<ul>" + "".join(verdicts) + "".join(f"<li>note: {esc(n)}</li>" for n in notes) + "</ul>"


def findings_mmlu(run: RunTables) -> str:
    data = run.summary("mmlu")
    if not data:
        return na(run.why_missing("mmlu"))
    rows, verdicts = [], []
    for key, s in (data.get("per_vector") or {}).items():
        ok, f = rule_mmlu(s)
        ends = f["ends"]
        rows.append([key, s.get("n_questions"), s.get("k_shots"), f["at0"], ends[0] if ends else None,
                     ends[1] if ends else None])
        # A model whose unsteered accuracy is not above guessing cannot show steering lowering it.
        verdicts.append(f"<li>{esc(key)}: " + verdict(ok, RULE_MMLU) +
                        (f" <span class='why'>Not judged: the unsteered accuracy's 95% interval [{f['low']:.2f}, "
                         f"{f['high']:.2f}] is not above random guessing ({f['guess']:.2f}), so there is no skill for "
                         "steering to remove (MMLU needs a larger model, or more questions to show it).</span>"
                         if f["at_chance"] else "") +
                        "</li>")
    return (f"<p>Source: {esc(data.get('source'))}.</p>" +
            table_html(["vector", "questions", "shots", "accuracy at α = 0", "at α_min", "at α_max"], rows) +
            "<ul>" + "".join(verdicts) + "</ul>")


def findings_recommend(run: RunTables) -> str:
    table = run.table("recommend")
    data = run.summary("recommend")
    if table is None and not data:
        return na(run.why_missing("recommend"))
    out = []
    if data:
        out.append(f"<p>Distortion budget: {esc(fmt(data.get('budget')))} nats; methods: "
                   f"{esc(', '.join(data.get('methods') or []))}.</p>")
        out += [f"<p class='rule'>{esc(n)}</p>" for n in data.get("notes") or []]
    if table is not None and not table.empty:
        cols = [c for c in ("concept", "layer", "method", "prompt_index", "prompt", "alpha", "status", "target_mass",
                            "kl", "measured", "concept_p", "p95_kl") if c in table.columns]
        rows = [[_short(v, 60) if isinstance(v, str) else v for v in r] for r in table[cols].head(200).itertuples(
            index=False)]
        out.append(table_html(cols, rows))
    return "\n".join(out)


def _short(text: str, n: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


# ----------------------------------------------------------------------------- explorer data


def explorer_data(run: RunTables) -> dict | None:
    """Per concept, layer and context: the alpha grid (subsampled) and the top tokens' p along it (ints of 1e-4)."""
    import numpy as np

    top = run.table("tokens_top", columns=["concept", "layer", "context_id", "context_kind", "token_id"])
    if top is None or top.empty or not run.has("tokens"):
        return None
    texts = run.context_texts()
    out: dict = {"scale": P_SCALE, "show": EXPLORER_SHOW, "concepts": {}}
    for (concept, layer), g in top.groupby(["concept", "layer"], sort=False):
        first = g.iloc[0]
        probe = run.table("tokens", columns=["alpha"], filters=[
            ("concept", "==", concept), ("layer", "==", int(layer)), ("context_id", "==", first["context_id"]),
            ("token_id", "==", int(first["token_id"]))])
        grid = np.sort(probe["alpha"].unique())
        keep = np.unique(np.round(np.linspace(0, len(grid) - 1, min(EXPLORER_ALPHAS, len(grid)))).astype(int))
        zero = np.flatnonzero(grid == 0)
        alphas = np.sort(np.unique(np.concatenate([grid[keep], grid[zero]])))
        rows = run.table("tokens", columns=["context_id", "token_id", "token", "alpha", "p"], filters=[
            ("concept", "==", concept), ("layer", "==", int(layer)), ("alpha", "in", alphas.tolist())])
        target = run.target_tokens(concept)
        contexts = []
        kinds = dict(zip(g["context_id"], g["context_kind"]))
        for cid in dict.fromkeys(g["context_id"].tolist()):
            c = rows[rows["context_id"] == cid]
            p = c.pivot_table(index="alpha", columns="token_id", values="p", aggfunc="first").reindex(alphas)
            names = c.drop_duplicates("token_id").set_index("token_id")["token"]
            values = p.to_numpy(dtype=np.float64, na_value=0.0)
            order = np.argsort(-values, axis=1, kind="stable")[:, :EXPLORER_SHOW]
            chosen = np.unique(order)
            if chosen.size > EXPLORER_TOKENS:  # keep the tokens that get largest somewhere along the slider
                chosen = chosen[np.argsort(-values[:, chosen].max(0), kind="stable")[:EXPLORER_TOKENS]]
            ids = [int(t) for t in p.columns[chosen]]
            contexts.append(dict(
                id=str(cid), kind=str(kinds.get(cid, "")), text=texts.get(cid, ""),
                tokens=[token_label(names[t], 40) for t in ids],
                target=[bool(target is not None and t in target) for t in ids],
                p=np.round(values[:, chosen] * P_SCALE).astype(int).tolist(),
                tracked=np.round(values.sum(1) * P_SCALE).astype(int).tolist(),
                n_tracked=int(values.shape[1])))
        out["concepts"].setdefault(str(concept), {})[str(int(layer))] = dict(
            alphas=[float(a) for a in alphas], zero=int(np.flatnonzero(alphas == 0)[0]) if (alphas == 0).any() else 0,
            has_target=target is not None, contexts=contexts)
    return out


def json_for_script(obj) -> str:
    """JSON safe inside <script>: no '<', '>' or '&' that could end the element."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


# ----------------------------------------------------------------------------- page


def section_run(run: RunTables) -> str:
    stages = run.manifest.get("stages", {})
    if not stages:
        return na("the manifest records no stage")
    rows = []
    for name, rec in stages.items():
        status = rec.get("status", "?")
        if name == "report" and status == "running":
            status = "writing this page"  # the manifest records the report stage's end after the page is written
        rows.append([name, status, rec.get("seconds"),
                     rec.get("note") or ", ".join(rec.get("outputs", [])[:4]) +
                     (" …" if len(rec.get("outputs", [])) > 4 else "")])
    total = sum(float(r.get("seconds") or 0) for r in stages.values())
    return table_html(["stage", "status", "seconds", "note / outputs"], rows) + \
        f"<p>Sum of stage times: {fmt(total)} s (cached stages show the time of the run that computed them).</p>"


def compact_png(path: Path, colors: int = 128) -> bytes:
    """The PNG with a 128-colour palette: line plots look the same at about a quarter of the bytes."""
    import io

    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    buffer = io.BytesIO()
    small.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def section_figures(run: RunTables) -> str:
    index_path = run.root / "figures" / "index.json"
    if not index_path.is_file():
        return na(f"no figures drawn yet; run `steerstrength plot {run.root}`")
    try:
        index = json.loads(index_path.read_text())
        entries = list(index.get("figures", []))
        if not all(isinstance(e, dict) and isinstance(e.get("files", []), list) and
                   all(isinstance(f, str) for f in e.get("files", [])) for e in entries):
            raise ValueError("a figure entry is not {stem, title, files: [...]}")
    except (OSError, ValueError, AttributeError, TypeError):  # written by plots.draw_all; damaged by hand
        return na(f"figures/index.json is damaged; redraw with `steerstrength plot {run.root}`")
    out = []
    for e in entries:
        png = next((f for f in e.get("files", []) if f.endswith(".png")), None)
        if png is None or not (run.root / png).is_file():
            out.append(f"<h3>{esc(e['title'])}</h3>" + na(f"{png} is missing; redraw with `steerstrength plot`"))
            continue
        data = base64.b64encode(compact_png(run.root / png)).decode("ascii")
        files = ", ".join(e.get("files", []))
        out.append(f'<figure id="fig-{esc(e["stem"])}"><h3>{esc(e["title"])} <span class="paper">'
                   f'{esc(e.get("paper", ""))}</span></h3><img alt="{esc(e["title"])}" '
                   f'src="data:image/png;base64,{data}"><figcaption>{esc(e.get("caption", ""))} '
                   f'<span class="files">Files: {esc(files)}</span></figcaption></figure>')
    missing = index.get("missing", [])
    if missing:
        out.append("<h3>Figures not available</h3><ul>" + "".join(
            f"<li><b>{esc(m['title'])}</b> ({esc(m.get('paper', ''))}): {esc(m['reason'])}</li>" for m in missing) +
            "</ul>")
    return "\n".join(out)


def section_config(run: RunTables) -> str:
    path = run.root / "config.toml"
    config = path.read_text() if path.is_file() else json.dumps(run.manifest.get("config", {}), indent=2)
    out = [f"<pre>{esc(config)}</pre>"]
    model = run.manifest.get("model")
    if model:
        out.append("<h3>Model</h3>" + table_html(["key", "value"], [[k, v] for k, v in model.items()]))
    if run.manifest.get("model_fingerprint"):
        out.append(f"<p>Fingerprint: <code>{esc(run.manifest['model_fingerprint'])}</code></p>")
    versions = run.manifest.get("versions")
    if versions:
        out.append("<h3>Versions</h3>" + table_html(["package", "version"], [[k, v] for k, v in versions.items()]))
    return "\n".join(out)


def section_explorer(data: dict | None, reason: str) -> str:
    if data is None:
        return na(reason)
    return (EXPLORER_HTML + f'<script id="explorer-data" type="application/json">{json_for_script(data)}</script>'
            + f"<script>{EXPLORER_JS}</script>")


def render(run: RunTables) -> str:
    """The whole page as a string."""
    model = (run.manifest.get("model") or {}).get("name")
    if not model:
        top = run.table("tokens_top", columns=["model"])
        model = str(top["model"].iloc[0]) if top is not None and not top.empty else "unknown model"
    concepts, layers = run.concepts(), run.layers()
    findings = [("Verdicts with controls: generic and concept-specific", findings_verdicts),
                ("Where the concept lives (layer scan, depth)", findings_scan),
                ("Next-token curves (Def. 3.1, Thm 3.3)", findings_tokens),
                ("Log-odds and dominating tokens (Def. 3.2, Thm 3.3)", findings_logodds),
                ("Large-α limit (Prop. 4.1)", findings_limit),
                ("Cross-entropy (Def. 3.7, Thm 3.8, Prop. 4.1)", findings_xent),
                ("Concept probability in generations (Thm 3.6)", findings_concept),
                ("MMLU (Fig. A.6)", findings_mmlu),
                ("Recommended α", findings_recommend)]
    parts = []
    for title, fn in findings:
        try:
            body = fn(run)
        except Exception as exc:  # a malformed summary must not cost the rest of the report
            body = na(f"could not be read: {type(exc).__name__}: {exc}")
        parts.append(f"<section class='finding'><h3>{esc(title)}</h3>{body}</section>")
    try:
        data, reason = explorer_data(run), run.why_missing("tokens")
    except Exception as exc:
        data, reason = None, f"could not be read: {type(exc).__name__}: {exc}"
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())
    return PAGE.format(
        csp=esc(CSP), title=esc(f"steerstrength report: {run.root.name}"), css=CSS,
        model=esc(model), concepts=esc(", ".join(concepts) or "–"), layers=esc(", ".join(map(str, layers)) or "–"),
        setting=esc(run.manifest.get("config", {}).get("setting", "?")), when=esc(when), root=esc(run.root),
        run=section_run(run), findings="\n".join(parts), figures=section_figures(run),
        explorer=section_explorer(data, reason), config=section_config(run))


def write_report(run_dir: str | Path) -> Path:
    """The paper's claims against the run's measurements: RUN/report.html (atomically), from its tables and figures.

    Args:
        run_dir: a run directory of `steerstrength run` (tables/, figures/, manifest.json); no model is loaded.

    Example::

        ss.write_report("runs/demo")             # -> Path("runs/demo/report.html")
    """
    run = RunTables(run_dir)
    page = render(run)
    table = run._cache.get("verdicts")
    if table is not None and not table.empty:  # the verdicts as data: tables/verdicts.parquet
        with atomic_path(run.root / "tables" / "verdicts.parquet") as tmp:
            table.to_parquet(tmp, index=False)
    path = run.root / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- static parts

CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1200px;
  padding:0 20px 60px;color:#222}
h1{margin-top:24px}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:40px}
nav a{margin-right:14px}table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}th{background:#f4f4f4}
pre{background:#f7f7f7;padding:10px;overflow:auto;font-size:12px}figure{margin:24px 0}
figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:13px;color:#444}
.paper{font-size:13px;color:#666;font-weight:normal}.files{color:#888;display:block}
.na{color:#8a6d3b;background:#fcf8e3;padding:6px 10px}.rule{color:#666;font-size:12px}
.badge{padding:1px 7px;border-radius:9px;font-size:12px;color:#fff}.ok{background:#2e7d32}
.bad{background:#c62828}.meh{background:#757575}.ctx{color:#555}
#explorer .controls label{margin-right:16px}
#ex-context-text{margin:8px 0;padding:6px 10px;background:#f7f7f7;font-family:monospace;white-space:pre-wrap}
#ex-slider-row{display:flex;align-items:center;gap:12px;margin:10px 0}#ex-alpha{flex:1}
.bar-row{display:grid;grid-template-columns:190px 1fr 150px;align-items:center;gap:8px;font-size:13px;margin:2px 0}
.bar-row .tok{font-family:monospace;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.bar{position:relative;height:16px;background:#f1f1f1}.fill{position:absolute;left:0;top:0;bottom:0}
.fill.target{background:#1f77b4}.fill.other{background:#ff7f0e}
.base{position:absolute;top:-2px;bottom:-2px;width:2px;background:#000}
.legend span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;vertical-align:middle}
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><style>{css}</style></head>
<body>
<h1>{title}</h1>
<p>Model <b>{model}</b>; concepts {concepts}; layers {layers}; negatives: {setting}. Run directory <code>{root}</code>.
Report written {when}. Redraw with <code>steerstrength plot {root}</code>.</p>
<nav><a href="#run">Run</a><a href="#findings">Findings</a><a href="#explorer-section">Explorer</a>
<a href="#figures">Figures</a><a href="#config">Configuration</a></nav>
<h2 id="run">Run</h2>{run}
<h2 id="findings">Theory against practice</h2>
<p class="rule">Each badge applies the rule written beside it to the run's numbers; hover for the rule.
Small demo runs (few prompts, short grids) give noisy readings.</p>
{findings}
<h2 id="explorer-section">Next-token explorer</h2>{explorer}
<h2 id="figures">Figures</h2>{figures}
<h2 id="config">Configuration</h2>{config}
</body></html>
"""

EXPLORER_HTML = """<div id="explorer">
<p>Pick a context and a layer and move α: the bars show the next-token probabilities of the most probable
tracked tokens at that α (the black tick marks p at α = 0). Tracked tokens are those the sweep stored
(the top-k at α_min and α_max); the line below says how much probability they hold.</p>
<div class="controls"><label>Concept <select id="ex-concept"></select></label>
<label>Layer <select id="ex-layer"></select></label>
<label>Context <select id="ex-context"></select></label></div>
<div id="ex-context-text"></div>
<div id="ex-slider-row"><label for="ex-alpha">α</label><input type="range" id="ex-alpha" min="0" max="0" step="1">
<output id="ex-alpha-value"></output></div>
<div class="legend" id="ex-legend"></div>
<div id="ex-bars" aria-live="polite"></div>
<p id="ex-mass" class="rule"></p>
</div>"""

EXPLORER_JS = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("explorer-data").textContent);
  var $ = function (id) { return document.getElementById(id); };
  var concept = $("ex-concept"), layer = $("ex-layer"), context = $("ex-context"), slider = $("ex-alpha");
  function fill(select, values, labels) {
    select.innerHTML = "";
    values.forEach(function (v, i) {
      var o = document.createElement("option");
      o.value = v; o.textContent = labels ? labels[i] : v; select.appendChild(o);
    });
  }
  function current() { return data.concepts[concept.value][layer.value]; }
  function fmtAlpha(a) { return (a > 0 ? "+" : "") + (Math.abs(a) >= 100 ? a.toFixed(0) : a.toFixed(1)); }
  function pct(v) { return (100 * v / data.scale).toFixed(2) + "%"; }
  function onConcept() {
    var layers = Object.keys(data.concepts[concept.value]).sort(function (a, b) { return a - b; });
    var keep = layer.value; fill(layer, layers, layers.map(function (l) { return "layer " + l; }));
    if (layers.indexOf(keep) >= 0) layer.value = keep;
    onLayer();
  }
  function onLayer() {
    var cur = current(), keep = context.value;
    fill(context, cur.contexts.map(function (c, i) { return String(i); }),
         cur.contexts.map(function (c) { return c.id + (c.kind ? " (" + c.kind + ")" : ""); }));
    cur.contexts.forEach(function (c, i) { if (c.id === keep) context.value = String(i); });
    slider.max = String(cur.alphas.length - 1);
    if (+slider.value > cur.alphas.length - 1 || slider.dataset.init !== "1") {
      slider.value = String(cur.zero); slider.dataset.init = "1";
    }
    $("ex-legend").innerHTML = cur.has_target
      ? '<span style="background:#1f77b4"></span>target token (top-M log-odds)' +
        '<span style="background:#ff7f0e"></span>other token'
      : '<span style="background:#ff7f0e"></span>token (log-odds not available: targets unknown)';
    draw();
  }
  function draw() {
    var cur = current(), c = cur.contexts[+context.value], i = +slider.value;
    $("ex-context-text").textContent = c.text || c.id;
    $("ex-alpha-value").textContent = fmtAlpha(cur.alphas[i]);
    var order = c.p[i].map(function (v, j) { return j; });
    order.sort(function (a, b) { return c.p[i][b] - c.p[i][a] || a - b; });
    var bars = $("ex-bars"); bars.innerHTML = "";
    order.slice(0, data.show).forEach(function (j) {
      var row = document.createElement("div"); row.className = "bar-row"; row.dataset.token = c.tokens[j];
      var tok = document.createElement("span");
      tok.className = "tok"; tok.textContent = c.tokens[j]; tok.title = c.tokens[j];
      var bar = document.createElement("span"); bar.className = "bar";
      var f = document.createElement("span"); f.className = "fill " + (c.target[j] ? "target" : "other");
      f.style.width = (100 * c.p[i][j] / data.scale) + "%";
      var base = document.createElement("span"); base.className = "base";
      base.style.left = (100 * c.p[cur.zero][j] / data.scale) + "%";
      bar.appendChild(f); bar.appendChild(base);
      var val = document.createElement("span"); val.className = "val";
      var d = c.p[i][j] - c.p[cur.zero][j];
      val.textContent = pct(c.p[i][j]) + "  (Δp " + (d >= 0 ? "+" : "−") + pct(Math.abs(d)) + ")";
      row.appendChild(tok); row.appendChild(bar); row.appendChild(val); bars.appendChild(row);
    });
    var mass = $("ex-mass");
    mass.textContent = "The " + c.n_tracked + " tracked tokens hold " + pct(c.tracked[i]) +
      " of the next-token probability at α = " + fmtAlpha(cur.alphas[i]) + "." +
      (c.tracked[i] < data.scale / 2 ? " Most of the probability is on tokens the sweep did not store." : "");
    mass.className = c.tracked[i] < data.scale / 2 ? "na" : "rule";
  }
  var names = Object.keys(data.concepts);
  fill(concept, names);
  concept.addEventListener("change", onConcept);
  layer.addEventListener("change", onLayer);
  context.addEventListener("change", draw);
  slider.addEventListener("input", draw);
  onConcept();
})();
"""
