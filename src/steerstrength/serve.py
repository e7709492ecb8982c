"""`steerstrength serve`: a local page to steer live (aiohttp, bound to 127.0.0.1; one static HTML file, no external
asset, no request but to this server).

Endpoints (JSON; a bad request is answered 400 with {"error": "..."} and the server keeps serving):
  GET  /             the page (static/steer.html)
  GET  /api/info     the model, and per vector (id "concept/layer"): r_l, the slider's range, the recommended alphas
                     and fluent range (residual units; strength.py), the concept curve with its control band
  POST /api/next     {vector, prompt, alpha}: the next-token distribution's top tokens at alpha_resid = alpha (and
                     unsteered), KL(p_alpha || p_0), entropy
  POST /api/complete {vector, prompt, alpha, seed?}: a few sampled completions at that alpha, each with its per-token KL
                     and degeneration flag (use.generate_completions)
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

from steerstrength.config import USE
from steerstrength.errors import InputError
from steerstrength.grid import to_raw
from steerstrength.models import Model

MAX_BODY = 64 * 1024  # bytes of a request body: a prompt of max_prompt_chars fits many times over


@dataclass
class Steerable:
    """What the page can steer: the model and its vectors by id, with what a run measured about each."""

    model: Model
    vectors: dict = field(default_factory=dict)  # id -> SteeringVector
    info: dict = field(default_factory=dict)  # id -> the page's facts (strength, curve, band)
    lock: threading.Lock = field(default_factory=threading.Lock)  # one forward at a time

    def vector(self, vid) -> object:
        if not isinstance(vid, str) or vid not in self.vectors:
            raise InputError(f"unknown vector {vid!r}; this server has {', '.join(self.vectors)}")
        return self.vectors[vid]

    def describe(self) -> dict:
        return dict(model=self.model.name, chat=self.model.has_chat_template, max_prompt_chars=USE.max_prompt_chars,
                    alpha_resid_max=USE.alpha_resid_max, completions=USE.serve_completions,
                    vectors=[dict(id=k, **self.info[k]) for k in self.vectors])


def steerable(model: Model, vector_files, run_dir: Path | None = None, recommended: Path | None = None) -> Steerable:
    """Every layer of every vector file, with the run's recommended alphas, fluent ranges and concept curves
    (`recommended`: a run directory or recommend.json to take them from instead; unlike a run's own, which may not
    have them yet, it must hold them)."""
    from steerstrength.strength import strength_from, with_strength
    from steerstrength.vectors import SteeringVectors

    out = Steerable(model)
    for path in vector_files:
        sv = SteeringVectors.load(path)
        sv.check(model)
        if recommended is not None:
            sv = with_strength(sv, strength_from(recommended, sv))
        elif run_dir is not None:
            try:
                sv = with_strength(sv, strength_from(run_dir, sv))
            except InputError:
                pass  # a run without recommend / concept tables: the page shows no recommendation
        strength = sv.meta.get("strength") or {}
        concept = sv.meta.get("concept") or Path(path).stem
        for vec in sv.select(None, model):
            vid = f"{concept}/{vec.layer}"
            scale = vec.resid_scale(model)
            per = (strength.get("layers") or {}).get(str(vec.layer)) or {}
            fluent = per.get("fluent_range")
            out.vectors[vid] = vec
            out.info[vid] = dict(
                concept=concept, layer=vec.layer, residual_norm=vec.r(model), resid_scale=scale,
                recommended=[dict(method=e["method"], budget=e["budget"], alpha_resid=e["alpha"] * scale,
                                  scope=e.get("scope")) for e in per.get("recommended") or []],
                fluent_range=None if not fluent else [x * scale for x in fluent["alpha"]],
                curve=concept_curve(run_dir, concept, vec.layer, scale) if run_dir is not None else None)
    if not out.vectors:
        raise InputError("no steering vectors to serve; give a run directory or -v FILE")
    return out


def concept_curve(run_dir: Path, concept: str, layer: int, scale: float) -> dict | None:
    """The concept stage's pooled curve p(alpha_resid) of v and, where the run has control directions (a `direction`
    column other than "v"), their band (min and max over the random directions) at each alpha; None without it."""
    import pandas as pd

    path = Path(run_dir) / "tables" / "concept_curve.parquet"
    if not path.is_file():
        return None
    try:
        frame = pd.read_parquet(path)
    except Exception:  # noqa: BLE001 - an unreadable table only costs the page its curve
        return None
    if not {"concept", "layer", "scope", "alpha", "p"} <= set(frame):
        return None
    frame = frame[(frame["concept"] == concept) & (frame["layer"] == layer) & (frame["scope"] == "pooled")]
    if "judge" in frame and len(frame):
        frame = frame[frame["judge"] == frame["judge"].iloc[0]]
    if "direction" in frame:
        own, controls = frame[frame["direction"] == "v"], frame[frame["direction"] != "v"]
    else:
        own, controls = frame, frame.iloc[0:0]
    if own.empty:
        return None
    own = own.sort_values("alpha")
    out = dict(alpha_resid=(own["alpha"] * scale).tolist(), p=own["p"].tolist(), band=None)
    if not controls.empty:
        band = controls.groupby("alpha")["p"].agg(["min", "max"]).reset_index().sort_values("alpha")
        out["band"] = dict(alpha_resid=(band["alpha"] * scale).tolist(), low=band["min"].tolist(),
                           high=band["max"].tolist(), n_directions=int(controls["direction"].nunique()))
    return out


def _request(s: Steerable, body) -> tuple[object, str, float]:
    """(vector, prompt, alpha_resid) of a request body, each checked: one clear message for a bad one."""
    if not isinstance(body, dict):
        raise InputError("the request body must be a JSON object with vector, prompt and alpha")
    vec = s.vector(body.get("vector"))
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("prompt must be a non-empty string")
    if len(prompt) > USE.max_prompt_chars:
        raise InputError(f"the prompt has {len(prompt)} characters; at most {USE.max_prompt_chars} are accepted")
    alpha = body.get("alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise InputError("alpha must be a finite number (residual units)")
    if abs(alpha) > USE.alpha_resid_max:
        raise InputError(f"alpha {alpha:g} is outside [-{USE.alpha_resid_max:g}, {USE.alpha_resid_max:g}] "
                         "(residual units)")
    return vec, prompt, float(alpha)


def next_tokens(s: Steerable, body) -> dict:
    from steerstrength.use import top_tokens

    vec, prompt, alpha = _request(s, body)
    raw = float(to_raw([alpha], "resid", vec.resid_scale(s.model))[0])
    with s.lock:
        out = top_tokens(s.model, vec, prompt, raw, chat=s.model.has_chat_template)
    return dict(out, alpha_resid=alpha, alpha=raw)


def completions(s: Steerable, body) -> dict:
    from steerstrength.metrics.concept import SamplingSettings
    from steerstrength.use import generate_completions

    vec, prompt, alpha = _request(s, body)
    seed = body.get("seed", USE.seed)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise InputError("seed must be an integer in [0, 2^32)")
    settings = SamplingSettings(max_new_tokens=USE.serve_max_new_tokens, temperature=USE.temperature,
                                top_p=USE.top_p, top_k=USE.top_k, chat=s.model.has_chat_template)
    with s.lock:
        frame = generate_completions(s.model, vec, [prompt], [alpha], unit="resid",
                                     completions=USE.serve_completions, settings=settings, seed=seed)
    return dict(alpha_resid=alpha, completions=[dict(text=r.completion, kl_mean=r.kl_mean, degenerate=bool(r.degenerate))
                                                for r in frame.itertuples()])


# ----------------------------------------------------------------------------- the web application


def page() -> bytes:
    from importlib.resources import files

    return files("steerstrength").joinpath("static", "steer.html").read_bytes()


SECURITY = {  # the page may talk to this server only; nothing is loaded from anywhere else
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store",
}


def make_app(s: Steerable):
    """The aiohttp application over a Steerable (tests drive it with aiohttp's test client)."""
    from aiohttp import web

    html = page()

    def error(status: int, message: str):
        return web.json_response({"error": message}, status=status, headers=SECURITY)

    def endpoint(compute):
        async def handler(request):
            if request.content_length is not None and request.content_length > MAX_BODY:
                return error(413, f"the request body is over {MAX_BODY} bytes")
            try:
                raw = await request.content.read(MAX_BODY + 1)
                if len(raw) > MAX_BODY:
                    return error(413, f"the request body is over {MAX_BODY} bytes")
                body = json.loads(raw or b"null")
            except (ValueError, UnicodeDecodeError):
                return error(400, "the request body is not JSON")
            try:
                result = await asyncio.get_running_loop().run_in_executor(None, compute, s, body)
            except InputError as exc:
                return error(400, str(exc))
            except Exception as exc:  # noqa: BLE001 - the server stays up; the page shows the message
                return error(500, f"{type(exc).__name__}: {exc}")
            return web.json_response(result, headers=SECURITY, dumps=lambda o: json.dumps(o, allow_nan=False))
        return handler

    async def index(_request):
        return web.Response(body=html, content_type="text/html", charset="utf-8", headers=SECURITY)

    async def info(_request):
        return web.json_response(s.describe(), headers=SECURITY)

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_get("/", index)
    app.router.add_get("/api/info", info)
    app.router.add_post("/api/next", endpoint(next_tokens))
    app.router.add_post("/api/complete", endpoint(completions))
    return app


def serve(s: Steerable, port: int | None = None, *, print_fn=print) -> None:
    """Serve the page on 127.0.0.1 only (never another interface) until Ctrl-C."""
    from aiohttp import web

    port = USE.port if port is None else port
    print_fn(f"steering page for {s.model.name} ({len(s.vectors)} vectors): http://{USE.host}:{port}/  (Ctrl-C stops)")
    web.run_app(make_app(s), host=USE.host, port=port, print=None, handle_signals=True)
