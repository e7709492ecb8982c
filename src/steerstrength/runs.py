"""The run directory: JSON manifest, lock, per-stage status and resumable chunks."""

from __future__ import annotations

import json
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from steerstrength.errors import RunError
from steerstrength.io import write_json

MANIFEST = "manifest.json"


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("steerstrength", "torch", "transformers", "safetensors", "pandas", "pyarrow", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


class RunDir:
    """A run directory. Stages record a key (hash of their inputs); a stage whose key matches is skipped."""

    def __init__(self, root: str | os.PathLike):
        # Absolute, so that outputs are recorded relative to the run directory whatever the working
        # directory: a re-run from elsewhere, or of a moved directory, finds them.
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.manifest = self._read()

    def _read(self) -> dict:
        path = self.root / MANIFEST
        if not path.is_file():
            return {"stages": {}}
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            raise RunError(f"{path} is not valid JSON; delete the run directory or pick another --out") from None

    def save(self) -> None:
        write_json(self.root / MANIFEST, self.manifest)

    def path(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

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
            yield
        finally:
            lock.release()

    # ------------------------------------------------------------------ stages

    def is_done(self, stage: str, key: str) -> bool:
        rec = self.manifest["stages"].get(stage)
        if not rec or rec.get("status") != "done" or rec.get("key") != key:
            return False
        return all((self.root / f).exists() for f in rec.get("outputs", []))

    def run_stage(self, stage: str, key: str, fn: Callable[[], list[str] | None]) -> tuple[str, float]:
        """Run `fn` unless the stage is done with the same key; returns (status, seconds)."""
        if self.is_done(stage, key):
            return "cached", self.manifest["stages"][stage].get("seconds", 0.0)
        self.manifest["stages"][stage] = {"status": "running", "key": key, "started": time.time()}
        self.save()
        start = time.perf_counter()
        outputs = fn() or []
        seconds = time.perf_counter() - start
        self.manifest["stages"][stage] = {
            "status": "done", "key": key, "seconds": round(seconds, 3),
            "outputs": [str(Path(o).resolve().relative_to(self.root)) for o in outputs],
            "finished": time.time(),
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
