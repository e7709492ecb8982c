"""What a run needs, checked before its first stage: each concept's P and N, its judge, its contexts.

Every function takes a config.RunConfig (`cfg`); config.py calls into this module (validate, build_config), so this
module never imports config back.

`check_run` reads the user's files and names the first problem in one InputError line (the CLI: exit code 2), before
the model loads and before anything is written to the run directory, so no stage fails minutes into a run.

Where a concept's texts come from (`prompt_sources`): its own files (prompts.files, or positive_file / negative_file
for a single concept) always win; otherwise prompts.source ("curated" or "generate").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from steerstrength.errors import InputError

# A user prompt file needs this many texts: every third is held out, and each split needs at least 2.
MIN_USER_TEXTS = 6


@dataclass(frozen=True)
class PromptSource:
    """One concept's P and N: "files" (positive / negative paths; negative None in the random setting), "curated" or
    "generate"."""

    kind: str
    positive: Optional[str] = None
    negative: Optional[str] = None

    def describe(self) -> str:
        if self.kind == "files":
            return f"user files {self.positive}" + (f" and {self.negative}" if self.negative else "")
        return {"curated": "curated pairs (data/concepts)",
                "generate": "generated with the paper's template"}[self.kind]


def has_user_files(cfg) -> bool:
    p = cfg.prompts
    return bool(p.files) or p.positive_file is not None or p.negative_file is not None


def settle_source(cfg) -> None:
    """prompts.source records the truth: "files" when every concept has user files (build_config calls this)."""
    if cfg.prompts.source == "curated" and has_user_files(cfg) and \
            all(s.kind == "files" for s in prompt_sources(cfg).values()):
        cfg.prompts.source = "files"


def check_file_keys(cfg) -> None:
    """The shape of prompts.files and positive_file / negative_file, without reading any file (config.validate)."""
    from pathlib import Path

    p = cfg.prompts
    if not isinstance(p.files, dict):
        raise InputError(f"prompts.files must be a table {{concept = [P file, N file]}}, not {p.files!r}")
    if p.files and (p.positive_file is not None or p.negative_file is not None):
        raise InputError("give prompts.files or prompts.positive_file / negative_file, not both: with several "
                         "concepts, name each concept's files in prompts.files")
    if (p.positive_file is not None or p.negative_file is not None) and len(cfg.concepts) > 1:
        raise InputError(f"prompts.positive_file would give all {len(cfg.concepts)} concepts "
                         f"({', '.join(cfg.concepts)}) the same texts; give each its own: "
                         "prompts.files.CONCEPT=P.jsonl,N.jsonl")
    if p.negative_file is not None and p.positive_file is None:
        raise InputError("prompts.positive_file is missing: prompts.negative_file gives N only; give the P texts too "
                         "(prompts.positive_file=P.jsonl)")
    if p.positive_file is not None and p.negative_file is None and cfg.setting == "contrastive":
        raise InputError("prompts.negative_file is missing: the contrastive setting needs N texts as well as P "
                         "(prompts.negative_file=N.jsonl), or setting=random")
    for concept, files in p.files.items():
        key = f"prompts.files.{concept}"
        if concept not in cfg.concepts:
            raise InputError(f"{key}: {concept!r} is not one of the run's concepts ({', '.join(cfg.concepts)}); add it "
                             "to concepts or remove its files")
        if isinstance(files, str):
            files = [f.strip() for f in files.split(",") if f.strip()]
        if not isinstance(files, list) or not all(isinstance(f, str) and f for f in files):
            raise InputError(f"{key} must be [P file, N file], not {files!r}")
        need = 2 if cfg.setting == "contrastive" else 1
        if len(files) < need:
            raise InputError(f"{key} names {len(files)} file; the {cfg.setting} setting needs the P file and the N "
                             f"file: {key}=P.jsonl,N.jsonl")
        if len(files) > 2:
            raise InputError(f"{key} names {len(files)} files; give the P file and the N file")
        for kind, f in zip(("P", "N"), files):
            if not Path(f).is_file():
                raise InputError(f"{key}: the {kind} file {f} is not a file; check the path")


def prompt_sources(cfg) -> dict[str, PromptSource]:
    """Each concept's P and N source (module doc)."""
    p = cfg.prompts
    out = {}
    for concept in cfg.concepts:
        if concept in p.files:
            files = p.files[concept]
            files = [f.strip() for f in files.split(",")] if isinstance(files, str) else list(files)
            out[concept] = PromptSource("files", files[0], files[1] if len(files) > 1 else None)
        elif p.positive_file is not None:
            out[concept] = PromptSource("files", p.positive_file, p.negative_file)
        else:
            out[concept] = PromptSource("generate" if p.source == "generate" else "curated")
    return out


def has_curated(concept: str) -> bool:
    from steerstrength.prompts import DERIVED, curated_concepts

    return concept.strip().lower() in curated_concepts() or concept.strip().lower() in DERIVED


def check_run(cfg) -> dict[str, PromptSource]:
    """Every concept's files, texts, judge and contexts, before any stage: one InputError line for the first problem.
    Returns the concepts' prompt sources."""
    from steerstrength.prompts import curated_concepts, load_prompts

    check_file_keys(cfg)
    sources = prompt_sources(cfg)
    for concept, src in sources.items():
        if src.kind == "files":
            for kind, path in (("P", src.positive), ("N", src.negative)):
                if path is None:
                    continue
                rows = load_prompts(path, what=f"{concept}'s {kind} file")
                if len(rows) < MIN_USER_TEXTS:
                    raise InputError(f"{concept}'s {kind} file {path} has {len(rows)} texts; a run needs at least "
                                     f"{MIN_USER_TEXTS} (every third is held out to measure the judge and derive "
                                     "contexts)")
        elif cfg.prompts.source == "files":
            raise InputError(f"prompts.source=files but concept {concept!r} has no files; give "
                             f"prompts.files.{concept}=P.jsonl,N.jsonl or prompts.source=curated")
        elif src.kind == "curated" and not has_curated(concept):
            raise InputError(f"no texts for concept {concept!r}: it has no curated pairs (curated: "
                             f"{', '.join(curated_concepts())}); give its files, "
                             f"prompts.files.{concept}=P.jsonl,N.jsonl (README: Your own concept), or "
                             "prompts.source=generate")
        if cfg.concept.enabled or cfg.recommend.enabled:
            check_judge(cfg, concept)
    if cfg.tokens.contexts_file:
        from steerstrength.prompts import read_contexts

        read_contexts(cfg.tokens.contexts_file)  # its texts and ids
    # Otherwise every concept has contexts: the built-in neutral ones, plus its own (built-in for the 8 curated
    # concepts; for any other, derived from its held-out P, which a user file has by MIN_USER_TEXTS).
    return sources


def check_judge(cfg, concept: str) -> None:
    """The run's judge (concept.judge) can judge `concept`: the probe trains on any concept's P / N, the lexicon
    knows emotion words only, the case judge knows "uppercase" only."""
    from steerstrength.judges import RULE_JUDGES, LexiconJudge, judge_for

    judge = judge_for(concept, cfg.concept.judge)
    if judge == "lexicon":
        LexiconJudge.spec(concept)  # one line naming the emotion concepts it knows
    elif judge == "case" and concept.strip().lower() not in RULE_JUDGES:
        raise InputError(f"concept.judge=case judges {', '.join(RULE_JUDGES)} only, not {concept!r}; use "
                         "concept.judge=probe (trained on the run's P and N)")
