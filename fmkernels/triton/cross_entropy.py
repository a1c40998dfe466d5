"""Cross-entropy chunk kernel in Triton: one program per row; online max/sum pass over the vocab in
BLOCK pieces, then a second pass writing scale * (softmax - onehot) IN PLACE over the logits.

logits: (C, V) contiguous; target: (C,) int64; returns per-row loss (C,) fp32 (0 for ignore_index rows).
Loads are upcast to fp32 before arithmetic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _ce_kernel(Z, T, LOSS, V, scale, ignore_index, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    zr = Z + row * V
    t = tl.load(T + row)
    if t == ignore_index:
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            tl.store(zr + cols, tl.zeros([BLOCK], dtype=tl.float32).to(Z.dtype.element_ty), mask=cols < V)
        tl.store(LOSS + row, 0.0)
    else:
        m = tl.full([BLOCK], -float("inf"), dtype=tl.float32)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(zr + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, z)
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # all -inf so far: avoid inf - inf
            acc = acc * tl.exp(m - m_safe) + tl.exp(z - m_safe)
            m = m_new
        mx = tl.max(m, axis=0)
        total = tl.sum(acc * tl.exp(m - mx), axis=0)
        lse = mx + tl.log(total)
        zt = tl.load(zr + t).to(tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            z = tl.load(zr + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(z - lse) * scale
            g = tl.where(cols == t, g - scale, g)
            tl.store(zr + cols, g.to(Z.dtype.element_ty), mask=mask)
        tl.store(LOSS + row, lse - zt)


@torch.library.custom_op("fmkernels::ce_chunk_triton_", mutates_args=("logits",))
def ce_chunk_triton_(logits: torch.Tensor, target: torch.Tensor, scale: float, ignore_index: int) -> torch.Tensor:
    C, V = logits.shape
    loss = torch.empty(C, dtype=torch.float32, device=logits.device)
    if C and V:
        _ce_kernel[(C,)](logits, target.contiguous(), loss, V, scale, ignore_index,
                         BLOCK=min(triton.next_power_of_2(max(V, 16)), 4096))
    return loss


@ce_chunk_triton_.register_fake
def _(logits, target, scale, ignore_index):
    return logits.new_empty((logits.shape[0],), dtype=torch.float32)
