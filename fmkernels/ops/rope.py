"""fmkernels.rope: rotary position embedding applied to q and k in one kernel, forward and backward.

Schema (defined once, here):
  fmkernels::rope(Tensor q, Tensor k, Tensor cos, Tensor sin, bool inverse) -> (Tensor q_out, Tensor k_out)
  q: (B, N, Hq, D), k: (B, N, Hk, D) (GQA: Hk may differ), any strides with a unit last-dim stride (e.g. views
  of one fused qkv projection); cos, sin: (>= N, D/2) fp32 from `rope_cos_sin`. Outputs are contiguous.
  The backward is the same kernel rotating by -theta (inverse=True).
Implemented by csrc/cpu/rope.cpp (CPU key) and csrc/cuda/fused_train.cu (CUDA key); Triton: fmkernels/triton/rope.py; reference: fmkernels/reference/rope.py.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _dispatch
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


torch.library.register_autograd("fmkernels::rope", _make_backward(torch.ops.fmkernels.rope), setup_context=_setup_context)


def _compiled(q, k, cos, sin):
    return torch.ops.fmkernels.rope(q, k, cos, sin, False)


def _triton(q, k, cos, sin):
    from ..triton import rope as tri

    return tri.rope_triton(q, k, cos, sin, False)


def _check(q: _dispatch.Query) -> Optional[str]:
    return None


OP = _dispatch.op("rope")
OP.register(_dispatch.Backend("cuda", _compiled, devices=("cuda",), dtypes=FLOAT_DTYPES, needs=("cuda_ext",)))
OP.register(_dispatch.Backend("triton", _triton, devices=("cuda",), dtypes=FLOAT_DTYPES, needs=("triton",)))
OP.register(_dispatch.Backend("cpu", _compiled, devices=("cpu",), dtypes=FLOAT_DTYPES, needs=("cpu_ext",)))
OP.register(_dispatch.Backend("reference", ref.rope, devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES))

__all__ = ["rope"]


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: Optional[str] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by their positions (Llama "rotate half"): x = [x1 | x2] -> [x1 c - x2 s | x2 c + x1 s].

    q: (B, N, Hq, D), k: (B, N, Hk, D), same dtype (float32/bfloat16/float16), D even; cos, sin: (>= N, D/2)
    (build them with `fmkernels.ops.rope.rope_cos_sin(N, D)`). Position n uses row n of cos/sin.
    Returns (q_rot, k_rot), contiguous, in q's dtype; differentiable in q and k.
    backend: "cpu" | "triton" | "reference" forces one (default: the fastest that fits; FMK_BACKEND).
    """
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
    return impl.fn(q, k, cos, sin)
