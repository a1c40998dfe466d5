"""fmkernels.flash_attention: fused attention (online softmax, no N x N matrix), forward and backward.

Schemas (defined once, here):
  fmkernels::flash_attention_fwd(Tensor q, Tensor k, Tensor v, float scale, int window_left, int window_right)
      -> (Tensor out, Tensor lse)
  fmkernels::flash_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
      float scale, int window_left, int window_right) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)
  q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D); out like q (contiguous); lse: (B, Hq, Nq) fp32 (natural log).
  window_left/right: -1 = unbounded; causal is folded into window_right = 0 by the public function.
Implemented by csrc/cpu/flash_attention.cpp (CPU key) and csrc/cuda/flash_attention.cu (CUDA key); the Triton
kernels register `fmkernels::flash_attention_*_triton`; the reference is plain autograd PyTorch.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _autograd, _dispatch
from .._library import define
from .._validation import FLOAT_DTYPES, check_same_device, check_tensor
from ..reference import attention as ref

MAX_HEAD_DIM = 256

define("flash_attention_fwd(Tensor q, Tensor k, Tensor v, float scale, int window_left, int window_right) -> (Tensor, Tensor)")
define(
    "flash_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale, "
    "int window_left, int window_right) -> (Tensor, Tensor, Tensor)"
)


@torch.library.register_fake("fmkernels::flash_attention_fwd")
def _fwd_fake(q, k, v, scale, window_left, window_right):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.register_fake("fmkernels::flash_attention_bwd")
def _bwd_fake(grad_out, q, k, v, out, lse, scale, window_left, window_right):
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, scale, window_left, window_right = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (scale, window_left, window_right)


def _make_backward(bwd):
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = bwd(grad_out.to(q.dtype), q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None

    return backward


BWD = _autograd.backward("flash_attention", _setup_context, _make_backward)  # one backward, every forward
BWD.attach("fmkernels::flash_attention_fwd", torch.ops.fmkernels.flash_attention_bwd)


def _compiled(q, k, v, scale, left, right):
    return torch.ops.fmkernels.flash_attention_fwd(q, k, v, scale, left, right)


def triton_module():
    """fmkernels/triton/flash_attention.py with this op's backward attached (imported on first use: triton is optional)."""
    from ..triton import flash_attention as tri

    BWD.attach(tri.flash_attention_fwd_triton, tri.flash_attention_bwd_triton)
    return tri


def _triton(q, k, v, scale, left, right):
    return triton_module().flash_attention_fwd_triton(q, k, v, scale, left, right)


def _reference(q, k, v, scale, left, right):
    return ref.flash_attention(q, k, v, window_size=(left, right), softmax_scale=scale, return_lse=True)


def _head_dim_ok(qry: _dispatch.Query) -> Optional[str]:
    if qry.shape and not 1 <= qry.shape[0] <= MAX_HEAD_DIM:
        return f"head dim {qry.shape[0]} outside [1, {MAX_HEAD_DIM}]"
    return None


def _cpu_slower_than_reference(qry: _dispatch.Query) -> Optional[str]:
    # The forward has a split-K decoding path for Nq <= 16: B4 H8 Nk=4096 D64 causal, Nq=1,
    # 1 core: fp32 3.0 ms vs reference 4.6 vs SDPA 4.2; bf16 1.8 vs SDPA 15.2 (benchmarks/bench_attention.py,
    # decode cases). The fp32 backward at such shapes is still the tiled kernel, which re-lays out all of K/V for
    # one query row: fwd+bwd Nq=1 113 ms vs reference 75; Nq=16 121 vs 108 (bf16: 44 vs 98, kept on cpu).
    if qry.dtype == torch.float32 and len(qry.shape) > 1 and qry.shape[1] <= 16 and dict(qry.extra).get("grad"):
        return "fp32 with Nq <= 16 and gradients: the reference backward is faster on CPU (measured)"
    return None


