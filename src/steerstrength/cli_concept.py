"""`steerstrength sweep concept | mmlu`: parse, call the metrics, print a table, write Parquet + JSON."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer

from steerstrength.cli_common import (BlocksPathOpt, DeviceOpt, DtypeOpt, ModelOpt, check_at_least, console, load, log,
                                      progress_bar, sweep_app)
from steerstrength.cli_sweeps import (
    AlphasOpt,
    ConceptOpt,
    LayersOpt,
    NormalizeOpt,
    OutOpt,
    PositionsOpt,
    PromptChatOpt,
    SettingOpt,
    Steering,
    UnitOpt,
    VectorsOpt,
    alpha_grid,
)
from steerstrength.errors import InputError


def _merge(results: list, header: dict, seconds: float, out: Path, prefix: str, frames: dict[str, str],
           st: Steering) -> dict:
    """One file per table over all layers (alpha and alpha_resid); the summary keeps each layer's own."""
    import pandas as pd

    from steerstrength.io import write_json, write_jsonl, write_parquet

    paths = {}
    for attr, suffix in frames.items():
        frame = pd.concat([st.with_resid(getattr(r, attr).copy(), int(r.summary["layer"])) for r in results],
                          ignore_index=True)
        path = out / f"{prefix}{suffix}"
        if suffix.endswith(".jsonl"):
            write_jsonl(path, frame.to_dict(orient="records"))
        else:
            write_parquet(path, frame)
        paths[attr] = str(path)
    summary = dict(header, per_layer={str(r.summary["layer"]): r.summary for r in results},
                   seconds=round(seconds, 2), files=dict(paths, summary=str(out / f"{prefix}.json")))
    write_json(out / f"{prefix}.json", summary)
    return paths


def _fmt_fit(fit: dict) -> str:
    if fit["status"] != "ok":
        return f"tanh fit: {fit['status']}"
    return (f"tanh fit p = {fit['c']:.3f} + {fit['a']:.3f} tanh({fit['b']:.4f} (alpha - {fit['alpha0']:.2f})), "
            f"R^2 = {fit['r2']:.3f}")


def _concept_table(summary: dict) -> None:
    from rich.table import Table

    for judge, c in summary["curves"].items():
        acc = summary["judge_accuracy"].get(judge)
        title = f"concept {summary['concept']!r}, layer {summary['layer']}, judge {judge}"
        if acc:
            title += f" (held-out P-vs-N accuracy {acc['accuracy']:.2f}, balanced {acc['balanced_accuracy']:.2f})"
        table = Table(title=title)
        for col in ("alpha", "p (judged present)", "95% CI", "mean score", "n"):
            table.add_column(col, justify="right")
        for i, alpha in enumerate(c["alpha"]):
            table.add_row(f"{alpha:g}", f"{c['p'][i]:.3f}", f"[{c['ci_low'][i]:.2f}, {c['ci_high'][i]:.2f}]",
                          f"{c['mean_score'][i]:.3f}", str(c["n_per_alpha"][i]))
        console.print(table)
        log(f"{_fmt_fit(c['tanh_fit'])}; Spearman rho(alpha, p) = {c['spearman_rho']:.3f}")
    for note in summary["notes"]:
        log(f"note: {note}")


def _preset_sizes(name: str) -> str:
    from steerstrength.config import preset

    cfg = preset(name)
    c = cfg.concept
    return (f"{c.n_alphas} alphas in +/-{c.alpha_max:g} ({cfg.alpha_unit}) x {c.n_prompts} prompts x {c.completions} "
            f"completions x {c.max_new_tokens} tokens")


