"""fmkernels.rope: rotary position embedding applied to q and k in one kernel, forward and backward.

Schema (defined once, here):
  fmkernels::rope(Tensor q, Tensor k, Tensor cos, Tensor sin, bool inverse) -> (Tensor q_out, Tensor k_out)
  q: (B, N, Hq, D), k: (B, N, Hk, D) (GQA: Hk may differ), any strides with a unit last-dim stride (e.g. views
  of one fused qkv projection); cos, sin: (>= N, D/2) fp32 from `rope_cos_sin`. Outputs are contiguous.
  The backward is the same kernel rotating by -theta (inverse=True).
Implemented by csrc/cpu/rope.cpp (CPU key) and csrc/cuda/rope.cu (CUDA key); Triton: fmkernels/triton/rope.py; reference: fmkernels/reference/rope.py.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _autograd, _dispatch
from .._library import define
from .._validation import FLOAT_DTYPES, check_same_device, check_tensor
from ..reference import rope as ref
from ..reference.rope import rope_cos_sin  # noqa: F401  (re-exported for modules: the cos/sin tables)

define("rope(Tensor q, Tensor k, Tensor cos, Tensor sin, bool inverse) -> (Tensor, Tensor)")


@torch.library.register_fake("fmkernels::rope")
def _fake(q, k, cos, sin, inverse):
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    _, _, cos, sin, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.inverse = inverse


def _make_backward(fn):
    def backward(ctx, gq, gk):
        cos, sin = ctx.saved_tensors
        dq, dk = fn(gq, gk, cos, sin, not ctx.inverse)
        return dq, dk, None, None, None

    return backward


BWD = _autograd.backward("rope", _setup_context, _make_backward)  # one backward (the inverse rotation), every forward
BWD.attach("fmkernels::rope", torch.ops.fmkernels.rope)


def _compiled(q, k, cos, sin):
    return torch.ops.fmkernels.rope(q, k, cos, sin, False)


def triton_module():
    """fmkernels/triton/rope.py with this op's backward attached (imported on first use: triton is optional)."""
    from ..triton import rope as tri

    BWD.attach(tri.rope_triton, tri.rope_triton)
    return tri


def _triton(q, k, cos, sin):
    return triton_module().rope_triton(q, k, cos, sin, False)


def _check(q: _dispatch.Query) -> Optional[str]:
    return None


OP = _dispatch.op("rope")
OP.register(_dispatch.Backend("cuda", _compiled, devices=("cuda",), dtypes=FLOAT_DTYPES, needs=("cuda_ext",)))
OP.register(_dispatch.Backend("triton", _triton, devices=("cuda",), dtypes=FLOAT_DTYPES, needs=("triton",)))
OP.register(_dispatch.Backend("cpu", _compiled, devices=("cpu",), dtypes=FLOAT_DTYPES, needs=("cpu_ext",)))
OP.register(_dispatch.Backend("reference", ref.rope, devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES))

__all__ = ["rope", "rope_qkv"]


