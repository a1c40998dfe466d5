"""Quantized GEMMs: int8 W8A8 (`int8_mm`, `int8_linear` with fused dynamic activation quantization), int4
weight-only (`int4_mm`), fp8 e4m3 (`fp8_mm`, GPU backends; CPU runs the reference), packing helpers and the
int8-training linear (`int8_training_linear`).

Schemas (defined once, here):
  fmkernels::quantize_per_row(Tensor x) -> (Tensor q, Tensor scale)          x (M, K) float -> int8, fp32 (M,)
  fmkernels::int8_pack_weight(Tensor b) -> (Tensor packed, Tensor comp)      b (N, K) int8 -> (N/16, K/4, 16, 4), (Np,)
  fmkernels::int8_mm(Tensor a, Tensor a_scale, Tensor b_packed, Tensor b_comp, Tensor b_scale, Tensor? bias,
                     ScalarType out_dtype) -> Tensor                          (M, N); int32 out_dtype: raw A @ B^T
  fmkernels::int8_linear(Tensor x, Tensor b_packed, Tensor b_comp, Tensor b_scale, Tensor? bias) -> Tensor
  fmkernels::int4_pack_weight(Tensor q) -> Tensor                            q (N, K) uint8 0..15 -> (N/16, K/8, 16, 4)
  fmkernels::int4_mm(Tensor x, Tensor w_packed, Tensor scale, Tensor zero, int group_size, int n, Tensor? bias,
                     int act_terms) -> Tensor
  fmkernels::fp8_mm(Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, Tensor? bias, ScalarType out_dtype) -> Tensor
Formats: see fmkernels/reference/quant.py. CPU kernels: csrc/cpu/int8_mm.cpp, csrc/cpu/int4_mm.cpp; Triton:
fmkernels/triton/{int8_mm,int4_mm,fp8_mm}.py; CUDA: csrc/cuda/{int8_mm,int4_mm,fp8_mm}.cu + quant_binding.cpp.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

import torch

from .. import _dispatch, _ext
from .._library import define
from .._validation import FLOAT_DTYPES, check_same_device, check_tensor
from ..reference import quant as ref

define("quantize_per_row(Tensor x) -> (Tensor, Tensor)")
define("int8_pack_weight(Tensor b) -> (Tensor, Tensor)")
define(
    "int8_mm(Tensor a, Tensor a_scale, Tensor b_packed, Tensor b_comp, Tensor b_scale, Tensor? bias, "
    "ScalarType out_dtype) -> Tensor"
)
define("int8_linear(Tensor x, Tensor b_packed, Tensor b_comp, Tensor b_scale, Tensor? bias) -> Tensor")
define("int4_pack_weight(Tensor q) -> Tensor")
define(
    "int4_mm(Tensor x, Tensor w_packed, Tensor scale, Tensor zero, int group_size, int n, Tensor? bias, "
    "int act_terms) -> Tensor"
)
define("fp8_mm(Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, Tensor? bias, ScalarType out_dtype) -> Tensor")

INT4_GROUP_SIZES = ref.INT4_GROUP_SIZES
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int32)


def _ru(x: int, m: int) -> int:
    return (x + m - 1) // m * m


@torch.library.register_fake("fmkernels::quantize_per_row")
def _qpr_fake(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0],), dtype=torch.float32)


@torch.library.register_fake("fmkernels::int8_pack_weight")
def _i8pack_fake(b):
    N, K = b.shape
    Np, Kp = _ru(max(N, 1), 16), _ru(max(K, 1), 4)
    return b.new_empty((Np // 16, Kp // 4, 16, 4), dtype=torch.int8), b.new_empty((Np,), dtype=torch.int32)


@torch.library.register_fake("fmkernels::int8_mm")
def _i8mm_fake(a, a_scale, b_packed, b_comp, b_scale, bias, out_dtype):
    return a.new_empty((a.shape[0], b_scale.shape[0]), dtype=out_dtype)


@torch.library.register_fake("fmkernels::int8_linear")
def _i8lin_fake(x, b_packed, b_comp, b_scale, bias):
    return x.new_empty((x.shape[0], b_scale.shape[0]))


@torch.library.register_fake("fmkernels::int4_pack_weight")
def _i4pack_fake(q):
    N, K = q.shape
    return q.new_empty((_ru(max(N, 1), 16) // 16, K // 8, 16, 4), dtype=torch.uint8)


@torch.library.register_fake("fmkernels::int4_mm")
def _i4mm_fake(x, w_packed, scale, zero, group_size, n, bias, act_terms):
    return x.new_empty((x.shape[0], n))


@torch.library.register_fake("fmkernels::fp8_mm")
def _fp8_fake(a, a_scale, b, b_scale, bias, out_dtype):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


@torch.library.impl("fmkernels::fp8_mm", "CPU")
def _fp8_mm_cpu(a, a_scale, b, b_scale, bias, out_dtype):
    # no fp8 hardware on CPU: the reference (dequantize + fp32 matmul) is the CPU implementation
    return ref.fp8_mm(a, a_scale, b, b_scale, bias, out_dtype)


# ---------------------------------------------------------------- backends


def _tri(name):
    def fn(*args):
        from ..triton import int4_mm as t4, int8_mm as t8, fp8_mm as tf

        return {
            "int8_mm": t8.int8_mm_triton,
            "int8_linear": t8.int8_linear_triton,
            "int4_mm": t4.int4_mm_triton,
            "fp8_mm": tf.fp8_mm_triton,
            "quantize_per_row": t8.quantize_per_row_triton,
        }[name](*args)

    return fn


def _compiled(name):
    return getattr(torch.ops.fmkernels, name).default  # the OpOverload: no per-call overload resolution


def _reg(name, ref_fn, dtypes, cpu=True, cuda=True, check=None):
    op = _dispatch.op(name)
    if cuda:
        op.register(_dispatch.Backend("cuda", _compiled(name), ("cuda",), dtypes, ("cuda_ext",), check))
    tri_file = {"int8_mm": "int8_mm", "int8_linear": "int8_mm", "int4_mm": "int4_mm", "fp8_mm": "fp8_mm",
                "quantize_per_row": "int8_mm"}[name]
    op.register(_dispatch.Backend("triton", _tri(name), ("cuda",), dtypes, ("triton",), check,
                                  files=("fmkernels/ops/quant.py", f"fmkernels/triton/{tri_file}.py")))
    if cpu:
        op.register(_dispatch.Backend("cpu", _compiled(name), ("cpu",), dtypes, ("cpu_ext",), check))
    op.register(_dispatch.Backend("reference", ref_fn, ("cpu", "cuda"), dtypes))
    return op


def _fp8_check(q: _dispatch.Query):
    if q.device != "cuda":
        return None
    cap = dict(q.extra).get("capability")
    if cap is not None and cap < (8, 9):
        return f"fp8 tensor cores need sm_89+, this GPU is sm_{cap[0]}{cap[1]}"
    return None


QPR_OP = _reg("quantize_per_row", ref.quantize_per_row, FLOAT_DTYPES)
INT8_OP = _reg("int8_mm", ref.int8_mm, _OUT_DTYPES)
INT8_LINEAR_OP = _reg("int8_linear", ref.int8_linear, FLOAT_DTYPES)
INT4_OP = _reg("int4_mm", ref.int4_mm, FLOAT_DTYPES)
FP8_OP = _reg("fp8_mm", ref.fp8_mm, FLOAT_DTYPES, cpu=False, check=_fp8_check)

__all__ = [
    "quantize_per_row",
    "int8_pack_weight",
    "int8_quantize_weight",
    "int8_mm",
    "int8_linear",
    "int4_quantize_weight",
    "int4_mm",
    "fp8_quantize",
    "fp8_mm",
    "int8_training_linear",
]


def _use_cpu_ext(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and _ext.has_cpu_ext() and not _forced_reference()


def _forced_reference() -> bool:
    return os.environ.get("FMK_BACKEND") == "reference"


# ---------------------------------------------------------------- validation helpers

_OP8 = "fmkernels.int8_mm"


def _check_int8_packed(op, K, b_packed, b_comp, b_scale, bias):
    if not isinstance(b_packed, torch.Tensor):
        raise TypeError(f"{op}: b_packed must be a torch.Tensor, got {type(b_packed).__name__}")
    if b_packed.dtype == torch.uint8:
        raise TypeError(
            f"{op}: b_packed is uint8, which is the int4 packed format (int4_quantize_weight); int8_mm needs an "
            f"int8 weight packed by int8_pack_weight / int8_quantize_weight"
        )
    check_tensor("b_packed", b_packed, dtypes=(torch.int8,), op=op)
    if b_packed.dim() != 4 or tuple(b_packed.shape[2:]) != (16, 4):
        raise ValueError(
            f"{op}: b_packed must be a packed int8 weight of shape (N/16, K/4, 16, 4) from int8_pack_weight, "
            f"got shape {tuple(b_packed.shape)} (pass the packed weight, not the plain (N, K) matrix)"
        )
    if b_packed.shape[1] * 4 != _ru(max(K, 1), 4):
        raise ValueError(
            f"{op}: b_packed was packed for K={b_packed.shape[1] * 4} (padded to 4) but the input has K={K}"
        )
    Np = b_packed.shape[0] * 16
    check_tensor("b_comp", b_comp, dtypes=(torch.int32,), ndim=1, op=op)
    if b_comp.shape[0] != Np:
        raise ValueError(f"{op}: b_comp must have shape ({Np},) to match b_packed, got {tuple(b_comp.shape)}")
    check_tensor("b_scale", b_scale, dtypes=(torch.float32,), ndim=1, op=op)
    N = b_scale.shape[0]
    if not (Np - 16 < N <= Np):
        raise ValueError(f"{op}: b_scale has {N} entries but b_packed holds {Np} (padded) columns")
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1, op=op)
        if bias.shape[0] != N:
            raise ValueError(f"{op}: bias must have shape ({N},), got {tuple(bias.shape)}")
    return N


# ---------------------------------------------------------------- int32 accumulator range

# The kernels accumulate a . b in int32 (modular: the result is exact whenever it fits). |a . b| <= K * 128^2
# (int8 inputs may hold -128), which fits for K <= 131,071; longer rows are split into K chunks whose partial
# products are scaled and summed in fp32 (the raw int32 output cannot hold the sum: it raises instead).
INT32_SAFE_K = (2**31 - 1) // (128 * 128)  # 131,071
K_CHUNK = INT32_SAFE_K // 4 * 4  # 131,068: a multiple of the packing's 4


def _k_chunks(K: int):
    return [(k0, min(K, k0 + K_CHUNK)) for k0 in range(0, K, K_CHUNK)]


def _packed_k_slice(b_packed, k0: int, k1: int):
    """(packed, comp) of columns k0:k1 of a packed int8 weight (k0 a multiple of 4)."""
    bp = b_packed[:, k0 // 4 : _ru(k1, 4) // 4].contiguous()  # (N/16, Kc/4, 16, 4)
    comp = 128 * bp.to(torch.int32).sum(dim=(1, 3), dtype=torch.int32).reshape(-1)  # (Np,)
    return bp, comp.to(torch.int32)


def _int8_mm_split_k(fn, a, a_scale, b_packed, b_scale, bias, out_dtype):
    op = _OP8
    if out_dtype == torch.int32:
        raise ValueError(
            f"{op}: K={a.shape[1]} exceeds {INT32_SAFE_K}, where the raw int32 product a @ B^T can overflow "
            f"(|result| <= K * 128^2); use a float out_dtype (the K dimension is then split and summed in fp32)"
        )
    y = None
    for k0, k1 in _k_chunks(a.shape[1]):
        bp, comp = _packed_k_slice(b_packed, k0, k1)
        part = fn(a[:, k0:k1].contiguous(), a_scale, bp, comp, b_scale, None, torch.float32)
        y = part if y is None else y.add_(part)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


# ---------------------------------------------------------------- public ops


def quantize_per_row(x: torch.Tensor, *, backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-row int8 quantization: x (M, K) float -> (q int8 (M, K), scale fp32 (M,)),
    x ~= q * scale[:, None]; scale = amax / 127, round half to even (bit-identical on every backend)."""
    op = "fmkernels.quantize_per_row"
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=2, op=op)
    impl = QPR_OP.select(_dispatch.Query(x.device.type, x.dtype, tuple(x.shape)), backend)
    return impl.fn(x.contiguous())


