"""A causal LM's facts: its blocks, final norm and unembedding, for any architecture (loading.py loads one).

Every architecture difference lives here: the rest of the package sees a `Model` with `blocks`,
`final_norm`, `unembed` and one `encode` helper that applies the model's BOS convention.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from steerstrength.errors import ArchitectureError, ModelLoadError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

# Where decoder blocks sit, per architecture family (first match wins).
BLOCK_PATHS = (
    "model.layers",  # Llama, SmolLM, Mistral, Qwen2/3, Gemma 1/2/3-text, Phi
    "model.language_model.layers",  # Gemma 3 multimodal (transformers >= 4.52)
    "language_model.model.layers",  # Gemma 3 multimodal, older layout
    "transformer.h",  # GPT-2, GPT-J, Bloom-like
    "gpt_neox.layers",  # GPT-NeoX / Pythia
    "model.decoder.layers",  # OPT
)
# Values hashed per tensor by `Model.fingerprint`: enough to tell fine-tunes apart, fast at any model size.
FINGERPRINT_SAMPLE = 1 << 20
# Names the final normalisation takes next to the blocks.
NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm")


def get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    """The module at dotted `path`, or None."""
    module = root
    for part in path.split("."):
        if not hasattr(module, part):
            return None
        module = getattr(module, part)
    return module if isinstance(module, nn.Module) else None


@dataclass
class Encoded:
    """A padded batch: ids, mask and the position ids that make padding invisible."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    padding_side: str

    @property
    def lengths(self) -> torch.Tensor:
        return self.attention_mask.sum(-1)

    def to(self, device) -> "Encoded":
        return Encoded(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.padding_side,
        )


