"""llama.cpp through the C API of the xllamacpp wheel (ctypes): the shared layer of llamacpp_agreement.py (does it steer
as we do?) and bench_generation.py (how fast does it sample steered?). The wheel's Python API exposes no control
vectors, so this drives llama.h directly: models, contexts, batches of parallel sequences, the memory (KV) API, and
llama.cpp's own `common_control_vector_load` (what `--control-vector FILE` calls).
"""

from __future__ import annotations

import ctypes
import functools
import struct
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------- an F32 GGUF of a GGUF model


def f32_gguf(src, dst) -> Path:
    """Every tensor of the GGUF `src` dequantized to F32, metadata copied (general.file_type = ALL_F32)."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize

    dst = Path(dst)
    if dst.is_file():
        return dst
    reader = GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    tmp = dst.with_suffix(".tmp")
    writer = GGUFWriter(str(tmp), arch)
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = 0 if key == "general.file_type" else f.contents()
        vtype = f.types[0]
        writer.add_key_value(key, value, vtype, sub_type=f.types[1] if vtype == GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        if t.tensor_type in (GGMLQuantizationType.F32,):
            data = np.array(t.data, dtype=np.float32)
        else:
            data = dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = [int(n) for n in reversed(t.shape)]  # numpy order
        writer.add_tensor(t.name, data.reshape(shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(dst)
    return dst


def gguf_quantization(path) -> str:
    """The type of the GGUF's largest tensors (Q4_1 for the embedded model, F32 for `f32_gguf`'s output)."""
    from collections import Counter

    from gguf import GGUFReader

    sizes = Counter()
    for t in GGUFReader(str(path)).tensors:
        sizes[t.tensor_type.name] += int(t.n_elements)
    return sizes.most_common(1)[0][0]


# ----------------------------------------------------------------------------- the C API


class _Bytes(ctypes.Structure):
    """An opaque parameter struct (llama_model_params, llama_context_params), larger than the real one: returned
    through a hidden pointer and passed on the stack as the last argument, so the spare bytes are never read."""

    _fields_ = [("raw", ctypes.c_uint8 * 512)]


class _Batch(ctypes.Structure):  # llama.h: struct llama_batch
    _fields_ = [("n_tokens", ctypes.c_int32), ("token", ctypes.POINTER(ctypes.c_int32)), ("embd", ctypes.c_void_p),
                ("pos", ctypes.POINTER(ctypes.c_int32)), ("n_seq_id", ctypes.POINTER(ctypes.c_int32)),
                ("seq_id", ctypes.POINTER(ctypes.POINTER(ctypes.c_int32))), ("logits", ctypes.POINTER(ctypes.c_int8))]


class _LoadInfo(ctypes.Structure):
    """common.h: struct common_control_vector_load_info { float strength; std::string fname; }. The wheel's C++ code
    uses libstdc++'s pre-C++11 string ABI (its symbols mangle std::string as `Ss`): a std::string is one pointer to
    the characters, preceded by a header {length, capacity, refcount}."""

    _fields_ = [("strength", ctypes.c_float), ("fname", ctypes.c_void_p)]


def _cow_string(text: bytes):
    """A pre-C++11 libstdc++ std::string's storage for `text`: (buffer to keep alive, pointer to its characters)."""
    header = struct.pack("<QQi4x", len(text), len(text), 0)  # length, capacity, refcount 0 (one owner)
    buf = ctypes.create_string_buffer(header + text + b"\0")
    return buf, ctypes.addressof(buf) + len(header)


class _Vector(ctypes.Structure):  # std::vector<T>: begin, end, end of storage
    _fields_ = [("begin", ctypes.c_void_p), ("end", ctypes.c_void_p), ("cap", ctypes.c_void_p)]


class _CvecData(ctypes.Structure):
    """common.h: struct common_control_vector_data { int n_embd; std::vector<float> data; ... }: newer llama.cpp
    versions append fields (a digest), so the buffer is larger than the two fields read."""

    _fields_ = [("n_embd", ctypes.c_int), ("data", _Vector), ("spare", ctypes.c_uint8 * 256)]


