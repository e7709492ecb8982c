"""Reading a run directory: `RunTables` gives its tables and summaries (read-only) and says why one is missing.

runs.py writes a run directory; this module reads it back for the figures (plots.py), the report (report.py), the
verdicts and the comparison across models (crossmodel.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from steerstrength.errors import InputError
from steerstrength.prompts import SAFE_NAME
from steerstrength.runs import resume_command

if TYPE_CHECKING:
    import pandas as pd

# Which stage writes the inputs of each table, to say why a figure is missing.
TABLE_STAGE = {"tokens": "tokens", "tokens_top": "tokens", "logodds": "logodds", "limit": "limit", "xent": "xent",
               "concept_curve": "concept", "concept": "concept", "mmlu": "mmlu", "recommend": "recommend",
               "depth": "depth", "layer_scan": "vectors"}


class RunTables:
    """Read-only access to a run directory's tables and summaries; says why one is not available."""

    def __init__(self, run_dir: str | Path):
        self.root = Path(run_dir)
        if not self.root.is_dir():
            raise InputError(f"run directory {self.root} does not exist; give the --out of a `steerstrength run`")
        path = self.root / "manifest.json"
        try:
            self.manifest = json.loads(path.read_text()) if path.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError(f"{path} is not valid JSON; rerun `{resume_command(self.root)}`") from None
        check_manifest(self.manifest, path, self.root)
        self._cache: dict = {}

    def has(self, name: str) -> bool:
        return (self.root / "tables" / f"{name}.parquet").is_file()

    def table(self, name: str, columns: list[str] | None = None, filters: list | None = None,
              direction: str | None = "v") -> "pd.DataFrame | None":
        """tables/<name>.parquet (only `columns`, rows matching pyarrow `filters`), or None when absent.

        `direction`: a table with a `direction` column (controls are rows: v, random-0, ...) gives the rows of this
        direction only, v's by default, so every reader of v's numbers reads what it read before controls; None:
        every direction."""
        import pandas as pd
        import pyarrow.parquet as pq

        path = self.root / "tables" / f"{name}.parquet"
        if not path.is_file():
            return None
        by_direction = [("direction", "==", direction)] if (
            direction is not None and "direction" in pq.read_schema(path).names) else []
        if filters is not None:  # filtered reads can be large (the tokens table): not kept
            return pd.read_parquet(path, columns=columns, filters=list(filters) + by_direction)
        key = (name, tuple(columns or ()), direction)
        if key not in self._cache:
            self._cache[key] = pd.read_parquet(path, columns=columns, filters=by_direction or None)
        return self._cache[key]

    def has_directions(self, name: str) -> bool:
        """Whether tables/<name>.parquet has a `direction` column (its rows include random directions)."""
        import pyarrow.parquet as pq

        path = self.root / "tables" / f"{name}.parquet"
        return path.is_file() and "direction" in pq.read_schema(path).names

    def summary(self, name: str) -> dict | None:
        """tables/<name>.json, or None when absent or unreadable."""
        path = self.root / "tables" / f"{name}.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None

    def stage_record(self, stage: str) -> dict:
        return self.manifest.get("stages", {}).get(stage, {})

    def why_missing(self, name: str) -> str:
        """Why table `name` is not there, from the manifest's record of the stage that writes it."""
        stage = TABLE_STAGE.get(name, name)
        rec = self.stage_record(stage)
        status = rec.get("status")
        if status == "skipped":
            return f"the {stage} stage was skipped: {rec.get('note') or 'disabled'}"
        if status == "running":
            return (f"the {stage} stage did not finish (failed or interrupted); rerun "
                    f"`{resume_command(self.root)}`")
        if status == "done":
            return f"the {stage} stage ran but tables/{name} is missing"
        return f"the {stage} stage has not run"

    def concepts(self) -> list[str]:
        listed = self.manifest.get("config", {}).get("concepts") or []
        found: list[str] = []
        for name in ("tokens_top", "xent", "concept_curve", "mmlu", "limit"):
            t = self.table(name, columns=["concept"])
            if t is not None:
                found += [c for c in t["concept"].unique().tolist() if c not in found]
        ordered = [c for c in listed if c in found] + [c for c in found if c not in listed]
        # Concept names become figure file names: a hostile run directory must not write outside figures/.
        return [c for c in (ordered or list(listed)) if isinstance(c, str) and SAFE_NAME.fullmatch(c)]

    def layers(self) -> list[int]:
        found: set[int] = set()
        for name in ("tokens_top", "xent", "concept_curve", "mmlu", "limit"):
            t = self.table(name, columns=["layer"])
            if t is not None:
                found |= {int(x) for x in t["layer"].unique().tolist()}
        return sorted(found)

    def context_texts(self) -> dict[str, str]:
        """context id -> text: the built-in contexts, or the run's contexts file (best effort)."""
        if "contexts" in self._cache:
            return self._cache["contexts"]
        from steerstrength.prompts import builtin_contexts, read_contexts

        out: dict[str, str] = {}
        try:
            for concept in self.concepts() or [None]:
                out.update({c["id"]: c["text"] for c in builtin_contexts(concept)})
            for note in ((self.summary("tokens") or {}).get("contexts") or {}).values():  # derived ones too
                out.update({c["id"]: c["text"] for c in note.get("contexts") or []})
            path = self.manifest.get("config", {}).get("tokens", {}).get("contexts_file")
            if path:
                out.update({c["id"]: c["text"] for c in read_contexts(path)})
        except (InputError, OSError, KeyError, ValueError):
            pass  # texts only label panels; ids are enough
        self._cache["contexts"] = out
        return out

    def target_tokens(self, concept: str) -> set[int] | None:
        """The top-M token ids (log-odds rank < n_target, Def. 3.2), or None without the logodds stage."""
        key = ("target", concept)
        if key not in self._cache:
            lo = self.table("logodds", columns=["token_id", "rank"], filters=[("concept", "==", concept)])
            n_target = (self.summary("logodds") or {}).get(concept, {}).get("definitions", {}).get("n_target") or 100
            self._cache[key] = (None if lo is None or lo.empty
                                else set(lo.loc[lo["rank"] < n_target, "token_id"].astype(int).tolist()))
        return self._cache[key]

    def vectors(self, concept: str):
        path = self.root / "vectors" / f"{concept}.safetensors"
        if not path.is_file():
            return None
        from steerstrength.vectors import SteeringVectors

        return SteeringVectors.load(path)


def check_manifest(manifest, path: Path, root: Path) -> None:
    """The manifest's shape as the readers use it (runs.py writes it): an object whose stages, config, model and
    versions are objects, each stage's record an object. One InputError line for a damaged file."""
    damaged = f"the file is damaged; `{resume_command(root)}` rewrites it"
    if not isinstance(manifest, dict):
        raise InputError(f"{path} is a JSON {type(manifest).__name__}, not an object; {damaged}")
    for key in ("stages", "config", "model", "versions"):
        value = manifest.get(key)
        if value is not None and not isinstance(value, dict):
            raise InputError(f"{path}: its {key!r} is a {type(value).__name__}, not an object; {damaged}")
    from steerstrength.config import RunConfig

    sections = {k for k, v in RunConfig().to_dict().items() if isinstance(v, dict)}
    parts = [(f"stage {k!r}", v) for k, v in (manifest.get("stages") or {}).items()]
    parts += [(f"config section {k!r}", v) for k, v in (manifest.get("config") or {}).items() if k in sections]
    for what, value in parts:
        if not isinstance(value, dict):
            raise InputError(f"{path}: its {what} is a {type(value).__name__}, not an object; {damaged}")
