"""Packed documents (pack_mode=document): where a batch of windows splits into documents.

BatchSampler(doc_starts=...) marks each target that is the next document's first token with -100 (the loss ignores
it); here those marks become the cu_seqlens of fmkernels.flash_attention_varlen over the B * T rows (row-major):
a document also starts at every row start. The model restarts RoPE positions at each document.
"""
from __future__ import annotations

import torch

__all__ = ["document_cu_seqlens"]


def document_cu_seqlens(y: torch.Tensor, boundary: int = -100) -> torch.Tensor:
    """y (B, T) targets with `boundary` where x[:, t + 1] starts a document -> int32 (S + 1,) prefix sums."""
    B, T = y.shape
    starts = torch.zeros(B, T, dtype=torch.bool, device=y.device)
    starts[:, 0] = True
    starts[:, 1:] = y[:, :-1] == boundary
    idx = torch.nonzero(starts.reshape(-1)).flatten()
    return torch.cat([idx, torch.tensor([B * T], device=y.device)]).to(torch.int32)