def _sig(lib, name, argtypes, restype=ctypes.c_int32):
    fn = getattr(lib, name)
    fn.argtypes, fn.restype = argtypes, restype


@functools.cache
def wheel_library():
    """The xllamacpp extension as a C library (it exports llama.cpp's C API and common's loader), initialised once,
    its log silenced."""
    import xllamacpp

    P, i32, u32 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_uint32
    path = next(Path(xllamacpp.__file__).parent.glob("xllamacpp*.so"))
    lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    _sig(lib, "llama_backend_init", [], None)
    _sig(lib, "llama_model_default_params", [], _Bytes)
    _sig(lib, "llama_context_default_params", [], _Bytes)
    _sig(lib, "llama_model_load_from_file", [ctypes.c_char_p, _Bytes], P)
    _sig(lib, "llama_init_from_model", [P, _Bytes], P)
    _sig(lib, "llama_model_n_layer", [P])
    _sig(lib, "llama_model_get_vocab", [P], P)
    _sig(lib, "llama_vocab_n_tokens", [P])
    _sig(lib, "llama_batch_get_one", [ctypes.POINTER(i32), i32], _Batch)
    _sig(lib, "llama_batch_init", [i32, i32, i32], _Batch)
    _sig(lib, "llama_batch_free", [_Batch], None)
    _sig(lib, "llama_decode", [P, _Batch])
    _sig(lib, "llama_get_logits", [P], ctypes.POINTER(ctypes.c_float))
    _sig(lib, "llama_get_logits_ith", [P, i32], ctypes.POINTER(ctypes.c_float))
    _sig(lib, "llama_set_adapter_cvec", [P, P, ctypes.c_size_t, i32, i32, i32])
    _sig(lib, "llama_set_n_threads", [P, i32, i32], None)
    for name in ("llama_n_threads", "llama_n_threads_batch"):
        _sig(lib, name, [P])
    for name in ("llama_n_ctx", "llama_n_ctx_seq", "llama_n_seq_max"):
        _sig(lib, name, [P], u32)
    _sig(lib, "llama_get_memory", [P], P)
    _sig(lib, "llama_memory_seq_cp", [P, i32, i32, i32, i32], None)
    _sig(lib, "llama_free", [P], None)
    _sig(lib, "llama_model_free", [P], None)
    load = getattr(lib, "_Z26common_control_vector_loadRKSt6vectorI31common_control_vector_load_infoSaIS0_EE")
    load.argtypes = [ctypes.POINTER(_CvecData), ctypes.POINTER(_Vector)]  # the result is returned through a pointer
    load.restype = ctypes.c_void_p
    lib.common_control_vector_load = load
    lib.llama_log_set.argtypes, lib.llama_log_set.restype = [_LOG_CALLBACK, P], None
    lib.llama_log_set(_QUIET, None)
    lib.llama_backend_init()
    return lib


# llama.cpp logs every context's creation to stderr; the benchmarks print what they measured instead.
_LOG_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_QUIET = _LOG_CALLBACK(lambda level, text, data: None)


# llama_context_params of this wheel (llama.h: n_ctx, n_batch, n_ubatch, n_seq_max, n_rs_seq, n_outputs_max, ..., then
# n_threads, n_threads_batch; the booleans embeddings, offload_kqv, no_perf, op_offload, swa_full, kv_unified at the
# end). Only n_ctx and n_seq_max keep their offsets across versions; kv_unified's is this build's (read off
# llama_context_default_params' code) and is checked after the context exists (llama_n_ctx_seq == llama_n_ctx);
# threads go through llama_set_n_threads, no offset needed.
_N_CTX, _N_SEQ_MAX, _KV_UNIFIED = 0, 12, 0x8D


