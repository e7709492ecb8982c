"""Difference-of-means steering vectors (Eq. 3), one per layer; safetensors and llama.cpp GGUF I/O.

Layer numbering: layer l is the residual stream at the output of block l (0-based), where `steer`
adds alpha * v. llama.cpp adds its tensor `direction.N` to the output of its layer N (also 0-based,
`build_cvec(cur, il)` at the end of block il; `direction.0` is rejected and block 0 is never steered),
so layer l is exported as `direction.l`, and layer 0 cannot be exported.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from steerstrength.errors import InputError
from steerstrength.io import atomic_path, json_digest
from steerstrength.models import Model
from steerstrength.steering import check_layer, layer_states, token_means, token_norms

GGUF_ARCH = "controlvector"
# The only tensor names of a safetensors vector file (no leading zeros: one name per layer).
SAFETENSORS_KEY = re.compile(r"layer\.(?P<layer>0|[1-9][0-9]*)(?P<resamples>\.resamples)?")
# llama.cpp parses the index after "direction." with std::stoi; only plain digits are accepted here.
GGUF_KEY = re.compile(r"direction\.(?P<layer>[0-9]+)")
# A difference of means this small relative to the means is rounding (P and N hold the same texts), not a direction.
ZERO_RTOL = 1e-6


# Provenance a SteeringVector carries from its file (the rest of the file's metadata stays on SteeringVectors).
PROVENANCE = ("model", "model_fingerprint", "concept", "setting", "normalize")


@dataclass(frozen=True, eq=False)
class SteeringVector:
    """One layer's steering vector v [d_model]: it knows its layer and where it came from.

    `residual_norm` is r_l, the layer's median residual norm (for grids in residual units); `meta` is provenance
    (model, fingerprint, concept, setting). Arithmetic gives new vectors of the same layer: `-sv`, `2 * sv`, `sv / 3`.

    Example::

        sv = ss.SteeringVectors.load("vectors.safetensors")[15]
        with sv.apply(model, alpha=4.0):          # a context manager over `steer`: the hook is always removed
            text = model.hf.generate(...)
    """

    vector: torch.Tensor
    layer: int
    residual_norm: float | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.vector, SteeringVector):
            object.__setattr__(self, "vector", self.vector.vector)

    def apply(self, model: Model, alpha, positions: str = "all"):
        """`with sv.apply(model, alpha):` adds alpha * v at block `layer`'s output (Eq. 1) inside the block."""
        from steerstrength.steering import steer

        return steer(model, self.vector, self.layer, alpha, positions)

    @property
    def direction(self) -> str:
        """The tables' `direction` column: "v" for the concept's own vector, "random-k" for a control."""
        return direction_of(self)

    def norm(self) -> torch.Tensor:
        """||v|| (a 0-d tensor, as the tensor's own .norm())."""
        return self.vector.norm()

    def normalized(self) -> "SteeringVector":
        """v / ||v|| (an InputError for the zero vector)."""
        n = self.vector.double().norm()
        if n == 0:
            raise InputError(f"the layer-{self.layer} vector is zero; it cannot be normalized")
        return self._with((self.vector.double() / n).to(self.vector.dtype), normalize=True)

    def resid_scale(self, model: Model | None = None) -> float:
        """alpha_resid per unit of raw alpha: ||v|| / r_l (r_l measured on `model` when not recorded)."""
        from steerstrength.grid import resid_scale

        return resid_scale(self.vector, self.r(model))

    def r(self, model: Model | None = None) -> float:
        """r_l: recorded, or measured on `model`."""
        if self.residual_norm is not None:
            return float(self.residual_norm)
        if model is None:
            raise InputError(f"no residual norm is recorded for layer {self.layer}; pass the model to measure it")
        return residual_norms(model, [self.layer])[self.layer]

    def raw_alphas(self, grid, model: Model | None = None) -> torch.Tensor:
        """An AlphaGrid (raw, unit or resid) as the raw alphas `steer` adds with this vector."""
        from steerstrength.grid import AlphaGrid

        grid = grid if isinstance(grid, AlphaGrid) else AlphaGrid(grid)
        return grid.to_raw(norm=float(self.vector.double().norm()), residual_norm=self.r(model) if grid.unit == "resid" else None)

    def _with(self, vector: torch.Tensor, **meta) -> "SteeringVector":
        return SteeringVector(vector, self.layer, self.residual_norm, dict(self.meta, **meta))

    def __neg__(self) -> "SteeringVector":
        return self._with(-self.vector)

    def __mul__(self, k: float) -> "SteeringVector":
        return self._with(self.vector * float(k))

    __rmul__ = __mul__

    def __truediv__(self, k) -> "SteeringVector":
        return self._with(self.vector / float(k))

    def __repr__(self) -> str:
        what = " ".join(f"{k}={self.meta[k]!r}" for k in ("concept", "model") if self.meta.get(k))
        return f"SteeringVector(layer={self.layer}, d={self.vector.shape[-1]}, norm={float(self.norm()):.4g}{' ' + what if what else ''})"


