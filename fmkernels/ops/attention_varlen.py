"""fmkernels.flash_attention_varlen: fused attention over packed variable-length sequences, forward and backward.

Schemas (defined once, here):
  fmkernels::flash_attention_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k,
      int max_seqlen_q, int max_seqlen_k, float scale, int window_left, int window_right) -> (Tensor out, Tensor lse)
  fmkernels::flash_attention_varlen_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
      Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float scale, int window_left,
      int window_right) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)
  q: (total_q, Hq, D); k, v: (total_k, Hkv, D); cu_seqlens_*: int32 (batch + 1,); out like q (contiguous);
  lse: (Hq, total_q) fp32 (natural log). Causal is folded into window_right = 0 by the public function.
Implemented by csrc/cpu/flash_attention.cpp (CPU key; the dense kernel's tiles run per sequence) and
fmkernels/triton/flash_attention_varlen.py (`fmkernels::flash_attention_varlen_*_triton`, the dense Triton kernels
with a sequence axis) and csrc/cuda/flash_attention.cu (CUDA key, grid z = the sequence; compile-checked only);
the reference runs each sequence on its own through the dense reference.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _autograd, _dispatch
from .._library import define
from .._validation import FLOAT_DTYPES, check_same_device, check_tensor
from ..reference import attention_varlen as ref
from .attention import MAX_HEAD_DIM, _check_window, _head_dim_ok

define(
    "flash_attention_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
    "int max_seqlen_q, int max_seqlen_k, float scale, int window_left, int window_right) -> (Tensor, Tensor)"
)
define(
    "flash_attention_varlen_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float scale, int window_left, "
    "int window_right) -> (Tensor, Tensor, Tensor)"
)


@torch.library.register_fake("fmkernels::flash_attention_varlen_fwd")
def _fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.register_fake("fmkernels::flash_attention_varlen_bwd")
def _bwd_fake(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
              window_left, window_right):
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, window_left, window_right = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, scale, window_left, window_right)


def _make_backward(bwd):
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = bwd(grad_out.to(q.dtype), q, k, v, out, lse, cu_q, cu_k, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None, None

    return backward


BWD = _autograd.backward("flash_attention_varlen", _setup_context, _make_backward)  # one backward, every forward
BWD.attach("fmkernels::flash_attention_varlen_fwd", torch.ops.fmkernels.flash_attention_varlen_bwd)


def _compiled(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right):
    return torch.ops.fmkernels.flash_attention_varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right)


def triton_module():
    """fmkernels/triton/flash_attention_varlen.py with this op's backward attached (imported on first use: triton is
    optional)."""
    from ..triton import flash_attention_varlen as tri

    BWD.attach(tri.flash_attention_varlen_fwd_triton, tri.flash_attention_varlen_bwd_triton)
    return tri


def _triton(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right):
    return triton_module().flash_attention_varlen_fwd_triton(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right)


def _reference(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right):
    return ref.flash_attention_varlen(
        q, k, v, cu_q, cu_k, window_size=(left, right), softmax_scale=scale, return_lse=True
    )


# On GPUs Triton goes first (as for the dense op: the CUDA kernels are plain SIMT and compile-checked only).
OP = _dispatch.op("flash_attention_varlen", auto_order={"cuda": ("triton", "cuda", "reference")})
OP.register(
    _dispatch.Backend("cuda", _compiled, devices=("cuda",), dtypes=FLOAT_DTYPES, needs=("cuda_ext",), check=_head_dim_ok)
)
OP.register(
    _dispatch.Backend("triton", _triton, devices=("cuda",), dtypes=FLOAT_DTYPES, needs=("triton",), check=_head_dim_ok)
)
OP.register(
    _dispatch.Backend("cpu", _compiled, devices=("cpu",), dtypes=FLOAT_DTYPES, needs=("cpu_ext",), check=_head_dim_ok)
)
OP.register(_dispatch.Backend("reference", _reference, devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES))

__all__ = ["flash_attention_varlen"]


def check_cu_seqlens(op: str, cu_seqlens_q, cu_seqlens_k, total_q: int, total_k: int, max_seqlen_q, max_seqlen_k,
                     device) -> None:
    """Validates the sequence tables: metadata first, then their values in one vectorized pass (one host sync;
    skipped while torch.compile traces, where the kernels' own O(batch) host check still refuses a bad table)."""
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{op}: {name} must be an int32 torch.Tensor, got {type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise TypeError(f"{op}: {name} must have dtype int32, got {cu.dtype}")
        if cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(f"{op}: {name} must be 1-D of length batch + 1 (>= 1), got shape {tuple(cu.shape)}")
        if cu.device != device:
            raise ValueError(f"{op}: {name} must be on q's device {device}, got {cu.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"{op}: cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), got "
            f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}"
        )
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise TypeError(f"{op}: {name} must be a non-negative int, got {m!r}")
    if torch.compiler.is_compiling():
        return
    if device.type == "cpu" and cu_seqlens_q.numel() <= 1024:
        # small CPU tables: plain lists (~5 us; the vectorized pass below costs ~100 us of op overhead per call)
        tables = [cu_seqlens_q.tolist(), cu_seqlens_k.tolist()]
        lens = [[b - a for a, b in zip(t, t[1:])] or [0] for t in tables]
        first, last = [t[0] for t in tables], [t[-1] for t in tables]
        lmin, lmax = [min(x) for x in lens], [max(x) for x in lens]
    else:
        cu = torch.stack([cu_seqlens_q, cu_seqlens_k]).long()  # (2, batch + 1)
        lens = cu.diff(dim=1)  # (2, batch)
        if lens.numel():
            lmin, lmax = lens.amin(dim=1), lens.amax(dim=1)
        else:
            lmin = lmax = torch.zeros(2, dtype=torch.long, device=cu.device)
        first, last, lmin, lmax = torch.stack([cu[:, 0], cu[:, -1], lmin, lmax]).cpu().tolist()  # one sync
    for i, (name, total, mx, mname) in enumerate(
        (("cu_seqlens_q", total_q, max_seqlen_q, "max_seqlen_q"), ("cu_seqlens_k", total_k, max_seqlen_k, "max_seqlen_k"))
    ):
        if first[i] != 0:
            raise ValueError(f"{op}: {name} must start at 0, got {first[i]}")
        if lmin[i] < 0:
            raise ValueError(f"{op}: {name} must be non-decreasing (a sequence length is {lmin[i]})")
        if last[i] != total:
            what = "q.shape[0]" if i == 0 else "k.shape[0]"
            raise ValueError(f"{op}: {name}[-1] must equal the total rows {what} = {total}, got {last[i]}")
        if lmax[i] > mx:
            raise ValueError(f"{op}: {mname} = {mx} is smaller than the longest sequence ({lmax[i]})")


