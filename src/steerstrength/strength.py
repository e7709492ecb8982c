"""The strength that travels with a vector: the recommended alphas and the fluent range of a run, in the vector's
own metadata (DESIGN.md: "a vector file and an exported control vector say the model, layer, r_l, unit, and the
recommended alpha where one was measured").

`meta["strength"]` of a SteeringVectors (safetensors metadata; GGUF key-value metadata on export) holds, per layer:

    {"unit": "raw",                        # the alphas below multiply this file's v: h + alpha v
     "source": "runs/demo",                # where they were measured
     "layers": {"28": {"residual_norm": r_l, "norm": ||v||, "resid_scale": ||v|| / r_l,
                       "recommended": [{"method", "budget", "alpha", "alpha_resid", "scope"}, ...],
                       "fluent_range": {"alpha": [lo, hi], "alpha_resid": [lo, hi], "judge", "rule"}}}}

`scope` says what a method's alpha is: "one alpha" (iso-kl, global, curvature on a corpus) or "mean over prompts"
(sweet-spot, curvature per prompt, grid-judge: one alpha per prompt, averaged here). The fluent range is the concept
stage's `fit_range`: the contiguous non-degenerate alphas around 0 (metrics/concept.py's degeneration rule).
"""

from __future__ import annotations

import json
from pathlib import Path

from steerstrength.errors import InputError

ONE_ALPHA = "one alpha"
MEAN_OVER_PROMPTS = "mean over prompts"


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is not a readable {what} ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} is not a {what}: its JSON is a {type(data).__name__}, not an object")
    return data


def measured_files(source) -> tuple[Path | None, Path | None]:
    """(recommend.json, concept.json) of a run directory, or a recommend.json given alone (its concept.json beside
    it when there is one); an InputError when neither is found."""
    source = Path(source)
    if source.is_dir():
        tables = source / "tables" if (source / "tables").is_dir() else source
        rec, con = tables / "recommend.json", tables / "concept.json"
    elif source.is_file():
        rec, con = source, source.parent / "concept.json"
    else:
        raise InputError(f"--recommended {source} does not exist; give a run directory or a recommend.json")
    rec, con = (rec if rec.is_file() else None), (con if con.is_file() else None)
    if rec is None and con is None:
        raise InputError(f"{source} holds no recommend.json and no concept.json (tables/ of a run that ran the "
                         "recommend or concept stage); run `steerstrength recommend` or the run's stages first")
    return rec, con


def strength_from(source, sv, concept: str | None = None) -> dict:
    """meta["strength"] for the vectors `sv` (a SteeringVectors) from a run directory or a recommend.json.

    Only entries for sv's concept (its meta, or `concept`) and layers are kept; alphas are the run's raw alphas on the
    run's vector, so they mean what they meant in the run only for the file the run steered (its vectors/<concept>
    .safetensors); nothing here can check that another file of the same concept and layers is that one.
    """
    rec_path, con_path = measured_files(source)
    concept = concept or sv.meta.get("concept") or ""
    layers: dict[str, dict] = {}
    for layer in sv.layers:
        norm = float(sv.vectors[layer].double().norm())
        r = (sv.meta.get("residual_norms") or {}).get(str(layer))
        layers[str(layer)] = dict(norm=norm, residual_norm=None if r is None else float(r),
                                  resid_scale=None if r is None else norm / float(r), recommended=[])

    def resid(entry: dict, alpha):
        scale = entry["resid_scale"]
        return None if scale is None or alpha is None else float(alpha) * scale

    if rec_path is not None:
        rec = _read_json(rec_path, "recommend.json")
        for key, s in (rec.get("per_vector") or {}).items():
            if not isinstance(s, dict) or (concept and s.get("concept") not in (concept, "", None)):
                continue
            entry = layers.get(str(s.get("layer")))
            if entry is None:
                continue
            one = s.get("alpha")
            alpha = one if one is not None else s.get("mean_alpha")
            if alpha is None:
                continue
            entry["recommended"].append(dict(method=s.get("method") or key.rsplit("/", 1)[-1],
                                             budget=s.get("budget", rec.get("budget")), alpha=float(alpha),
                                             alpha_resid=resid(entry, alpha),
                                             scope=ONE_ALPHA if one is not None else MEAN_OVER_PROMPTS))
    if con_path is not None:
        from steerstrength.metrics.concept import DEGENERATION_RULE

        con = _read_json(con_path, "concept.json")
        for key, s in con.items():
            if not isinstance(s, dict) or "/" not in key:
                continue
            c, _, layer = key.rpartition("/")
            entry = layers.get(layer)
            if entry is None or (concept and c != concept):
                continue
            for judge, curve in (s.get("curves") or {}).items():
                span = curve.get("fit_range") if isinstance(curve, dict) else None
                if span:
                    entry["fluent_range"] = dict(alpha=[float(x) for x in span],
                                                 alpha_resid=[resid(entry, x) for x in span], judge=judge,
                                                 rule=DEGENERATION_RULE)
                    break
    found = any(e["recommended"] or "fluent_range" in e for e in layers.values())
    if not found:
        raise InputError(f"{source} has no recommendation or fluent range for concept {concept or '?'!r} at layers "
                         f"{', '.join(map(str, sv.layers))}; pass the run (or recommend.json) these vectors came from")
    return dict(unit="raw", source=str(source), layers=layers)


def with_strength(sv, strength: dict):
    """A copy of `sv` whose metadata carries `strength` (meta["strength"])."""
    from steerstrength.vectors import SteeringVectors

    return SteeringVectors(dict(sv.vectors), dict(sv.meta, strength=strength), dict(sv.resamples))


def recommended_alpha(strength: dict, layer: int, method: str | None = None) -> dict:
    """One recommended entry at `layer`: `method`'s, else the first one-alpha method (iso-kl, global, corpus
    curvature), else the first recorded. An InputError names what is there when nothing fits."""
    entries = ((strength or {}).get("layers") or {}).get(str(layer), {}).get("recommended") or []
    if not entries:
        raise InputError(f"no recommended alpha is recorded for layer {layer}; pass --recommended RUN (a run or "
                         "recommend.json that measured this vector) or give --alpha")
    if method is not None:
        for e in entries:
            if e["method"] == method:
                return e
        raise InputError(f"no {method!r} recommendation for layer {layer}; recorded: "
                         f"{', '.join(e['method'] for e in entries)}")
    return next((e for e in entries if e.get("scope") == ONE_ALPHA), entries[0])


def recommended_strengths(strength: dict | None, layer: int, method: str | None = None) -> tuple[list[float], list[str]]:
    """0 and each recommended alpha at `layer` (raw; `method`'s only, when given), each with its label ("unsteered",
    "iso-kl (B=1)"): the strengths `steerstrength generate --recommended` compares."""
    if not strength:
        raise InputError("give the strengths with --alpha (e.g. --alpha 0,0.5,1) or --recommended RUN")
    entries = ((strength.get("layers") or {}).get(str(layer)) or {}).get("recommended") or []
    if method is not None:
        entries = [e for e in entries if e["method"] == method]
    if not entries:
        raise InputError(f"--recommended has no{' ' + method if method else ''} recommended alpha for layer {layer}; "
                         "give --alpha")
    return [0.0] + [e["alpha"] for e in entries], ["unsteered"] + [f"{e['method']} (B={e['budget']:g})" for e in entries]


def fluent_range(strength: dict, layer: int) -> dict | None:
    return ((strength or {}).get("layers") or {}).get(str(layer), {}).get("fluent_range")
