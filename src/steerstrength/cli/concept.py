"""`steerstrength sweep concept | mmlu`: parse, call the metrics, print a table, write Parquet + JSON."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from steerstrength.cli.common import Steering, check_at_least, check_seed, command_grid, console, load, log, \
    progress_bar, sweep_command
from steerstrength.cli.options import (MODEL, STEERED, SWEEP, AlphaMaxOpt, AlphaUnitOpt, GridOptions, ModelOptions,
                                       PresetOpt, PromptOptions, SectionOptions, SeedOpt, SteeredOptions, SweepRun,
                                       TextsOptions, grid_group, prompts_group, section_group, texts_group)
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


CONCEPT = section_group(
    "concept",
    holdout=typer.Option(None, "--holdout", help="Fraction of P and N held out to measure each judge."),
    completions=typer.Option(None, "--completions", help="Completions per prompt and alpha."),
    max_new_tokens=typer.Option(None, "--max-new-tokens"),
    temperature=typer.Option(None, "--temperature"),
    top_p=typer.Option(None, "--top-p"),
    top_k=typer.Option(None, "--top-k", help="0: off."),
    batch_size=typer.Option(None, "--batch-size", help="Rows (alpha x prompt x completion) per generate call."),
)


@sweep_command("concept")
def sweep_concept(
    steered: SteeredOptions = STEERED,
    judge: Optional[List[str]] = typer.Option(None, "--judge", "-j", help="probe (calibrated), llm, lexicon or "
                                              "embedding; repeat to score the same completions with several judges; "
                                              "default: the best measured judge for the concept (judges.best_judge)."),
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help="The llm judge's model; default: the steered model."),
    texts: TextsOptions = texts_group("P texts (JSONL 'text' or one per line): judge calibration and held-out "
                                      "accuracy."),
    prompts: PromptOptions = prompts_group("Prompts (JSONL 'text' or one per line); default: the 32 neutral "
                                           "evaluation prompts (training half).",
                                           "Use the first N prompts; default: the preset's."),
    grid: GridOptions = grid_group("concept").but(
        alpha_min=typer.Option(None, "--alpha-min", help="default: the preset's (-concept.alpha_max)."),
        alpha_max=AlphaMaxOpt("default: the preset's (concept.alpha_max)."),
        alpha_unit=AlphaUnitOpt("raw or resid (see `sweep tokens --help`); default: the preset's (resid, like "
                                "`steerstrength run`).")),
    sizes: SectionOptions = CONCEPT,
    seed: int = SeedOpt("Completion seeds derive from (seed, prompt, index), shared across alphas; the random "
                        "directions (--controls) derive from it too."),
    run: SweepRun = SWEEP.but(preset=PresetOpt(f"Sizes: the concept section of `steerstrength run --preset NAME` "
                                               f"(config.py): demo ({_preset_sizes('demo')}) or paper "
                                               f"({_preset_sizes('paper')}).")),
    model: ModelOptions = MODEL,
) -> None:
    """Concept probability in sampled steered completions, judged (Sec. 5, Thm 3.6): concept_*.parquet, concept.json."""
    from steerstrength.grid import check_unit
    from steerstrength.judges import check_judge_name, make_judge
    from steerstrength.stages import concept_stage, judge_texts

    check_at_least(("--n-prompts", prompts.n_prompts, 1), ("--completions", sizes.completions, 1),
                   ("--max-new-tokens", sizes.max_new_tokens, 1), ("--n-alphas", grid.n_alphas, 1),
                   ("--batch-size", sizes.batch_size, 1))
    check_seed(seed)
    # One preset system: the run's concept section, so `sweep concept` and `run` measure the same sizes.
    cfg, size = sizes.of(run.preset, n_prompts=prompts.n_prompts, chat=prompts.chat)
    unit = check_unit(grid.alpha_unit or cfg.alpha_unit)
    alphas = command_grid(grid, section=size, cfg=cfg, unit=unit, zero=False)
    run.check_out("concept_completions.jsonl", "concept_scores.parquet", "concept_curve.parquet", "concept.json")
    for name in judge or []:
        check_judge_name(name)
    pos, neg = texts.read("text file", min_count=2)
    prompt_list = prompts.texts(size.n_prompts)
    st = Steering(model, steered, unit)
    concept_name = st.labels["concept"]
    if not concept_name:
        raise InputError(f"{steered.vectors} names no concept; pass --concept (e.g. --concept joy)")
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
        judge_lm = st.model if judge_model is None else load(judge_model, dtype=model.dtype, device=model.device)
    judges = [make_judge(name, model=judge_lm, device="cpu" if str(st.model.device) == "cpu" else str(st.model.device))
              for name in judge]
    with run.folder():
        result = concept_stage(st.model, st.steered(cfg, run.controls, seed), size, prompts=prompt_list, labels=st.labels,
                               positions=steered.positions, grid=alphas, judges=judges, judge_model=judge_lm,
                               texts=(pos, neg), seed=seed, progress=progress_bar, on_vector=_concept_table)
        header = st.header(run.start, metric="concept_probability", preset=run.preset, judges=list(judge),
                           judge_model=judge_lm.name if judge_lm is not None else None,
                           sizes=dict(n_alphas=len(alphas), n_prompts=len(prompt_list), completions=size.completions,
                                      max_new_tokens=size.max_new_tokens))
        paths = run.write(result, header)
    log(f"wrote {', '.join(str(p) for p in paths)} ({run.seconds():.1f} s)")


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


MMLU = section_group(
    "mmlu",
    k_shot=typer.Option(None, "--k-shots", help="Solved dev questions before each question; default: the preset's "
                        "mmlu.k_shot."),
    max_questions=typer.Option(None, "--limit", help="At most N test questions per subject; default: the preset's "
                               "mmlu.max_questions."),
    chat=typer.Option(None, "--chat/--no-chat", help="Put the k-shot prompt in the chat template."),
    token_budget=typer.Option(None, "--token-budget", help="Rows x tokens per forward (memory bound)."),
)


@sweep_command("mmlu")
def sweep_mmlu(
    steered: SteeredOptions = STEERED,
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
    mmlu: SectionOptions = MMLU,
    grid: GridOptions = grid_group("mmlu"),
    run: SweepRun = SWEEP,
    model: ModelOptions = MODEL,
) -> None:
    """MMLU accuracy against alpha by answer-letter likelihood (App. A, Fig. A.6): mmlu.parquet, mmlu_questions.parquet."""
    from steerstrength.grid import check_unit
    from steerstrength.stages import mmlu_questions, mmlu_stage

    check_at_least(("--token-budget", mmlu.token_budget, 1), ("--k-shots", mmlu.k_shot, 0),
                   ("--limit", mmlu.max_questions, 1), ("--n-alphas", grid.n_alphas, 1))
    run.check_out("mmlu_questions.parquet", "mmlu.parquet", "mmlu.json")
    wanted = [s.strip() for s in subjects.split(",") if s.strip()] if subjects else None
    cfg, section = mmlu.of(run.preset, subjects=wanted)
    unit = check_unit(grid.alpha_unit or cfg.alpha_unit)
    alphas = command_grid(grid, section=section, cfg=cfg, unit=unit)
    source = source if source is not None or mmlu_dir or mmlu_parquet else section.source
    # The preset's subjects go with the preset's source; another source is read whole unless --subjects says.
    wanted = wanted if wanted is not None or source != section.source else (section.subjects or None)
    # Bad data fails before the model loads.
    questions = mmlu_questions(source, wanted, section.max_questions, mmlu_dir=mmlu_dir, mmlu_parquet=mmlu_parquet)
    st = Steering(model, steered, unit)
    with run.folder():
        result = mmlu_stage(st.model, st.steered(cfg, run.controls), section, questions=questions,
                            source=source or str(mmlu_dir or mmlu_parquet), labels=st.labels,
                            positions=steered.positions, grid=alphas, progress=progress_bar)
        for summary in result.summary()["per_vector"].values():
            _mmlu_table(summary)
        paths = run.write(result, st.header(run.start, metric="mmlu_accuracy", random_guess=0.25, preset=run.preset))
    log(f"wrote {', '.join(str(p) for p in paths)} ({run.seconds():.1f} s)")
