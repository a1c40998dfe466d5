"""Sparse pruned matmuls: 2:4 semi-structured (`sparse24_mm`, `sparse24_int8_mm`) and block-sparse (`bsr_mm`),
with the compress/decompress helpers of both formats (layouts: fmkernels/reference/sparse.py).

Schemas (defined once, here):
  fmkernels::sparse24_mm(Tensor x, Tensor values, Tensor meta, Tensor? bias) -> Tensor
      x (M, K) fp32/bf16/fp16; values (N, K/2) same dtype; meta int32 (N, ceil(K/32)); y (M, N) in x's dtype.
  fmkernels::sparse24_sddmm(Tensor grad_y, Tensor x, Tensor meta) -> Tensor
      grad of the kept values only: (N, K/2) fp32, g[n, j] = sum_m grad_y[m, n] * x[m, col(n, j)].
  fmkernels::sparse24_int8_mm(Tensor x, Tensor values, Tensor meta) -> Tensor
      int8 x (M, K), int8 values (N, K/2): exact int32 (M, N).
  fmkernels::bsr_mm(Tensor x, Tensor blocks, Tensor row_ptr, Tensor col_idx, Tensor? bias) -> Tensor
      x (M, K); blocks (nnzb, b, b); row_ptr int32 (N/b + 1); col_idx int32 (nnzb,); y (M, N).
Backward (fixed pattern; one backward attached to every backend's forward): sparse24: grad_x = grad_y @ W (dense
product with the decompressed W), grad_values from the dispatched `sparse24_values_grad` (schema sparse24_sddmm;
reference, cpu and triton backends; kept positions only). bsr: grad_x = bsr_mm(grad_y, W^T in BSR) (the sparse transpose),
grad_blocks per kept block only.

Shape-aware dispatch: `sparse24_plan` / `bsr_plan` say whether the sparse kernel or the dense matmul is the
faster path for a given (M, N, K, dtype, device), from the per-shape cost table measured by
benchmarks/bench_sparse.py on this machine kind (`_CPU_24`, `_CPU_BSR`); fmkernels.nn.SparseLinear follows the plan.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _autograd, _dispatch
from .._library import define
from .._validation import FLOAT_DTYPES, check_same_device, check_tensor
from ..reference import sparse as ref

define("sparse24_mm(Tensor x, Tensor values, Tensor meta, Tensor? bias) -> Tensor")
define("sparse24_sddmm(Tensor grad_y, Tensor x, Tensor meta) -> Tensor")
define("sparse24_int8_mm(Tensor x, Tensor values, Tensor meta) -> Tensor")
define("bsr_mm(Tensor x, Tensor blocks, Tensor row_ptr, Tensor col_idx, Tensor? bias) -> Tensor")


@torch.library.register_fake("fmkernels::sparse24_mm")
def _s24_fake(x, values, meta, bias):
    return x.new_empty((x.shape[0], values.shape[0]))


@torch.library.register_fake("fmkernels::sparse24_sddmm")
def _sddmm_fake(grad_y, x, meta):
    return x.new_empty((grad_y.shape[1], x.shape[1] // 2), dtype=torch.float32)


@torch.library.register_fake("fmkernels::sparse24_int8_mm")
def _s24i8_fake(x, values, meta):
    return x.new_empty((x.shape[0], values.shape[0]), dtype=torch.int32)


@torch.library.register_fake("fmkernels::bsr_mm")
def _bsr_fake(x, blocks, row_ptr, col_idx, bias):
    return x.new_empty((x.shape[0], (row_ptr.shape[0] - 1) * blocks.shape[1]))


# ---------------------------------------------------------------- autograd (fixed sparsity pattern), once per op
# The same backward is attached to every backend's forward (fmkernels/_autograd.py); make_backward receives the
# backend's forward kernel where the backward reuses it (bsr: grad_x is a BSR product with W^T).

bsr_transpose, bsr_block_grad = ref.bsr_transpose, ref.bsr_block_grad  # pure-PyTorch format helpers


def _s24_setup(ctx, inputs, output):
    x, values, meta, bias = inputs
    ctx.save_for_backward(x, values, meta)
    ctx.has_bias = bias is not None


def _s24_make_backward():
    def backward(ctx, grad_y):
        x, values, meta = ctx.saved_tensors
        gx = gv = gb = None
        grad_y = grad_y.contiguous()
        if ctx.needs_input_grad[0]:
            gx = grad_y @ ref.decompress_24(values, meta).to(grad_y.dtype)  # (M, K)
        if ctx.needs_input_grad[1]:  # kept positions only, on the backend of grad_y's device
            gv = sparse24_values_grad(grad_y, x, meta).to(values.dtype)  # (N, K/2)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            gb = grad_y.float().sum(0)
        return gx, gv, None, gb

    return backward


def _bsr_setup(ctx, inputs, output):
    x, blocks, row_ptr, col_idx, bias = inputs
    ctx.save_for_backward(x, blocks, row_ptr, col_idx)
    ctx.has_bias = bias is not None


def _bsr_make_backward(forward):
    def backward(ctx, grad_y):
        x, blocks, row_ptr, col_idx = ctx.saved_tensors
        gx = gblk = gb = None
        grad_y = grad_y.contiguous()
        if ctx.needs_input_grad[0]:
            tb, trp, tci = ref.bsr_transpose(blocks.to(grad_y.dtype), row_ptr, col_idx, x.shape[1])
            gx = forward(grad_y, tb, trp, tci, None)
        if ctx.needs_input_grad[1]:
            gblk = ref.bsr_block_grad(grad_y, x, row_ptr, col_idx, blocks.shape[1]).to(blocks.dtype)
        if ctx.has_bias and ctx.needs_input_grad[4]:
            gb = grad_y.float().sum(0)
        return gx, gblk, None, None, gb

    return backward


S24_BWD = _autograd.backward("sparse24_mm", _s24_setup, _s24_make_backward)
S24_BWD.attach("fmkernels::sparse24_mm")
BSR_BWD = _autograd.backward("bsr_mm", _bsr_setup, _bsr_make_backward)
BSR_BWD.attach("fmkernels::bsr_mm", torch.ops.fmkernels.bsr_mm)


# ---------------------------------------------------------------- backends


def _s24_compiled(x, values, meta, bias):
    return torch.ops.fmkernels.sparse24_mm(x, values, meta, bias)


def _s24_triton(x, values, meta, bias):
    from ..triton import sparse24_mm as tri

    return S24_BWD.attach(tri.sparse24_mm_triton)(x, values, meta, bias)


def _s24i8_compiled(x, values, meta):
    return torch.ops.fmkernels.sparse24_int8_mm(x, values, meta)


def _s24i8_triton(x, values, meta):
    from ..triton import sparse24_mm as tri

    return tri.sparse24_int8_mm_triton(x, values, meta)


def _sddmm_compiled(grad_y, x, meta):
    return torch.ops.fmkernels.sparse24_sddmm(grad_y, x, meta)


def _sddmm_triton(grad_y, x, meta):
    from ..triton import sparse24_mm as tri

    return tri.sparse24_sddmm_triton(grad_y, x, meta)


def _bsr_compiled(x, blocks, row_ptr, col_idx, bias):
    return torch.ops.fmkernels.bsr_mm(x, blocks, row_ptr, col_idx, bias)


def _bsr_triton(x, blocks, row_ptr, col_idx, bias):
    from ..triton import bsr_mm as tri

    return BSR_BWD.attach(tri.bsr_mm_triton, tri.bsr_mm_triton)(x, blocks, row_ptr, col_idx, bias)


def _needs_sm80(q: _dispatch.Query) -> Optional[str]:
    if len(q.shape) == 3 and q.shape[2] % 32:
        return f"K={q.shape[2]} is not a multiple of 32 (mma.sp k32 steps)"
    if q.device == "cuda" and torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability()
        if major < 8:
            return f"needs sm80+ (mma.sp), this GPU is sm{major}x"
    return None


S24 = _dispatch.op("sparse24_mm")
S24.register(_dispatch.Backend("cuda", _s24_compiled, devices=("cuda",), dtypes=(torch.bfloat16, torch.float16),
                               needs=("cuda_ext",), check=_needs_sm80))
S24.register(_dispatch.Backend("triton", _s24_triton, devices=("cuda",), dtypes=FLOAT_DTYPES, needs=("triton",)))
S24.register(_dispatch.Backend("cpu", _s24_compiled, devices=("cpu",), dtypes=FLOAT_DTYPES, needs=("cpu_ext",)))
S24.register(_dispatch.Backend("reference", ref.sparse24_mm, devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES))

# The values gradient of the 2:4 backward: one dispatched op, so a forward on CUDA finds a backward there.
SDDMM = _dispatch.op("sparse24_values_grad")
SDDMM.register(_dispatch.Backend("triton", _sddmm_triton, devices=("cuda",), dtypes=FLOAT_DTYPES, needs=("triton",)))
SDDMM.register(_dispatch.Backend("cpu", _sddmm_compiled, devices=("cpu",), dtypes=FLOAT_DTYPES, needs=("cpu_ext",)))
SDDMM.register(_dispatch.Backend("reference", ref.sparse24_sddmm, devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES))

S24I8 = _dispatch.op("sparse24_int8_mm")
S24I8.register(_dispatch.Backend("triton", _s24i8_triton, devices=("cuda",), dtypes=(torch.int8,), needs=("triton",)))
S24I8.register(_dispatch.Backend("cpu", _s24i8_compiled, devices=("cpu",), dtypes=(torch.int8,), needs=("cpu_ext",)))
S24I8.register(_dispatch.Backend("reference", ref.sparse24_int8_mm, devices=("cpu", "cuda"), dtypes=(torch.int8,)))

BSR = _dispatch.op("bsr_mm")
BSR.register(_dispatch.Backend("cuda", _bsr_compiled, devices=("cuda",), dtypes=FLOAT_DTYPES, needs=("cuda_ext",)))
BSR.register(_dispatch.Backend("triton", _bsr_triton, devices=("cuda",), dtypes=FLOAT_DTYPES, needs=("triton",)))
BSR.register(_dispatch.Backend("cpu", _bsr_compiled, devices=("cpu",), dtypes=FLOAT_DTYPES, needs=("cpu_ext",)))
BSR.register(_dispatch.Backend("reference", ref.bsr_mm, devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES))


__all__ = [
    "compress_24",
    "decompress_24",
    "is_24_sparse",
    "sparse24_mm",
    "sparse24_int8_mm",
    "sparse24_values_grad",
    "compress_bsr",
    "decompress_bsr",
    "bsr_mm",
]

BSR_BLOCK_SIZES = (16, 32, 64)

# ---------------------------------------------------------------- formats


def is_24_sparse(w: torch.Tensor) -> bool:
    """True when every group of 4 consecutive entries along the last dim has at most 2 non-zeros."""
    if w.dim() != 2 or w.shape[1] % 4:
        return False
    return bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def compress_24(w: torch.Tensor, *, prune: bool = False, scores: Optional[torch.Tensor] = None):
    """W (N, K) -> (values (N, K/2), meta int32 (N, ceil(K/32))); exact inverse of `decompress_24`.

    W must be 2:4 sparse along K (at most 2 non-zeros in every group of 4 columns); otherwise a ValueError,
    unless prune=True: then the 2 entries with the largest `scores` (default |W|) of each group are kept.
    """
    op = "fmkernels.compress_24"
    check_tensor("w", w, ndim=2, op=op)
    if w.dtype not in FLOAT_DTYPES + (torch.int8,):
        raise TypeError(f"{op}: w must have dtype float32, bfloat16, float16 or int8, got {w.dtype}")
    N, K = w.shape
    if K % 4:
        raise ValueError(f"{op}: w.shape[1] (K={K}) must be a multiple of 4 for 2:4 sparsity")
    groups = w.reshape(N, K // 4, 4)
    if prune:
        s = (scores if scores is not None else w.float().abs()).reshape(N, K // 4, 4)
        if scores is not None and scores.shape != w.shape:
            raise ValueError(f"{op}: scores must have w's shape {tuple(w.shape)}, got {tuple(scores.shape)}")
        # rank by score; ties go to the lower position (stable sort)
        top = torch.sort(s.float(), dim=-1, descending=True, stable=True).indices[..., :2]
        pos = torch.sort(top, dim=-1).values
    else:
        nz = groups != 0
        bad = nz.sum(-1) > 2
        if bool(bad.any()):
            r, g = [int(v) for v in bad.nonzero()[0]]
            raise ValueError(
                f"{op}: w is not 2:4 sparse: {int(bad.sum())} groups of 4 have more than 2 non-zeros "
                f"(first: row {r}, columns {4 * g}..{4 * g + 3}); pass prune=True to keep the 2 largest of each group"
            )
        # the non-zeros first, then the lowest free positions; ascending
        key = nz.to(torch.int32) * 8 + (3 - torch.arange(4, device=w.device, dtype=torch.int32))
        pos = torch.sort(torch.topk(key, 2, dim=-1).indices, dim=-1).values  # (N, K/4, 2)
    values = torch.gather(groups, 2, pos).reshape(N, K // 2).contiguous()
    meta = ref.pack_meta(pos.reshape(N, K // 2))
    return values, meta


def decompress_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """(values (N, K/2), meta) -> dense W (N, K) with zeros at the pruned positions."""
    _check_24_format("fmkernels.decompress_24", values, meta)
    return ref.decompress_24(values, meta)


def _check_24_format(op, values, meta, K: Optional[int] = None):
    check_tensor("values", values, ndim=2, op=op)
    check_tensor("meta", meta, dtypes=(torch.int32,), ndim=2, op=op)
    K = 2 * values.shape[1] if K is None else K
    if values.shape[1] * 2 != K:
        raise ValueError(f"{op}: values must have shape (N, K/2) = (N, {K // 2}) for K={K}, got {tuple(values.shape)}")
    if K % 4:
        raise ValueError(f"{op}: K={K} must be a multiple of 4 for 2:4 sparsity")
    want = (values.shape[0], (K + 31) // 32)
    if tuple(meta.shape) != want:
        raise ValueError(f"{op}: meta must have shape {want} for values {tuple(values.shape)}, got {tuple(meta.shape)}")


def compress_bsr(w: torch.Tensor, block_size: int, *, block_mask: Optional[torch.Tensor] = None):
    """W (N, K) -> (blocks (nnzb, b, b), row_ptr int32 (N/b+1), col_idx int32 (nnzb)).

    Keeps the blocks selected by `block_mask` (N/b, K/b) bool, default: the blocks with any non-zero.
    N and K must be multiples of b (16, 32 or 64).
    """
    op = "fmkernels.compress_bsr"
    check_tensor("w", w, dtypes=FLOAT_DTYPES, ndim=2, op=op)
    b = _check_block_size(op, block_size)
    N, K = w.shape
    if N % b or K % b:
        raise ValueError(f"{op}: w's shape {tuple(w.shape)} must be a multiple of block_size={b} in both dims")
    grid = w.reshape(N // b, b, K // b, b).permute(0, 2, 1, 3)  # (N/b, K/b, b, b)
    if block_mask is None:
        block_mask = (grid != 0).flatten(2).any(-1)
    elif tuple(block_mask.shape) != (N // b, K // b):
        raise ValueError(f"{op}: block_mask must have shape {(N // b, K // b)}, got {tuple(block_mask.shape)}")
    block_mask = block_mask.to(torch.bool)
    r, c = block_mask.nonzero(as_tuple=True)  # row-major: grouped by block row, ascending columns
    blocks = grid[r, c].contiguous()
    row_ptr = torch.zeros(N // b + 1, dtype=torch.int32, device=w.device)
    row_ptr[1:] = torch.cumsum(block_mask.sum(1), 0).to(torch.int32)
    return blocks, row_ptr, c.to(torch.int32)


def decompress_bsr(blocks: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, K: int) -> torch.Tensor:
    _check_bsr_format("fmkernels.decompress_bsr", blocks, row_ptr, col_idx, K)
    return ref.decompress_bsr(blocks, row_ptr, col_idx, K)


def _check_block_size(op, b) -> int:
    if not isinstance(b, int) or b not in BSR_BLOCK_SIZES:
        raise ValueError(f"{op}: block_size must be one of {BSR_BLOCK_SIZES}, got {b!r}")
    return b


def _check_bsr_format(op, blocks, row_ptr, col_idx, K: int):
    check_tensor("blocks", blocks, ndim=3, op=op)
    check_tensor("row_ptr", row_ptr, dtypes=(torch.int32,), ndim=1, op=op)
    check_tensor("col_idx", col_idx, dtypes=(torch.int32,), ndim=1, op=op)
    b = blocks.shape[1]
    if blocks.shape[2] != b:
        raise ValueError(f"{op}: blocks must be square (nnzb, b, b), got {tuple(blocks.shape)}")
    _check_block_size(op, b)
    if K % b:
        raise ValueError(f"{op}: K={K} must be a multiple of the block size {b}")
    if col_idx.shape[0] != blocks.shape[0]:
        raise ValueError(f"{op}: col_idx must have one entry per block ({blocks.shape[0]}), got {col_idx.shape[0]}")
    if row_ptr.shape[0] < 1:
        raise ValueError(f"{op}: row_ptr must have N/b + 1 entries, got {row_ptr.shape[0]}")


# ---------------------------------------------------------------- public matmuls


def _as_2d(x):
    return x.reshape(-1, x.shape[-1])


def sparse24_mm(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: Optional[torch.Tensor] = None,
                *, backend: Optional[str] = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) with W (N, K) in 2:4 compressed form (`compress_24`).

    x: (..., K) float32/bfloat16/float16, K a multiple of 4; values: (N, K/2) in x's dtype; meta: int32.
    Returns (..., N) in x's dtype. Differentiable in x, values (kept positions only) and bias.
    """
    op = "fmkernels.sparse24_mm"
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1, op=op)
    K = x.shape[-1]
    if K % 4:
        raise ValueError(f"{op}: x.shape[-1] (K={K}) must be a multiple of 4 for 2:4 sparsity")
    _check_24_format(op, values, meta, K)
    if values.dtype != x.dtype:
        raise TypeError(f"{op}: values must have x's dtype {x.dtype}, got {values.dtype}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1, op=op)
        if bias.shape[0] != values.shape[0]:
            raise ValueError(f"{op}: bias must have shape ({values.shape[0]},), got {tuple(bias.shape)}")
    check_same_device(op, x=x, values=values, meta=meta, bias=bias)
    x2 = _as_2d(x)
    q = _dispatch.Query(device=x.device.type, dtype=x.dtype, shape=(x2.shape[0], values.shape[0], K))
    impl = S24.select(q, backend)
    y = impl.fn(x2.contiguous(), values.contiguous(), meta.contiguous(), bias)
    return y.reshape(*x.shape[:-1], values.shape[0])


def sparse24_int8_mm(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, *, backend: Optional[str] = None):
    """int32 y = x @ W^T, exact, for int8 x (..., K) and int8 2:4-compressed W (values (N, K/2), meta)."""
    op = "fmkernels.sparse24_int8_mm"
    check_tensor("x", x, dtypes=(torch.int8,), min_ndim=1, op=op)
    check_tensor("values", values, dtypes=(torch.int8,), ndim=2, op=op)
    K = x.shape[-1]
    if K % 4:
        raise ValueError(f"{op}: x.shape[-1] (K={K}) must be a multiple of 4 for 2:4 sparsity")
    _check_24_format(op, values, meta, K)
    check_same_device(op, x=x, values=values, meta=meta)
    x2 = _as_2d(x)
    q = _dispatch.Query(device=x.device.type, dtype=x.dtype, shape=(x2.shape[0], values.shape[0], K))
    impl = S24I8.select(q, backend)
    y = impl.fn(x2.contiguous(), values.contiguous(), meta.contiguous())
    return y.reshape(*x.shape[:-1], values.shape[0])


def sparse24_values_grad(grad_y: torch.Tensor, x: torch.Tensor, meta: torch.Tensor, *,
                         backend: Optional[str] = None) -> torch.Tensor:
    """Gradient of the kept values of a 2:4 W: (N, K/2) fp32 from grad_y (M, N) and x (M, K); nothing is computed
    for the pruned positions. The backward of `sparse24_mm` on every backend."""
    op = "fmkernels.sparse24_values_grad"
    check_tensor("grad_y", grad_y, dtypes=FLOAT_DTYPES, ndim=2, op=op)
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=2, op=op)
    check_tensor("meta", meta, dtypes=(torch.int32,), ndim=2, op=op)
    M, K = x.shape
    N = grad_y.shape[1]
    if grad_y.shape[0] != M:
        raise ValueError(f"{op}: grad_y (M, N) and x (M, K) must share M, got {tuple(grad_y.shape)} and {tuple(x.shape)}")
    if K % 4:
        raise ValueError(f"{op}: x.shape[1] (K={K}) must be a multiple of 4 for 2:4 sparsity")
    if tuple(meta.shape) != (N, (K + 31) // 32):
        raise ValueError(f"{op}: meta must have shape {(N, (K + 31) // 32)}, got {tuple(meta.shape)}")
    check_same_device(op, grad_y=grad_y, x=x, meta=meta)
    if grad_y.dtype != x.dtype:
        grad_y = grad_y.to(x.dtype)
    q = _dispatch.Query(device=x.device.type, dtype=x.dtype, shape=(M, N, K))
    return SDDMM.select(q, backend).fn(grad_y.contiguous(), x.contiguous(), meta.contiguous())


def bsr_mm(x: torch.Tensor, blocks: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
           bias: Optional[torch.Tensor] = None, *, backend: Optional[str] = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) with W (N, K) block-sparse (`compress_bsr`); only the kept blocks are visited.

    x: (..., K) float, K a multiple of the block size; blocks (nnzb, b, b) in x's dtype. Returns (..., N).
    Differentiable in x (through the sparse transpose), blocks (kept blocks only) and bias.
    """
    op = "fmkernels.bsr_mm"
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1, op=op)
    K = x.shape[-1]
    _check_bsr_format(op, blocks, row_ptr, col_idx, K)
    if blocks.dtype != x.dtype:
        raise TypeError(f"{op}: blocks must have x's dtype {x.dtype}, got {blocks.dtype}")
    N = (row_ptr.shape[0] - 1) * blocks.shape[1]
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1, op=op)
        if bias.shape[0] != N:
            raise ValueError(f"{op}: bias must have shape ({N},), got {tuple(bias.shape)}")
    check_same_device(op, x=x, blocks=blocks, row_ptr=row_ptr, col_idx=col_idx, bias=bias)
    x2 = _as_2d(x)
    q = _dispatch.Query(device=x.device.type, dtype=x.dtype, shape=(x2.shape[0], N, K))
    impl = BSR.select(q, backend)
    y = impl.fn(x2.contiguous(), blocks.contiguous(), row_ptr.contiguous(), col_idx.contiguous(), bias)
    return y.reshape(*x.shape[:-1], N)


# ---------------------------------------------------------------- shape-aware dispatch: sparse or dense

# Measured on this machine kind (2 shared cores Zen 4 AVX-512, OMP_WAIT_POLICY=PASSIVE, N = K = 4096) with
# `python benchmarks/bench_sparse.py --out benchmarks/results/sparse_cpu.json` (dense and sparse interleaved).
# Each entry says which path runs in an M bucket, from the measurement at the bucket's upper edge (the sparse
# speedup falls as M grows, so a bucket whose largest M measured faster sparse is faster sparse throughout).
# "sparse" only where the measured speedup is at least SPARSE_MARGIN (the shared cores move single runs by
# 10-20%); otherwise dense, which is never slower than the dense layer it replaced.
# tests/test_sparse_dispatch.py checks these tables against the committed results.
SPARSE_MARGIN = 1.25
# 2:4: M <= 1, <= 16, <= 32, <= 64, <= 256, <= 512, <= 1024, > 1024 (measured at M = 1 ... 1024, 2048)
S24_M_BUCKETS = (1, 16, 32, 64, 256, 512, 1024)
_CPU_24 = {
    # fp32, 2 threads: 2.1-3.2x at M <= 64, 1.74x at 256, 1.37x at 512; 1.19x at 1024 and 2048 (dense)
    torch.float32: ("sparse", "sparse", "sparse", "sparse", "sparse", "sparse", "dense", "dense"),
    # bf16: torch's bf16 Linear (oneDNN, AVX512-BF16 dot products) beats the fp32-FMA sparse kernels from M = 16
    torch.bfloat16: ("sparse", "dense", "dense", "dense", "dense", "dense", "dense", "dense"),
}
# BSR (block 32, fp32): per measured sparsity level, M buckets M <= 1, <= 16, <= 64, <= 256, > 256. A layer uses
# the row of the smallest measured sparsity >= its own (conservative: denser layers are slower).
M_BUCKETS = (1, 16, 64, 256)
_CPU_BSR = {
    0.5: ("dense", "sparse", "sparse", "sparse", "sparse"),
    0.8: ("sparse", "sparse", "sparse", "sparse", "sparse"),
    0.9: ("sparse", "sparse", "sparse", "sparse", "sparse"),
}


def _bucket(M: int, edges=M_BUCKETS) -> int:
    for i, edge in enumerate(edges):
        if M <= edge:
            return i
    return len(edges)


def sparse24_plan(M: int, N: int, K: int, dtype: torch.dtype, device: str) -> str:
    """'sparse' or 'dense': which path is faster for y = x @ W^T with a 2:4 W of shape (N, K) and M rows.
    CPU: the measured table (dtypes not measured go dense); GPU: sparse (mma.sp / Triton)."""
    if device == "cpu":
        row = _CPU_24.get(dtype)
        return row[_bucket(M, S24_M_BUCKETS)] if row is not None else "dense"
    return "sparse"


def bsr_plan(M: int, N: int, K: int, density: float, dtype: torch.dtype, device: str) -> str:
    """'sparse' or 'dense' for a block-sparse W keeping `density` of its blocks."""
    if device == "cpu":
        sparsity = 1.0 - density
        levels = sorted(lv for lv in _CPU_BSR if lv <= sparsity + 0.01)  # blocks per row are rounded
        if dtype != torch.float32 or not levels:
            return "dense"
        return _CPU_BSR[levels[-1]][_bucket(M)]
    return "sparse"
