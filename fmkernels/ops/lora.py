"""lora_update: a frozen layer's output plus its LoRA adapters' update, y + scaling * [h_i @ B_i^T]_i with
h = x @ A^T, where part i of the output rows (e.g. the q, k, v rows of a fused qkv projection) uses columns
i*rank .. (i+1)*rank of h. One A GEMM for all parts, one accumulating GEMM per part into the output (no
block-diagonal B with zero blocks, no scaled update temporary); the backward mirrors it (dB and dh per part,
dA and dx once). Plain PyTorch GEMMs: the ranks are too small for a kernel of our own to pay.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["lora_update"]


class _LoRAUpdate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, x, A, B, splits, rank, scaling):
        dt = y.dtype  # bf16 under autocast (the base ran in it): the adapters' GEMMs run in it too
        x2 = x.reshape(-1, x.shape[-1]).to(dt)  # (T, in)
        y2 = y.reshape(-1, y.shape[-1])  # (T, out)
        Ac, Bc = A.to(dt), B.to(dt)  # (S*r, in), (out, r)
        h = x2 @ Ac.t()  # (T, S*r)
        out = torch.empty_like(y2)
        o = 0
        for i, n in enumerate(splits):
            torch.addmm(y2[:, o:o + n], h[:, i * rank:(i + 1) * rank], Bc[o:o + n].t(), alpha=scaling,
                        out=out[:, o:o + n])
            o += n
        ctx.save_for_backward(x2, Ac, Bc, h)
        ctx.meta = (tuple(splits), rank, scaling, x.shape, x.dtype, A.dtype, B.dtype)
        return out.view(y.shape)

    @staticmethod
    def backward(ctx, g):
        x2, A, B, h = ctx.saved_tensors
        splits, r, s, xshape, xdt, adt, bdt = ctx.meta
        g2 = g.reshape(-1, g.shape[-1]).to(h.dtype)  # (T, out)
        dh, dB = torch.empty_like(h), torch.empty_like(B)
        o = 0
        for i, n in enumerate(splits):
            gi = g2[:, o:o + n]
            torch.mm(gi, B[o:o + n], out=dh[:, i * r:(i + 1) * r])  # (T, r)
            torch.mm(gi.t(), h[:, i * r:(i + 1) * r], out=dB[o:o + n])  # (n, r)
            o += n
        dh.mul_(s)
        dB.mul_(s)
        dx = dA = None
        if ctx.needs_input_grad[1]:
            dx = (dh @ A).view(xshape).to(xdt)  # (.., in)
        if ctx.needs_input_grad[2]:
            dA = (dh.t() @ x2).to(adt)  # (S*r, in)
        return g, dx, dA, dB.to(bdt), None, None, None


def lora_update(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, splits: Sequence[int],
                rank: int, scaling: float) -> torch.Tensor:
    """y (.., out): the base layer's output for x (.., in); A (S*rank, in), B (out, rank); splits: S part sizes
    summing to out. Returns y + scaling * update (a new tensor; differentiable in y, x, A, B)."""
    op = "fmkernels.lora_update"
    S = len(splits)
    if A.dim() != 2 or A.shape != (S * rank, x.shape[-1]):
        raise ValueError(f"{op}: A must be ({S} * rank {rank}, in {x.shape[-1]}), got {tuple(A.shape)}")
    if B.dim() != 2 or B.shape != (y.shape[-1], rank) or sum(splits) != y.shape[-1]:
        raise ValueError(f"{op}: B must be (out {y.shape[-1]}, rank {rank}) with splits summing to out, got "
                         f"B {tuple(B.shape)}, splits {list(splits)}")
    if y.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"{op}: y {tuple(y.shape)} and x {tuple(x.shape)} must share leading dims")
    return _LoRAUpdate.apply(y, x, A, B, list(splits), rank, float(scaling))
