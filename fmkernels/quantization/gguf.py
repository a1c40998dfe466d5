"""GGUF import: load_gguf(path) -> a Hugging Face causal LM whose linear layers hold the file's own quantized
blocks, without dequantizing and re-quantizing:

  Q4_0 (block of 32: fp16 d, 4-bit q; w = (q - 8) d)        -> Int4Linear g32, scale d, zero 8
  Q4_1 (block of 32: fp16 d, fp16 m, 4-bit q; w = q d + m)  -> Int4Linear g32, scale d, zero -m / d
  Q8_0 (block of 32: fp16 d, int8 q; w = q d)               -> Int8WeightOnlyLinear g32, scale d
Other tensor types are dequantized to float by transformers (a warning names them); norms and embeddings stay
float. A tied output head (no `output.weight`, lm_head tied to token_embd) takes token_embd's blocks.
Needs `gguf` and `transformers` (the `gguf` extra). Llama-family files only (architecture "llama"): q / k rows
are un-permuted as transformers does (llama.cpp stores them in its rotary layout).
"""
from __future__ import annotations

import logging
import os
import warnings

import numpy as np
import torch
from torch import nn

from ..nn.quantized import Int4Linear, Int8WeightOnlyLinear

log = logging.getLogger("fmkernels.quantization")

SUPPORTED_ARCHS = ("llama",)
_BLOCK = 32
_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
_FLOAT = ("F32", "F16", "BF16")


def _fail(msg):
    raise ValueError(f"load_gguf: {msg}")


def _read(path):
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001  (gguf raises ValueError, IndexError, struct.error, ...)
        _fail(f"path '{path}' is not a readable GGUF file (truncated or corrupt?): {type(e).__name__}: {e}")
    size = os.path.getsize(path)
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            _fail(f"path '{path}' is truncated: tensor '{t.name}' ends at byte {t.data_offset + t.n_bytes}, the file "
                  f"has {size}")
    return reader


def _arch(reader) -> str:
    f = reader.fields.get("general.architecture")
    if f is None:
        _fail("the file has no 'general.architecture' field")
    return bytes(f.parts[-1]).decode("utf-8", "replace")