def flash_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
):
    """Attention over packed variable-length sequences (FlashAttention-2's varlen semantics), no padding.

    q: (total_q, Hq, D); k, v: (total_k, Hkv, D), Hq a multiple of Hkv (GQA without copies), D in [1, 256],
    fp32/bf16/fp16 (fp32 accumulation; output in q's dtype). cu_seqlens_q / cu_seqlens_k: int32 (batch + 1,) prefix
    sums on q's device: sequence s is rows [cu[s], cu[s+1]) (zero-length sequences allowed). max_seqlen_q / _k:
    at least the longest sequence. causal / window_size: as `flash_attention`, per sequence, bottom-right aligned
    (query i of a sequence with nq queries and nk keys sits at key position i + nk - nq). Rows that see no key give
    zeros (lse = -inf). return_lse: also return the fp32 log-sum-exp (Hq, total_q). Differentiable in q, k, v;
    the CPU and Triton backwards are deterministic. backend: "cpu" | "cuda" | "triton" | "reference" forces one (default: the fastest that fits).
    """
    op = "fmkernels.flash_attention_varlen"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, dtypes=FLOAT_DTYPES, ndim=3, op=op)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} must have q's dtype {q.dtype}, got {t.dtype}")
    check_same_device(op, q=q, k=k, v=v)
    Tq, Hq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[2] != D:
        raise ValueError(f"{op}: k.shape[2] (head dim) must equal q.shape[2] ({D}), got shape {tuple(k.shape)}")
    Tk, Hkv = k.shape[0], k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(
            f"{op}: q's head count ({Hq}) must be a multiple of k/v's head count ({Hkv}) (grouped-query attention)"
        )
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"{op}: head dim (q.shape[2]) must be in [1, {MAX_HEAD_DIM}], got {D}")
    check_cu_seqlens(op, cu_seqlens_q, cu_seqlens_k, Tq, Tk, max_seqlen_q, max_seqlen_k, q.device)
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
    qry = _dispatch.Query(device=q.device.type, dtype=q.dtype, shape=(D,))
    impl = OP.select(qry, backend)
    out, lse = impl.fn(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), scale, left, right)
    return (out, lse) if return_lse else out
