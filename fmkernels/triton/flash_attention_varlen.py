"""Varlen flash attention in Triton: the kernels of fmkernels/triton/flash_attention.py with VARLEN=True, one
program per (query block, head, sequence) (dK/dV: key block, kv head, sequence). Packed q (total_q, Hq, D) and
k/v (total_k, Hkv, D) are read in place as (1, H, total, D) views; each program reads its sequence's row range
from cu_seqlens and masks bottom-right aligned within it. Deterministic (no atomics).
"""
from __future__ import annotations

import torch

from .flash_attention import _bwd, _fwd, _unit_last


def _view(t: torch.Tensor) -> torch.Tensor:
    return _unit_last(t).transpose(0, 1).unsqueeze(0)  # (1, H, total, D)


@torch.library.custom_op("fmkernels::flash_attention_varlen_fwd_triton", mutates_args=())
def flash_attention_varlen_fwd_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, scale: float, window_left: int, window_right: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd(_view(q), _view(k), _view(v), scale, window_left, window_right, cu_seqlens_q.contiguous(),
                cu_seqlens_k.contiguous(), max_seqlen_q, max_seqlen_k)


@flash_attention_varlen_fwd_triton.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right):
    return torch.empty(q.shape, device=q.device, dtype=q.dtype), q.new_empty((q.shape[1], q.shape[0]),
                                                                               dtype=torch.float32)


@torch.library.custom_op("fmkernels::flash_attention_varlen_bwd_triton", mutates_args=())
def flash_attention_varlen_bwd_triton(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float,
    window_left: int, window_right: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd(_view(grad_out.to(q.dtype)), _view(q), _view(k), _view(v), _view(out), lse.unsqueeze(0), scale,
                window_left, window_right, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), max_seqlen_q,
                max_seqlen_k)


@flash_attention_varlen_bwd_triton.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
      window_right):
    return (torch.empty(q.shape, device=q.device, dtype=q.dtype), torch.empty(k.shape, device=k.device, dtype=k.dtype),
            torch.empty(v.shape, device=v.device, dtype=v.dtype))
