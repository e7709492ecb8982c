"""Evaluation text for cross-entropy: local files, a Hugging Face dataset, or the model's own samples.

Sources (`load_corpus`):
- a `.txt` file (one text per non-empty line), a `.jsonl` file (a `text` field per line), a `.parquet`
  file or a directory of `.parquet` shards with a `text` column (the FineWeb layout);
- `hf:NAME` or `hf:NAME:CONFIG`: a Hugging Face dataset through `datasets` (needs network or a local cache);
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

SAMPLES_FILE = "corpus_samples.jsonl"


def _nonempty(texts: Sequence[str], where: str) -> list[str]:
    kept = [t for t in texts if isinstance(t, str) and t.strip()]
    if not kept:
        raise InputError(f"the corpus {where} holds no non-empty text; give a file with at least one text")
    return kept


def parquet_texts(path: Path, *, field: str = "text", max_texts: int | None = None) -> list[str]:
    """The `field` column of a Parquet file, or of every `.parquet` shard in a directory (sorted)."""
    import pyarrow.parquet as pq

    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise InputError(f"directory {path} holds no .parquet files; give a Parquet file or shard directory")
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


def hf_texts(name: str, *, config: str | None = None, split: str = "train", field: str = "text",
             max_texts: int = 1000, data_files=None) -> list[str]:
    """The first `max_texts` values of `field` in a Hugging Face dataset, streamed (no full download)."""
    try:
        import datasets
    except ImportError:
        raise InputError("loading a Hugging Face dataset needs the `datasets` package: pip install datasets") from None
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
                seed: int = 0, cache_dir=None, progress: Callable[[int], None] | None = None) -> list[str]:
    """Texts of an evaluation corpus from a file, a `hf:` dataset, or (source None) the model's samples."""
    if source is None or str(source) == "":
        if model is None:
            raise InputError("the model-samples corpus needs the model; pass model=")
        if cache_dir is None:
            texts = sample_texts(model, n_samples, sample_tokens, seed=seed, progress=progress)
        else:
            texts = cached_samples(model, cache_dir, n_samples, sample_tokens, seed=seed, progress=progress)
        return _nonempty(texts, "sampled from the model")
    source = str(source)
    if source.startswith("hf:"):
        name, _, config = source[3:].partition(":")
        if not name:
            raise InputError("a dataset source reads hf:NAME or hf:NAME:CONFIG, e.g. hf:HuggingFaceFW/fineweb:sample-10BT")
        texts = hf_texts(name, config=config or None, split=split, field=field, max_texts=max_texts or 1000)
        return _nonempty(texts, source)
    path = Path(source).expanduser()
    if not path.exists():
        raise InputError(f"corpus {path} does not exist; give a .txt/.jsonl/.parquet file, a Parquet directory "
                         "or hf:NAME for a Hugging Face dataset")
    suffix = path.suffix.lower()
    if path.is_dir() or suffix == ".parquet":
        texts = parquet_texts(path, field=field, max_texts=max_texts)
    elif suffix in (".jsonl", ".ndjson", ".txt", ".text"):
        try:
            texts = [row[field] for row in read_texts(path, field=field, what="corpus file")]
        except InputError as exc:
            if "needs at least" in str(exc):
                raise InputError(f"the corpus {path} is empty; give a file with at least one text") from None
            raise
    else:
        raise InputError(f"corpus {path}: unknown file type {suffix or '(none)'}; use .txt, .jsonl or .parquet")
    if max_texts is not None:
        texts = texts[:max_texts]
    return _nonempty(texts, str(path))
