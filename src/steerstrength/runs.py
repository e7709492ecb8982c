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
from typing import Callable, Iterable, Iterator

from steerstrength.errors import InputError, RunError
from steerstrength.io import atomic_path, is_temp_name, write_json, write_parquet

MANIFEST = "manifest.json"
LOCK = ".lock"
# Where the stages write; leftover temp files of a killed writer (io.atomic_path: `.NAME.XXXX.tmp`) are swept
# from these folders and from the root itself, never from elsewhere (--out may be a folder with other files).
RUN_FOLDERS = ("prompts", "vectors", "tables", "figures", "corpus", ".chunks")
# What else a run writes at its root (models/: the run directories of a run over several models). None of these, and
# nothing under them, may be a symbolic link: a write, a read or a delete through one would reach outside the run.
RUN_FILES = (MANIFEST, "config.toml", "report.html", LOCK, "models")


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


def find_link(root: Path, names: Iterable[str]) -> Path | None:
    """The first symbolic link among root/NAME for `names`, or under those that are folders (a linked folder is
    reported, never entered)."""
    for name in names:
        top = root / name
        if top.is_symlink():
            return top
        folders = [top] if top.is_dir() else []
        while folders:  # scandir's entries know whether they are links: no stat per file (.chunks holds thousands)
            with os.scandir(folders.pop()) as entries:
                for entry in entries:
                    if entry.is_symlink():
                        return Path(entry.path)
                    if entry.is_dir(follow_symlinks=False):
                        folders.append(entry.path)
    return None


def refuse_links(root: Path, names: Iterable[str], option: str = "--out") -> None:
    """One RunError line, before anything is written, when an output of `root` (or a folder of them) is a symbolic
    link: steerstrength writes, reads back and deletes only inside the folder it was given."""
    link = find_link(root, names)
    if link is not None:
        raise RunError(f"{link} is a symbolic link (to {os.readlink(link)}); steerstrength writes only inside "
                       f"{root}: replace the link with a real folder or file, or give another {option}")


def remove_temp_files(folder: Path, *, recursive: bool) -> int:
    """Remove the temp files of io.atomic_path (io.is_temp_name) a killed writer left in `folder` (and below it when
    `recursive`): regular files only, never through a linked folder. Only under the folder's lock."""
    if folder.is_symlink() or not folder.is_dir():
        return 0
    found = []
    for here, _, files in os.walk(folder):  # followlinks=False
        found += [Path(here, f) for f in files if is_temp_name(f)]
        if not recursive:
            break
    found = [p for p in found if p.is_file() and not p.is_symlink()]
    for p in found:
        p.unlink(missing_ok=True)
    return len(found)


@contextmanager
def output_lock(directory: str | os.PathLike, option: str = "--out") -> Iterator[None]:
    """One writer per output folder (a run directory, or a command's --out): a second gets one RunError line at once
    rather than waiting (it would overwrite the first's results with its own when it ended)."""
    from filelock import FileLock, Timeout

    directory = Path(directory)
    refuse_links(directory, (LOCK,), option)
    directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(directory / LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RunError(f"another steerstrength run or sweep is writing {directory}; wait for it to finish or give "
                       f"another {option}") from None
    try:
        yield
    finally:
        lock.release()


@contextmanager
def output_folder(directory: str | os.PathLike) -> Iterator[Path]:
    """A command's --out while the command computes and writes: locked (output_lock), cleared of the temp files a
    killed writer left at its top (never below: --out may hold other files)."""
    directory = Path(directory)
    with output_lock(directory):
        remove_temp_files(directory, recursive=False)
        yield directory


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
        refuse_links(self.root, RUN_FILES + RUN_FOLDERS)
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
        """One writer per run directory (output_lock); temp files a killed writer left are removed first."""
        with output_lock(self.root):
            self.sweep_temp_files()
            yield

    def sweep_temp_files(self) -> int:
        """Remove the temp files a killed writer left at the root and in RUN_FOLDERS (only under the lock)."""
        n = remove_temp_files(self.root, recursive=False)
        n += sum(remove_temp_files(self.root / folder, recursive=True) for folder in RUN_FOLDERS)
        if n:
            self.notes.append(f"removed {n} temporary file(s) left by an interrupted run")
        return n

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
    """The one writer of stage outputs: every table, then <name>.json (the summary, plus `extra`), each atomically;
    then, last, the set's index <name>.set.json (each file's size and sha256), which check_result_set reads."""
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
    paths = [Path(p) for p in paths]
    index = {"stage": result.name, "files": {p.name: file_record(p) for p in paths}}
    return paths + [write_json(directory / set_index(result.name), index)]


def set_index(name: str) -> str:
    """The file that closes a set of results written by write_result: written last, it records each file of the set."""
    return f"{name}.set.json"


def check_result_set(directory: str | os.PathLike, name: str, files: Iterable[str], rerun: str) -> None:
    """Refuse (one InputError line naming `rerun`, the command that writes the set again) to read `files` of a set
    `name` unless its index records each as it is now: a set that a killed or concurrent writer left mixed or
    unfinished is never read."""
    directory = Path(directory)
    for f in files:
        if not (directory / f).is_file():
            raise InputError(f"{directory / f} does not exist; run `{rerun}`")
    index = directory / set_index(name)
    try:
        records = json.loads(index.read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):  # missing, not UTF-8 / JSON, not an object
        records = None
    if not isinstance(records, dict):
        raise InputError(f"{directory} holds no finished set of {name} results ({index.name} is missing or damaged: "
                         f"its writer was interrupted, or an older steerstrength wrote it); run `{rerun}` "
                         "again")
    for f in files:
        if not is_intact(directory / f, records.get(f)):
            raise InputError(f"{directory / f} is not the file the last {name} set written there recorded (its writer "
                             f"was interrupted, or another wrote over it); run `{rerun}` again")


def resume_command(run_dir: Path) -> str:
    """The command that resumes (or repairs) a run: its own config.toml, so no preset's defaults replace the run's."""
    run_dir = Path(run_dir)
    config = run_dir / "config.toml"
    return f"steerstrength run --config {config} --out {run_dir}" if config.is_file() else \
        f"steerstrength run --out {run_dir}"