def int8_pack_weight(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack an int8 weight B (N, K) once for int8_mm: (packed (N/16, K/4, 16, 4) int8, comp (Np,) int32)."""
    check_tensor("b", b, dtypes=(torch.int8,), ndim=2, op="fmkernels.int8_pack_weight")
    if _use_cpu_ext(b):
        return torch.ops.fmkernels.int8_pack_weight(b.contiguous())
    return ref.int8_pack_weight(b)


def int8_quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float weight (N, K) -> (packed, comp, scale (N,)): per-output-channel symmetric int8, packed for int8_mm."""
    check_tensor("w", w, dtypes=FLOAT_DTYPES, ndim=2, op="fmkernels.int8_quantize_weight")
    q, s = quantize_per_row(w.detach())
    packed, comp = int8_pack_weight(q)
    return packed, comp, s


def int8_mm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b_packed: torch.Tensor,
    b_comp: torch.Tensor,
    b_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    out_dtype: torch.dtype = torch.float32,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """(A @ B^T) * a_scale[:, None] * b_scale[None, :] (+ bias) with exact int32 accumulation.

    a: (M, K) int8; a_scale: (M,) float; b_packed, b_comp: from int8_pack_weight(B (N, K)); b_scale: (N,) fp32.
    out_dtype: float32 | bfloat16 | float16, or int32 for the raw integer product (scales and bias ignored).
    """
    op = _OP8
    check_tensor("a", a, dtypes=(torch.int8,), ndim=2, op=op)
    check_tensor("a_scale", a_scale, dtypes=FLOAT_DTYPES, ndim=1, op=op)
    if a_scale.shape[0] != a.shape[0]:
        raise ValueError(f"{op}: a_scale must have shape ({a.shape[0]},), got {tuple(a_scale.shape)}")
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"{op}: out_dtype must be float32, bfloat16, float16 or int32, got {out_dtype}")
    _check_int8_packed(op, a.shape[1], b_packed, b_comp, b_scale, bias)
    check_same_device(op, a=a, a_scale=a_scale, b_packed=b_packed, b_comp=b_comp, b_scale=b_scale, bias=bias)
    impl = _select_cached("int8_mm", a.device.type, out_dtype, backend, *_env_key())  # no shape-dependent checks
    if a.shape[1] > INT32_SAFE_K:
        return _int8_mm_split_k(impl.fn, a.contiguous(), a_scale.float().contiguous(), b_packed, b_scale, bias,
                                out_dtype)
    return impl.fn(a.contiguous(), a_scale.float().contiguous(), b_packed, b_comp, b_scale, bias, out_dtype)


