"""Readable fp32 attention: the oracle for every fmkernels.flash_attention backend (and its last-resort fallback).

Masks follow FlashAttention-2: with Nq queries and Nk keys, query i "sits" at key position i + Nk - Nq
(bottom-right alignment). Query i sees key j when
    j >= i + Nk - Nq - left   (left >= 0; -1 = unbounded)   and   j <= i + Nk - Nq + right   (right >= 0).
causal=True is right = 0. Rows that see no key (or whose scores are all -inf) give zeros and lse = -inf.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def attention_mask(nq: int, nk: int, window_left: int, window_right: int, device=None) -> Optional[torch.Tensor]:
    """Boolean (Nq, Nk) mask of allowed (query, key) pairs, or None when everything is allowed."""
    if window_left < 0 and window_right < 0:
        return None
    i = torch.arange(nq, device=device).unsqueeze(1) + (nk - nq)  # (Nq, 1): the query's key position
    j = torch.arange(nk, device=device).unsqueeze(0)  # (1, Nk)
    allowed = torch.ones(nq, nk, dtype=torch.bool, device=device)
    if window_left >= 0:
        allowed &= j >= i - window_left
    if window_right >= 0:
        allowed &= j <= i + window_right
    return allowed


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    key_start: Optional[torch.Tensor] = None,
    key_end: Optional[torch.Tensor] = None,
):
    """softmax(q k^T * scale + mask) v in fp32; output in q's dtype; lse (B, Hq, Nq) fp32 if return_lse.

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D) with Hq % Hkv == 0 (grouped-query attention).
    key_start / key_end: (B,) ints: batch entry b sees only keys [key_start[b], key_end[b]) (a padded batch; the
    causal / window mask keeps its positions in the padded sequence).
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
    left, right = window_size
    if causal:
        right = 0
    qf, kf, vf = q.float(), k.float(), v.float()
    if Hkv != Hq:  # GQA: query head h reads kv head h // (Hq // Hkv)
        kf = kf.repeat_interleave(Hq // Hkv, dim=1)
        vf = vf.repeat_interleave(Hq // Hkv, dim=1)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # (B, Hq, Nq, Nk)
    mask = attention_mask(Nq, Nk, left, right, device=q.device)
    if key_start is not None:
        j = torch.arange(Nk, device=q.device)
        keys = (j >= key_start.to(q.device).long()[:, None]) & (j < key_end.to(q.device).long()[:, None])  # (B, Nk)
        keys = keys[:, None, None, :]  # (B, 1, 1, Nk)
        mask = keys if mask is None else keys & mask
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    # Rows whose scores are all -inf (masked, or -inf from the data) give zeros and lse = -inf, as SDPA's safe
    # softmax does; a NaN or +inf score makes its row NaN (softmax's own semantics).
    empty = (s == float("-inf")).all(dim=-1, keepdim=True)  # (B, Hq, Nq, 1)
    s = s.masked_fill(empty, 0.0)  # keeps softmax finite there; zeroed below
    p = torch.softmax(s, dim=-1).masked_fill(empty, 0.0)
    lse = torch.logsumexp(s, dim=-1).masked_fill(empty.squeeze(-1), float("-inf"))  # (B, Hq, Nq)
    out = torch.matmul(p, vf).to(q.dtype)  # (B, Hq, Nq, D)
    return (out, lse) if return_lse else out
