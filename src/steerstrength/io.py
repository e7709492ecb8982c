"""Atomic file output and checked file input: nothing half-written, one clear error per bad file."""

from __future__ import annotations

import contextlib
import json
import os
import re
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


# atomic_path's temp names (`.NAME.XXXXXXXX.tmp`) for the kinds of file steerstrength writes: what a sweep of the temp
# files a killed writer left removes, and nothing else (a user's `.notes.tmp` beside our outputs is kept).
TEMP_NAME = re.compile(r"\..+\.(parquet|jsonl?|safetensors|gguf|png|pdf|html|toml|done)\.[a-z0-9_]+\.tmp")


def json_digest(obj) -> str:
    """The first 16 hex digits of sha256 over `obj` as sorted JSON: the one key of configs and stage inputs."""
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_temp_name(name: str) -> bool:
    return TEMP_NAME.fullmatch(name) is not None


def write_figure(fig, out_dir: str | os.PathLike, stem: str, *, dpi: int = 120) -> list[Path]:
    """A matplotlib figure as `stem`.png and `stem`.pdf, each atomically (the PDF without a creation date, so the
    same figure gives the same bytes)."""
    paths = []
    for ext in ("png", "pdf"):
        path = Path(out_dir) / f"{stem}.{ext}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=dpi, metadata={"CreationDate": None} if ext == "pdf" else None)
        paths.append(path)
    return paths


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


TEXTS = "UTF-8 text (JSONL, or one text per line)"  # what a text file given by the user must be


def read_texts(path, *, field: str = "text", min_count: int = 1, what: str = "prompt file") -> list[dict]:
    """Rows of a JSONL file (objects with a `field` key) or a plain file with one text per line.

    Raises InputError naming the file and the line for a missing, unreadable, binary or non-UTF-8 file, an
    empty file or a bad line.
    """
    path = check_input_file(path, what)
    rows: list[dict] = []
    is_jsonl = path.suffix.lower() in (".jsonl", ".ndjson", ".json")  # a .json of texts: JSON lines, never plain text
    try:
        with open(path, encoding="utf-8-sig") as fh:  # -sig: a leading byte-order mark is not part of the text
            for lineno, line in enumerate(fh, start=1):
                if "\0" in line:
                    raise InputError(_binary(path, what, lineno))
                if not line.strip():
                    continue
                if is_jsonl:
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise InputError(f"{path}:{lineno}: malformed JSON ({exc.msg}); fix or remove that "
                                         "line") from None
                    if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                        raise InputError(f"{path}:{lineno}: expected an object with a string {field!r} field")
                    rows.append(obj)
                else:
                    rows.append({field: line.rstrip("\n")})
    except UnicodeDecodeError:
        raise _not_utf8(path, what) from None
    except OSError as exc:
        raise InputError(f"{what} {path} cannot be read ({exc.strerror}); check its permissions") from None
    if len(rows) < min_count:
        raise InputError(
            f"{what} {path} has {len(rows)} text(s); it needs at least {min_count} "
            "(JSONL with a 'text' field, or one text per line)"
        )
    return rows


def read_text_file(path, *, what: str = "file", want: str = "UTF-8 text") -> str:
    """A small text file (a TOML config), decoded as UTF-8, with the same one-line errors as read_texts."""
    path = check_input_file(path, what)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise _not_utf8(path, what, want) from None
    except OSError as exc:
        raise InputError(f"{what} {path} cannot be read ({exc.strerror}); check its permissions") from None
    if "\0" in text:
        raise InputError(_binary(path, what, text.count("\n", 0, text.index("\0")) + 1, want))
    return text


def check_input_file(path, what: str) -> Path:
    """`path` if it is an existing regular file; else one InputError line (missing, a directory, a device)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path} is a directory; give a file")
    if not path.is_file():
        if path.exists():
            raise InputError(f"{what} {path} is not a regular file; give a file")
        raise InputError(f"{what} {path} does not exist; check the path")
    return path


def _binary(path: Path, what: str, lineno: int, want: str = TEXTS) -> str:
    return f"{what} {path}:{lineno}: a NUL byte: this is a binary file, not text; give {want}"


def _not_utf8(path: Path, what: str, want: str = TEXTS) -> InputError:
    """The first line that is not UTF-8 (found again in binary: a text-mode reader cannot say where it failed)."""
    with open(path, "rb") as fh:
        if fh.read(2) in (b"\xff\xfe", b"\xfe\xff"):
            return InputError(f"{what} {path} is UTF-16 text; save it as UTF-8")
        fh.seek(0)
        binary = False
        for lineno, raw in enumerate(fh, start=1):
            binary = binary or b"\0" in raw
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                byte = f"byte 0x{raw[exc.start]:02x} is not UTF-8"
                if binary:
                    return InputError(f"{what} {path}:{lineno}: a binary file, not text ({byte}); give {want}")
                return InputError(f"{what} {path}:{lineno}: {byte} (another encoding, e.g. Latin-1?); save the file "
                                  "as UTF-8")
    return InputError(f"{what} {path} is not UTF-8 text; save it as UTF-8")


# ----------------------------------------------------------------------------- output destinations


def check_output_dir(path, *, names: Iterable[str] = (), option: str = "--out") -> Path:
    """Refuse, before any compute, an output directory that cannot be made or written, or whose output `names`
    are taken by directories: one InputError line naming `option`. Nothing is left on disk."""
    path = Path(path)
    if _exists(path, option) and not path.is_dir():
        raise InputError(f"{option} {path} is a file, not a directory; give a directory (it is made if missing)")
    for name in names:
        if (path / name).is_symlink():
            raise InputError(f"{option} {path}: {path / name} is a symbolic link (to {os.readlink(path / name)}); "
                             f"steerstrength writes only inside {option}: remove the link or pick another {option}")
        if (path / name).is_dir():
            raise InputError(f"{option} {path}: {path / name} is a directory, so {name} cannot be written; "
                             f"remove it or pick another {option}")
    _check_writable(path, option)
    return path


def check_output_file(path, *, option: str = "--out", example: str = "out") -> Path:
    """Refuse, before any compute, an output file path that is a directory, not a regular file (a device), or lies
    where nothing can be written: one InputError line naming `option`. Nothing is left on disk."""
    path = Path(path)
    if _exists(path, option):
        if path.is_dir():
            raise InputError(f"{option} {path} is a directory; give a file path such as {path / example}")
        if not path.is_file():
            raise InputError(f"{option} {path} exists and is not a regular file; give a file path")
    _check_writable(path.parent, option, shown=path)
    return path


def _exists(path: Path, option: str) -> bool:
    try:
        return path.exists()
    except OSError as exc:
        raise InputError(f"{option} {path} cannot be reached ({exc.strerror}); pick another {option}") from None


def _check_writable(directory: Path, option: str, shown: Path | None = None) -> None:
    """The directory exists and takes new files, or its nearest existing ancestor is a directory that does.

    Probed by making (and removing) a temporary directory: permission bits say nothing for root or a read-only
    mount."""
    shown = directory if shown is None else shown
    existing = directory
    while not _exists(existing, option) and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{option} {shown} lies under {existing}, which is a file; pick another {option}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".steerstrength-probe-", dir=existing))
    except OSError as exc:
        raise InputError(f"{option} {shown}: cannot write in {existing} ({exc.strerror}); "
                         f"pick another {option}") from None