class LlamaCpp:
    """One model in llama.cpp (CPU): next-token distributions and steered sampling, with or without a control
    vector."""

    def __init__(self, gguf_path, *, threads: int = 1, n_ctx: int = 512):
        self.lib = lib = wheel_library()
        self.path, self.threads, self.n_ctx = Path(gguf_path), threads, n_ctx
        self.model = lib.llama_model_load_from_file(str(gguf_path).encode(), lib.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        self.n_layer = lib.llama_model_n_layer(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        fields = np.frombuffer(bytes(lib.llama_context_default_params().raw[:16]), dtype=np.uint32)
        if not (fields[1] >= fields[2] > 0 and fields[3] >= 1):  # n_ctx, n_batch, n_ubatch, n_seq_max
            raise RuntimeError(f"llama_context_params does not have the layout this module assumes: {fields}")

    def close(self) -> None:
        if self.model:
            self.lib.llama_model_free(self.model)
            self.model = None

    def context(self, *, n_seq: int = 1, n_ctx: int | None = None, cvec: tuple[int, np.ndarray] | None = None):
        """A new context of `n_seq` parallel sequences sharing one KV buffer (kv_unified: a prompt decoded once is
        shared by llama_memory_seq_cp, as llama.cpp's `batched` example shares it), `threads` threads, the control
        vector `cvec` = (n_embd, [n_layer x n_embd] from layer 1) set over layers 1..n_layer as
        common_init_from_params sets --control-vector. Free it with llama_free."""
        lib = self.lib
        params = lib.llama_context_default_params()
        n_ctx = n_ctx or self.n_ctx
        base = ctypes.addressof(params)
        ctypes.memmove(base + _N_CTX, ctypes.byref(ctypes.c_uint32(n_ctx)), 4)
        ctypes.memmove(base + _N_SEQ_MAX, ctypes.byref(ctypes.c_uint32(n_seq)), 4)
        ctypes.memmove(base + _KV_UNIFIED, ctypes.byref(ctypes.c_bool(True)), 1)
        ctx = lib.llama_init_from_model(self.model, params)
        if not ctx:
            raise RuntimeError("llama.cpp could not create a context")
        lib.llama_set_n_threads(ctx, self.threads, self.threads)
        got = (lib.llama_n_seq_max(ctx), lib.llama_n_ctx_seq(ctx), lib.llama_n_threads(ctx))
        if got[0] != n_seq or got[1] != lib.llama_n_ctx(ctx) or got[1] < n_ctx or got[2] != self.threads:
            lib.llama_free(ctx)
            raise RuntimeError(f"the context is not the one asked for (n_seq_max, n_ctx_seq, threads = {got}): "
                               "llama_context_params' layout differs in this wheel")
        if cvec is not None:
            n_embd, data = cvec
            buf = np.ascontiguousarray(data, dtype=np.float32)
            err = lib.llama_set_adapter_cvec(ctx, buf.ctypes.data, buf.size, n_embd, 1, self.n_layer)
            if err:
                lib.llama_free(ctx)
                raise RuntimeError(f"llama_set_adapter_cvec failed ({err})")
        return ctx

    def control_vector(self, path, strength: float = 1.0) -> tuple[int, np.ndarray]:
        """llama.cpp's `common_control_vector_load` of one file at `strength` (what --control-vector-scaled
        FILE:strength reads): (n_embd, the [n_layer x n_embd] buffer starting at layer 1)."""
        text, chars = _cow_string(str(path).encode())
        infos = (_LoadInfo * 1)(_LoadInfo(strength=strength, fname=chars))
        begin = ctypes.addressof(infos)
        vec = _Vector(begin, begin + ctypes.sizeof(_LoadInfo), begin + ctypes.sizeof(_LoadInfo))
        out = _CvecData()
        self.lib.common_control_vector_load(ctypes.byref(out), ctypes.byref(vec))
        self._keep = (text, infos)
        if out.n_embd <= 0:
            raise RuntimeError(f"llama.cpp refused the control vector {path}")
        n = (out.data.end - out.data.begin) // 4
        return out.n_embd, np.ctypeslib.as_array(ctypes.cast(out.data.begin, ctypes.POINTER(ctypes.c_float)),
                                                 shape=(n,)).copy()

    def next_token_probs(self, ids, control_vector=None, strength: float = 1.0) -> np.ndarray:
        """softmax of llama.cpp's logits after token ids `ids` ([n_vocab], float64), steered by `control_vector`
        (a .gguf loaded at `strength`, applied over layers 1..n_layer as common_init_from_params applies
        --control-vector)."""
        lib = self.lib
        cvec = None if control_vector is None else self.control_vector(control_vector, strength)
        ctx = self.context(n_ctx=max(self.n_ctx, len(ids) + 1), cvec=cvec)
        try:
            tokens = (ctypes.c_int32 * len(ids))(*ids)
            if lib.llama_decode(ctx, lib.llama_batch_get_one(tokens, len(ids))) != 0:
                raise RuntimeError("llama_decode failed")
            logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, -1), shape=(self.n_vocab,)).astype(np.float64)
        finally:
            lib.llama_free(ctx)
        return softmax(logits)

    def sample_parallel(self, ids, n_seq: int, new_tokens: int, rng: np.random.Generator, *,
                        cvec: tuple[int, np.ndarray] | None = None, feed: list[int] | None = None) -> dict:
        """`n_seq` completions of `ids` in one context (the control vector `cvec` for all of them), decoded as
        parallel sequences in one llama_batch per step: the prompt prefilled once as sequence 0 and copied to the
        others with llama_memory_seq_cp, then `new_tokens` tokens per sequence sampled at temperature 1 from the
        full logits (numpy; no stop token). With `feed` (one token per sequence), the second step decodes those
        tokens instead of sampled ones (the correctness check). Returns the tokens, the first two steps'
        distributions ([n_seq, n_vocab], float64) and the seconds of setup, prefill and decode."""
        import time

        lib, T = self.lib, len(ids)
        t0 = time.perf_counter()
        ctx = self.context(n_seq=n_seq, n_ctx=T + n_seq * new_tokens + 1, cvec=cvec)
        batch = lib.llama_batch_init(max(T, n_seq), 0, 1)
        try:
            t1 = time.perf_counter()
            for i, tok in enumerate(ids):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0] = tok, i, 1, 0
                batch.logits[i] = i == T - 1
            batch.n_tokens = T
            if lib.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed (prefill)")
            first = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, -1), shape=(self.n_vocab,))
            logits = np.repeat(first[None].astype(np.float64), n_seq, axis=0)
            memory = lib.llama_get_memory(ctx)
            for s in range(1, n_seq):
                lib.llama_memory_seq_cp(memory, 0, s, -1, -1)
            t2 = time.perf_counter()
            tokens, probs = np.zeros((n_seq, new_tokens), dtype=np.int64), []
            for step in range(new_tokens):
                p = softmax(logits)
                if step < 2:
                    probs.append(p)
                tokens[:, step] = sample_rows(p, rng)
                if step == new_tokens - 1:
                    break
                picked = tokens[:, step] if feed is None or step else np.asarray(feed)
                for s in range(n_seq):
                    batch.token[s], batch.pos[s], batch.n_seq_id[s], batch.seq_id[s][0] = int(picked[s]), T + step, 1, s
                    batch.logits[s] = 1
                batch.n_tokens = n_seq
                if lib.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed (decode)")
                out = np.ctypeslib.as_array(lib.llama_get_logits(ctx), shape=(n_seq, self.n_vocab))
                logits = out.astype(np.float64)
            t3 = time.perf_counter()
        finally:
            lib.llama_batch_free(batch)
            lib.llama_free(ctx)
        return dict(tokens=tokens, probs=probs, setup_s=t1 - t0, prefill_s=t2 - t1, decode_s=t3 - t2)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def sample_rows(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row of p [n, V] by inverse CDF (one uniform per row, as our RowSampler draws)."""
    c = np.cumsum(p, axis=-1)
    u = rng.random(p.shape[0]) * c[:, -1]
    return np.minimum((c < u[:, None]).sum(axis=-1), p.shape[1] - 1)


def total_variation(p, q) -> float:
    return 0.5 * float(np.abs(np.asarray(p, dtype=np.float64) - np.asarray(q, dtype=np.float64)).sum())
