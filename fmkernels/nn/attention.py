"""Attention modules over fmkernels.flash_attention: a drop-in for F.scaled_dot_product_attention and a
grouped-query self-attention block."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops

__all__ = ["Attention", "scaled_dot_product_attention", "sdpa_fallback_reason"]

_FLOAT = (torch.float32, torch.bfloat16, torch.float16)


def sdpa_fallback_reason(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                         enable_gqa: bool = True) -> Optional[str]:
    """Why fmkernels.flash_attention cannot compute this F.scaled_dot_product_attention call exactly (None when it
    can): the one set of eligibility rules, used by the drop-in below and by fmkernels.patch (plain PyTorch and
    Hugging Face attention). Shape / dtype checks only, so under torch.compile it is decided at trace time."""
    if attn_mask is not None:
        return "mask"
    if dropout_p != 0.0:
        return "dropout"
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return "not 4-D"
    if query.dtype not in _FLOAT or key.dtype != query.dtype or value.dtype != query.dtype:
        return "dtype"
    if key.shape != value.shape or key.shape[0] != query.shape[0] or key.shape[3] != query.shape[3]:
        return "shape"
    if key.shape[1] == 0 or query.shape[1] % key.shape[1] != 0 or (key.shape[1] != query.shape[1] and not enable_gqa):
        return "heads"
    if not 1 <= query.shape[3] <= ops.attention.MAX_HEAD_DIM:
        return "head_dim"
    if query.shape[2] == 0 or key.shape[2] == 0:
        return "empty"
    if is_causal and query.shape[2] != key.shape[2]:
        return "causal_alignment"  # SDPA's causal mask is top-left aligned, FlashAttention's bottom-right
    return None


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Same signature and result as `F.scaled_dot_product_attention` for (B, H, N, D) inputs.

    Runs fmkernels.flash_attention when it can compute exactly the same thing (`sdpa_fallback_reason` is None: no
    attn_mask, no dropout, float dtypes, and for is_causal equal query and key lengths, since SDPA's causal mask is
    top-left aligned and FlashAttention's bottom-right). Otherwise falls back to PyTorch's SDPA.
    """
    if sdpa_fallback_reason(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa) is None:
        return ops.flash_attention(query, key, value, causal=is_causal, softmax_scale=scale, backend=backend)
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
        enable_gqa=enable_gqa,
    )


class Attention(nn.Module):
    """Multi-head self-attention with grouped-query heads: x (B, N, dim) -> (B, N, dim).

    q/k/v/o are bias-free linear maps (Llama style); n_kv_heads divides n_heads (GQA; n_kv_heads=1 is MQA).
    `rope`, when given, is called as rope(q, k) on (B, H, N, head_dim) tensors and returns the rotated pair.
    causal / window_size / softmax_scale are passed to fmkernels.flash_attention.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: Optional[int] = None,
        *,
        causal: bool = True,
        window_size: tuple[int, int] = (-1, -1),
        softmax_scale: Optional[float] = None,
        bias: bool = False,
        device=None,
        dtype=None,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if dim % n_heads != 0:
            raise ValueError(f"Attention: dim ({dim}) must be a multiple of n_heads ({n_heads})")
        if n_heads % n_kv_heads != 0:
            raise ValueError(f"Attention: n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.dim, self.n_heads, self.n_kv_heads = dim, n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.causal, self.window_size, self.softmax_scale, self.backend = causal, tuple(window_size), softmax_scale, backend
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.q_proj = nn.Linear(dim, n_heads * self.head_dim, **kw)
        self.k_proj = nn.Linear(dim, n_kv_heads * self.head_dim, **kw)
        self.v_proj = nn.Linear(dim, n_kv_heads * self.head_dim, **kw)
        self.o_proj = nn.Linear(n_heads * self.head_dim, dim, **kw)

    def forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        B, N, _ = x.shape  # (B, N, dim)
        q = self.q_proj(x).view(B, N, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, N, hd), strided view
        k = self.k_proj(x).view(B, N, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, N, hd)
        v = self.v_proj(x).view(B, N, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = rope(q, k)
        o = ops.flash_attention(
            q, k, v, causal=self.causal, window_size=self.window_size, softmax_scale=self.softmax_scale,
            backend=self.backend,
        )  # (B, H, N, hd)
        return self.o_proj(o.transpose(1, 2).reshape(B, N, self.n_heads * self.head_dim))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, causal={self.causal}, "
            f"window_size={self.window_size}"
        )
