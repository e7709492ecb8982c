"""`steerstrength sweep concept | mmlu`: parse, call the metrics, print a table, write Parquet + JSON."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer

from steerstrength.cli.common import (BlocksPathOpt, DeviceOpt, DtypeOpt, ModelOpt, check_at_least, check_seed, console,
                                      load, log, progress_bar, sweep_app)
from steerstrength.cli.sweeps import (
    AlphasOpt,
    ConceptOpt,
    ControlsOpt,
    LayersOpt,
    NormalizeOpt,
    OutOpt,
    PositionsOpt,
    PromptChatOpt,
    SettingOpt,
    Steering,
    AlphaMinOpt,
    GridUnitOpt,
    PresetOpt,
    VectorsOpt,
    command_grid,
    preset_section,
)
from steerstrength.errors import InputError


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
    holdout: Optional[float] = typer.Option(None, "--holdout", help="Fraction of P and N held out to measure each "
                                                                   "judge."),
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
    temperature: Optional[float] = typer.Option(None, "--temperature"),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="0: off."),
    seed: int = typer.Option(0, "--seed", help="Completion seeds derive from (seed, prompt, index), shared across alphas; "
                                               "the random directions (--controls) derive from it too."),
    controls: Optional[int] = ControlsOpt,
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Rows (alpha x prompt x completion) per "
                                                                        "generate call."),
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
    from steerstrength.grid import check_unit
    from steerstrength.io import check_output_dir, read_texts
    from steerstrength.judges import check_judge_name, make_judge
    from steerstrength.prompts import evaluation_prompts
    from steerstrength.runs import output_folder, write_result
    from steerstrength.stages import concept_stage, judge_texts

    start = time.perf_counter()
    check_at_least(("--n-prompts", n_prompts, 1), ("--completions", completions, 1),
                   ("--max-new-tokens", max_new_tokens, 1), ("--n-alphas", n_alphas, 1), ("--batch-size", batch_size, 1))
    check_seed(seed)
    # One preset system: the run's concept section, so `sweep concept` and `run` measure the same sizes.
    cfg, size = preset_section(preset, "concept", n_prompts=n_prompts, completions=completions,
                               max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                               batch_size=batch_size, holdout=holdout, chat=chat)
    unit = check_unit(alpha_unit or cfg.alpha_unit)
    grid = command_grid(alphas, alpha_min, alpha_max, n_alphas, section=size, unit=unit, cfg=cfg, zero=False)
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
    st = Steering(model, dtype, device, blocks_path, vectors, layers, concept, setting, normalize, positions, unit)
    concept_name = st.labels["concept"]
    if not concept_name:
        raise InputError(f"{vectors} names no concept; pass --concept (e.g. --concept joy)")
    if pos is None:  # the held-out curated pairs, as the run measures its judge on
        pos, neg = judge_texts(concept_name)
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
    with output_folder(out):  # one writer; its tables are one set (runs.check_result_set)
        result = concept_stage(st.model, st.steered(cfg, "concept", controls, seed), size, prompts=prompt_list, labels=st.labels,
                               positions=positions, grid=grid, judges=judges, judge_model=judge_lm, texts=(pos, neg),
                               seed=seed, progress=progress_bar, on_vector=_concept_table)
        header = st.header(start, metric="concept_probability", preset=preset, judges=list(judge),
                           judge_model=judge_lm.name if judge_lm is not None else None,
                           sizes=dict(n_alphas=len(grid), n_prompts=len(prompt_list), completions=size.completions,
                                      max_new_tokens=size.max_new_tokens))
        paths = write_result(out, result, extra=header)
    log(f"wrote {', '.join(str(p) for p in paths)} ({time.perf_counter() - start:.1f} s)")


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
    source: Optional[str] = typer.Option(None, "--source", help="mmlu (the packaged MMLU test set; the preset's "
                                         "default), a CSV directory, a Parquet file or directory, "
                                         "cais/mmlu (through `datasets`), or sample (the toy questions shipped "
                                         "for tests: not MMLU)."),
    mmlu_dir: Optional[Path] = typer.Option(None, "--mmlu-dir", help="Original MMLU CSVs: *_dev.csv, *_test.csv "
                                                                    "(question,A,B,C,D,answer; no header)."),
    mmlu_parquet: Optional[Path] = typer.Option(None, "--mmlu-parquet", help="cais/mmlu Parquet files (question, "
                                                                            "subject, choices, answer)."),
    subjects: Optional[str] = typer.Option(None, "--subjects", help="Comma-separated; default: the preset's "
                                                                    "mmlu.subjects with its source, else every subject."),
    k_shots: Optional[int] = typer.Option(None, "--k-shots", help="Solved dev questions before each question; "
                                                                  "default: the preset's mmlu.k_shot."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most N test questions per subject; default: the "
                                                              "preset's mmlu.max_questions."),
    alpha_min: Optional[float] = AlphaMinOpt,
    alpha_max: Optional[float] = typer.Option(None, "--alpha-max", help="default: the preset's mmlu.alpha_max."),
    n_alphas: Optional[int] = typer.Option(None, "--n-alphas", help="linspace points (0 is added); default: the "
                                                                    "preset's."),
    alphas: Optional[str] = AlphasOpt,
    chat: Optional[bool] = typer.Option(None, "--chat/--no-chat", help="Put the k-shot prompt in the chat template."),
    token_budget: Optional[int] = typer.Option(None, "--token-budget", help="Rows x tokens per forward (memory "
                                                                            "bound)."),
    positions: str = PositionsOpt,
    normalize: bool = NormalizeOpt,
    alpha_unit: Optional[str] = GridUnitOpt,
    concept: Optional[str] = ConceptOpt,
    setting: Optional[str] = SettingOpt,
    controls: Optional[int] = ControlsOpt,
    preset: str = PresetOpt,
    out: Path = OutOpt,
    model: Optional[str] = ModelOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    blocks_path: Optional[str] = BlocksPathOpt,
) -> None:
    """MMLU accuracy against alpha by answer-letter likelihood (App. A, Fig. A.6): mmlu.parquet, mmlu_questions.parquet."""
    from steerstrength.grid import check_unit
    from steerstrength.io import check_output_dir
    from steerstrength.runs import output_folder, write_result
    from steerstrength.stages import mmlu_questions, mmlu_stage

    start = time.perf_counter()
    check_at_least(("--token-budget", token_budget, 1), ("--k-shots", k_shots, 0), ("--limit", limit, 1),
                   ("--n-alphas", n_alphas, 1))
    check_output_dir(out, names=("mmlu_questions.parquet", "mmlu.parquet", "mmlu.json"))
    wanted = [s.strip() for s in subjects.split(",") if s.strip()] if subjects else None
    cfg, section = preset_section(preset, "mmlu", k_shot=k_shots, max_questions=limit, chat=chat,
                                  token_budget=token_budget, subjects=wanted)
    unit = check_unit(alpha_unit or cfg.alpha_unit)
    grid = command_grid(alphas, alpha_min, alpha_max, n_alphas, section=section, unit=unit, cfg=cfg)
    source = source if source is not None or mmlu_dir or mmlu_parquet else section.source
    # The preset's subjects go with the preset's source; another source is read whole unless --subjects says.
    wanted = wanted if wanted is not None or source != section.source else (section.subjects or None)
    # Bad data fails before the model loads.
    questions = mmlu_questions(source, wanted, section.max_questions, mmlu_dir=mmlu_dir, mmlu_parquet=mmlu_parquet)
    st = Steering(model, dtype, device, blocks_path, vectors, layers, concept, setting, normalize, positions, unit)
    with output_folder(out):
        result = mmlu_stage(st.model, st.steered(cfg, "mmlu", controls), section, questions=questions,
                            source=source or str(mmlu_dir or mmlu_parquet), labels=st.labels, positions=positions,
                            grid=grid, progress=progress_bar)
        for summary in result.summary()["per_vector"].values():
            _mmlu_table(summary)
        paths = write_result(out, result, extra=st.header(start, metric="mmlu_accuracy", random_guess=0.25,
                                                          preset=preset))
    log(f"wrote {', '.join(str(p) for p in paths)} ({time.perf_counter() - start:.1f} s)")