def int8_linear(
    x: torch.Tensor,
    b_packed: torch.Tensor,
    b_comp: torch.Tensor,
    b_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """W8A8 linear: dynamic per-token int8 quantization of x (..., K) fused with int8_mm; output in x's dtype."""
    op = "fmkernels.int8_linear"
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1, op=op)
    K = x.shape[-1]
    N = _check_int8_packed(op, K, b_packed, b_comp, b_scale, bias)
    check_same_device(op, x=x, b_packed=b_packed, b_comp=b_comp, b_scale=b_scale, bias=bias)
    x2 = x.reshape(-1, K)
    impl = INT8_LINEAR_OP.select(_dispatch.Query(x.device.type, x.dtype, (x2.shape[0], N, K)), backend)
    if K > INT32_SAFE_K:  # per-chunk quantization of x (its own scale per row and chunk), fp32 sum of the parts
        y = None
        for k0, k1 in _k_chunks(K):
            bp, comp = _packed_k_slice(b_packed, k0, k1)
            part = impl.fn(x2[:, k0:k1].contiguous(), bp, comp, b_scale, None).float()
            y = part if y is None else y.add_(part)
        y = (y + bias.float() if bias is not None else y).to(x.dtype)
        return y.reshape(*x.shape[:-1], N)
    y = impl.fn(x2.contiguous(), b_packed, b_comp, b_scale, bias)
    return y.reshape(*x.shape[:-1], N)


