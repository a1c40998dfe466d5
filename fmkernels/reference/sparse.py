"""Readable fp32 references for the sparse formats and matmuls (the oracle for every backend).

2:4 semi-structured (along K, per output row n of W (N, K)):
  values: (N, K/2), the kept weights of every group of 4 in order (2 per group, ascending position);
  meta:   int32 (N, ceil(K/32)); word w holds the in-group positions (2 bits each, little-end first) of kept
          values 16w .. 16w+15, so kept value j sits at column 4*(j//2) + pos(j). Padding bits are zero.
  One 32-bit word covers 32 columns of W: the CPU kernel turns it into a 16-lane permute index with two
  instructions, and a row streams as values + 1/8 byte per weight.
Block-sparse (BSR) with square blocks of b (16, 32, 64) over W (N, K):
  blocks: (nnzb, b, b), block i = W[r*b:(r+1)*b, c*b:(c+1)*b] row-major (n, k), grouped by block row r;
  row_ptr: int32 (N/b + 1,), block row r owns blocks row_ptr[r] .. row_ptr[r+1]-1;
  col_idx: int32 (nnzb,), ascending within a block row.
"""
from __future__ import annotations

import torch


def sparse24_columns(meta: torch.Tensor, K: int) -> torch.Tensor:
    """(N, K/2) int64: the W column of every kept value."""
    N = meta.shape[0]
    words = meta.to(torch.int64) & 0xFFFFFFFF  # (N, W)
    pos = (words.unsqueeze(-1) >> (2 * torch.arange(16, dtype=torch.int64, device=meta.device))) & 3  # (N, W, 16)
    pos = pos.reshape(N, -1)[:, : K // 2]
    j = torch.arange(K // 2, device=meta.device)
    return 4 * (j // 2) + pos


def pack_meta(pos: torch.Tensor) -> torch.Tensor:
    """pos: (N, K/2) in-group positions 0..3 -> int32 (N, ceil(K/32)) words."""
    N, half = pos.shape
    nw = (half + 15) // 16
    p = torch.zeros(N, nw * 16, dtype=torch.int64, device=pos.device)
    p[:, :half] = pos.to(torch.int64)
    words = (p.view(N, nw, 16) << (2 * torch.arange(16, dtype=torch.int64, device=pos.device))).sum(-1)  # < 2**32
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def decompress_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Dense (N, K) in values' dtype, zeros at the pruned positions. Differentiable in values."""
    N, half = values.shape
    K = 2 * half
    cols = sparse24_columns(meta, K)
    return torch.zeros(N, K, dtype=values.dtype, device=values.device).scatter(1, cols, values)


def sparse24_mm(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias=None) -> torch.Tensor:
    """y = x @ W^T (+ bias) in fp32, returned in x's dtype. x: (M, K)."""
    w = decompress_24(values.float(), meta)  # (N, K)
    y = x.float() @ w.t()  # (M, N)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def sparse24_int8_mm(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """int32 y = x @ W^T for int8 x (M, K) and int8 2:4 values; exact (int64 accumulate)."""
    w = decompress_24(values.to(torch.int64), meta)  # (N, K)
    return (x.to(torch.int64) @ w.t()).to(torch.int32)


def sparse24_sddmm(grad_y: torch.Tensor, x: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Gradient of the kept 2:4 values: (N, K/2) fp32, g[n, j] = sum_m grad_y[m, n] * x[m, col(n, j)].
    grad_y (M, N), x (M, K). Gathers x's columns per row while the gather stays under 64M elements, else one
    dense (N, K) product and a gather."""
    cols = sparse24_columns(meta, x.shape[1])  # (N, K/2)
    if x.shape[0] * cols.numel() < 2**26:
        return torch.einsum("mn,mnj->nj", grad_y.float(), x.float()[:, cols])
    return (grad_y.float().t() @ x.float()).gather(1, cols)


def bsr_columns(row_ptr: torch.Tensor) -> torch.Tensor:
    """(nnzb,) block row of every block."""
    counts = (row_ptr[1:] - row_ptr[:-1]).to(torch.int64)
    return torch.repeat_interleave(torch.arange(counts.numel(), device=row_ptr.device), counts)


def decompress_bsr(blocks: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, K: int) -> torch.Tensor:
    """Dense (N, K) from BSR; differentiable in blocks."""
    nnzb, b, _ = blocks.shape
    nbr = row_ptr.numel() - 1
    rows = bsr_columns(row_ptr)
    grid = torch.zeros(nbr, K // b, b, b, dtype=blocks.dtype, device=blocks.device)
    grid = grid.index_put((rows, col_idx.to(torch.int64)), blocks)
    return grid.permute(0, 2, 1, 3).reshape(nbr * b, K)


def bsr_mm(x: torch.Tensor, blocks, row_ptr, col_idx, bias=None) -> torch.Tensor:
    w = decompress_bsr(blocks.float(), row_ptr, col_idx, x.shape[-1])
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def bsr_transpose(blocks, row_ptr, col_idx, K: int):
    """W^T in BSR: (blocks^T, row_ptr^T, col_idx^T) for the (K, N) matrix."""
    b = blocks.shape[1]
    rows = bsr_columns(row_ptr)  # block row of each block
    cols = col_idx.to(torch.int64)
    order = torch.argsort(cols * (row_ptr.numel()) + rows, stable=True)
    t_blocks = blocks[order].transpose(1, 2).contiguous()
    counts = torch.bincount(cols, minlength=K // b)
    t_row_ptr = torch.zeros(K // b + 1, dtype=torch.int32, device=blocks.device)
    t_row_ptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return t_blocks, t_row_ptr, rows[order].to(torch.int32)


def bsr_block_grad(grad_y, x, row_ptr, col_idx, b: int) -> torch.Tensor:
    """(nnzb, b, b) fp32: grad of each kept block, grad_y[:, r-block]^T @ x[:, c-block]; nothing else computed."""
    M = x.shape[0]
    gy = grad_y.float().reshape(M, -1, b)  # (M, N/b, b)
    xb = x.float().reshape(M, -1, b)  # (M, K/b, b)
    rows = bsr_columns(row_ptr)
    out = torch.empty(col_idx.numel(), b, b, dtype=torch.float32, device=x.device)
    chunk = max(1, (1 << 22) // max(1, M * b))  # blocks per batched matmul, bounds the gathered copies
    for s in range(0, col_idx.numel(), chunk):
        r = rows[s : s + chunk]
        c = col_idx[s : s + chunk].to(torch.int64)
        out[s : s + chunk] = torch.bmm(gy[:, r].permute(1, 2, 0), xb[:, c].permute(1, 0, 2))
    return out
