"""The same architecture as `Transformer`, written in plain PyTorch (nn.Linear, torch.nn.RMSNorm, rotate-half
RoPE with torch.cat, F.silu, F.scaled_dot_product_attention, F.cross_entropy over full logits): the reference
for convergence tests and the peer in benchmarks/bench_train.py. Separate q/k/v and gate/up projections, as
plain Llama code has them; `fmk_to_plain_state_dict` / `plain_to_fmk_state_dict` map the weights exactly.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..reference.rope import rope_cos_sin
from .config import TransformerConfig


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _apply_rope(x, cos, sin):  # x: (B, H, N, D); cos/sin: (N, D/2)
    c = torch.cat([cos, cos], -1)[None, None].to(x.dtype)
    s = torch.cat([sin, sin], -1)[None, None].to(x.dtype)
    return x * c + _rotate_half(x) * s


class PlainAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * D, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * D, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * D, bias=False)
        self.wo = nn.Linear(cfg.n_heads * D, cfg.dim, bias=False)
        if cfg.qk_norm:  # per-head RMSNorm of q and k before RoPE (same names as the fused model's)
            self.q_norm = nn.RMSNorm(D, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(D, eps=cfg.norm_eps)

    def forward(self, x, cos, sin):
        B, N, _ = x.shape
        H, Hk, D = self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.head_dim
        q = self.wq(x).view(B, N, H, D)
        k = self.wk(x).view(B, N, Hk, D)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, N, D)
        v = self.wv(x).view(B, N, Hk, D).transpose(1, 2)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        if Hk != H:
            k = k.repeat_interleave(H // Hk, dim=1)
            v = v.repeat_interleave(H // Hk, dim=1)
        p = self.cfg.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        return self.wo(y.transpose(1, 2).reshape(B, N, H * D))


class PlainMLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class PlainBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = PlainAttention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = PlainMLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin):
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class PlainTransformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(PlainBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_cos_sin(cfg.max_seq_len, cfg.head_dim, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, 0.0, out_std if name.endswith(("wo.weight", "w2.weight")) else std)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, reduction: str = "mean"):
        N = idx.shape[1]
        cos, sin = self.rope_cos[:N], self.rope_sin[:N]
        x = self.drop(self.tok_emb(idx))
        for layer in self.layers:
            x = layer(x, cos, sin)
        x = self.norm(x)
        w = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, w)  # (B, N, V)
        if self.cfg.logit_softcap is not None:
            logits = self.cfg.logit_softcap * torch.tanh(logits / self.cfg.logit_softcap)
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction=reduction)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def fmk_to_plain_state_dict(sd: dict, cfg: TransformerConfig) -> dict:
    """Transformer state_dict -> PlainTransformer state_dict (split wqkv and w13)."""
    D = cfg.head_dim
    out = {}
    for k, v in sd.items():
        if k.endswith("attn.wqkv.weight"):
            p = k[: -len("wqkv.weight")]
            q, kk, vv = v.split([cfg.n_heads * D, cfg.n_kv_heads * D, cfg.n_kv_heads * D], dim=0)
            out[p + "wq.weight"], out[p + "wk.weight"], out[p + "wv.weight"] = q.clone(), kk.clone(), vv.clone()
        elif k.endswith("mlp.w13.weight"):
            p = k[: -len("w13.weight")]
            g, u = v.split([cfg.ffn_dim, cfg.ffn_dim], dim=0)
            out[p + "w1.weight"], out[p + "w3.weight"] = g.clone(), u.clone()
        else:
            out[k] = v
    return out


def plain_to_fmk_state_dict(sd: dict, cfg: TransformerConfig) -> dict:
    """PlainTransformer state_dict -> Transformer state_dict (concatenate q/k/v and gate/up)."""
    out = {}
    for k, v in sd.items():
        if k.endswith("attn.wq.weight"):
            p = k[: -len("wq.weight")]
            out[p + "wqkv.weight"] = torch.cat([v, sd[p + "wk.weight"], sd[p + "wv.weight"]], 0)
        elif k.endswith(("attn.wk.weight", "attn.wv.weight", "mlp.w3.weight")):
            continue
        elif k.endswith("mlp.w1.weight"):
            p = k[: -len("w1.weight")]
            out[p + "w13.weight"] = torch.cat([v, sd[p + "w3.weight"]], 0)
        else:
            out[k] = v
    return out