def int4_quantize_weight(
    w: torch.Tensor, group_size: int = 128, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float weight (N, K) -> (packed (N/16, K/8, 16, 4) uint8, scale (K/G, Np) fp32, zero (K/G, Np) fp32).

    Group-wise along K; asymmetric (min/max, zero point in [0, 15]) by default, symmetric: zero = 8."""
    op = "fmkernels.int4_quantize_weight"
    check_tensor("w", w, dtypes=FLOAT_DTYPES, ndim=2, op=op)
    _check_group(op, w.shape[1], group_size)
    N = w.shape[0]
    q, s, z = ref.quantize_int4(w.detach(), group_size, symmetric)
    Np = _ru(max(N, 1), 16)
    sp = torch.ones(s.shape[0], Np, dtype=torch.float32, device=w.device)
    zp = torch.zeros_like(sp)
    sp[:, :N], zp[:, :N] = s, z
    packed = torch.ops.fmkernels.int4_pack_weight(q) if _use_cpu_ext(q) else ref.int4_pack_weight(q)
    return packed, sp, zp


def _check_group(op, K, group_size):
    if not isinstance(group_size, int) or group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"{op}: group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
    if K % group_size != 0:
        raise ValueError(
            f"{op}: K={K} (in_features) is not a multiple of group_size={group_size}; pick a group size that "
            f"divides K or leave this layer unquantized"
        )


def int4_mm(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    n: int,
    bias: Optional[torch.Tensor] = None,
    *,
    act_terms: int = 2,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """W4A16 GEMM: x (..., K) fp32/bf16/fp16 @ dequant(W)^T (+ bias) -> (..., n) in x's dtype.

    w_packed, scale, zero: from int4_quantize_weight. The CPU kernel quantizes activations per row on the fly:
    act_terms=2 (default) uses two int8 terms (~15-bit activations), act_terms=1 is W4A8 (faster for large M).
    """
    op = "fmkernels.int4_mm"
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1, op=op)
    K = x.shape[-1]
    if not isinstance(w_packed, torch.Tensor):
        raise TypeError(f"{op}: w_packed must be a torch.Tensor, got {type(w_packed).__name__}")
    if w_packed.dtype == torch.int8:
        raise TypeError(f"{op}: w_packed is int8, which is the int8 packed format; int4_mm needs the uint8 weight "
                        f"from int4_quantize_weight")
    check_tensor("w_packed", w_packed, dtypes=(torch.uint8,), ndim=4, op=op)
    if tuple(w_packed.shape[2:]) != (16, 4):
        raise ValueError(f"{op}: w_packed must have shape (N/16, K/8, 16, 4), got {tuple(w_packed.shape)}")
    _check_group(op, K, group_size)
    if w_packed.shape[1] * 8 != K:
        raise ValueError(f"{op}: w_packed was packed for K={w_packed.shape[1] * 8} but x has K={K}")
    Np = w_packed.shape[0] * 16
    if not isinstance(n, int) or not (Np - 16 < n <= Np):
        raise ValueError(f"{op}: n={n!r} does not match w_packed ({Np} padded columns)")
    for name, t in (("scale", scale), ("zero", zero)):
        check_tensor(name, t, dtypes=(torch.float32,), ndim=2, op=op)
        if tuple(t.shape) != (K // group_size, Np):
            raise ValueError(
                f"{op}: {name} must have shape ({K // group_size}, {Np}) for K={K}, group_size={group_size}, "
                f"got {tuple(t.shape)} (was the weight quantized with another group size?)"
            )
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1, op=op)
        if bias.shape[0] != n:
            raise ValueError(f"{op}: bias must have shape ({n},), got {tuple(bias.shape)}")
    if act_terms not in (1, 2):
        raise ValueError(f"{op}: act_terms must be 1 or 2, got {act_terms!r}")
    check_same_device(op, x=x, w_packed=w_packed, scale=scale, zero=zero, bias=bias)
    x2 = x.reshape(-1, K)
    impl = INT4_OP.select(_dispatch.Query(x.device.type, x.dtype, (x2.shape[0], n, K, group_size)), backend)
    y = impl.fn(x2.contiguous(), w_packed, scale, zero, group_size, n, bias, act_terms)
    return y.reshape(*x.shape[:-1], n)


def fp8_quantize(x: torch.Tensor, per_row: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float -> (float8_e4m3fn (M, K), scale fp32 (M,) or scalar)."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=2, op="fmkernels.fp8_quantize")
    return ref.quantize_fp8(x, per_row)


def fp8_mm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """fp8 e4m3 GEMM: (a @ b^T) * a_scale * b_scale (+ bias); scales per tensor (0-d) or per row ((M,), (N,)).
    GPU backends (CUDA sm89+/sm90, Triton); on CPU the reference runs (no fp8 hardware)."""
    op = "fmkernels.fp8_mm"
    f8 = (torch.float8_e4m3fn,)
    check_tensor("a", a, dtypes=f8, ndim=2, op=op)
    check_tensor("b", b, dtypes=f8, ndim=2, op=op)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{op}: a is (M, K={a.shape[1]}) but b is (N, K={b.shape[1]}); K must match")
    for name, s, rows in (("a_scale", a_scale, a.shape[0]), ("b_scale", b_scale, b.shape[0])):
        check_tensor(name, s, dtypes=(torch.float32,), op=op)
        if s.dim() not in (0, 1) or (s.dim() == 1 and s.shape[0] != rows):
            raise ValueError(f"{op}: {name} must be a scalar or shape ({rows},), got {tuple(s.shape)}")
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    extra = ()
    if a.device.type == "cuda":
        extra = (("capability", torch.cuda.get_device_capability(a.device)),)
    impl = FP8_OP.select(_dispatch.Query(a.device.type, out_dtype, (a.shape[0], b.shape[0], a.shape[1]), extra), backend)
    return impl.fn(a.contiguous(), a_scale, b.contiguous(), b_scale, bias, out_dtype)


# ---------------------------------------------------------------- module fast path


@functools.lru_cache(maxsize=256)
def _select_cached(op_name, device, dtype, backend, env, interp, disable_ext):
    # int8_mm / int8_linear / int4_mm backends have no shape-dependent checks: (device, dtype, forced backend,
    # environment) decide. A failed selection raises and is not cached.
    return _dispatch.OPS[op_name].select(_dispatch.Query(device, dtype), backend)


# CPython on POSIX: os.environ's backing dict (bytes keys, kept in step by os.environ[...] = / del / putenv through
# os.environ, and so by monkeypatch.setenv): 3 lookups in ~0.15 us against ~2.1 us for 3 os.environ.get (measured
# on the Zen 4 VM; 2% of a 4096x4096 int8 weight-only linear at batch 1).
_ENV_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None
if not (isinstance(_ENV_DATA, dict) and all(isinstance(k, bytes) for k in list(_ENV_DATA)[:1])):
    _ENV_DATA = None


def _env_key():
    d = _ENV_DATA
    if d is not None:
        return d.get(b"FMK_BACKEND") or None, d.get(b"TRITON_INTERPRET"), d.get(b"FMK_DISABLE_EXT")
    env = os.environ
    return env.get("FMK_BACKEND") or None, env.get("TRITON_INTERPRET"), env.get("FMK_DISABLE_EXT")


def _fast_impl(op_name, x, w, backend):
    """Backend for a module whose packed weights were validated when they were built or loaded (saves ~25 us
    of per-call Python checks, 8% of a 4096x4096 batch-1 int8 linear); None: take the checked path."""
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES or x.device != w.device or x.dim() == 0:
        return None
    return _select_cached(op_name, x.device.type, x.dtype, backend, *_env_key())


def int8_linear_module(x, b_packed, b_comp, b_scale, bias, backend=None):
    """int8_linear for Int8Linear (weights validated at construction / load)."""
    K = x.shape[-1] if isinstance(x, torch.Tensor) and x.dim() else -1
    fits = b_packed.shape[1] * 4 == _ru(max(K, 1), 4) and K <= INT32_SAFE_K  # longer K: the split path
    impl = _fast_impl("int8_linear", x, b_packed, backend) if fits else None
    if impl is None:
        return int8_linear(x, b_packed, b_comp, b_scale, bias, backend=backend)
    x2 = x.reshape(-1, K).contiguous()
    if impl.name == "cpu" and _plain_no_grad(x, bias):
        # inference on plain tensors: straight to the CPU kernel, past the Python autograd wrapper that
        # register_autograd installs (~25 -> ~15 us of per-call overhead; 4096x4096 batch 1 is ~300 us)
        y = _INT8_LINEAR_OV.redispatch(_CPU_KEYS, x2, b_packed, b_comp, b_scale, bias)
    else:
        y = impl.fn(x2, b_packed, b_comp, b_scale, bias)
    return y.reshape(*x.shape[:-1], b_scale.shape[0])


_INT8_LINEAR_OV = torch.ops.fmkernels.int8_linear.default
_CPU_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


def _plain_no_grad(x, bias) -> bool:
    """x is a plain eager CPU tensor (not fake/functional/subclass, not being traced) and no gradient is needed."""
    if type(x) is not torch.Tensor or torch.compiler.is_compiling():
        return False
    if not torch.is_grad_enabled():
        return True
    return not x.requires_grad and (bias is None or not bias.requires_grad)


def int4_mm_module(x, w_packed, scale, zero, group_size, n, bias, act_terms, backend=None):
    """int4_mm for Int4Linear (weights validated at construction / load)."""
    K = x.shape[-1] if isinstance(x, torch.Tensor) and x.dim() else -1
    impl = _fast_impl("int4_mm", x, w_packed, backend) if w_packed.shape[1] * 8 == K else None
    if impl is None:
        return int4_mm(x, w_packed, scale, zero, group_size, n, bias, act_terms=act_terms, backend=backend)
    y = impl.fn(x.reshape(-1, K).contiguous(), w_packed, scale, zero, group_size, n, bias, act_terms)
    return y.reshape(*x.shape[:-1], n)


# ---------------------------------------------------------------- int8 training


class _Int8TrainingLinear(torch.autograd.Function):
    """y = x @ W^T + b with the forward and the input-gradient matmuls on the int8 kernel (dynamic per-row
    scaling of x, W, dy and W^T), the weight gradient dy^T @ x in the input precision (fp32)."""

    @staticmethod
    def forward(ctx, x2, weight, bias, backend):
        packed, comp, s = int8_quantize_weight(weight)
        y = int8_linear(x2, packed, comp, s, bias, backend=backend)
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        ctx.backend = backend
        return y

    @staticmethod
    def backward(ctx, gy):
        x2, weight = ctx.saved_tensors
        gx = gw = gb = None
        gy = gy.contiguous()
        if ctx.needs_input_grad[0]:
            wt_packed, wt_comp, wt_s = int8_quantize_weight(weight.t().contiguous())  # W^T per input channel
            gx = int8_linear(gy.to(x2.dtype), wt_packed, wt_comp, wt_s, None, backend=ctx.backend)
        if ctx.needs_input_grad[1]:
            gw = (gy.t().to(weight.dtype) @ x2.to(weight.dtype))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.sum(0).to(weight.dtype)
        return gx, gw, gb, None


def int8_training_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *, backend: Optional[str] = None
) -> torch.Tensor:
    """Differentiable linear for int8 training: forward and grad-input on int8 GEMMs with dynamic scaling,
    grad-weight in x's precision; weight stays the fp32 master copy (quantized afresh every call)."""
    op = "fmkernels.int8_training_linear"
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1, op=op)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=2, op=op)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{op}: weight must be (N, {x.shape[-1]}), got {tuple(weight.shape)}")
    x2 = x.reshape(-1, x.shape[-1])
    y = _Int8TrainingLinear.apply(x2, weight, bias, backend)
    return y.reshape(*x.shape[:-1], weight.shape[0])


