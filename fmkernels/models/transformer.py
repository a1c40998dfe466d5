"""A Llama-style decoder on fmkernels ops, written for one device (parallelism and activation checkpointing
are applied from outside, see fmkernels.train.parallel).

token embedding -> L x [x + Attn(RMSNorm(x)); x + SwiGLU-MLP(RMSNorm(x))] -> RMSNorm -> head (tied or not)
Attention: fused qkv projection, RoPE on q and k in one kernel (fmkernels.rope), GQA, causal attention
through `fmkernels.flash_attention` when it exists (else F.scaled_dot_product_attention). MLP: one packed
gate/up projection and fmkernels.swiglu. Loss: fmkernels.linear_cross_entropy (no (tokens, vocab) logits).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import fmkernels
from fmkernels import nn as fnn
from fmkernels import ops
from fmkernels.ops.rope import rope_cos_sin

from .config import TransformerConfig


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str = "auto", dropout_p: float = 0.0):
    """q: (B, Hq, N, D), k, v: (B, Hk, N, D) -> (B, Hq, N, D), causal. The one place attention is chosen."""
    if mode != "sdpa" and dropout_p == 0.0 and hasattr(fmkernels, "flash_attention"):
        return fmkernels.flash_attention(q, k, v, causal=True)
    if mode == "flash":
        raise RuntimeError("model config attention='flash': fmkernels.flash_attention is not available in this build")
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        Hq, Hk, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.wqkv(x).view(B, N, Hq + 2 * Hk, D)  # (B, N, Hq + 2Hk, D)
        q, k = ops.rope(qkv[:, :, :Hq], qkv[:, :, Hq : Hq + Hk], cos, sin)  # (B, N, H, D) contiguous
        v = qkv[:, :, Hq + Hk :]
        p = self.cfg.dropout if self.training else 0.0
        y = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.cfg.attention, p)
        return self.wo(y.transpose(1, 2).reshape(B, N, Hq * D))  # (B, N, dim)


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=False)  # packed [gate | up]
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(ops.swiglu(self.w13(x)))  # (B, N, 2F) -> (B, N, F) -> (B, N, dim)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.attn_norm = fnn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = fnn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class Transformer(nn.Module):
    """Llama-style decoder. forward(idx) -> logits (B, N, V); forward(idx, targets) -> mean loss (fused)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = fnn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_cos_sin(cfg.max_seq_len, cfg.head_dim, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, D/2)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.ones_(p)  # RMSNorm weights
            elif name.endswith("wo.weight") or name.endswith("w2.weight"):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        B, N = idx.shape
        if N > self.cfg.max_seq_len:
            raise ValueError(f"Transformer: sequence length {N} exceeds max_seq_len {self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:N], self.rope_sin[:N]
        x = self.drop(self.tok_emb(idx))  # (B, N, dim)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, reduction: str = "mean"):
        h = self.hidden_states(idx)  # (B, N, dim)
        if targets is None:
            return F.linear(h, self.head_weight)  # (B, N, V)
        return ops.linear_cross_entropy(h, self.head_weight, targets, reduction=reduction)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
