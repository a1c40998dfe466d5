"""fmkernels.linear: y = x W^T (+ b), differentiable, with the fp32 CPU matmuls on oneDNN's AVX-512 kernels.

PyTorch's fp32 CPU matmul (nn.Linear, torch.mm) is MKL's sgemm. PyTorch also ships oneDNN, whose fp32 AVX-512
kernels it exposes as torch.ops.mkldnn._linear_pointwise (what inductor's CPU linear lowers to). Measured on 2
cores Zen 4 (AVX-512, no AMX; FMA peak 234 GFLOP/s), T = 2048 tokens, (K, N) in {(384, 384), (384, 1152),
(384, 2048), (1024, 384)} (`benchmarks/bench_linear.py`):
  y  = x W^T   oneDNN 213-217 GFLOP/s, MKL 191-197   -> oneDNN
  dX = dY W    oneDNN 216-222 GFLOP/s, MKL 195-202   -> oneDNN
  dW = dY^T X  oneDNN 108-194 GFLOP/s, MKL 184-195   -> fmkernels::mm_tn_ (csrc/cpu/mm_tn.cpp): 207-227 GFLOP/s
               where MKL ran 191-201 side by side
Backends: "cpu" (fp32 CPU tensors outside autocast; under CPU autocast F.linear already runs oneDNN's bf16
kernels), "reference" (F.linear: every other case, and the fallback when oneDNN is missing).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _dispatch, _ext
from .._library import define
from .._validation import FLOAT_DTYPES, check_same_device, check_tensor

__all__ = ["linear", "matmul_nt", "matmul_tn"]

# out (N, K) (+)= a^T b for fp32 CPU a (T, N), b (T, K) with unit last strides (csrc/cpu/mm_tn.cpp).
define("mm_tn_(Tensor(a!) out, Tensor a, Tensor b, bool accumulate) -> ()")


@torch.library.register_fake("fmkernels::mm_tn_")
def _mm_tn_fake(out, a, b, accumulate):
    return None


@functools.lru_cache(maxsize=None)
def onednn_missing() -> Optional[str]:
    """Why oneDNN's fp32 linear cannot be used here (None when it can): checked once with a tiny probe."""
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch build has no oneDNN (torch.backends.mkldnn.is_available() is False)"
    try:
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 3), torch.ones(4, 3), None, "none", [], "")
    except Exception as e:  # op renamed or removed in a later PyTorch
        return f"torch.ops.mkldnn._linear_pointwise is not usable ({type(e).__name__}: {e})"
    if tuple(y.shape) != (2, 4) or not bool((y == 3.0).all()):
        return "torch.ops.mkldnn._linear_pointwise failed its probe (wrong result)"
    return None


def _use_onednn(t: torch.Tensor) -> bool:
    return (t.device.type == "cpu" and t.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and onednn_missing() is None)


def _onednn_nt(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a @ b.T (+ bias) on oneDNN; a (M, K), b (N, K), fp32 CPU (any strides)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


def matmul_nt(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a @ b.T for 2-D a (M, K) and b (N, K), into `out` when given: oneDNN for fp32 CPU tensors (see the module
    docstring; oneDNN has no out= form, so its result is copied into out), else torch.mm."""
    if _use_onednn(a) and b.dtype == torch.float32 and b.device.type == "cpu":
        y = _onednn_nt(a, b)
        return y if out is None else out.copy_(y)
    return torch.mm(a, b.t(), out=out) if out is not None else a @ b.t()


def _mm_tn_fits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == torch.float32 and b.dtype == torch.float32 and a.device.type == "cpu" and b.device.type == "cpu"
            and a.dim() == 2 and b.dim() == 2 and a.stride(1) == 1 and b.stride(1) == 1
            and _ext.has_cpu_ext())  # without AVX-512 (or FMK_CPU_ISA below it) the op itself runs addmm_


def matmul_tn(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None,
              accumulate: bool = False) -> torch.Tensor:
    """a.T @ b for 2-D a (T, N) and b (T, K) (a linear layer's weight gradient: a = dY, b = X), into `out` when
    given (added to it when accumulate=True). fp32 CPU tensors with unit last strides run fmkernels::mm_tn_
    (measured faster than MKL, see the module docstring); everything else runs torch.mm / addmm_. Not
    differentiable."""
    if not _mm_tn_fits(a, b):
        return a.t().mm(b) if out is None else out.addmm_(a.t(), b, beta=1.0 if accumulate else 0.0)
    if out is None:
        out, accumulate = torch.empty((a.shape[1], b.shape[1]), dtype=torch.float32), False
    elif out.dtype != torch.float32 or out.stride(1) != 1 or out.device.type != "cpu":
        return out.addmm_(a.t(), b, beta=1.0 if accumulate else 0.0)
    torch.ops.fmkernels.mm_tn_(out, a, b, accumulate)
    return out


class _OneDnnLinear(torch.autograd.Function):
    """x (..., K), weight (N, K), bias (N,) or None -> (..., N); fp32 CPU."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = x.reshape(-1, x.shape[-1])
        y = _onednn_nt(x2, weight, bias)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        g2 = gy.reshape(-1, gy.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:  # dX = dY W: oneDNN (a @ b.T with b = W^T)
            dx = _onednn_nt(g2, weight.t()).view(x.shape)
        if ctx.needs_input_grad[1]:  # dW = dY^T X
            dw = matmul_tn(g2, x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g2.sum(0)
        return dx, dw, db


def _cpu(x, weight, bias):
    return _OneDnnLinear.apply(x, weight, bias)


def _reference(x, weight, bias):
    return F.linear(x, weight, bias)


def _cpu_reason(q: _dispatch.Query) -> Optional[str]:
    if dict(q.extra).get("autocast"):
        return "under CPU autocast F.linear already runs oneDNN's bf16 kernels"
    return onednn_missing()


OP = _dispatch.op("linear")
OP.register(_dispatch.Backend("cpu", _cpu, devices=("cpu",), dtypes=(torch.float32,), check=_cpu_reason))
OP.register(_dispatch.Backend("reference", _reference, devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
           backend: Optional[str] = None) -> torch.Tensor:
    """y = x @ weight.T + bias, as torch.nn.functional.linear (same shapes and autograd).

    x: (..., K); weight: (N, K); bias: (N,) or None; all the same dtype and device. fp32 CPU calls run the
    forward and dX products on oneDNN and dW on fmkernels::mm_tn_ (measured fastest, see the module docstring).
    backend: "cpu" | "reference" forces one (default: the fastest that fits; FMK_BACKEND).
    """
    op = "fmkernels.linear"
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1, op=op)
    # Under autocast x and the weight may differ in dtype (autocast casts both); otherwise they must match.
    autocast = torch.is_autocast_enabled(x.device.type) if x.device.type in ("cpu", "cuda") else False
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES if autocast else (x.dtype,), ndim=2, op=op)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{op}: weight must be (N, {x.shape[-1]}) for x of shape {tuple(x.shape)}, got "
                         f"{tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES if autocast else (x.dtype,), ndim=1, op=op)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        check_same_device(op, x=x, weight=weight, bias=bias)
    else:
        check_same_device(op, x=x, weight=weight)
    if torch.compiler.is_compiling():  # the compiler picks its own linear kernels (inductor lowers to oneDNN/MKL)
        return F.linear(x, weight, bias)
    q = _dispatch.Query(device=x.device.type, dtype=x.dtype, shape=tuple(weight.shape),
                        extra=(("autocast", autocast),))
    return OP.select(q, backend).fn(x, weight, bias)