# ---------------------------------------------------------------- autograd of the quantized linears
# The packed weights are constants (no gradient); the input gets the straight-through gradient through the
# dequantized weight, dx = dy @ W_deq (what QLoRA-style adapters below a frozen quantized layer need), and
# the bias its usual sum. W_deq is rebuilt from the packed form in the backward: no dense copy is kept.


def _int8_linear_setup(ctx, inputs, output):
    x, b_packed, _b_comp, b_scale, bias = inputs
    ctx.save_for_backward(b_packed, b_scale)
    ctx.k, ctx.x_dtype = x.shape[-1], x.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _needs(ctx, i: int) -> bool:
    return ctx.needs_input_grad[i + getattr(ctx, "arg_offset", 0)]


def _int8_linear_backward(ctx, gy):
    b_packed, b_scale = ctx.saved_tensors
    gx = gb = None
    if _needs(ctx, 0):
        w = ref.int8_unpack_weight(b_packed, b_scale.shape[0], ctx.k).float() * b_scale[:, None]  # (N, K)
        gx = (gy.float() @ w).to(ctx.x_dtype)
    if ctx.bias_dtype is not None and _needs(ctx, 4):
        gb = gy.reshape(-1, gy.shape[-1]).float().sum(0).to(ctx.bias_dtype)
    return gx, None, None, None, gb