def _prepare(q, k, cos, sin, backend):
    """Checks rope's arguments; returns the backend and the arguments as its kernel takes them."""
    op = "fmkernels.rope"
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=4, op=op)
    check_tensor("k", k, dtypes=FLOAT_DTYPES, ndim=4, op=op)
    check_tensor("cos", cos, dtypes=FLOAT_DTYPES, ndim=2, op=op)
    check_tensor("sin", sin, dtypes=FLOAT_DTYPES, ndim=2, op=op)
    check_same_device(op, q=q, k=k, cos=cos, sin=sin)
    if k.dtype != q.dtype:
        raise TypeError(f"{op}: k must have q's dtype {q.dtype}, got {k.dtype}")
    B, N, Hq, D = q.shape
    if D % 2:
        raise ValueError(f"{op}: the head dim (q.shape[3]) must be even, got {D}")
    if k.shape[0] != B or k.shape[1] != N or k.shape[3] != D:
        raise ValueError(f"{op}: k must have shape ({B}, {N}, Hk, {D}) to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if cos.shape[0] < N or cos.shape[1] != D // 2 or sin.shape != cos.shape:
        raise ValueError(
            f"{op}: cos and sin must have shape (>= {N}, {D // 2}), got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    qk = _dispatch.Query(device=q.device.type, dtype=q.dtype, shape=(D,))
    impl = OP.select(qk, backend)
    if impl.name != "reference":
        if q.stride(-1) != 1:
            q = q.contiguous()
        if k.stride(-1) != 1:
            k = k.contiguous()
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
    return impl, q, k, cos, sin


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: Optional[str] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by their positions (Llama "rotate half"): x = [x1 | x2] -> [x1 c - x2 s | x2 c + x1 s].

    q: (B, N, Hq, D), k: (B, N, Hk, D), same dtype (float32/bfloat16/float16), D even; cos, sin: (>= N, D/2)
    (build them with `fmkernels.ops.rope.rope_cos_sin(N, D)`). Position n uses row n of cos/sin.
    Returns (q_rot, k_rot), contiguous, in q's dtype; differentiable in q and k.
    backend: "cpu" | "triton" | "reference" forces one (default: the fastest that fits; FMK_BACKEND).
    """
    impl, q, k, cos, sin = _prepare(q, k, cos, sin, backend)
    return impl.fn(q, k, cos, sin)


def _rotation(name: str):
    """(q, k, cos, sin, inverse) -> (q_rot, k_rot) of backend `name`."""
    if name == "reference":
        return ref.rope
    if name == "triton":
        return triton_module().rope_triton
    return torch.ops.fmkernels.rope


class _PackedRope(torch.autograd.Function):
    """(q_rot, k_rot, v) from one (B, N, Hq + 2 Hk, D) projection; the backward writes d(qkv) in one
    concatenation (per-slice gradients would each zero-fill a qkv-sized buffer and be summed)."""

    @staticmethod
    def forward(ctx, qkv, hq, hk, cos, sin, rotate):
        ctx.save_for_backward(cos, sin)
        ctx.rotate = rotate
        ctx.dtype = qkv.dtype
        ctx.parts = [(qkv.shape[0], qkv.shape[1], h, qkv.shape[3]) for h in (hq, hk, hk)]
        q, k = rotate(qkv[:, :, :hq], qkv[:, :, hq : hq + hk], cos, sin, False)
        return q, k, qkv[:, :, hq + hk :]

    @staticmethod
    def backward(ctx, gq, gk, gv):
        cos, sin = ctx.saved_tensors
        g = [t if t is not None else cos.new_zeros(shape, dtype=ctx.dtype) for t, shape in zip((gq, gk, gv), ctx.parts)]
        dq, dk = ctx.rotate(g[0], g[1], cos, sin, True)
        return torch.cat([dq, dk, g[2]], dim=2), None, None, None, None, None


def rope_qkv(
    qkv: torch.Tensor, n_q_heads: int, cos: torch.Tensor, sin: torch.Tensor, *, backend: Optional[str] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rope on the q and k heads of one fused projection: qkv (B, N, Hq + 2 Hk, D) packed [q | k | v] ->
    (q_rot (B, N, Hq, D), k_rot (B, N, Hk, D), v (B, N, Hk, D), a view of qkv). The gradient comes back packed
    like qkv in one tensor. Other arguments as `rope`.
    """
    op = "fmkernels.rope_qkv"
    check_tensor("qkv", qkv, dtypes=FLOAT_DTYPES, ndim=4, op=op)
    hk2 = qkv.shape[2] - n_q_heads
    if n_q_heads < 1 or hk2 < 2 or hk2 % 2:
        raise ValueError(f"{op}: qkv's dim 2 must be n_q_heads + 2 * n_kv_heads (n_q_heads = {n_q_heads}), got "
                         f"shape {tuple(qkv.shape)}")
    hk = hk2 // 2
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    impl, _, _, cos, sin = _prepare(qkv[:, :, :n_q_heads], qkv[:, :, n_q_heads : n_q_heads + hk], cos, sin, backend)
    return _PackedRope.apply(qkv, n_q_heads, hk, cos, sin, _rotation(impl.name))