@dataclass
class Model:
    """A causal LM with the parts steering needs; build it with `load_model`."""

    hf: nn.Module
    tokenizer: object
    name: str
    source: str
    blocks: nn.ModuleList
    final_norm: nn.Module
    unembed: nn.Module
    blocks_path: str
    add_bos: bool
    load_seconds: float = 0.0
    info: dict = field(default_factory=dict)
    # loading.load_model, set on the models it returns: `in_dtype` loads the same source again through it.
    loader: Callable | None = field(default=None, repr=False)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return int(self.unembed.weight.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.unembed.weight.shape[0])

    @property
    def device(self) -> torch.device:
        """Where inputs go and results come back: the unembedding's device, or, for a model placed over several
        devices by `load_model(device_map=...)`, the first module's (the embeddings'; accelerate's hooks move each
        block's inputs to its own device and the logits back here)."""
        placed = getattr(self.hf, "hf_device_map", None)
        if placed and len(set(placed.values())) > 1:
            first = next(iter(placed.values()))
            if first in ("cpu", "disk", "meta"):
                return torch.device("cpu")
            return torch.device(f"cuda:{first}") if isinstance(first, int) else torch.device(first)
        return self.unembed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unembed.weight.dtype

    @property
    def architecture(self) -> str:
        archs = getattr(self.hf.config, "architectures", None) or [type(self.hf).__name__]
        return archs[0]

    @property
    def last_mlp(self) -> nn.Module | None:
        """The feed-forward module of the last block, when the architecture names it `mlp`."""
        mlp = getattr(self.blocks[-1], "mlp", None)
        return mlp if isinstance(mlp, nn.Module) else None

    @property
    def cache_arg(self) -> str:
        """The forward's KV-cache keyword: `cache` (newer transformers; `past_key_values` warns there) or the old name."""
        import inspect

        params = inspect.signature(self.hf.forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    @property
    def final_logit_softcap(self) -> float | None:
        """The final logit soft-capping constant (Gemma 2/3), or None."""
        config = self.hf.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        cap = getattr(text, "final_logit_softcapping", None)
        return float(cap) if cap else None

    def logits_of(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (float32) of last-block residual states [..., d_model]: final norm, unembedding, soft-capping."""
        y = self.unembed(self.final_norm(hidden.to(self.dtype))).float()
        cap = self.final_logit_softcap
        return torch.tanh(y / cap) * cap if cap is not None else y

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def max_length(self) -> int | None:
        cfg = getattr(self.hf.config, "get_text_config", lambda: self.hf.config)()
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def start_ids(self) -> list[int]:
        """Ids an unconditional sample starts from: BOS, or EOS for models without one (GPT-2)."""
        tok = self.tokenizer
        if tok.bos_token_id is not None:
            return [int(tok.bos_token_id)]
        if tok.eos_token_id is not None:
            return [int(tok.eos_token_id)]
        raise ArchitectureError(f"{self.name}: the tokenizer has neither a BOS nor an EOS token to start from")

    def render(self, text: str, *, chat: bool = False, system: str | None = None) -> str:
        """The text the model reads: the chat template applied when `chat`, else `text` itself."""
        if not chat:
            return text
        if not self.has_chat_template:
            raise ModelLoadError(f"{self.name} has no chat template; run without --chat")
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": text})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def token_ids(self, text: str, *, chat: bool = False, system: str | None = None) -> list[int]:
        """One text's ids with the model's BOS convention (never a doubled BOS)."""
        tok = self.tokenizer
        rendered = self.render(text, chat=chat, system=system)
        ids = list(tok(rendered, add_special_tokens=False)["input_ids"])
        bos = tok.bos_token_id
        if self.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [int(bos)] + ids
        return ids

    def encode(
        self,
        texts: Sequence[str] | str,
        *,
        chat: bool = False,
        system: str | None = None,
        padding_side: str = "left",
        max_length: int | None = None,
    ) -> Encoded:
        """Tokenize a batch the same way everywhere: BOS convention, chat template, padding, mask."""
        if isinstance(texts, str):
            texts = [texts]
        rows = [self.token_ids(t, chat=chat, system=system) for t in texts]
        if max_length is not None:
            rows = [r[:max_length] for r in rows]
        return self.pad(rows, padding_side=padding_side)

    def pad(self, rows: Sequence[Sequence[int]], *, padding_side: str = "left") -> Encoded:
        """Pad id lists into a batch; position ids count real tokens only."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
        width = max((len(r) for r in rows), default=0)
        pad_id = self.pad_id
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row)
            if n == 0:
                continue
            sl = slice(width - n, width) if padding_side == "left" else slice(0, n)
            ids[i, sl] = torch.tensor(row, dtype=torch.long)
            mask[i, sl] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return Encoded(ids.to(self.device), mask.to(self.device), positions.to(self.device), padding_side)

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, 0):
            if candidate is not None:
                return int(candidate)
        return 0

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_strings(self, ids) -> list[str]:
        """Readable strings of single token ids (spaces and newlines kept)."""
        return [self.tokenizer.decode([int(i)]) for i in ids]

    def fingerprint(self) -> str:
        """A short hash of the weights themselves, never of the name or path they were loaded from.

        Hashes the architecture, every parameter's shape, and the values of the unembedding and of the first and
        last blocks (strided to at most FINGERPRINT_SAMPLE values per tensor), rounded to bfloat16 so the same
        weights loaded in float32 or bfloat16 agree.
        """
        h = hashlib.sha256(self.architecture.encode())
        h.update(repr([tuple(p.shape) for p in self.hf.parameters()]).encode())
        for t in (*_weights(self.unembed, "weight"), *_weights(self.blocks[0]), *_weights(self.blocks[-1])):
            flat = t.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // FINGERPRINT_SAMPLE)].to(torch.bfloat16).cpu()
            h.update(sample.view(torch.int16).numpy().tobytes())
        return h.hexdigest()[:16]

    @property
    def n_params(self) -> int:
        """Parameters of the model (tied embeddings counted once)."""
        return sum(p.numel() for p in self.hf.parameters())

    def describe(self) -> dict:
        """The facts `steerstrength models show` prints."""
        return {
            "name": self.name,
            "source": self.source,
            "architecture": self.architecture,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "vocab_size": self.vocab_size,
            "n_params": self.n_params,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "chat_template": self.has_chat_template,
            "load_seconds": round(self.load_seconds, 3),
            "import_seconds": round(float(self.info.get("import_seconds", 0.0)), 3),
            "blocks_path": self.blocks_path,
            "add_bos": self.add_bos,
            **({"license": self.info["license"]} if "license" in self.info else {}),
        }

    def in_dtype(self, dtype: str | torch.dtype) -> "Model":
        """This model in `dtype` on the same device (e.g. the float32 reference of a bfloat16 model): made on the first
        call and cached on this object; the model itself if it has that dtype.

        A model loaded from a file, directory or HF id is loaded again in `dtype`, so its weights are those a run in
        `dtype` uses (a bfloat16 model's rounded weights are not the float32 ones); any other is a cast copy."""
        dtype = resolve_dtype(dtype)
        if dtype == self.dtype:
            return self
        copies = self.__dict__.setdefault("_dtype_copies", {})
        if dtype not in copies:
            kind, _, spec = self.source.partition(":")
            if kind in ("gguf", "dir", "hf") and spec and self.loader is not None:
                other = self.loader(spec, dtype, self.device, blocks_path=self.blocks_path)
                other.name = self.name
            else:
                import copy

                other = wrap(copy.deepcopy(self.hf).to(dtype=dtype), self.tokenizer, name=self.name,
                             source=self.source, blocks_path=self.blocks_path)
            copies[dtype] = other
        return copies[dtype]