def _int4_mm_setup(ctx, inputs, output):
    x, w_packed, scale, zero, group_size, n, bias, _act_terms = inputs
    ctx.save_for_backward(w_packed, scale, zero)
    ctx.k, ctx.n, ctx.group_size, ctx.x_dtype = x.shape[-1], n, group_size, x.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _int4_mm_backward(ctx, gy):
    w_packed, scale, zero = ctx.saved_tensors
    gx = gb = None
    if _needs(ctx, 0):
        w = ref.dequantize_int4(ref.int4_unpack_weight(w_packed, ctx.n, ctx.k), scale, zero, ctx.group_size)
        gx = (gy.float() @ w).to(ctx.x_dtype)
    if ctx.bias_dtype is not None and _needs(ctx, 6):
        gb = gy.reshape(-1, gy.shape[-1]).float().sum(0).to(ctx.bias_dtype)
    return gx, None, None, None, None, None, gb, None


torch.library.register_autograd("fmkernels::int8_linear", _int8_linear_backward, setup_context=_int8_linear_setup)
torch.library.register_autograd("fmkernels::int4_mm", _int4_mm_backward, setup_context=_int4_mm_setup)


_STE = {"int8_linear": (_int8_linear_setup, _int8_linear_backward), "int4_mm": (_int4_mm_setup, _int4_mm_backward)}


class _StraightThrough(torch.autograd.Function):
    """The same straight-through gradient for backends that are not the registered op (reference: autograd
    through its rounding would be wrong; triton: its own custom op)."""

    @staticmethod
    def forward(kind, fn, *inputs):
        return fn(*inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        kind, _fn, *args = inputs
        ctx.kind, ctx.arg_offset = kind, 2
        _STE[kind][0](ctx, args, output)

    @staticmethod
    def backward(ctx, gy):
        return (None, None, *_STE[ctx.kind][1](ctx, gy))


def _straight_through(kind, fn):
    def wrapped(*inputs):
        return _StraightThrough.apply(kind, fn, *inputs)

    return wrapped


for _name in _STE:
    for _b in ("reference", "triton"):
        _be = _dispatch.OPS[_name].backends[_b]
        _dispatch.OPS[_name].register(dataclasses.replace(_be, fn=_straight_through(_name, _be.fn)))
