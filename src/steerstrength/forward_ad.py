"""Forward-mode AD through a replay from block l: d/d alpha of the steered logits (Thm 3.8 curvature).

`forward_from_differentiable` is `forward_from` outside inference mode; `forward_ad_safe` patches the ops whose
nested forward-mode AD PyTorch gets wrong, so torch.func.jvp of a jvp is exact.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

from steerstrength.errors import InputError
from steerstrength.models import Encoded, Model
from steerstrength.steering import _forward, _replay_from, check_layer

# ----------------------------------------------------------------------------- differentiable replay


def forward_from_differentiable(model: Model, enc: Encoded, layer: int, hidden: torch.Tensor, *,
                                logits_to_keep=0) -> torch.Tensor:
    """`forward_from` outside inference mode, so forward-mode AD (torch.func.jvp) can carry d/d alpha.

    `hidden` may be a dual tensor, e.g. h + alpha * v with alpha a jvp input; blocks 0..layer never run.
    """
    check_layer(model, layer)
    if any(p.is_meta for p in model.hf.parameters()):
        raise InputError(f"{model.name} keeps some weights offloaded (device_map with \"cpu\"/\"disk\" entries), which "
                         "accelerate loads inside the forward, where forward-mode AD (the curvature of Thm 3.8) cannot "
                         "run; place the model on GPUs only, or skip the curvature (xent --no-curvature)")
    with _replay_from(model, layer, hidden):
        out = _forward(model, enc, use_cache=False, logits_to_keep=logits_to_keep)
    return out.logits


class _SecondOrderOps(torch.overrides.TorchFunctionMode):
    """Plain formulas for ops whose nested forward-mode AD PyTorch gets wrong or lacks.

    layer_norm's jvp-of-jvp is wrong (torch 2.13) and silu's is missing under no_grad; the formulas
    below are the same functions written with ops whose nested forward AD is exact.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.layer_norm, torch.layer_norm):
            return _layer_norm(*args, **kwargs)
        if func is F.silu or func is torch.nn.functional.silu:
            x = args[0] if args else kwargs["input"]
            return x * torch.sigmoid(x)
        if hasattr(F, "rms_norm") and func is F.rms_norm:
            return _rms_norm(*args, **kwargs)
        return func(*args, **kwargs)


def _layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *_args):
    dims = tuple(range(-len(normalized_shape), 0))
    mean = x.mean(dim=dims, keepdim=True)
    var = (x - mean).pow(2).mean(dim=dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def _rms_norm(x, normalized_shape, weight=None, eps=None):
    dims = tuple(range(-len(normalized_shape), 0))
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    y = x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)
    return y * weight if weight is not None else y


@contextlib.contextmanager
def forward_ad_safe() -> Iterator[None]:
    """Inside it, nested torch.func.jvp through `forward_from_differentiable` is exact (Thm 3.8 curvature)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # The fused CPU/GPU attention kernels have no forward-mode AD; the math backend is composite.
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), _SecondOrderOps():
        yield
