"""The run directory: JSON manifest, lock, per-stage status and resumable chunks.

Every output and every chunk part is recorded with its size and sha256: a file that was truncated or changed
after it was written is recomputed, never reused. A damaged manifest or chunk is set aside, not fatal.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from steerstrength.errors import RunError
from steerstrength.io import atomic_path, write_json, write_parquet

MANIFEST = "manifest.json"
# Where the stages write; leftover temp files of a killed writer (io.atomic_path: `.NAME.XXXX.tmp`) are swept
# from these folders and from the root itself, never from elsewhere (--out may be a folder with other files).
RUN_FOLDERS = ("prompts", "vectors", "tables", "figures", "corpus", ".chunks")


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("steerstrength", "torch", "transformers", "safetensors", "pandas", "pyarrow", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def file_record(path: str | os.PathLike) -> dict:
    """{size, sha256} of a file as written."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return dict(size=os.path.getsize(path), sha256=digest.hexdigest())


def content_digest(path: str | os.PathLike, suffixes: tuple[str, ...] = ()) -> str:
    """sha256 of the bytes a stage reads at `path`: a file's, or a directory's files (those ending in `suffixes`, or
    all; linked folders are not entered, as the readers' rglob does not), each under its relative name."""
    path = Path(path)
    if not path.is_dir():
        return file_record(path)["sha256"]
    digest = hashlib.sha256()
    for p in sorted(p for p in path.rglob("*") if p.is_file() and (not suffixes or p.name.endswith(suffixes))):
        digest.update(f"{p.relative_to(path).as_posix()}\0{file_record(p)['sha256']}\0".encode())
    return digest.hexdigest()


def is_intact(path: Path, record) -> bool:
    """Whether `path` is still the file `record` (file_record) describes."""
    if not isinstance(record, dict) or not path.is_file() or path.stat().st_size != record.get("size"):
        return False
    return file_record(path)["sha256"] == record.get("sha256")


