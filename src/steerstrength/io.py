"""Atomic file output and checked file input: nothing half-written, one clear error per bad file."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from steerstrength.errors import InputError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it is renamed onto `path`, on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; results are ordinary files
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path, obj, *, indent: int = 2) -> Path:
    """JSON, atomically (NaN/inf written as null so any JSON reader accepts the file)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_finite(obj), indent=indent, allow_nan=False) + "\n")
    return Path(path)


def _finite(obj):
    import math

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # numpy / torch scalars
        return _finite(obj.item())
    return obj


def write_parquet(path, frame) -> Path:
    """A pandas DataFrame as Parquet, atomically."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return Path(path)


def write_jsonl(path, rows: Iterable[dict]) -> Path:
    """One JSON object per line, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Path(path)


def read_texts(path, *, field: str = "text", min_count: int = 1, what: str = "prompt file") -> list[dict]:
    """Rows of a JSONL file (objects with a `field` key) or a plain file with one text per line.

    Raises InputError naming the file and the line for a missing file, an empty file or a bad line.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist; check the path")
    rows: list[dict] = []
    is_jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            if is_jsonl:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{path}:{lineno}: malformed JSON ({exc.msg}); fix or remove that line") from None
                if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                    raise InputError(f"{path}:{lineno}: expected an object with a string {field!r} field")
                rows.append(obj)
            else:
                rows.append({field: line.rstrip("\n")})
    if len(rows) < min_count:
        raise InputError(
            f"{what} {path} has {len(rows)} text(s); it needs at least {min_count} "
            "(JSONL with a 'text' field, or one text per line)"
        )
    return rows
