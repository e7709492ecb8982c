"""Difference-of-means steering vectors (Eq. 3), one per layer; safetensors I/O."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from steerstrength.errors import InputError
from steerstrength.io import atomic_path
from steerstrength.models import Model
from steerstrength.steering import check_layer, hidden_at


@dataclass
class SteeringVectors:
    """Layer -> steering vector [d_model], with the metadata that says how it was made."""

    vectors: dict[int, torch.Tensor]
    meta: dict = field(default_factory=dict)
    # Optional bootstrap replicates: layer -> [K, d_model], for error bars (Fig. A.3).
    resamples: dict[int, torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, layer: int) -> torch.Tensor:
        if layer not in self.vectors:
            have = ", ".join(str(k) for k in sorted(self.vectors))
            raise InputError(f"no steering vector for layer {layer}; this file has layers {have}")
        return self.vectors[layer]

    def __contains__(self, layer: int) -> bool:
        return layer in self.vectors

    @property
    def layers(self) -> list[int]:
        return sorted(self.vectors)

    @property
    def d_model(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])

    def norms(self) -> dict[int, float]:
        return {layer: float(v.double().norm()) for layer, v in sorted(self.vectors.items())}

    def to(self, device=None, dtype=None) -> "SteeringVectors":
        move = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return SteeringVectors(
            {k: move(v) for k, v in self.vectors.items()},
            dict(self.meta),
            {k: move(v) for k, v in self.resamples.items()},
        )

    def save(self, path) -> Path:
        """Safetensors: tensors `layer.{l}` (and `layer.{l}.resamples`), metadata as JSON strings."""
        from safetensors.torch import save_file

        tensors = {f"layer.{k}": v.detach().contiguous().cpu() for k, v in self.vectors.items()}
        tensors.update({f"layer.{k}.resamples": v.detach().contiguous().cpu() for k, v in self.resamples.items()})
        meta = {"steerstrength": json.dumps(self.meta, sort_keys=True)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return Path(path)

    @classmethod
    def load(cls, path) -> "SteeringVectors":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise InputError(f"vector file {path} does not exist; create it with `steerstrength vectors`")
        try:
            vectors, resamples = {}, {}
            with safe_open(str(path), framework="pt") as fh:
                meta = json.loads((fh.metadata() or {}).get("steerstrength", "{}"))
                for key in fh.keys():
                    parts = key.split(".")
                    if parts[0] != "layer" or not parts[1].isdigit():
                        continue
                    target = resamples if key.endswith(".resamples") else vectors
                    target[int(parts[1])] = fh.get_tensor(key)
        except (OSError, ValueError, json.JSONDecodeError) as exc:
            raise InputError(f"{path} is not a steerstrength safetensors vector file ({exc})") from None
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for corrupt headers
            raise InputError(f"{path} is not a readable safetensors file ({type(exc).__name__})") from None
        if not vectors:
            raise InputError(f"{path} holds no `layer.N` tensors; it is not a steerstrength vector file")
        return cls(vectors, meta, resamples)


def config_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start:start + batch_size])
        enc = model.encode(chunk, padding_side="right", max_length=max_length)
        mask = enc.attention_mask.clone()
        if skip_first_token:
            mask[:, 0] = 0  # right padding: column 0 is each text's first token
        counts = mask.sum(-1)
        if (counts == 0).any():
            bad = chunk[int((counts == 0).nonzero()[0])]
            need = "two tokens" if skip_first_token else "one token"
            raise InputError(f"text {bad[:40]!r} has fewer than {need} after tokenization; remove it or pass "
                             "skip_first_token=False")
        hidden = hidden_at(model, enc, layers)
        w = mask.to(torch.float64).unsqueeze(-1)
        for layer in layers:
            h = hidden[layer].to(torch.float64)
            out[layer][start:start + len(chunk)] = ((h * w).sum(1) / counts[:, None].to(torch.float64)).cpu()
        if progress is not None:
            progress(len(chunk))
    return out


def difference_of_means(model: Model, positive: Sequence[str], negative: Sequence[str], layers: Sequence[int] | int,
                        *, skip_first_token: bool = True, normalize: bool = False, batch_size: int = 8,
                        max_length: int | None = None, concept: str = "", setting: str = "",
                        progress=None) -> SteeringVectors:
    """Eq. (3): mean over P of token-averaged residual streams minus the same over N, per layer."""
    if isinstance(layers, int):
        layers = [layers]
    if len(positive) < 2 or len(negative) < 2:
        raise InputError(f"P has {len(positive)} and N has {len(negative)} texts; each needs at least 2")
    pos = mean_activations(model, positive, layers, skip_first_token=skip_first_token, batch_size=batch_size,
                           max_length=max_length, progress=progress)
    neg = mean_activations(model, negative, layers, skip_first_token=skip_first_token, batch_size=batch_size,
                           max_length=max_length, progress=progress)
    vectors = {}
    for layer in sorted(set(layers)):
        v = pos[layer].mean(0) - neg[layer].mean(0)
        if normalize:
            v = v / v.norm()
        vectors[layer] = v.to(torch.float32)
    settings = dict(skip_first_token=skip_first_token, normalize=normalize, max_length=max_length)
    meta = dict(
        model=model.name,
        model_fingerprint=model.fingerprint(),
        concept=concept,
        setting=setting,
        n_positive=len(positive),
        n_negative=len(negative),
        layers=sorted(vectors),
        norms={str(k): float(v.double().norm()) for k, v in vectors.items()},
        config_hash=config_hash(dict(settings, positive=list(positive), negative=list(negative), layers=sorted(vectors))),
        **settings,
    )
    return SteeringVectors(vectors, meta)
