"""fmkernels.linear_cross_entropy: fused linear + cross-entropy that never materializes (tokens, vocab) logits.

Chunk by chunk over tokens (Liger-Kernel's scheme): logits_c = x_c @ W^T (oneDNN for fp32 CPU, see
ops/linear.py; torch elsewhere), then ONE kernel turns the chunk into its per-row loss and, in place, its
gradient scale * (softmax - onehot); then dx_c = G_c @ W and dW += G_c^T @ x_c. The gradients are computed
during the forward (inside one opaque op, `fmkernels::linear_cross_entropy_fwd`, so torch.compile traces around
it) and scaled by the incoming gradient in the backward, so peak extra memory is one (chunk, vocab) buffer plus
dW (the size of the weight's gradient anyway) instead of several (tokens, vocab) tensors.

Schema of the chunk kernel (defined once, here):
  fmkernels::ce_chunk_(Tensor(a!) logits, Tensor target, float scale, int ignore_index) -> Tensor loss_rows
  logits: (C, V) contiguous fp32/bf16/fp16, overwritten with scale * d(loss)/d(logits); target: (C,) int64;
  returns (C,) fp32 per-row losses (0 where target == ignore_index).
Implemented by csrc/cpu/cross_entropy.cpp (CPU key) and csrc/cuda/cross_entropy.cu (CUDA key); Triton: fmkernels/triton/cross_entropy.py;
reference: fmkernels/reference/cross_entropy.py (its `cross_entropy_chunk` is the reference backend's chunk).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import _dispatch
from .._library import define
from .._validation import FLOAT_DTYPES, check_same_device, check_tensor
from ..reference import cross_entropy as ref
from .linear import matmul_nt, matmul_tn

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


# Rows per chunk: about 16 MiB of logits per chunk (4M fp32 / 8M bf16 logits), at least 256 rows (matmul
# efficiency), at most T. Under 32 MiB on purpose: glibc mmaps blocks of 32 MiB and more and unmaps them on
# free, so a 32 MiB chunk was page-faulted in on every call. T 2048, H 384, V 8192, fp32 fwd+bwd: 1024 rows
# (32 MiB) 223 ms, 512 rows 211 ms, 256 rows 207 ms.
_CHUNK_BYTES = 16 * 1024 * 1024


# In 16-bit compute each chunk's dW product is a (V, H) temporary added into the fp32 dW, so its cost falls with
# fewer chunks: at least 1024 rows there. T 2048, H 384, V 32768, bf16 autocast fwd+bwd, stock glibc / tuned
# allocator: 256 rows 633 / 477 ms, 512 rows 568 / 439, 1024 rows 511 / 430. (fp32 accumulates dW in place.)
_MIN_ROWS_16BIT = 1024


def default_chunk_size(tokens: int, vocab: int, itemsize: int = 4) -> int:
    rows = max(256 if itemsize >= 4 else _MIN_ROWS_16BIT, _CHUNK_BYTES // (itemsize * max(vocab, 1)))
    return max(1, min(tokens, rows))


# The whole chunk loop is one opaque op, so torch.compile traces the model around it (fullgraph works) and
# autograd sees one node. It returns the loss and the gradients it computed on the way (empty when not needed);
# its backward only scales them by the incoming gradient.
define(
    "linear_cross_entropy_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor target, int ignore_index, "
    "bool mean, int chunk, str kernel, ScalarType cdtype, bool need_x, bool need_w, bool need_b) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)

_CHUNK_KERNELS: dict[str, Callable] = {"cpu": _ce_cpu, "cuda": _ce_cpu, "triton": _ce_triton, "reference": _ce_reference}


@torch.library.impl("fmkernels::linear_cross_entropy_fwd", "CompositeExplicitAutograd")
def _lce_fwd(x, weight, bias, target, ignore_index, mean, chunk, kernel, cdtype, need_x, need_w, need_b):
    """x (T, H), weight (V, H), bias (V,)?, target (T,) -> loss (), dx (T, H) cdtype, dw (V, H) fp32, db (V,) fp32."""
    T, H = x.shape
    V = weight.shape[0]
    run_chunk = _CHUNK_KERNELS[kernel]
    need_b = need_b and bias is not None
    n_valid = int((target != ignore_index).sum()) if mean else 1
    scale = 1.0 / max(n_valid, 1) if mean else 1.0
    empty = x.new_empty((0,), dtype=torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        w = weight.to(cdtype)
        b = bias.to(cdtype) if bias is not None else None
        dx = torch.empty((T, H), dtype=cdtype, device=x.device) if need_x else empty
        # fp32: the first chunk writes dw, the others add to it; lower precision: the first chunk's product becomes dw
        dw = torch.empty((V, H), dtype=torch.float32, device=x.device) if need_w and cdtype == torch.float32 else empty
        db = torch.zeros((V,), dtype=torch.float32, device=x.device) if need_b else empty
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for s in range(0, T, chunk):
            e = min(T, s + chunk)
            xc = x[s:e].to(cdtype)  # (C, H)
            logits = matmul_nt(xc, w) if b is None else torch.addmm(b, xc, w.t())  # (C, V)
            total += run_chunk(logits, target[s:e], scale, ignore_index).sum()  # logits <- scale * dL/dlogits
            if need_x:
                matmul_nt(logits, w.t(), out=dx[s:e])  # (C, H)
            if need_w:
                if cdtype == torch.float32:
                    matmul_tn(logits, xc, out=dw, accumulate=s > 0)  # (V, H)
                elif s == 0:
                    dw = (logits.t() @ xc).float()
                else:
                    dw += logits.t() @ xc  # added in fp32 straight from the low-precision product
            if need_b:
                db += logits.float().sum(0)
        if need_w and T == 0:
            dw = torch.zeros((V, H), dtype=torch.float32, device=x.device)
    if mean and n_valid == 0:  # no counted token: 0 / 0 = NaN as in F.cross_entropy (the gradients stay zero)
        return total / 0.0, dx, dw, db
    return total * scale, dx, dw, db


@torch.library.register_fake("fmkernels::linear_cross_entropy_fwd")
def _lce_fwd_fake(x, weight, bias, target, ignore_index, mean, chunk, kernel, cdtype, need_x, need_w, need_b):
    T, H = x.shape
    V = weight.shape[0]
    empty = x.new_empty((0,), dtype=torch.float32)
    return (x.new_empty((), dtype=torch.float32),
            x.new_empty((T, H), dtype=cdtype) if need_x else empty,
            x.new_empty((V, H), dtype=torch.float32) if need_w else empty,
            x.new_empty((V,), dtype=torch.float32) if need_b and bias is not None else empty)


def _lce_setup(ctx, inputs, output):
    x, weight, bias = inputs[:3]
    need_x, need_w, need_b = inputs[9:12]
    _, dx, dw, db = output
    ctx.save_for_backward(dx, dw, db)
    ctx.dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else None)
    ctx.needs = (need_x, need_w, need_b and bias is not None)


def _lce_backward(ctx, g, _gdx, _gdw, _gdb):
    dx, dw, db = ctx.saved_tensors
    grads = [(t * g).to(dt) if need else None for t, dt, need in zip((dx, dw, db), ctx.dtypes, ctx.needs)]
    return grads[0], grads[1], grads[2], None, None, None, None, None, None, None, None, None


torch.library.register_autograd("fmkernels::linear_cross_entropy_fwd", _lce_backward, setup_context=_lce_setup)


def _run(kernel: str):
    def fn(x, weight, bias, target, ignore_index, reduction, chunk, cdtype):
        grad = torch.is_grad_enabled()
        return torch.ops.fmkernels.linear_cross_entropy_fwd(
            x, weight, bias, target, ignore_index, reduction == "mean", chunk, kernel, cdtype,
            grad and x.requires_grad, grad and weight.requires_grad, grad and bias is not None and bias.requires_grad,
        )[0]

    return fn


OP = _dispatch.op("linear_cross_entropy")
_F = "fmkernels/ops/cross_entropy.py"  # fmk info --files: the chunk kernel each backend's loop calls
OP.register(_dispatch.Backend("cuda", _run("cuda"), devices=("cuda",), dtypes=FLOAT_DTYPES, needs=("cuda_ext",),
                              files=(_F, "csrc/cuda/cross_entropy_binding.cpp", "csrc/cuda/cross_entropy.cu")))
OP.register(_dispatch.Backend("triton", _run("triton"), devices=("cuda",), dtypes=FLOAT_DTYPES, needs=("triton",),
                              files=(_F, "fmkernels/triton/cross_entropy.py")))
OP.register(_dispatch.Backend("cpu", _run("cpu"), devices=("cpu",), dtypes=FLOAT_DTYPES, needs=("cpu_ext",),
                              files=(_F, "csrc/cpu/cross_entropy.cpp")))
OP.register(_dispatch.Backend("reference", _run("reference"), devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES,
                              files=(_F, "fmkernels/reference/cross_entropy.py")))

__all__ = ["linear_cross_entropy"]


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
    softmax always in fp32). chunk_size: tokens per chunk (default: about 16 MiB of logits per chunk, at least 256 tokens).
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
    dev = x.device.type
    autocast = dev in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(dev)  # meta: no autocast
    cdtype = torch.get_autocast_dtype(dev) if autocast else x.dtype
    if chunk_size is None:
        chunk_size = default_chunk_size(T, V, cdtype.itemsize)
    elif not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")
    q = _dispatch.Query(device=dev, dtype=cdtype, shape=(V,))
    impl = OP.select(q, backend)
    return impl.fn(x2, weight, bias, t2, int(ignore_index), reduction, int(chunk_size), cdtype)