def _blocks(t, kind):
    """Raw rows (N, K/32, bytes) of a quantized 2-D tensor; GGUF shape is (K, N) (ne0 = K)."""
    if len(t.shape) != 2:
        _fail(f"tensor '{t.name}' ({kind}) has shape {list(t.shape)}; expected 2-D")
    K, N = int(t.shape[0]), int(t.shape[1])
    if K % _BLOCK:
        _fail(f"tensor '{t.name}' ({kind}) has {K} columns, not a multiple of {_BLOCK}")
    raw = np.asarray(t.data, dtype=np.uint8).reshape(N, K // _BLOCK, _BYTES[kind])
    return raw, N, K


def _f16(raw, off):
    return torch.from_numpy(np.ascontiguousarray(raw[..., off:off + 2]).view(np.float16)[..., 0].astype(np.float32))


def _nibbles(qs: np.ndarray) -> torch.Tensor:
    """(N, nb, 16) bytes -> (N, nb * 32) codes: element j = low nibble of byte j, element j + 16 = high nibble."""
    lo, hi = qs & 0x0F, qs >> 4
    return torch.from_numpy(np.concatenate([lo, hi], axis=2).reshape(qs.shape[0], -1).astype(np.uint8))


def convert_tensor(t, kind, perm=None, backend=None, bias=None) -> nn.Module:
    """One GGUF Q4_0 / Q4_1 / Q8_0 tensor -> the fmkernels layer holding its blocks (rows permuted by perm)."""
    raw, N, K = _blocks(t, kind)
    if perm is not None:
        raw = raw[perm]
    d = _f16(raw, 0)  # (N, K/32)
    if kind == "Q8_0":
        q = torch.from_numpy(np.ascontiguousarray(raw[..., 2:]).view(np.int8).reshape(N, K).copy())
        return Int8WeightOnlyLinear.from_quantized(q, d.t().contiguous(), K, bias, group_size=_BLOCK, backend=backend)
    if kind == "Q4_0":
        q = _nibbles(raw[..., 2:])
        scale, zero = d, torch.full_like(d, 8.0)
    else:  # Q4_1: w = q d + m = (q - (-m / d)) d
        q = _nibbles(raw[..., 4:])
        m = _f16(raw, 2)
        dead = d == 0  # a constant block: w = m everywhere = (0 - (-m)) * 1
        scale = torch.where(dead, torch.ones_like(d), d)
        zero = -m / scale
        if dead.any():
            q = q.reshape(N, K // _BLOCK, _BLOCK).masked_fill(dead[..., None], 0).reshape(N, K)
    return Int4Linear.from_quantized(q, scale.t().contiguous(), zero.t().contiguous(), K, bias, group_size=_BLOCK,
                                     backend=backend)


def load_gguf(path, *, backend=None, dtype=torch.float32):
    """GGUF file -> transformers AutoModelForCausalLM (fp32 by default) with Q4_0 / Q4_1 / Q8_0 linear layers as
    Int4Linear / Int8WeightOnlyLinear holding the file's blocks. The model is built completely before it is
    returned; any error names the file or the tensor."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_gguf: path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        _fail(f"path '{path}' does not exist or is not a file")
    try:
        import gguf  # noqa: F401
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise ImportError("load_gguf needs the `gguf` and `transformers` packages: pip install 'fmkernels[gguf]'") from e
    reader = _read(path)
    arch = _arch(reader)
    if arch not in SUPPORTED_ARCHS:
        _fail(f"architecture '{arch}' of '{path}' is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")
    import gguf

    dequantizable = set(getattr(gguf.quants, "_type_traits", {}).keys())
    kinds = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in _BYTES and kind not in _FLOAT and dequantizable and t.tensor_type not in dequantizable:
            _fail(f"tensor '{t.name}' has type {kind}, which gguf cannot dequantize")
        kinds[t.name] = kind
    d, name = os.path.split(os.path.abspath(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=dtype)
        except Exception as e:  # noqa: BLE001
            _fail(f"transformers could not build a model from '{path}': {type(e).__name__}: {e}")
    return quantize_from_gguf_(model, path, backend=backend, _reader=reader, _kinds=kinds)


def quantize_from_gguf_(model, path, *, backend=None, _reader=None, _kinds=None):
    """Swap the linear layers of `model` (transformers, loaded from the same GGUF file) for fmkernels layers
    holding the file's Q4_0 / Q4_1 / Q8_0 blocks; in place, all built before any swap. Returns the model."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    reader = _reader if _reader is not None else _read(os.fspath(path))
    arch = _arch(reader)
    if arch not in SUPPORTED_ARCHS:
        _fail(f"architecture '{arch}' of '{path}' is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")
    kinds = _kinds if _kinds is not None else {t.name: t.tensor_type.name for t in reader.tensors}
    cfg = model.config
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(
        config={"num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads})
    name_map = get_gguf_hf_weights_map(model, processor)

    def target(gname):
        hf = name_map.get(gname)
        if hf is None or not hf.endswith(".weight"):
            return None, None
        mod = hf[: -len(".weight")]
        try:
            m = model.get_submodule(mod)
        except AttributeError:
            return None, None
        return mod, m

    jobs = []  # (hf module fqn, gguf tensor, kind)
    by_name = {t.name: t for t in reader.tensors}
    for t in reader.tensors:
        mod, m = target(t.name)
        if mod is None or type(m) is not nn.Linear:
            continue
        if kinds[t.name] in _BYTES:
            jobs.append((mod, t))
        elif kinds[t.name] not in _FLOAT:
            warnings.warn(f"load_gguf: tensor '{t.name}' ({kinds[t.name]}) has no fmkernels format; dequantized to "
                          f"float", stacklevel=2)
    head = getattr(model, "lm_head", None)
    emb = model.get_input_embeddings()
    if ("output.weight" not in by_name and "token_embd.weight" in by_name and type(head) is nn.Linear
            and head.weight.shape == emb.weight.shape and kinds["token_embd.weight"] in _BYTES):
        jobs.append(("lm_head", by_name["token_embd.weight"]))
    new = {}
    for mod, t in jobs:
        lin = model.get_submodule(mod)
        kind = kinds[t.name]
        K, N = int(t.shape[0]), int(t.shape[1])
        if (lin.in_features, lin.out_features) != (K, N):
            _fail(f"tensor '{t.name}' is {N} x {K} but the model's '{mod}' is {lin.out_features} x {lin.in_features}")
        perm = None
        if ".attn_q." in t.name or ".attn_k." in t.name:
            idx = processor.process(np.arange(N, dtype=np.float64).reshape(N, 1), t.name).weights
            perm = np.asarray(idx).reshape(-1).astype(np.int64)
        bias = None if lin.bias is None else lin.bias.detach().float()
        new[mod] = convert_tensor(t, kind, perm, backend, bias).to(lin.weight.device)
    for mod, m in new.items():
        parent, _, child = mod.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, m)
    counts = {}
    for _, t in jobs:
        counts[kinds[t.name]] = counts.get(kinds[t.name], 0) + 1
    model.fmk_quantize_summary = (f"load_gguf('{os.path.basename(path)}'): {len(new)} linear layers kept quantized "
                                  f"({', '.join(f'{k}: {v}' for k, v in sorted(counts.items()))})")
    log.info("%s", model.fmk_quantize_summary)
    return model
