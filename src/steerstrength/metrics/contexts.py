"""Contexts for next-token sweeps: the built-in set (data/contexts.json) or the user's, checked up front."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Sequence

from steerstrength.errors import InputError
from steerstrength.models import Model


def _builtin() -> dict:
    return json.loads(resources.files("steerstrength").joinpath("data/contexts.json").read_text(encoding="utf-8"))


def builtin_concepts() -> list[str]:
    """The paper's 8 concepts that have built-in concept-positive contexts."""
    return sorted(_builtin()["concepts"])


def builtin_contexts(concept: str | None = None) -> list[dict]:
    """The 44 neutral contexts, plus the 4 concept-positive ones of `concept` when it is one of the 8."""
    data = _builtin()
    out = [dict(c, kind="neutral") for c in data["neutral"]]
    if concept:
        out += [dict(c, kind="concept") for c in data["concepts"].get(concept.lower(), [])]
    return out


def read_contexts(path) -> list[dict]:
    """User contexts: JSONL with a `text` field (optional `id`, `kind`) or one context per line."""
    from steerstrength.io import read_texts

    rows = read_texts(Path(path), what="contexts file")
    out = [dict(id=str(r.get("id", f"user-{i + 1:02d}")), text=r["text"], kind=str(r.get("kind", "user")))
           for i, r in enumerate(rows)]
    return check_ids(out, where=f"{path}: ")


def check_ids(contexts: list[dict], *, where: str = "") -> list[dict]:
    """The contexts unchanged if every id is a safe file-name part (ids name chunk files) and no two are the same
    (ignoring case, as some disks do); else one InputError line."""
    from steerstrength.prompts import check_name

    seen: dict[str, int] = {}
    for i, c in enumerate(contexts):
        try:
            check_name(c["id"], "context id")
        except InputError as exc:
            raise InputError(f"{where}context {i + 1}: {exc}") from None
        first = seen.setdefault(c["id"].casefold(), i)
        if first != i:
            raise InputError(f"{where}context id {c['id']!r} is given twice (contexts {first + 1} and {i + 1}; ids "
                             "name files, so they must differ in more than case); give each context its own id")
    return contexts


def as_contexts(model: Model, contexts: Sequence[str | dict] | str, *, chat: bool = False) -> list[dict]:
    """Contexts as dicts with id/text/kind, each checked against the model's maximum length before any compute."""
    if isinstance(contexts, str):
        contexts = [contexts]
    out = []
    for i, ctx in enumerate(contexts):
        item = dict(ctx) if isinstance(ctx, dict) else {"text": ctx}
        if not isinstance(item.get("text"), str) or not item["text"].strip():
            raise InputError(f"context {i} is empty; give non-empty contexts")
        item["id"] = str(item.get("id", f"c{i:02d}"))
        item.setdefault("kind", "user")
        n = len(model.token_ids(item["text"], chat=chat))
        if model.max_length and n > model.max_length:
            raise InputError(f"context {item['id']!r} has {n} tokens, more than {model.name}'s maximum "
                             f"{model.max_length}; shorten it")
        out.append(item)
    if not out:
        raise InputError("no contexts given; pass at least one context")
    return check_ids(out)