# ----------------------------------------------------------------------------- dtype & device


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return DTYPES[key]


def resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    name = str(device).lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ModelLoadError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelLoadError(f"device {device!r} asked for but MPS is not available; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ModelLoadError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    return dev


# ----------------------------------------------------------------------------- architecture


def find_parts(hf: nn.Module, blocks_path: str | None = None) -> tuple[str, nn.ModuleList, nn.Module, nn.Module]:
    """Locate (blocks path, blocks, final norm, unembedding) in a transformers causal LM."""
    arch = type(hf).__name__
    hint = "pass --blocks-path (API: blocks_path=) with the dotted path of the decoder blocks"
    if blocks_path:
        blocks = get_submodule(hf, blocks_path)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise ArchitectureError(f"{arch}: {blocks_path!r} is not a list of decoder blocks; {hint}")
        path = blocks_path
    else:
        path, blocks = None, None
        for candidate in BLOCK_PATHS:
            found = get_submodule(hf, candidate)
            if isinstance(found, nn.ModuleList) and len(found) > 0:
                path, blocks = candidate, found
                break
        if blocks is None:
            raise ArchitectureError(f"unknown architecture {arch}: cannot find its decoder blocks; {hint}")
    parent_path = path.rsplit(".", 1)[0] if "." in path else ""
    parent = get_submodule(hf, parent_path) if parent_path else hf
    norm = None
    for name in NORM_NAMES:
        candidate = getattr(parent, name, None)
        if isinstance(candidate, nn.Module):
            norm = candidate
            break
    if norm is None:
        raise ArchitectureError(
            f"{arch}: found blocks at {path!r} but no final norm beside them ({', '.join(NORM_NAMES)})"
        )
    unembed = None
    try:
        unembed = hf.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        pass
    for name in ("lm_head", "embed_out"):
        if unembed is None or getattr(unembed, "weight", None) is None:
            unembed = getattr(hf, name, None)
    if unembed is None or getattr(unembed, "weight", None) is None:
        raise ArchitectureError(f"{arch}: the model has no output embedding (unembedding) matrix")
    return path, blocks, norm, unembed


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer itself prepends BOS: the convention the model was trained with."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    # Observed, not read from `add_bos_token`: in transformers 5 the flag and the post-processor can disagree.
    try:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    except Exception:  # noqa: BLE001 - a tokenizer that cannot encode "a" adds nothing we can see
        return False
    return bool(ids) and ids[0] == bos


def wrap(hf: nn.Module, tokenizer, *, name: str, source: str, blocks_path: str | None = None,
         load_seconds: float = 0.0) -> Model:
    """Build a `Model` around an already loaded transformers model and tokenizer."""
    path, blocks, norm, unembed = find_parts(hf, blocks_path)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    hf.eval()
    return Model(
        hf=hf,
        tokenizer=tokenizer,
        name=name,
        source=source,
        blocks=blocks,
        final_norm=norm,
        unembed=unembed,
        blocks_path=path,
        add_bos=tokenizer_adds_bos(tokenizer),
        load_seconds=load_seconds,
    )


def _weights(module: nn.Module, only: str | None = None):
    """A module's parameters (or the one named `only`) as tensors with data: a block that a device_map offloaded
    (its parameters on the meta device) gives the weights its accelerate hook loads at call time."""
    seen = set()  # as module.parameters(): a shared parameter once, in the same order
    for prefix, sub in module.named_modules():
        stored = getattr(getattr(sub, "_hf_hook", None), "weights_map", None)  # accelerate's hook on the leaf
        for name, p in sub.named_parameters(recurse=False):
            if id(p) in seen or (only is not None and f"{prefix}.{name}".lstrip(".") != only):
                continue
            seen.add(id(p))
            yield stored[name] if p.is_meta and stored is not None else p