class RunDir:
    """A run directory. Stages record a key (hash of their inputs); a stage whose key matches is skipped."""

    def __init__(self, root: str | os.PathLike):
        # Absolute, so that outputs are recorded relative to the run directory whatever the working
        # directory: a re-run from elsewhere, or of a moved directory, finds them.
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.notes: list[str] = []  # what the run directory repaired, for the caller to show
        self.manifest = self._read()

    def _read(self) -> dict:
        path = self.root / MANIFEST
        if not path.is_file():
            return {"stages": {}}
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            manifest = None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("stages"), dict):
            # The stages run again; their finished chunks (.chunks/, checked one by one) are kept.
            self.notes.append(f"{path} was damaged; every stage is checked again and finished chunks are reused")
            return {"stages": {}}
        return manifest

    def save(self) -> None:
        write_json(self.root / MANIFEST, self.manifest)

    def path(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def relative(self, path: str | os.PathLike) -> str:
        return str(Path(path).resolve().relative_to(self.root))

    @contextmanager
    def lock(self) -> Iterator[None]:
        """One writer per run directory; a second gets a clear error instead of waiting."""
        from filelock import FileLock, Timeout

        lock = FileLock(str(self.root / ".lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise RunError(f"another steerstrength run is writing {self.root}; wait for it or use another --out") from None
        try:
            self.sweep_temp_files()
            yield
        finally:
            lock.release()

    def sweep_temp_files(self) -> int:
        """Remove the temp files a killed writer left (only under the lock: no writer of ours is running)."""
        found = list(self.root.glob(".*.tmp"))
        for folder in RUN_FOLDERS:
            if (self.root / folder).is_dir():
                found += (self.root / folder).rglob(".*.tmp")
        found = [p for p in found if p.is_file() and not p.is_symlink()]
        for p in found:
            p.unlink(missing_ok=True)
        if found:
            self.notes.append(f"removed {len(found)} temporary file(s) left by an interrupted run")
        return len(found)

    # ------------------------------------------------------------------ stages

    def why_stale(self, stage: str, key: str) -> str | None:
        """None when the stage is done with this key and every output is as written; else why it must run."""
        rec = self.manifest["stages"].get(stage)
        if not isinstance(rec, dict) or rec.get("status") != "done":
            return "not done"
        if rec.get("key") != key:
            return "its inputs changed"
        files = rec.get("files")
        if not isinstance(files, dict) or set(files) != set(rec.get("outputs", [])):
            return "its outputs carry no size and checksum (older run directory)"
        for rel, record in files.items():
            if not is_intact(self.root / rel, record):
                return f"{rel} is missing or changed since it was written"
        return None

    def is_done(self, stage: str, key: str) -> bool:
        return self.why_stale(stage, key) is None

    def run_stage(self, stage: str, key: str, fn: Callable[[], list[str] | None],
                  log: Callable[[str], None] | None = None) -> tuple[str, float]:
        """Run `fn` unless the stage is done with the same key and intact outputs; returns (status, seconds)."""
        why = self.why_stale(stage, key)
        if why is None:
            return "cached", self.manifest["stages"][stage].get("seconds", 0.0)
        if log is not None and why not in ("not done", "its inputs changed"):
            log(f"[{stage}] recomputed: {why}")
        self.manifest["stages"][stage] = {"status": "running", "key": key, "started": time.time()}
        self.save()
        start = time.perf_counter()
        outputs = [self.relative(o) for o in fn() or []]
        seconds = time.perf_counter() - start
        self.manifest["stages"][stage] = {
            "status": "done", "key": key, "seconds": round(seconds, 3), "outputs": outputs,
            "files": {rel: file_record(self.root / rel) for rel in outputs}, "finished": time.time(),
        }
        self.save()
        return "done", seconds

    def mark(self, stage: str, status: str, note: str = "") -> None:
        self.manifest["stages"][stage] = {"status": status, "note": note}
        self.save()

    # ------------------------------------------------------------------ chunks

    def chunk_dir(self, stage: str, key: str) -> Path:
        """Where a stage keeps finished chunks; a different key starts from an empty directory."""
        d = self.root / ".chunks" / stage / key
        d.mkdir(parents=True, exist_ok=True)
        return d

    def chunk(self, stage: str, key: str, name: str, compute: Callable[[], dict],
              log: Callable[[str], None] | None = None) -> dict:
        """read_or_compute in this stage key's chunk directory (a different key starts from an empty one)."""
        return read_or_compute(self.chunk_dir(stage, key), name, compute,
                               log=None if log is None else (lambda m: log(f"[{stage}] {m}")))


def read_or_compute(directory: str | os.PathLike, name: str, compute: Callable[[], dict],
                    log: Callable[[str], None] | None = None) -> dict:
    """THE resume mechanism: a finished piece ({part: DataFrame}) in `directory` is read back, else computed and
    written atomically. Each part is its own Parquet file (types intact); the `.done` marker, written last, records
    each part's size and sha256; a piece whose marker or parts are damaged is computed again."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / f"{name}.done"
    if marker.is_file():
        frames = _read_chunk(directory, name, marker)
        if frames is not None:
            return frames
        if log is not None:
            log(f"chunk {name} was damaged; computing it again")
        marker.unlink()  # its parts are overwritten below; a kill meanwhile leaves no marker to trust
    frames = compute()
    records = {part: file_record(write_parquet(directory / f"{name}.{part}.parquet", frame))
               for part, frame in frames.items()}
    with atomic_path(marker) as tmp:
        tmp.write_text(json.dumps(records, sort_keys=True))
    return frames


def _read_chunk(directory: Path, name: str, marker: Path) -> dict | None:
    """The chunk's frames, or None when its marker or any part is not as written."""
    import pandas as pd

    try:
        records = json.loads(marker.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None
    if not isinstance(records, dict) or not records:
        return None
    frames = {}
    for part, record in records.items():
        path = directory / f"{name}.{part}.parquet"
        if not is_intact(path, record):
            return None
        try:
            frames[part] = pd.read_parquet(path)
        except Exception:  # noqa: BLE001 - the checksum matched, yet the file does not read: recompute it
            return None
    return frames


# ----------------------------------------------------------------------------- stage results and the one writer


@dataclass
class StageResult:
    """What a stage measured: tables by file name (.parquet, or .jsonl for texts) and a JSON summary.

    `sweep X` and the run's stage X return one and write it with `write_result`; results of several concepts
    combine with `StageResult.combine`.
    """

    name: str  # the summary is written as <name>.json
    frames: dict = field(default_factory=dict)  # file name -> DataFrame
    info: dict | None = None

    def tables(self) -> dict:
        return self.frames

    def summary(self) -> dict | None:
        return self.info

    @classmethod
    def combine(cls, results: "list[StageResult]") -> "StageResult":
        """One result: each table concatenated (in order), the summaries merged key by key (nested dicts merge)."""
        import pandas as pd

        if not results:
            raise ValueError("no stage results to combine")
        frames = {name: pd.concat([r.frames[name] for r in results if name in r.frames], ignore_index=True)
                  for name in results[0].frames}
        info = None
        for r in results:
            if r.info is not None:
                info = _merge(info or {}, r.info)
        return cls(results[0].name, frames, info)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, dict) else value
    return out


def write_result(directory: str | os.PathLike, result: StageResult, extra: dict | None = None) -> list[Path]:
    """The one writer of stage outputs: every table, then <name>.json (the summary, plus `extra`), each atomically."""
    from steerstrength.io import write_jsonl

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, frame in result.tables().items():
        if name.endswith(".jsonl"):
            paths.append(write_jsonl(directory / name, frame.to_dict(orient="records")))
        else:
            paths.append(write_parquet(directory / name, frame))
    summary = result.summary()
    if summary is not None or extra:
        paths.append(write_json(directory / f"{result.name}.json", dict(extra or {}, **(summary or {}))))
    return [Path(p) for p in paths]


def resume_command(run_dir: Path) -> str:
    """The command that resumes (or repairs) a run: its own config.toml, so no preset's defaults replace the run's."""
    run_dir = Path(run_dir)
    config = run_dir / "config.toml"
    return f"steerstrength run --config {config} --out {run_dir}" if config.is_file() else \
        f"steerstrength run --out {run_dir}"