@sweep_app.command("concept")
def sweep_concept(
    vectors: Path = VectorsOpt,
    layers: Optional[str] = LayersOpt,
    judge: Optional[List[str]] = typer.Option(None, "--judge", "-j", help="probe (calibrated), llm, lexicon or "
                                              "embedding; repeat to score the same completions with several judges; "
                                              "default: the best measured judge for the concept (judges.best_judge)."),
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help="The llm judge's model; default: the steered model."),
    positive: Optional[Path] = typer.Option(None, "--positive", "-p", help="P texts (JSONL 'text' or one per line): "
                                                                          "judge calibration and held-out accuracy."),
    negative: Optional[Path] = typer.Option(None, "--negative", "-n", help="N texts, same formats."),
    holdout: float = typer.Option(0.5, "--holdout", help="Fraction of P and N held out to measure each judge."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Prompts (JSONL 'text' or one per line); default: "
                                                                   "the 32 neutral evaluation prompts (training half)."),
    preset: str = typer.Option("demo", "--preset", help="Sizes: the concept section of `steerstrength run --preset "
                               f"NAME` (config.py): demo ({_preset_sizes('demo')}) or paper ({_preset_sizes('paper')})."),
    alpha_min: Optional[float] = typer.Option(None, "--alpha-min", help="default: the preset's (-concept.alpha_max)."),
    alpha_max: Optional[float] = typer.Option(None, "--alpha-max", help="default: the preset's (concept.alpha_max)."),
    n_alphas: Optional[int] = typer.Option(None, "--n-alphas", help="linspace points (0 is added); default: the preset's."),
    alphas: Optional[str] = AlphasOpt,
    n_prompts: Optional[int] = typer.Option(None, "--n-prompts", help="Use the first N prompts; default: the preset's."),
    completions: Optional[int] = typer.Option(None, "--completions", help="Completions per prompt and alpha."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens"),
    temperature: float = typer.Option(1.0, "--temperature"),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k", help="0: off."),
    seed: int = typer.Option(0, "--seed", help="Completion seeds derive from (seed, prompt, index), shared across alphas."),
    batch_size: int = typer.Option(64, "--batch-size", help="Rows (alpha x prompt x completion) per generate call."),
    chat: Optional[bool] = PromptChatOpt,
    positions: str = PositionsOpt,
    normalize: bool = NormalizeOpt,
    alpha_unit: Optional[str] = typer.Option(None, "--alpha-unit", help="raw or resid (see `sweep tokens --help`); "
                                             "default: the preset's (resid, like `steerstrength run`)."),
    concept: Optional[str] = ConceptOpt,
    setting: Optional[str] = SettingOpt,
    out: Path = OutOpt,
    model: Optional[str] = ModelOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    blocks_path: Optional[str] = BlocksPathOpt,
) -> None:
    """Concept probability in sampled steered completions, judged (Sec. 5, Thm 3.6): concept_*.parquet, concept.json."""
    from steerstrength.config import preset as run_preset
    from steerstrength.io import check_output_dir, read_texts
    from steerstrength.judges import check_judge_name, make_judge
    from steerstrength.metrics.concept import concept_probability
    from steerstrength.metrics.grid import check_unit, linspace_grid
    from steerstrength.prompts import evaluation_prompts

    start = time.perf_counter()
    run_cfg = run_preset(preset)  # one preset system: the run's, so `sweep concept` and `run` measure the same sizes
    size = run_cfg.concept
    alpha_unit = check_unit(alpha_unit or run_cfg.alpha_unit)
    check_at_least(("--n-prompts", n_prompts, 1), ("--completions", completions, 1),
                   ("--max-new-tokens", max_new_tokens, 1), ("--n-alphas", n_alphas, 1), ("--batch-size", batch_size, 1))
    if alpha_unit != run_cfg.alpha_unit and alphas is None and (alpha_min is None or alpha_max is None):
        raise InputError(f"the {preset} preset's grid is in {run_cfg.alpha_unit} units (+/-{size.alpha_max:g}); with "
                         f"--alpha-unit {alpha_unit} give --alpha-min and --alpha-max, or --alphas")
    check_output_dir(out, names=("concept_completions.jsonl", "concept_scores.parquet", "concept_curve.parquet",
                                 "concept.json"))
    for name in judge or []:
        check_judge_name(name)
    if (positive is None) != (negative is None):
        raise InputError("give both --positive and --negative (P and N texts), or neither")
    pos = [r["text"] for r in read_texts(positive, min_count=2, what="positive text file")] if positive else None
    neg = [r["text"] for r in read_texts(negative, min_count=2, what="negative text file")] if negative else None
    prompt_list = ([r["text"] for r in read_texts(prompts, what="prompt file")] if prompts
                   else evaluation_prompts("train"))
    # The preset's prompt count applies to the built-in prompts; a --prompts file is used whole (as in `run`).
    prompt_list = prompt_list[: n_prompts if n_prompts is not None else (size.n_prompts if prompts is None else None)]
    preset_grid = linspace_grid(-size.alpha_max, size.alpha_max, size.n_alphas, zero=False).tolist()
    if alphas is None and n_alphas is None and alpha_min is None and alpha_max is None:
        grid = list(preset_grid)
    else:
        lo = preset_grid[0] if alpha_min is None else alpha_min
        hi = preset_grid[-1] if alpha_max is None else alpha_max
        grid = alpha_grid(alphas, lo, hi, n_alphas if n_alphas is not None else size.n_alphas)[0].tolist()
    st = Steering(model, dtype, device, blocks_path, vectors, layers, concept, setting, normalize, positions,
                  alpha_unit)
    concept_name = st.labels["concept"]
    if not concept_name:
        raise InputError(f"{vectors} names no concept; pass --concept (e.g. --concept joy)")
    if not judge:
        from steerstrength.judges import best_judge

        try:
            judge = [best_judge(concept_name)]
        except InputError:
            judge = ["llm"]
    judge_lm = None
    if "llm" in judge:
        judge_lm = st.model if judge_model is None else load(judge_model, dtype=dtype, device=device)
    judges = [make_judge(name, model=judge_lm, device="cpu" if str(st.model.device) == "cpu" else str(st.model.device))
              for name in judge]
    n_completions = completions if completions is not None else size.completions
    new_tokens = max_new_tokens if max_new_tokens is not None else size.max_new_tokens
    results = []
    for layer in st.layers:
        total = len(grid) * len(prompt_list) * n_completions * (1 + len(judges))
        with progress_bar(f"concept {concept_name}, layer {layer} (generate, then judge)", total) as advance:
            results.append(concept_probability(
                st.model, st.vectors[layer], layer, concept_name, alphas=st.raw(layer, grid).tolist(),
                prompts=prompt_list,
                n_completions=n_completions, max_new_tokens=new_tokens, judges=judges, positive=pos, negative=neg,
                temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, chat=chat, positions=positions,
                setting=st.labels["setting"], batch_size=batch_size, holdout=holdout, progress=advance))
        _concept_table(results[-1].summary)
    header = dict(st.header(), metric="concept_probability", preset=preset, judges=list(judge),
                  judge_model=judge_lm.name if judge_lm is not None else None,
                  sizes=dict(n_alphas=len(grid), n_prompts=len(prompt_list), completions=n_completions,
                             max_new_tokens=new_tokens))
    paths = _merge(results, header, time.perf_counter() - start, out, "concept",
                   {"completions": "_completions.jsonl", "scores": "_scores.parquet", "curve": "_curve.parquet"}, st)
    log(f"wrote {', '.join(paths.values())} and {out / 'concept.json'} ({time.perf_counter() - start:.1f} s)")


