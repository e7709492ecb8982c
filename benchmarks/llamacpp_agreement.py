"""Does llama.cpp, given our pre-scaled control vector at scale 1, steer the way we do at that alpha?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/llamacpp_agreement.py --alpha 0.5 --json benchmarks/results/llamacpp.json

1. An F32 GGUF of the embedded model: every tensor of its GGUF dequantized to float32 (the same weights our loader
   dequantizes), the key-value metadata copied.
2. A steering vector (the run's file, or the difference of means of the curated joy pairs), exported with
   `export-gguf --alpha A --alpha-unit resid` (SteeringVectors.prescaled + to_gguf): direction.l = alpha_l v_l.
3. llama.cpp, through the C API of the xllamacpp wheel (ctypes; its Python API does not expose control vectors):
   the model loaded, the control vector loaded by llama.cpp's own `common_control_vector_load` (what
   `--control-vector FILE` calls, scale 1) and applied over layers 1..n_layer as llama-cli applies it, then the
   next-token distribution after each context (its full logits, softmax in float64).
4. Ours: `next_token_probs(model, sv, context, [alpha_raw])`, float32. The total variation between the two, per
   context, with and without steering, and how far steering moved ours (so agreement is not agreement on nothing).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import struct
import time
from pathlib import Path

import numpy as np

CONTEXTS = ("Tell me about your day.", "The weather today is", "My favourite food is", "I walked into the room and")


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


# ----------------------------------------------------------------------------- llama.cpp through the wheel's C API


class _Bytes(ctypes.Structure):
    """An opaque parameter struct (llama_model_params, llama_context_params), larger than the real one: returned
    through a hidden pointer and passed on the stack as the last argument, so the spare bytes are never read."""

    _fields_ = [("raw", ctypes.c_uint8 * 512)]


class _Batch(ctypes.Structure):  # llama.h: struct llama_batch
    _fields_ = [("n_tokens", ctypes.c_int32), ("token", ctypes.c_void_p), ("embd", ctypes.c_void_p),
                ("pos", ctypes.c_void_p), ("n_seq_id", ctypes.c_void_p), ("seq_id", ctypes.c_void_p),
                ("logits", ctypes.c_void_p)]


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


def wheel_library():
    """The xllamacpp extension as a C library (it exports llama.cpp's C API and common's loader)."""
    import xllamacpp

    path = next(Path(xllamacpp.__file__).parent.glob("xllamacpp*.so"))
    lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    lib.llama_backend_init.restype = None
    lib.llama_model_default_params.restype = _Bytes
    lib.llama_context_default_params.restype = _Bytes
    lib.llama_model_load_from_file.argtypes = [ctypes.c_char_p, _Bytes]
    lib.llama_model_load_from_file.restype = ctypes.c_void_p
    lib.llama_init_from_model.argtypes = [ctypes.c_void_p, _Bytes]
    lib.llama_init_from_model.restype = ctypes.c_void_p
    lib.llama_model_n_layer.argtypes = [ctypes.c_void_p]
    lib.llama_model_get_vocab.argtypes = [ctypes.c_void_p]
    lib.llama_model_get_vocab.restype = ctypes.c_void_p
    lib.llama_vocab_n_tokens.argtypes = [ctypes.c_void_p]
    lib.llama_batch_get_one.argtypes = [ctypes.POINTER(ctypes.c_int32), ctypes.c_int32]
    lib.llama_batch_get_one.restype = _Batch
    lib.llama_decode.argtypes = [ctypes.c_void_p, _Batch]
    lib.llama_get_logits_ith.argtypes = [ctypes.c_void_p, ctypes.c_int32]
    lib.llama_get_logits_ith.restype = ctypes.POINTER(ctypes.c_float)
    lib.llama_set_adapter_cvec.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int32,
                                           ctypes.c_int32, ctypes.c_int32]
    lib.llama_free.argtypes = [ctypes.c_void_p]
    lib.llama_model_free.argtypes = [ctypes.c_void_p]
    load = getattr(lib, "_Z26common_control_vector_loadRKSt6vectorI31common_control_vector_load_infoSaIS0_EE")
    load.argtypes = [ctypes.POINTER(_CvecData), ctypes.POINTER(_Vector)]  # the result is returned through a pointer
    load.restype = ctypes.c_void_p
    lib.common_control_vector_load = load
    lib.llama_backend_init()
    return lib


class LlamaCpp:
    """One model in llama.cpp (CPU), next-token distributions with or without a control vector file."""

    def __init__(self, gguf_path, *, threads: int = 1, n_ctx: int = 512):
        self.lib = lib = wheel_library()
        self.model = lib.llama_model_load_from_file(str(gguf_path).encode(), lib.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        self.n_layer = lib.llama_model_n_layer(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        params = lib.llama_context_default_params()
        fields = np.frombuffer(bytes(params.raw[:24]), dtype=np.uint32)  # n_ctx, n_batch, n_ubatch, n_seq_max, thr
        if not (fields[1] >= fields[2] > 0 and fields[3] >= 1):
            raise RuntimeError(f"llama_context_params does not have the layout this script assumes: {fields}")
        for offset, value in ((0, n_ctx), (16, threads), (20, threads)):  # n_ctx, n_threads, n_threads_batch
            ctypes.memmove(ctypes.addressof(params) + offset, ctypes.byref(ctypes.c_uint32(value)), 4)
        self.params = params

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

    def next_token_probs(self, ids, control_vector=None) -> np.ndarray:
        """softmax of llama.cpp's logits after token ids `ids` ([n_vocab], float64), steered by `control_vector`
        (a .gguf applied at scale 1 over layers 1..n_layer, as common_init_from_params applies --control-vector)."""
        lib = self.lib
        ctx = lib.llama_init_from_model(self.model, self.params)
        if not ctx:
            raise RuntimeError("llama.cpp could not create a context")
        try:
            if control_vector is not None:
                n_embd, data = self.control_vector(control_vector)
                buf = data.astype(np.float32)
                err = lib.llama_set_adapter_cvec(ctx, buf.ctypes.data, buf.size, n_embd, 1, self.n_layer)
                if err:
                    raise RuntimeError(f"llama_set_adapter_cvec failed ({err})")
            tokens = (ctypes.c_int32 * len(ids))(*ids)
            if lib.llama_decode(ctx, lib.llama_batch_get_one(tokens, len(ids))) != 0:
                raise RuntimeError("llama_decode failed")
            logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, -1), shape=(self.n_vocab,)).astype(np.float64)
        finally:
            lib.llama_free(ctx)
        z = np.exp(logits - logits.max())
        return z / z.sum()


def total_variation(p, q) -> float:
    return 0.5 * float(np.abs(np.asarray(p, dtype=np.float64) - np.asarray(q, dtype=np.float64)).sum())


# ----------------------------------------------------------------------------- the comparison


def agreement(model, sv, layer: int, alpha: float, workdir, *, contexts=CONTEXTS, threads: int = 1) -> dict:
    """TV between llama.cpp with the pre-scaled control vector at scale 1 and ours at that alpha (resid units),
    per context; the same without steering; and how far steering moved ours."""
    from steerstrength.steering import next_token_probs

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if not str(model.source).startswith("gguf:"):
        raise ValueError(f"{model.name} was not loaded from a GGUF; llama.cpp needs one")
    gguf = f32_gguf(str(model.source).removeprefix("gguf:"), workdir / f"{model.name}.f32.gguf")
    pre = sv.prescaled(alpha, "resid", model, [layer])
    cvec = pre.to_gguf(workdir / f"prescaled.{layer}.gguf")
    raw = pre.meta["prescaled"]["raw_alpha"][str(layer)]
    cpp = LlamaCpp(gguf, threads=threads)
    rows = []
    for context in contexts:
        ids = model.token_ids(context)
        ours = next_token_probs(model, sv[layer], context, [raw, 0.0]).double().numpy()
        steered, plain = cpp.next_token_probs(ids, cvec), cpp.next_token_probs(ids)
        rows.append(dict(context=context, tv_steered=total_variation(steered, ours[0]),
                         tv_unsteered=total_variation(plain, ours[1]), tv_ours_alpha_vs_0=total_variation(ours[0], ours[1]),
                         top_ours=int(ours[0].argmax()), top_llamacpp=int(steered.argmax())))
    return dict(model=model.name, gguf=str(gguf), layer=layer, alpha_resid=alpha, alpha_raw=raw,
                llamacpp_layers=cpp.n_layer, rows=rows, max_tv_steered=max(r["tv_steered"] for r in rows),
                max_tv_unsteered=max(r["tv_unsteered"] for r in rows),
                min_tv_ours_alpha_vs_0=min(r["tv_ours_alpha_vs_0"] for r in rows))


def main() -> None:
    import steerstrength as ss

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vectors", default=None, help="a vector file; default: curated joy pairs' difference of means")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--alpha", type=float, default=0.5, help="in residual units")
    ap.add_argument("--workdir", default="/tmp/steerstrength-llamacpp")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    start = time.perf_counter()
    model = ss.load_model()
    if args.vectors:
        sv = ss.SteeringVectors.load(args.vectors)
    else:
        sv = ss.difference_of_means(model, ss.curated_texts("joy", "positive"), ss.curated_texts("joy", "negative"),
                                    [args.layer], concept="joy")
    out = agreement(model, sv, args.layer, args.alpha, args.workdir, threads=args.threads)
    out["seconds"] = round(time.perf_counter() - start, 1)
    for r in out["rows"]:
        print(f"{r['context']!r:40} TV steered {r['tv_steered']:.2e}  unsteered {r['tv_unsteered']:.2e}  "
              f"(ours alpha vs 0: {r['tv_ours_alpha_vs_0']:.3f})  top {r['top_ours']}/{r['top_llamacpp']}")
    print(f"max TV with the pre-scaled vector at scale 1: {out['max_tv_steered']:.2e} (layer {args.layer}, "
          f"alpha_resid {args.alpha}, raw {out['alpha_raw']:.4g})")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
