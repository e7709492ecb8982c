"""Contexts for next-token sweeps: the built-in set (data/contexts.json) or the user's, checked up front."""

from __future__ import annotations

from typing import Sequence

from steerstrength.errors import InputError
from steerstrength.models import Model
from steerstrength.prompts import builtin_concepts, builtin_contexts, check_ids, read_contexts  # noqa: F401


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


def derive_contexts(concept: str, texts: Sequence[str], n: int, words: int) -> list[dict]:
    """Concept contexts from a concept's own (held-out) P texts, as the curated ones are written: the opening `words`
    words of each text (one fewer than the text has, so the next token stays open), the first `n` distinct ones."""
    out, seen = [], set()
    for text in texts:
        parts = text.split()
        if len(parts) < 3:
            continue
        opening = " ".join(parts[: min(words, len(parts) - 1)]).rstrip(",;:")
        if opening.casefold() in seen:
            continue
        seen.add(opening.casefold())
        out.append(dict(id=f"{concept[:66]}-own-{len(out) + 1}", text=opening, kind="concept"))
        if len(out) == n:
            break
    return out


def stage_contexts(concept: str | None, contexts_file=None, n_contexts: int | None = None,
                   own: Sequence[dict] | None = None) -> list[dict]:
    """The contexts a next-token stage sweeps: the user's file, or the built-in ones (neutral + the concept's own, or
    `own` for a concept without built-in ones: derive_contexts); `n_contexts` keeps that many, half of them (at least
    one) the concept's own when it has some."""
    if contexts_file:
        items = read_contexts(contexts_file)
    else:
        items = builtin_contexts(concept)
        if own and not any(c["kind"] == "concept" for c in items):
            items = items + [dict(c, kind="concept") for c in own]
        if n_contexts is not None:
            own = [c for c in items if c["kind"] == "concept"]
            neutral = [c for c in items if c["kind"] != "concept"]
            keep_own = own[: min(len(own), max(1, n_contexts // 2))]
            items = neutral[: max(0, n_contexts - len(keep_own))] + keep_own
    return items if n_contexts is None else items[:n_contexts]
