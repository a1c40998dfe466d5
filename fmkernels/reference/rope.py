"""Rotary position embedding, readable fp32 reference (Llama "rotate half" convention)."""
from __future__ import annotations

import torch


def rope_cos_sin(seq_len: int, head_dim: int, base: float = 10000.0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape (seq_len, head_dim // 2), fp32: angle[n, j] = n * base^(-2j / head_dim)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    ang = torch.arange(seq_len, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]  # (N, D/2)
    return ang.cos().float(), ang.sin().float()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, N, H, D); cos/sin: (N, D/2)
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    c = cos[: x.shape[1]].float()[None, :, None, :]
    s = sin[: x.shape[1]].float()[None, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False):
    """q: (B, N, Hq, D), k: (B, N, Hk, D); cos, sin: (>= N, D/2). inverse rotates by -theta."""
    if inverse:
        sin = -sin
    return _rotate(q, cos, sin), _rotate(k, cos, sin)