def _check_residual_norms(norms) -> None:
    """The metadata's r_l per layer: {"layer": positive finite number}, or absent (measured on the model)."""
    if norms is None:
        return
    if not isinstance(norms, dict):
        raise InputError(f"the metadata's residual_norms is a {type(norms).__name__}, not an object {{layer: r_l}}; "
                         "remake the file with `steerstrength vectors` (or drop the key: r_l is then measured)")
    for layer, r in norms.items():
        if not (isinstance(r, (int, float)) and not isinstance(r, bool) and 0 < r < float("inf")) \
                or not str(layer).isdigit():
            raise InputError(f"the metadata's residual_norms[{layer!r}] is {r!r}; r_l is a positive finite number "
                             "per layer: remake the file with `steerstrength vectors` (or drop the key)")


def direction_of(sv) -> str:
    """A vector's `direction` column: "v" for the concept's own vector, "random-k" for a control (random_controls)."""
    return str((getattr(sv, "meta", None) or {}).get("direction", "v"))


def control_seed(seed: int, concept: str, layer: int) -> int:
    """The seed of one (concept, layer)'s random directions: derived from the run seed, the same in every stage."""
    digest = hashlib.sha256(f"controls|{seed}|{concept}|{layer}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def random_controls(sv: SteeringVector, n: int, *, seed: int = 0) -> list[SteeringVector]:
    """n random directions of v's layer and norm, orthogonal to v (Gaussian, v's component removed, rescaled):
    the controls of every stage, meta["direction"] = "random-0" ... (the same n first ones for any larger n).

    Example::

        controls = ss.random_controls(sv[28], 4, seed=0)
        [c.meta["direction"] for c in controls]      # ['random-0', 'random-1', 'random-2', 'random-3']
    """
    v = sv.vector.double().cpu()
    norm = float(v.norm())
    if norm == 0:
        raise InputError(f"the layer-{sv.layer} vector is zero; random directions of its norm would be zero too")
    gen = torch.Generator().manual_seed(control_seed(seed, sv.meta.get("concept", ""), sv.layer))
    unit = v / norm
    out = []
    for k in range(n):
        r = torch.randn(v.numel(), generator=gen, dtype=torch.float64)
        r = r - (r @ unit) * unit
        r = r - (r @ unit) * unit  # twice: orthogonal to rounding
        r = r * (norm / float(r.norm()))
        out.append(SteeringVector(r.to(sv.vector.dtype).to(sv.vector.device), sv.layer, sv.residual_norm,
                                  dict(sv.meta, direction=f"random-{k}")))
    return out


@dataclass
class SteeringVectors:
    """Layer -> SteeringVector, with the metadata that says how they were made (`vectors` holds the tensors)."""

    vectors: dict[int, torch.Tensor]
    meta: dict = field(default_factory=dict)
    # Optional bootstrap replicates: layer -> [K, d_model], for error bars (Fig. A.3).
    resamples: dict[int, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A mapping of SteeringVectors (or of tensors): the tensors are kept.
        self.vectors = {k: v.vector if isinstance(v, SteeringVector) else v for k, v in (self.vectors or {}).items()}
        if not self.vectors:
            raise InputError("no steering vectors given; a SteeringVectors needs at least one layer")
        if not isinstance(self.meta, dict):
            raise InputError(f"the metadata of steering vectors must be a dict (a JSON object), not a "
                             f"{type(self.meta).__name__}")
        sizes = {int(v.shape[-1]) if v.ndim else 0 for v in self.vectors.values()}
        for layer, v in self.vectors.items():
            if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
                raise InputError(f"layer keys must be non-negative integers, not {layer!r}")
            if not v.is_floating_point():
                raise InputError(f"the vector for layer {layer} has dtype {str(v.dtype).removeprefix('torch.')}; "
                                 "steering vectors are floating point (float32)")
            if v.ndim != 1 or len(sizes) != 1:
                raise InputError(f"the vector for layer {layer} has shape {tuple(v.shape)}; every layer needs one "
                                 f"1-D vector of the same size (sizes found: {sorted(sizes)})")
            if not torch.isfinite(v).all():
                raise InputError(f"the vector for layer {layer} contains NaN or inf; recompute it from finite "
                                 "activations (float32 avoids overflow)")
        _check_residual_norms(self.meta.get("residual_norms"))
        d = sizes.pop()
        for layer, r in self.resamples.items():
            if not r.is_floating_point():
                raise InputError(f"the resamples for layer {layer} have dtype {str(r.dtype).removeprefix('torch.')}; "
                                 "they must be floating point (float32)")
            if layer not in self.vectors or r.ndim != 2 or r.shape[1] != d:
                raise InputError(f"resamples for layer {layer} have shape {tuple(r.shape)}; expected [K, {d}] "
                                 "for a layer that has a vector")
            if not torch.isfinite(r).all():
                raise InputError(f"the resamples for layer {layer} contain NaN or inf")

    def __getitem__(self, layer: int) -> SteeringVector:
        if layer not in self.vectors:
            have = ", ".join(str(k) for k in sorted(self.vectors))
            raise InputError(f"no steering vector for layer {layer}; this file has layers {have}")
        recorded = (self.meta.get("residual_norms") or {}).get(str(layer))
        return SteeringVector(self.vectors[layer], layer, None if recorded is None else float(recorded),
                              {k: self.meta[k] for k in PROVENANCE if k in self.meta})

    def __contains__(self, layer: int) -> bool:
        return layer in self.vectors

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.vectors)

    def items(self):
        """(layer, SteeringVector) pairs, by layer."""
        return [(layer, self[layer]) for layer in self.layers]

    def values(self) -> list[SteeringVector]:
        return [self[layer] for layer in self.layers]

    def select(self, layers: Sequence[int] | None = None, model: Model | None = None) -> list[SteeringVector]:
        """The SteeringVector of each layer (all by default), with r_l measured on `model` where not recorded."""
        layers = self.layers if layers is None else list(layers)
        for layer in layers:
            self[layer]  # a one-line error for a layer this object lacks
            if model is not None:
                self.residual_norm(layer, model)  # recorded in meta, so each vector carries it
        return [self[layer] for layer in layers]

    @property
    def layers(self) -> list[int]:
        return sorted(self.vectors)

    @property
    def d_model(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])

    def norms(self) -> dict[int, float]:
        return {layer: float(v.double().norm()) for layer, v in sorted(self.vectors.items())}

    def residual_norm(self, layer: int, model: Model | None = None) -> float:
        """r_l, the layer's median residual norm (recorded when the vectors were made; else measured on `model`)."""
        recorded = (self.meta.get("residual_norms") or {}) if isinstance(self.meta, dict) else {}
        if str(layer) in recorded:
            return float(recorded[str(layer)])
        if model is None:
            raise InputError(f"the vector file records no residual norm for layer {layer}; pass the model to measure it")
        value = residual_norms(model, [layer])[layer]
        self.meta.setdefault("residual_norms", {})[str(layer)] = value
        return value

    def resid_scale(self, layer: int, model: Model | None = None) -> float:
        """alpha_resid per unit of raw alpha at `layer`: ||v_l|| / r_l."""
        from steerstrength.grid import resid_scale

        return resid_scale(self.vectors[layer], self.residual_norm(layer, model))

    def check(self, model: Model) -> "SteeringVectors":
        """Raise InputError unless these vectors fit `model` (d_model and layer range)."""
        if self.d_model != model.d_model:
            made = self.meta.get("model") or "another model"
            raise InputError(f"the steering vectors have size {self.d_model} but {model.name} has d_model "
                             f"{model.d_model}; they were made for {made}")
        for layer in self.layers:
            check_layer(model, layer)
        return self

    def prescaled(self, alpha, unit: str = "raw", model: Model | None = None,
                  layers: Sequence[int] | None = None) -> "SteeringVectors":
        """alpha_l * v_l per layer, so that adding the result once (llama.cpp's `--control-vector FILE`, scale 1)
        steers at `alpha` in `unit` ("raw" or "resid": alpha_l = alpha r_l / ||v_l||, r_l recorded or measured on
        `model`); `alpha` is one number or {layer: alpha}. meta["prescaled"] records the alphas; the strength of
        the unscaled v stays in meta["strength"]."""
        import math

        from steerstrength.grid import check_unit, to_raw

        unit = check_unit(unit, ("raw", "resid"))
        chosen = self.layers if layers is None else sorted(set(int(x) for x in layers))
        given = {int(k): v for k, v in alpha.items()} if isinstance(alpha, dict) else {x: alpha for x in chosen}
        raw, resid = {}, {}
        for layer in chosen:
            self[layer]  # a one-line error for a layer these vectors lack
            a = given.get(layer)
            if a is None or not math.isfinite(float(a)) or float(a) == 0:
                raise InputError(f"the pre-scaling alpha for layer {layer} must be finite and nonzero, not {a!r}")
            scale = self.resid_scale(layer, model) if unit == "resid" or self._has_r(layer) else None
            raw[str(layer)] = float(to_raw([float(a)], unit, scale)[0])
            resid[str(layer)] = None if scale is None else raw[str(layer)] * scale
        one = {float(given[x]) for x in chosen}
        meta = dict(self.meta, prescaled=dict(unit=unit, alpha=one.pop() if len(one) == 1 else None, raw_alpha=raw,
                                              alpha_resid=resid,
                                              note="the tensors hold raw_alpha * v: apply at scale 1; scale s "
                                                   "steers at s x alpha"))
        return SteeringVectors({layer: (self.vectors[layer].double() * raw[str(layer)]).to(self.vectors[layer].dtype)
                                for layer in chosen}, meta, {})

    def _has_r(self, layer: int) -> bool:
        return str(layer) in ((self.meta.get("residual_norms") or {}) if isinstance(self.meta, dict) else {})

    def to(self, device=None, dtype=None) -> "SteeringVectors":
        move = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return SteeringVectors(
            {k: move(v) for k, v in self.vectors.items()},
            dict(self.meta),
            {k: move(v) for k, v in self.resamples.items()},
        )

    # ------------------------------------------------------------------------- peers' objects (docs/use.md)

    def to_steering_vectors(self):
        """steering-vectors' SteeringVector, layer_type "decoder_block" (the output of block l, where ours steers):
        `.apply(model, multiplier=alpha)` there is `sv[l].apply(model, alpha)` here. It has no field for metadata, so
        the model, r_l and strength stay behind (`from_steering_vectors(obj, meta=sv.meta)` puts them back)."""
        try:
            from steering_vectors import SteeringVector as Theirs
        except ImportError as exc:
            raise InputError(f"steering-vectors is not importable ({exc}); pip install steering-vectors") from None
        return Theirs(layer_activations={k: v.detach().clone() for k, v in self.vectors.items()},
                      layer_type="decoder_block")

    @classmethod
    def from_steering_vectors(cls, obj, meta: dict | None = None) -> "SteeringVectors":
        """A steering-vectors SteeringVector (decoder_block layers only: others hook inside a block) as ours."""
        if getattr(obj, "layer_type", "decoder_block") != "decoder_block":
            raise InputError(f"a steering-vectors vector of layer_type {obj.layer_type!r} steers inside a block; only "
                             "decoder_block (the block's output) is a steerstrength layer")
        return cls({int(k): torch.as_tensor(v).detach().float().cpu() for k, v in obj.layer_activations.items()},
                   dict(meta or {}))

    def to_repeng(self):
        """repeng's ControlVector(model_type, directions): `set_control(v, coeff)` there adds coeff * direction to
        the output of layer l, as here. It has no field for metadata (nor has its GGUF export): write our GGUF
        (`to_gguf`) when the strength must travel; repeng's `import_gguf` reads it (ignoring steerstrength.*)."""
        import numpy as np

        try:
            from repeng import ControlVector
        except (ImportError, AttributeError) as exc:  # repeng 0.4 uses np.float_, gone in NumPy 2
            raise InputError(f"repeng is not importable here ({type(exc).__name__}: {exc})") from None
        return ControlVector(model_type=str(self.meta.get("model_type") or "unknown"),
                             directions={k: v.detach().float().cpu().numpy().astype(np.float32)
                                         for k, v in self.vectors.items()})

    @classmethod
    def from_repeng(cls, control_vector, meta: dict | None = None) -> "SteeringVectors":
        """A repeng ControlVector (anything with .directions {layer: array} and .model_type) as ours."""
        directions = {int(k): torch.as_tensor(v).detach().float().reshape(-1).cpu()
                      for k, v in control_vector.directions.items()}
        return cls(directions, dict({"model_type": getattr(control_vector, "model_type", None)}, **(meta or {})))

    # ------------------------------------------------------------------------- safetensors

    def save(self, path) -> Path:
        """Safetensors: tensors `layer.{l}` (and `layer.{l}.resamples`), metadata as JSON strings."""
        with atomic_path(path) as tmp:
            self._write_safetensors(tmp)
        return Path(path)

    def _write_safetensors(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {f"layer.{k}": v.detach().contiguous().cpu() for k, v in self.vectors.items()}
        tensors.update({f"layer.{k}.resamples": v.detach().contiguous().cpu() for k, v in self.resamples.items()})
        meta = {"steerstrength": json.dumps(self.meta, sort_keys=True)}
        mode = path.stat().st_mode & 0o777 if path.exists() else None  # atomic_path's: the umask's, like any output
        try:
            save_file(tensors, str(path), metadata=meta)  # writes a new file (mode 0600) and renames it onto `path`
        except Exception as exc:  # noqa: BLE001 - safetensors' SafetensorError: a disk full, a permission lost
            raise _write_error(exc, path) from None
        if mode is not None:
            path.chmod(mode)

    @classmethod
    def load(cls, path) -> "SteeringVectors":
        """Read a steerstrength safetensors file, or a llama.cpp control-vector .gguf."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise InputError(f"vector file {path} does not exist; create it with `steerstrength vectors`")
        if path.suffix.lower() == ".gguf":
            return cls.from_gguf(path)
        try:
            vectors, resamples = {}, {}
            with safe_open(str(path), framework="pt") as fh:
                meta = json.loads((fh.metadata() or {}).get("steerstrength", "{}"))
                for key in fh.keys():
                    match = SAFETENSORS_KEY.fullmatch(key)
                    if match is None:
                        raise InputError(f"{path} holds a tensor {key!r}; a steerstrength vector file holds only "
                                         "`layer.N` and `layer.N.resamples` tensors")
                    target = resamples if match["resamples"] else vectors
                    target[int(match["layer"])] = fh.get_tensor(key)
        except InputError:
            raise
        except (OSError, ValueError, json.JSONDecodeError) as exc:
            raise InputError(f"{path} is not a steerstrength safetensors vector file ({exc})") from None
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for corrupt headers
            raise InputError(f"{path} is not a readable safetensors file ({type(exc).__name__})") from None
        if not isinstance(meta, dict):
            raise InputError(f"{path}: its `steerstrength` metadata is a JSON {type(meta).__name__}, not an object; "
                             "it is not a steerstrength vector file")
        if not vectors:
            raise InputError(f"{path} holds no `layer.N` tensors; it is not a steerstrength vector file")
        try:
            return cls(vectors, meta, resamples)
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from None

    # ------------------------------------------------------------------------- llama.cpp GGUF

    def gguf_layers(self, layers: Sequence[int] | None = None) -> list[int]:
        """The layers a GGUF export writes: all but 0 by default (llama.cpp never steers block 0)."""
        if layers is None:
            chosen = [layer for layer in self.layers if layer > 0]
        else:
            chosen = sorted(set(int(layer) for layer in layers))
            for layer in chosen:
                self[layer]  # raises for a layer this object lacks
        if 0 in chosen or not chosen:
            raise InputError("llama.cpp cannot steer layer 0 (the output of the first block: its loader rejects "
                             "direction.0); export layers >= 1")
        return chosen

    def to_gguf(self, path, layers: Sequence[int] | None = None, *, model_hint: str | None = None) -> Path:
        """llama.cpp control vector (`--control-vector`): F32 tensors `direction.{l}` [d_model], layer l >= 1."""
        chosen = self.gguf_layers(layers)
        with atomic_path(path) as tmp:
            self._write_gguf(tmp, chosen, model_hint)
        return Path(path)

    def _write_gguf(self, path: Path, layers: Sequence[int], model_hint: str | None = None) -> None:
        from gguf import GGUFWriter

        hint = model_hint or self.meta.get("model_type") or self.meta.get("model") or "unknown"
        writer = GGUFWriter(str(path), GGUF_ARCH)
        writer.add_string(f"{GGUF_ARCH}.model_hint", str(hint))
        writer.add_int32(f"{GGUF_ARCH}.layer_count", len(layers))
        # Ignored by llama.cpp (it reads only direction.* tensors); kept so the file says how it was made and at
        # what strength: typed keys a GGUF viewer shows, and the whole metadata as JSON (steerstrength.meta).
        for key, value in gguf_strength_keys(self, layers).items():
            if isinstance(value, str):
                writer.add_string(key, value)
            elif isinstance(value, list):
                writer.add_array(key, value)
            else:
                writer.add_float32(key, float(value))
        writer.add_string("steerstrength.meta", json.dumps(self.meta, sort_keys=True))
        for layer in layers:
            writer.add_tensor(f"direction.{layer}", self.vectors[layer].detach().float().cpu().contiguous().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    @classmethod
    def from_gguf(cls, path) -> "SteeringVectors":
        """A llama.cpp control vector (ours, llama.cpp's cvector-generator's, repeng's): direction.N -> layer N.

        Read as llama.cpp's `common_control_vector_load_one` reads it: every tensor must be an F32 `direction.N`
        with N >= 1, one-dimensional, all of one size; tensors for the same N are added. A file llama.cpp would
        skip is an InputError here, never a partial load.
        """
        path = Path(path)
        try:
            from gguf import GGMLQuantizationType, GGUFReader

            reader = GGUFReader(str(path))
            tensors = list(reader.tensors)
            meta_field = reader.fields.get("steerstrength.meta")
            meta = json.loads(meta_field.contents()) if meta_field is not None else {}
        except (OSError, ValueError, KeyError, IndexError, TypeError, json.JSONDecodeError) as exc:
            raise InputError(f"{path} is not a readable GGUF control vector ({type(exc).__name__})") from None
        if not tensors:
            raise InputError(f"{path} holds no direction.N tensors; it is not a llama.cpp control vector")
        if not isinstance(meta, dict):
            raise InputError(f"{path}: its steerstrength.meta is a JSON {type(meta).__name__}, not an object")
        vectors: dict[int, torch.Tensor] = {}
        size = None
        for tensor in tensors:
            match = GGUF_KEY.fullmatch(tensor.name)
            if match is None:
                raise InputError(f"{path} holds a tensor {tensor.name!r}; llama.cpp refuses a control vector with "
                                 "any tensor but direction.N")
            layer = int(match["layer"])
            if layer == 0:
                raise InputError(f"{path} holds {tensor.name}; llama.cpp refuses direction.0 (it never steers the "
                                 "first block's output), so the file would not load there")
            if layer > 2**31 - 1:
                raise InputError(f"{path} holds {tensor.name}; llama.cpp refuses a layer index beyond 32 bits")
            if tensor.tensor_type != GGMLQuantizationType.F32:
                raise InputError(f"{path}: {tensor.name} is {tensor.tensor_type.name}; llama.cpp reads only F32 "
                                 "direction tensors (re-export it as F32)")
            shape = [int(n) for n in tensor.shape]
            n_dims = max((i + 1 for i, n in enumerate(shape) if n > 1), default=1)  # ggml_n_dims
            if n_dims != 1:
                raise InputError(f"{path}: {tensor.name} has shape {shape}; a direction is one-dimensional [n_embd]")
            v = torch.from_numpy(tensor.data.astype("float32").reshape(-1).copy())
            if size is not None and v.numel() != size:
                raise InputError(f"{path}: {tensor.name} has {v.numel()} values but an earlier direction has {size}; "
                                 "all directions need one size")
            size = v.numel()
            # llama.cpp adds the directions a file gives for one layer.
            vectors[layer] = vectors[layer] + v if layer in vectors else v
        return cls(vectors, meta)


def gguf_strength_keys(sv: SteeringVectors, layers: Sequence[int]) -> dict:
    """The typed GGUF keys that say what a control vector is and at what strength (per exported layer, in order):
    model, fingerprint, layers, r_l (NaN when unknown), the unit, the pre-scaling and, as JSON, the recommended alphas
    and fluent ranges of meta["strength"] (strength.py)."""
    meta = sv.meta if isinstance(sv.meta, dict) else {}
    r = meta.get("residual_norms") or {}
    keys = {"steerstrength.model": str(meta.get("model") or ""),
            "steerstrength.model_fingerprint": str(meta.get("model_fingerprint") or ""),
            "steerstrength.concept": str(meta.get("concept") or ""),
            "steerstrength.layers": [int(x) for x in layers],
            "steerstrength.residual_norms": [float(r.get(str(x), float("nan"))) for x in layers],
            "steerstrength.norms": [float(sv.vectors[x].double().norm()) for x in layers],
            "steerstrength.unit": "raw: llama.cpp adds scale * direction.N; direction.N = prescale * v"}
    pre = meta.get("prescaled")
    if pre:
        keys["steerstrength.prescale_unit"] = str(pre["unit"])
        if pre.get("alpha") is not None:
            keys["steerstrength.prescale_alpha"] = float(pre["alpha"])
        keys["steerstrength.prescale_raw_alpha"] = [float(pre["raw_alpha"].get(str(x), float("nan"))) for x in layers]
    strength = meta.get("strength")
    if strength:
        per = strength.get("layers") or {}
        keys["steerstrength.recommended"] = json.dumps({str(x): (per.get(str(x)) or {}).get("recommended") or []
                                                        for x in layers}, sort_keys=True)
        keys["steerstrength.fluent_range"] = json.dumps({str(x): (per.get(str(x)) or {}).get("fluent_range")
                                                         for x in layers}, sort_keys=True)
    return keys


def _write_error(exc: Exception, path: Path) -> OSError:
    """safetensors' write error (its own type) as the OSError it stands for, so the CLI says it in one line."""
    import errno
    import os

    code = re.search(r"os error (\d+)", str(exc))
    number = int(code.group(1)) if code else errno.EIO
    return OSError(number, os.strerror(number) if code else f"cannot write safetensors ({exc})", str(path.parent))


def save_vectors(sv: SteeringVectors, out, gguf_out=None, gguf_layers: Sequence[int] | None = None) -> None:
    """Write the safetensors file and, optionally, the GGUF: both or neither (temp files, then renames)."""
    chosen = sv.gguf_layers(gguf_layers) if gguf_out is not None else None
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_path(out))
        sv._write_safetensors(tmp)
        if gguf_out is not None:
            sv._write_gguf(stack.enter_context(atomic_path(gguf_out)), chosen)


def parse_layers(spec: str | int | Sequence[int], n_layers: int) -> list[int]:
    """Layers from "5,15,25", "all", "early,middle,late" (n/6, n/2, 5n/6) or ints; checked (config.resolve_layers)."""
    from steerstrength.config import resolve_layers

    if isinstance(spec, int):
        items: list = [spec]
    elif isinstance(spec, str):
        text = spec.strip().lower()
        if text == "all":
            return list(range(n_layers))
        items = [part.strip() for part in text.split(",") if part.strip()]
        if not items:
            raise InputError("no layers given; use e.g. --layers 5,15,25, --layers middle or --layers all")
        if "auto" in items:
            raise InputError("--layers auto needs the prompt sets: use `steerstrength vectors --layers auto` "
                             "or `steerstrength vectors scan`")
    else:
        items = list(spec)
    return resolve_layers(items, n_layers)


# ----------------------------------------------------------------------------- activations


@torch.inference_mode()
def mean_activations(model: Model, texts: Sequence[str], layers: Sequence[int], *, skip_first_token: bool = True,
                     batch_size: int = 8, max_length: int | None = None, progress=None) -> dict[int, torch.Tensor]:
    """Per layer, [len(texts), d_model] float64: each text's residual stream averaged over its tokens.

    One forward per batch records every layer, stops after the deepest one, computes no logits.
    Padding is masked; the first position is left out when `skip_first_token` (attention sink).
    """
    layers = sorted(set(layers))
    for layer in layers:
        check_layer(model, layer)
    out = {layer: torch.empty((len(texts), model.d_model), dtype=torch.float64) for layer in layers}
    for start, mask, hidden in layer_states(model, texts, layers, batch_size=batch_size, max_length=max_length,
                                            skip_first_token=skip_first_token):
        for layer in layers:
            out[layer][start:start + mask.shape[0]] = token_means(hidden[layer], mask)
        if progress is not None:
            progress(mask.shape[0])
    return out


@torch.inference_mode()
def residual_norms(model: Model, layers: Sequence[int], texts: Sequence[str] | None = None, *,
                   batch_size: int = 16) -> dict[int, float]:
    """r_l of alpha_resid (grid.py): per layer, the median L2 norm of the residual stream, first token left out.

    The first position is an attention sink (norm ~24,000 from layer 11 of SmolLM2, vs ~200 elsewhere), so it is
    excluded like in Eq. (3).

    Args:
        layers: the blocks whose outputs are measured.
        texts: the texts whose tokens are measured; default: the 44 built-in neutral contexts.
        batch_size: texts per forward.

    Example::

        ss.residual_norms(model, [15, 28])       # {15: ~170, 28: ~720} on SmolLM2-135M
    """
    if texts is None:
        from steerstrength.prompts import builtin_contexts

        texts = [c["text"] for c in builtin_contexts()]
    layers = sorted(set(int(x) for x in layers))
    for layer in layers:
        check_layer(model, layer)
    norms: dict[int, list] = {layer: [] for layer in layers}
    for _, mask, hidden in layer_states(model, texts, layers, batch_size=batch_size, require_tokens=False):
        for layer in layers:
            norms[layer].append(token_norms(hidden[layer], mask))
    out = {}
    for layer in layers:
        values = torch.cat(norms[layer])
        if values.numel() == 0:
            raise InputError("the texts for the residual norm have no token after the first; give longer texts")
        out[layer] = float(values.double().median())
    return out


def bootstrap(pos: torch.Tensor, neg: torch.Tensor, k: int, *, seed: int = 0, normalize: bool = False) -> torch.Tensor:
    """[k, d]: Eq. (3) recomputed on P and N resampled with replacement (Fig. A.3's error bars).

    Works on the per-text means, so no forward pass is repeated; resampling weights are counts.
    """
    gen = torch.Generator().manual_seed(int(seed))

    def resampled_means(acts: torch.Tensor) -> torch.Tensor:
        n = acts.shape[0]
        idx = torch.randint(n, (k, n), generator=gen)
        counts = torch.zeros((k, n), dtype=torch.float64).scatter_add_(1, idx, torch.ones((k, n), dtype=torch.float64))
        return (counts @ acts) / n

    pos_means, neg_means = resampled_means(pos), resampled_means(neg)
    v = pos_means - neg_means
    if normalize:
        norms = v.norm(dim=-1, keepdim=True)
        if (norms <= ZERO_RTOL * torch.maximum(pos_means.norm(dim=-1, keepdim=True),
                                            neg_means.norm(dim=-1, keepdim=True))).any():
            raise InputError("a bootstrap replicate of the difference of means is the zero vector (it drew the same "
                             "texts for P and N), so it cannot be normalized; give more distinct texts or no resamples")
        v = v / norms
    return v


def difference_of_means(model: Model, positive: Sequence[str | dict], negative: Sequence[str | dict],
                        layers: Sequence[int] | int | str, *, skip_first_token: bool = True, normalize: bool = False,
                        batch_size: int = 8, max_length: int | None = None, concept: str = "", setting: str = "",
                        resamples: int = 0, seed: int = 0, progress=None) -> SteeringVectors:
    """Eq. (3): mean over P of token-averaged residual streams minus the same over N, per layer.

    Args:
        positive, negative: texts, or prompt-set rows with a "text" field (at least 2 each).
        layers: ints, or a spec such as "5,15,25", "middle", "early,middle,late", "all" (the layer scan's pick:
            scan.scan_layers(model, P, N).chosen; the vectors stage records it as meta["auto_layer"]).
        skip_first_token: leave position 0 (the attention sink) out of each text's average.
        normalize: scale each vector to unit norm.
        resamples: K > 0 adds K bootstrap replicates per layer (`.resamples[layer]`, [K, d]) for error bars.
        concept, setting: labels recorded in the metadata (with r_l per layer, `residual_norms`).

    Example::

        sv = ss.difference_of_means(model, P, N, [15, 28], concept="joy")   # SteeringVectors
        sv[28]                                   # SteeringVector(layer=28, ...): .vector, .residual_norm
    """
    positive = [t if isinstance(t, str) else t["text"] for t in positive]
    negative = [t if isinstance(t, str) else t["text"] for t in negative]
    items = [x.strip() for x in layers.split(",")] if isinstance(layers, str) else (
        [layers] if isinstance(layers, int) else list(layers))
    if any(isinstance(x, str) and x.lower() == "auto" for x in items):
        raise InputError("layers 'auto' is the layer scan's pick: give it as a number (ss.scan_layers(model, P, N)."
                         "chosen); `steerstrength vectors --layers auto` and `run` scan for you")
    layers = parse_layers(layers, model.n_layers)
    if len(positive) < 2 or len(negative) < 2:
        raise InputError(f"P has {len(positive)} and N has {len(negative)} texts; each needs at least 2")
    if resamples < 0:
        raise InputError(f"the number of bootstrap resamples must be 0 or more, not {resamples}")
    if normalize and sorted(positive) == sorted(negative):
        raise InputError("P and N hold the same texts, so the difference of means is the zero vector and cannot be "
                         "normalized; give different texts for P and N")
    pos = mean_activations(model, positive, layers, skip_first_token=skip_first_token, batch_size=batch_size,
                           max_length=max_length, progress=progress)
    neg = mean_activations(model, negative, layers, skip_first_token=skip_first_token, batch_size=batch_size,
                           max_length=max_length, progress=progress)
    vectors, replicates = {}, {}
    for layer in layers:
        v = pos[layer].mean(0) - neg[layer].mean(0)
        if not torch.isfinite(v).all():
            raise InputError(f"layer {layer}: the activations overflowed to NaN or inf in {model.dtype}; "
                             "recompute with --dtype float32")
        if normalize:
            if v.norm() <= ZERO_RTOL * max(pos[layer].mean(0).norm(), neg[layer].mean(0).norm()):
                raise InputError(f"layer {layer}: the difference of means is the zero vector (P and N have the same "
                                 "mean activation, e.g. the same texts), so it cannot be normalized; give different "
                                 "texts for P and N")
            v = v / v.norm()
        vectors[layer] = v.to(torch.float32)
        if resamples:
            replicates[layer] = bootstrap(pos[layer], neg[layer], resamples, seed=seed,
                                          normalize=normalize).to(torch.float32)
    settings = dict(skip_first_token=skip_first_token, normalize=normalize, max_length=max_length)
    meta = dict(
        model=model.name,
        model_fingerprint=model.fingerprint(),
        model_type=getattr(model.hf.config, "model_type", None),
        n_layers=model.n_layers,
        d_model=model.d_model,
        dtype=str(model.dtype).removeprefix("torch."),
        concept=concept,
        setting=setting,
        unit="raw",  # steering adds alpha * v of this file (residual units: alpha ||v|| / r_l, grid.py)
        n_positive=len(positive),
        n_negative=len(negative),
        layers=sorted(vectors),
        norms={str(k): float(v.double().norm()) for k, v in vectors.items()},
        residual_norms={str(k): r for k, r in residual_norms(model, sorted(vectors)).items()},
        resamples=resamples,
        seed=seed,
        config_hash=json_digest(dict(settings, positive=list(positive), negative=list(negative), layers=sorted(vectors),
                                     resamples=resamples, seed=seed)),
        **settings,
    )
    return SteeringVectors(vectors, meta, replicates)
