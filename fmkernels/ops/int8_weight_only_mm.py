"""int8 weight-only GEMM (W8A16): x @ dequant(W)^T with int8 weights and group-wise or per-channel fp32 scales.

Schema (defined once, here):
  fmkernels::int8_weight_only_mm(Tensor x, Tensor w_packed, Tensor scale, int group_size, int n, Tensor? bias)
      -> Tensor      x (M, K) float, w_packed (Np/16, K/4, 16, 4) uint8 ("wo8"), scale (K/G, Np) fp32 -> (M, n)
Format: fmkernels/reference/quant.py ("wo8"). CPU: csrc/cpu/int8_weight_only_mm.cpp (VNNI, ~15-bit activations in
two int8 terms); Triton: fmkernels/triton/int8_weight_only_mm.py (fp32 dot on GPU-dequantized tiles); reference:
exact fp32 activations. CUDA: csrc/cuda/int8_weight_only_mm.cu (fp32 FMA on registers-dequantized weights).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .. import _dispatch
from .._library import define
from .._validation import FLOAT_DTYPES, check_tensor
from ..reference import quant as ref
from . import quant as Q

define("int8_weight_only_mm(Tensor x, Tensor w_packed, Tensor scale, int group_size, int n, Tensor? bias) -> Tensor")

__all__ = ["int8_weight_only_quantize", "int8_weight_only_mm"]


@torch.library.register_fake("fmkernels::int8_weight_only_mm")
def _fake(x, w_packed, scale, group_size, n, bias):
    return x.new_empty((x.shape[0], n))


def _triton(*args):
    from ..triton.int8_weight_only_mm import int8_weight_only_mm_triton

    return int8_weight_only_mm_triton(*args)


OP = _dispatch.op("int8_weight_only_mm")
OP.register(_dispatch.Backend("cuda", torch.ops.fmkernels.int8_weight_only_mm.default, ("cuda",), FLOAT_DTYPES,
                              ("cuda_ext",)))
OP.register(_dispatch.Backend("triton", _triton, ("cuda",), FLOAT_DTYPES, ("triton",)))
OP.register(_dispatch.Backend("cpu", torch.ops.fmkernels.int8_weight_only_mm.default, ("cpu",), FLOAT_DTYPES,
                              ("cpu_ext",)))
OP.register(_dispatch.Backend("reference", ref.int8_weight_only_mm, ("cpu", "cuda"), FLOAT_DTYPES))


def int8_weight_only_quantize(w: torch.Tensor, group_size: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Float weight (N, K) -> (packed (Np/16, Kp/4, 16, 4) uint8, scale (Kp/G, Np) fp32, G): symmetric int8 per
    group of G along K (None: per output channel, one group). K is zero-padded to Kp (a multiple of 4 and of G);
    callers pad x the same way (Int8WeightOnlyLinear does)."""
    op = "fmkernels.int8_weight_only_quantize"
    check_tensor("w", w, dtypes=FLOAT_DTYPES, ndim=2, op=op)
    N, K = w.shape
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or group_size <= 0 or group_size % 4):
        raise ValueError(f"{op}: group_size must be None (per channel) or a positive multiple of 4, got {group_size!r}")
    Kp = Q._ru(max(K, 1), 4 if group_size is None else group_size)
    G = Kp if group_size is None else group_size
    wp = torch.nn.functional.pad(w.detach().float(), (0, Kp - K))
    q, s = ref.quantize_int8_grouped(wp, G)
    return pack_int8_weight_only(q, s)