def _mmlu_table(summary: dict) -> None:
    from rich.table import Table

    subjects = sorted(summary["accuracy_per_subject"])
    table = Table(title=f"MMLU accuracy, layer {summary['layer']} ({summary['n_questions']} questions, "
                        f"{summary['k_shots']}-shot; random guess {summary['random_guess']:.2f})")
    for col in ["alpha", "accuracy", "95% CI", "log p(answer)"] + subjects:
        table.add_column(col, justify="right")
    acc = summary["accuracy"]
    for i, alpha in enumerate(acc["alpha"]):
        table.add_row(f"{alpha:g}", f"{acc['accuracy'][i]:.3f}", f"[{acc['ci_low'][i]:.2f}, {acc['ci_high'][i]:.2f}]",
                      f"{acc['mean_logp_answer'][i]:.3f}", *[f"{summary['accuracy_per_subject'][s][i]:.2f}" for s in subjects])
    console.print(table)
    for note in summary["notes"]:
        log(f"note: {note}")


@sweep_app.command("mmlu")
def sweep_mmlu(
    vectors: Path = VectorsOpt,
    layers: Optional[str] = LayersOpt,
    source: Optional[str] = typer.Option(None, "--source", help="A CSV directory, a Parquet file or directory, "
                                         "cais/mmlu (default, through `datasets`), or sample (the toy questions shipped "
                                         "for tests and the demo: not MMLU)."),
    mmlu_dir: Optional[Path] = typer.Option(None, "--mmlu-dir", help="Original MMLU CSVs: *_dev.csv, *_test.csv "
                                                                    "(question,A,B,C,D,answer; no header)."),
    mmlu_parquet: Optional[Path] = typer.Option(None, "--mmlu-parquet", help="cais/mmlu Parquet files (question, "
                                                                            "subject, choices, answer)."),
    subjects: Optional[str] = typer.Option(None, "--subjects", help="Comma-separated; default: every subject found."),
    k_shots: int = typer.Option(5, "--k-shots", help="Solved dev questions before each question."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most N test questions per subject."),
    alpha_min: float = typer.Option(-40.0, "--alpha-min"),
    alpha_max: float = typer.Option(40.0, "--alpha-max"),
    n_alphas: int = typer.Option(9, "--n-alphas", help="linspace points; 0 is added."),
    alphas: Optional[str] = AlphasOpt,
    chat: bool = typer.Option(False, "--chat/--no-chat", help="Put the k-shot prompt in the chat template."),
    token_budget: int = typer.Option(16384, "--token-budget", help="Rows x tokens per forward (memory bound)."),
    positions: str = PositionsOpt,
    normalize: bool = NormalizeOpt,
    alpha_unit: str = UnitOpt,
    concept: Optional[str] = ConceptOpt,
    setting: Optional[str] = SettingOpt,
    out: Path = OutOpt,
    model: Optional[str] = ModelOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    blocks_path: Optional[str] = BlocksPathOpt,
) -> None:
    """MMLU accuracy against alpha by answer-letter likelihood (App. A, Fig. A.6): mmlu.parquet, mmlu_questions.parquet."""
    from steerstrength.io import check_output_dir
    from steerstrength.metrics.mmlu import load_mmlu, mmlu_accuracy, resolve_source
    from steerstrength.pipeline import mmlu_source

    start = time.perf_counter()
    check_at_least(("--token-budget", token_budget, 1), ("--k-shots", k_shots, 0), ("--limit", limit, 1))
    check_output_dir(out, names=("mmlu_questions.parquet", "mmlu.parquet", "mmlu.json"))
    grid, _ = alpha_grid(alphas, alpha_min, alpha_max, n_alphas)
    wanted = [s.strip() for s in subjects.split(",") if s.strip()] if subjects else None
    csv_dir, parquet = resolve_source(mmlu_source(source), mmlu_dir, mmlu_parquet)  # `sample`: as `run` reads it
    data = load_mmlu(wanted, mmlu_dir=csv_dir, mmlu_parquet=parquet, limit=limit)  # bad data fails before the model loads
    st = Steering(model, dtype, device, blocks_path, vectors, layers, concept, setting, normalize, positions,
                  alpha_unit)
    n_questions = sum(len(test) for _, test in data.values())
    results = []
    for layer in st.layers:
        with progress_bar(f"MMLU, layer {layer} (questions x alphas)", n_questions * grid.numel()) as advance:
            results.append(mmlu_accuracy(
                st.model, st.vectors[layer], layer, alphas=st.raw(layer, grid), mmlu_dir=csv_dir, mmlu_parquet=parquet, data=data,
                k_shots=k_shots, limit=limit, chat=chat, positions=positions,
                concept=st.labels["concept"], setting=st.labels["setting"], token_budget=token_budget,
                progress=advance))
        _mmlu_table(results[-1].summary)
    header = dict(st.header(), metric="mmlu_accuracy", random_guess=0.25)
    paths = _merge(results, header, time.perf_counter() - start, out, "mmlu",
                   {"table": "_questions.parquet", "accuracy": ".parquet"}, st)
    log(f"wrote {', '.join(paths.values())} and {out / 'mmlu.json'} ({time.perf_counter() - start:.1f} s)")
