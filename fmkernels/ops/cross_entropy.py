"""fmkernels.linear_cross_entropy: fused linear + cross-entropy that never materializes (tokens, vocab) logits.

Chunk by chunk over tokens (Liger-Kernel's scheme): logits_c = x_c @ W^T (torch/MKL matmul), then ONE kernel
turns the chunk into its per-row loss and, in place, its gradient scale * (softmax - onehot); then
dx_c = G_c @ W and dW += G_c^T @ x_c. The gradients are computed during the forward and scaled by the
incoming gradient in the backward, so peak extra memory is one (chunk, vocab) buffer plus dW (the size of
the weight's gradient anyway) instead of several (tokens, vocab) tensors.

Schema of the chunk kernel (defined once, here):
  fmkernels::ce_chunk_(Tensor(a!) logits, Tensor target, float scale, int ignore_index) -> Tensor loss_rows
  logits: (C, V) contiguous fp32/bf16/fp16, overwritten with scale * d(loss)/d(logits); target: (C,) int64;
  returns (C,) fp32 per-row losses (0 where target == ignore_index).
Implemented by csrc/cpu/cross_entropy.cpp (CPU key) and csrc/cuda/fused_train.cu (CUDA key); Triton: fmkernels/triton/cross_entropy.py;
reference: fmkernels/reference/cross_entropy.py (its `cross_entropy_chunk` is the reference backend's chunk).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import _dispatch
from .._library import define
from .._validation import FLOAT_DTYPES, check_same_device, check_tensor
from ..reference import cross_entropy as ref

define("ce_chunk_(Tensor(a!) logits, Tensor target, float scale, int ignore_index) -> Tensor")


@torch.library.register_fake("fmkernels::ce_chunk_")
def _ce_fake(logits, target, scale, ignore_index):
    return logits.new_empty((logits.shape[0],), dtype=torch.float32)


def _ce_cpu(logits, target, scale, ignore_index):  # also the CUDA path: the dispatcher picks by device
    return torch.ops.fmkernels.ce_chunk_(logits, target, scale, ignore_index)


def _ce_triton(logits, target, scale, ignore_index):
    from ..triton import cross_entropy as tri

    return tri.ce_chunk_triton_(logits, target, scale, ignore_index)


def _ce_reference(logits, target, scale, ignore_index):
    loss, grad = ref.cross_entropy_chunk(logits, target, scale, ignore_index)
    logits.copy_(grad)
    return loss


# Rows per chunk: about 8M logits per chunk (32 MB fp32), at least 256 rows (matmul efficiency, and fewer
# (V, H) dW updates: in bf16 each chunk's dW product is a (V, H) fp32 temporary), at most T.
_CHUNK_ELEMS = 8 * 1024 * 1024


def default_chunk_size(tokens: int, vocab: int) -> int:
    return max(1, min(tokens, max(256, _CHUNK_ELEMS // max(vocab, 1))))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, target, ignore_index, reduction, chunk, kernel, cdtype):
        T, H = x.shape
        V = weight.shape[0]
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        need_any = need_x or need_w or need_b
        n_valid = int((target != ignore_index).sum()) if reduction == "mean" else 1
        scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
        with torch.autocast(x.device.type, enabled=False):
            w = weight.to(cdtype)
            b = bias.to(cdtype) if bias is not None else None
            dx = torch.empty((T, H), dtype=cdtype, device=x.device) if need_x else None
            dw = torch.zeros((V, H), dtype=torch.float32, device=x.device) if need_w else None
            db = torch.zeros((V,), dtype=torch.float32, device=x.device) if need_b else None
            total = torch.zeros((), dtype=torch.float32, device=x.device)
            for s in range(0, T, chunk):
                e = min(T, s + chunk)
                xc = x[s:e].to(cdtype)  # (C, H)
                logits = xc @ w.t() if b is None else torch.addmm(b, xc, w.t())  # (C, V)
                total += kernel(logits, target[s:e], scale, ignore_index).sum()  # logits <- scale * dL/dlogits
                if not need_any:
                    continue
                if need_x:
                    torch.mm(logits, w, out=dx[s:e])  # (C, H)
                if need_w:
                    if cdtype == torch.float32:
                        dw.addmm_(logits.t(), xc)  # (V, H)
                    else:
                        dw += (logits.t() @ xc).float()
                if need_b:
                    db += logits.float().sum(0)
        loss = total * scale if reduction == "mean" else total
        ctx.save_for_backward(dx, dw, db)
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return loss

    @staticmethod
    def backward(ctx, g):
        dx, dw, db = ctx.saved_tensors
        xd, wd, bd = ctx.dtypes
        one = isinstance(g, torch.Tensor) and g.numel() == 1 and bool(g == 1)

        def scaled(t, dt):
            if t is None:
                return None
            return (t if one else t * g).to(dt)

        return scaled(dx, xd), scaled(dw, wd), scaled(db, bd), None, None, None, None, None, None


def _run(kernel: Callable):
    def fn(x, weight, bias, target, ignore_index, reduction, chunk, cdtype):
        return _LinearCrossEntropy.apply(x, weight, bias, target, ignore_index, reduction, chunk, kernel, cdtype)

    return fn


OP = _dispatch.op("linear_cross_entropy")
OP.register(_dispatch.Backend("cuda", _run(_ce_cpu), devices=("cuda",), dtypes=FLOAT_DTYPES, needs=("cuda_ext",)))
OP.register(_dispatch.Backend("triton", _run(_ce_triton), devices=("cuda",), dtypes=FLOAT_DTYPES, needs=("triton",)))
OP.register(_dispatch.Backend("cpu", _run(_ce_cpu), devices=("cpu",), dtypes=FLOAT_DTYPES, needs=("cpu_ext",)))
OP.register(_dispatch.Backend("reference", _run(_ce_reference), devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES))

__all__ = ["linear_cross_entropy"]


@torch.compiler.disable
def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """cross_entropy(x @ weight^T + bias, target) without materializing the (tokens, vocab) logits.

    x: (..., H) float32/bfloat16/float16; weight: (V, H); bias: (V,) or None; target: (...) int64 class ids
    (ignore_index skipped). reduction: "mean" (over non-ignored tokens) or "sum". Returns a 0-d fp32 loss,
    differentiable in x, weight and bias. Under torch.autocast the matmuls run in the autocast dtype (the
    softmax always in fp32). chunk_size: tokens per chunk (default: about 8M logits per chunk, at least 256 tokens).
    backend: "cpu" | "triton" | "reference" forces the chunk kernel (default: fastest that fits; FMK_BACKEND).
    """
    op = "fmkernels.linear_cross_entropy"
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1, op=op)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=2, op=op)
    check_tensor("target", target, dtypes=(torch.int64,), op=op)
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1, op=op)
    check_same_device(op, x=x, weight=weight, target=target, bias=bias)
    H = x.shape[-1]
    if weight.shape[1] != H:
        raise ValueError(f"{op}: weight must have shape (V, {H}) to match x.shape[-1], got {tuple(weight.shape)}")
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if tuple(target.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"{op}: target must have shape {tuple(x.shape[:-1])} (x's leading dims), got {tuple(target.shape)}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{op}: reduction must be 'mean' or 'sum', got {reduction!r}")
    x2 = x.reshape(-1, H)
    t2 = target.reshape(-1).contiguous()
    T, V = x2.shape[0], weight.shape[0]
    if chunk_size is None:
        chunk_size = default_chunk_size(T, V)
    elif not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")
    dev = x.device.type
    cdtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    q = _dispatch.Query(device=dev, dtype=cdtype, shape=(V,))
    impl = OP.select(q, backend)
    return impl.fn(x2, weight, bias, t2, int(ignore_index), reduction, int(chunk_size), cdtype)