def pack_int8_weight_only(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """q (N, Kp) int8 codes and scale (Kp/G, N) fp32 -> (packed, scale padded to (Kp/G, Np), G)."""
    N, Kp = q.shape
    G = Kp // scale.shape[0]
    Np = Q._ru(max(N, 1), 16)
    sp = torch.zeros(scale.shape[0], Np, dtype=torch.float32, device=q.device)
    sp[:, :N] = scale
    return ref.int8_weight_only_pack(q), sp, G


def _check(op, x, w_packed, scale, group_size, n, bias):
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1, op=op)
    K = x.shape[-1]
    if not isinstance(w_packed, torch.Tensor):
        raise TypeError(f"{op}: w_packed must be a torch.Tensor, got {type(w_packed).__name__}")
    check_tensor("w_packed", w_packed, dtypes=(torch.uint8,), ndim=4, op=op)
    if tuple(w_packed.shape[2:]) != (16, 4) or w_packed.shape[1] * 4 != K:
        raise ValueError(f"{op}: w_packed must have shape (Np/16, K/4, 16, 4) = (*, {K // 4}, 16, 4) for x's K={K}, "
                         f"got {tuple(w_packed.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or group_size % 4 \
            or K % group_size:
        raise ValueError(f"{op}: group_size must be a positive multiple of 4 dividing K={K}, got {group_size!r}")
    Np = w_packed.shape[0] * 16
    if not isinstance(n, int) or not (Np - 16 < n <= Np):
        raise ValueError(f"{op}: n={n!r} does not match w_packed ({Np} padded columns)")
    check_tensor("scale", scale, dtypes=(torch.float32,), ndim=2, op=op)
    if tuple(scale.shape) != (K // group_size, Np):
        raise ValueError(f"{op}: scale must have shape ({K // group_size}, {Np}), got {tuple(scale.shape)}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1, op=op)
        if bias.shape[0] != n:
            raise ValueError(f"{op}: bias must have shape ({n},), got {tuple(bias.shape)}")


def int8_weight_only_mm(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    scale: torch.Tensor,
    group_size: int,
    n: int,
    bias: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """W8A16 GEMM: x (..., K) fp32/bf16/fp16 @ dequant(W)^T (+ bias) -> (..., n) in x's dtype.

    w_packed, scale, group_size: from int8_weight_only_quantize (K already padded). The CPU kernel quantizes
    activations per row into two int8 terms (~15-bit); the reference backend keeps them exact."""
    op = "fmkernels.int8_weight_only_mm"
    _check(op, x, w_packed, scale, group_size, n, bias)
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    impl = OP.select(_dispatch.Query(x.device.type, x.dtype, (x2.shape[0], n, K)), backend)
    y = impl.fn(x2.contiguous(), w_packed, scale, group_size, n, bias)
    return y.reshape(*x.shape[:-1], n)


def int8_weight_only_mm_module(x, w_packed, scale, group_size, n, bias, backend=None):
    """int8_weight_only_mm for Int8WeightOnlyLinear (weights validated at construction / load)."""
    K = x.shape[-1] if isinstance(x, torch.Tensor) and x.dim() else -1
    impl = Q._fast_impl("int8_weight_only_mm", x, w_packed, backend) if w_packed.shape[1] * 4 == K else None
    if impl is None:
        return int8_weight_only_mm(x, w_packed, scale, group_size, n, bias, backend=backend)
    flat = x.dim() == 2 and x.is_contiguous()  # decode's (1, K): skip two reshapes (~1 us)
    x2 = x if flat else x.reshape(-1, K).contiguous()
    if impl.name == "cpu" and Q._plain_no_grad(x, bias):
        y = _OV.redispatch(Q._CPU_KEYS, x2, w_packed, scale, group_size, n, bias)  # past the autograd wrapper
    else:
        y = impl.fn(x2, w_packed, scale, group_size, n, bias)
    return y if flat else y.reshape(*x.shape[:-1], n)


_OV = torch.ops.fmkernels.int8_weight_only_mm.default


# ---------------------------------------------------------------- autograd: straight-through dx = dy @ W_deq


def _setup(ctx, inputs, output):
    x, w_packed, scale, group_size, n, bias = inputs
    ctx.save_for_backward(w_packed, scale)
    ctx.k, ctx.n, ctx.group_size, ctx.x_dtype = x.shape[-1], n, group_size, x.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, gy):
    w_packed, scale = ctx.saved_tensors
    off = getattr(ctx, "arg_offset", 0)
    gx = gb = None
    if ctx.needs_input_grad[off]:
        q = ref.int8_weight_only_unpack(w_packed, ctx.n, ctx.k)
        w = ref.dequantize_int8_weight_only(q, scale, ctx.group_size)
        gx = (gy.float() @ w).to(ctx.x_dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[off + 5]:
        gb = gy.reshape(-1, gy.shape[-1]).float().sum(0).to(ctx.bias_dtype)
    return gx, None, None, None, None, gb


torch.library.register_autograd("fmkernels::int8_weight_only_mm", _backward, setup_context=_setup)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(fn, *inputs):
        return fn(*inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.arg_offset = 1
        _setup(ctx, inputs[1:], output)

    @staticmethod
    def backward(ctx, gy):
        return (None, *_backward(ctx, gy))


for _b in ("reference", "triton"):
    _be = OP.backends[_b]
    OP.register(dataclasses.replace(_be, fn=(lambda f: lambda *a: _StraightThrough.apply(f, *a))(_be.fn)))