# On GPUs Triton goes first: the CUDA kernels are plain SIMT (no tensor cores) and untested on a device so far.
OP = _dispatch.op("flash_attention", auto_order={"cuda": ("triton", "cuda", "reference")})
OP.register(
    _dispatch.Backend("cuda", _compiled, devices=("cuda",), dtypes=FLOAT_DTYPES, needs=("cuda_ext",), check=_head_dim_ok)
)
OP.register(
    _dispatch.Backend("triton", _triton, devices=("cuda",), dtypes=FLOAT_DTYPES, needs=("triton",), check=_head_dim_ok)
)
OP.register(
    _dispatch.Backend("cpu", _compiled, devices=("cpu",), dtypes=FLOAT_DTYPES, needs=("cpu_ext",), check=_head_dim_ok,
                      prefer_other=_cpu_slower_than_reference)
)
OP.register(_dispatch.Backend("reference", _reference, devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES))


__all__ = ["flash_attention"]


def _check_window(window_size) -> tuple[int, int]:
    op = "fmkernels.flash_attention"
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"{op}: window_size must be a pair (left, right) of ints, got {window_size!r}")
    out = []
    for side, w in zip(("left", "right"), window_size):
        if isinstance(w, bool) or not isinstance(w, int):
            raise TypeError(f"{op}: window_size {side} must be an int, got {type(w).__name__}")
        if w < -1:
            raise ValueError(f"{op}: window_size {side} must be >= 0, or -1 for unbounded, got {w}")
        out.append(int(w))
    return out[0], out[1]


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
):
    """softmax(q k^T * softmax_scale + mask) v without materializing the (Nq, Nk) score matrix.

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D) with Hq a multiple of Hkv (GQA/MQA without copies); the layout of
    `F.scaled_dot_product_attention`. Any strides (e.g. a transposed (B, N, H, D) tensor). D in [1, 256];
    Nq, Nk >= 1; fp32/bf16/fp16 with fp32 accumulation; the output has q's dtype.
    causal: bottom-right aligned as in FlashAttention-2 (query i sees key j when j <= i + Nk - Nq).
    window_size=(left, right): query i sees keys in [i + Nk - Nq - left, i + Nk - Nq + right]; -1 = unbounded;
    causal=True is right = 0. Rows that see no key give zeros (and lse = -inf).
    softmax_scale: default 1/sqrt(D). return_lse: also return the fp32 log-sum-exp (B, Hq, Nq) (not
    differentiable). Differentiable in q, k, v; the CPU backward is deterministic.
    backend: "cpu" | "cuda" | "triton" | "reference" forces one (default: the fastest that fits; FMK_BACKEND).
    """
    op = "fmkernels.flash_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, dtypes=FLOAT_DTYPES, ndim=4, op=op)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} must have q's dtype {q.dtype}, got {t.dtype}")
    check_same_device(op, q=q, k=k, v=v)
    B, Hq, Nq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B:
        raise ValueError(f"{op}: k.shape[0] (batch) must equal q.shape[0] ({B}), got shape {tuple(k.shape)}")
    if k.shape[3] != D:
        raise ValueError(f"{op}: k.shape[3] (head dim) must equal q.shape[3] ({D}), got shape {tuple(k.shape)}")
    Hkv, Nk = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(
            f"{op}: q's head count ({Hq}) must be a multiple of k/v's head count ({Hkv}) (grouped-query attention)"
        )
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"{op}: head dim (q.shape[3]) must be in [1, {MAX_HEAD_DIM}], got {D}")
    if Nq == 0:
        raise ValueError(f"{op}: q must have at least one query (q.shape[2] >= 1), got shape {tuple(q.shape)}")
    if Nk == 0:
        raise ValueError(f"{op}: k and v must have at least one key (k.shape[2] >= 1), got shape {tuple(k.shape)}")
    if not isinstance(causal, bool):
        raise TypeError(f"{op}: causal must be a bool, got {type(causal).__name__}")
    left, right = _check_window(window_size)
    if causal:
        right = 0
    if softmax_scale is None:
        scale = 1.0 / math.sqrt(D)
    else:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) or not math.isfinite(
            softmax_scale
        ):
            raise ValueError(f"{op}: softmax_scale must be a finite float or None, got {softmax_scale!r}")
        scale = float(softmax_scale)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    qry = _dispatch.Query(device=q.device.type, dtype=q.dtype, shape=(D, Nq), extra=(("grad", grad),))
    impl = OP.select(qry, backend)
    out, lse = impl.fn(q, k, v, scale, left, right)
    return (out, lse) if return_lse else out
