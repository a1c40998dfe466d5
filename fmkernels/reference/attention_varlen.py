"""Readable fp32 varlen attention: the oracle for every fmkernels.flash_attention_varlen backend.

Packed sequences: sequence s has queries q[cu_seqlens_q[s]:cu_seqlens_q[s+1]] and keys/values
k[cu_seqlens_k[s]:cu_seqlens_k[s+1]]; each runs on its own through the dense reference (masks bottom-right aligned
per sequence, as FlashAttention-2's varlen function). Empty sequences are allowed; a sequence without keys gives
zeros and lse = -inf.
"""
from __future__ import annotations

from typing import Optional

import torch

from .attention import flash_attention


def flash_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
):
    """q (total_q, Hq, D), k/v (total_k, Hkv, D) -> out (total_q, Hq, D) in q's dtype [, lse (Hq, total_q) fp32]."""
    Tq, Hq, D = q.shape
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for s in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[s], cq[s + 1], ck[s], ck[s + 1]
        if q1 == q0:
            continue
        if k1 == k0:  # no keys: zeros (kept in the graph so gradients flow as zeros)
            outs.append(q[q0:q1] * 0)
            lses.append(torch.full((Hq, q1 - q0), float("-inf"), device=q.device))
            continue
        o, lse = flash_attention(
            q[q0:q1].transpose(0, 1).unsqueeze(0),  # (1, Hq, nq, D)
            k[k0:k1].transpose(0, 1).unsqueeze(0),
            v[k0:k1].transpose(0, 1).unsqueeze(0),
            causal=causal,
            window_size=window_size,
            softmax_scale=softmax_scale,
            return_lse=True,
        )
        outs.append(o[0].transpose(0, 1))  # (nq, Hq, D)
        lses.append(lse[0])  # (Hq, nq)
    if outs:
        out = torch.cat(outs, 0)
        lse = torch.cat(lses, 1)
    else:
        out = q * 0
        lse = torch.empty(Hq, Tq, device=q.device)
    return (out, lse) if return_lse else out
