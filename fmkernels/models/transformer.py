"""A Llama-style decoder on fmkernels ops, written for one device (parallelism and activation checkpointing
are applied from outside, see fmkernels.train.parallel).

token embedding -> L x [x + Attn(RMSNorm(x)); x + SwiGLU-MLP(RMSNorm(x))] -> RMSNorm -> head (tied or not)
Attention: fused qkv projection, RoPE on q and k in one kernel (fmkernels.rope), GQA, causal attention
through `fmkernels.flash_attention` (F.scaled_dot_product_attention for attention dropout or attention='sdpa'). MLP: one packed
gate/up projection and fmkernels.swiglu. Loss: fmkernels.linear_cross_entropy (no (tokens, vocab) logits).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import nn as fnn
from .. import ops
from ..ops.rope import rope_cos_sin
from ..reference.attention import attention_mask

from .config import TransformerConfig


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str = "auto", dropout_p: float = 0.0):
    """q: (B, Hq, Nq, D), k, v: (B, Hk, Nk, D) -> (B, Hq, Nq, D), causal aligned bottom-right (Nq < Nk when
    decoding with a KV cache). The one place attention is chosen."""
    if mode != "sdpa" and dropout_p == 0.0:
        return ops.flash_attention(q, k, v, causal=True)
    if mode == "flash":
        raise RuntimeError("model config attention='flash': fmkernels.flash_attention has no attention dropout; "
                           "use attention='auto' (SDPA while dropout > 0) or dropout 0")
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    Nq, Nk = q.shape[2], k.shape[2]
    if Nq == Nk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    # decoding with a KV cache: SDPA's is_causal aligns top-left; the cache needs bottom-right (j <= i + Nk - Nq)
    mask = attention_mask(Nq, Nk, -1, 0, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class KVCache:
    """Keys and values of the tokens seen so far, for incremental decoding (`Transformer.forward(idx, cache=...)`).

    Per layer k, v: (B, Hk, capacity, D) preallocated; `length` tokens are filled. Attention of n new tokens
    reads keys [0, length + n) with the bottom-right causal mask of `fmkernels.flash_attention` (query i of the
    new ones sees keys j <= length + i), so prefill and one-token steps are the same code.
    """

    def __init__(self, cfg: TransformerConfig, batch_size: int, capacity: Optional[int] = None):
        capacity = cfg.max_seq_len if capacity is None else capacity
        if not isinstance(capacity, int) or not 1 <= capacity <= cfg.max_seq_len:
            raise ValueError(f"KVCache: capacity must be an int in [1, max_seq_len={cfg.max_seq_len}], got {capacity!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"KVCache: batch_size must be a positive int, got {batch_size!r}")
        self.batch_size, self.n_layers, self.capacity = batch_size, cfg.n_layers, capacity
        self.shape = (batch_size, cfg.n_kv_heads, capacity, cfg.head_dim)
        # allocated at the first append, in the dtype/device attention runs in (bf16 under autocast)
        self.k: list[Optional[torch.Tensor]] = [None] * cfg.n_layers
        self.v: list[Optional[torch.Tensor]] = [None] * cfg.n_layers
        self.length = 0

    def reset(self) -> None:
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (B, Hk, n, D) of the new tokens -> all keys/values so far, (B, Hk, length + n, D) views."""
        s, e = self.length, self.length + k.shape[2]
        if self.k[layer] is None or self.k[layer].dtype != k.dtype or self.k[layer].device != k.device:
            old_k, old_v = self.k[layer], self.v[layer]
            self.k[layer] = k.new_zeros(self.shape)
            self.v[layer] = v.new_zeros(self.shape)
            if old_k is not None and s:
                self.k[layer][:, :, :s] = old_k[:, :, :s]
                self.v[layer][:, :, :s] = old_v[:, :, :s]
        self.k[layer][:, :, s:e] = k
        self.v[layer][:, :, s:e] = v
        return self.k[layer][:, :, :e], self.v[layer][:, :, :e]


def softcap_logits(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap): logits bounded in (-cap, cap), ~identity near 0 (Gemma 2's final-logit cap)."""
    return cap * torch.tanh(logits / cap)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wqkv = fnn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = fnn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's D of q and k, before RoPE
            self.q_norm = fnn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
            self.k_norm = fnn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: Optional[KVCache] = None, layer: int = 0, docs: Optional[tuple] = None) -> torch.Tensor:
        B, N, _ = x.shape
        Hq, Hk, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.wqkv(x).view(B, N, Hq + 2 * Hk, D)  # (B, N, Hq + 2Hk, D)
        if self.cfg.qk_norm:
            q0, k0, v0 = qkv.split([Hq, Hk, Hk], dim=2)
            qkv = torch.cat([self.q_norm(q0), self.k_norm(k0), v0], dim=2)
        if docs is not None:  # packed documents: cos/sin per token (B * N, D/2), varlen attention over the rows
            cu, max_len = docs
            q, k, v = ops.rope_qkv(qkv.view(1, B * N, Hq + 2 * Hk, D), Hq, cos, sin)  # (1, B * N, H, D)
            y = ops.flash_attention_varlen(q[0], k[0], v[0].contiguous(), cu, cu, max_len, max_len, causal=True)
            return self.wo(y.reshape(B, N, Hq * D))  # (B, N, dim)
        q, k, v = ops.rope_qkv(qkv, Hq, cos, sin)  # q, k rotated (B, N, H, D) contiguous; v a view of qkv
        if torch.is_grad_enabled():
            # attention saves v for its backward: as a view it would keep all of qkv alive until then (d384 x 6,
            # batch 8 x 256, fp32: 36 MB more resident per step than a 3 MB-per-layer copy of v)
            v = v.contiguous()
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, N, D)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, Hk, length + N, D)
        p = self.cfg.dropout if self.training else 0.0
        y = causal_attention(q, k, v, self.cfg.attention, p)
        return self.wo(y.transpose(1, 2).reshape(B, N, Hq * D))  # (B, N, dim)


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.w13 = fnn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=False)  # packed [gate | up]
        self.w2 = fnn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: Optional[KVCache] = None, layer: int = 0, docs: Optional[tuple] = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, cache, layer, docs))
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
        self.lm_head = None if cfg.tie_embeddings else fnn.Linear(cfg.dim, cfg.vocab_size, bias=False)
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

    def hidden_states(self, idx: torch.Tensor, cache: Optional[KVCache] = None,
                      cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """cu_seqlens: int32 (S + 1,) documents packed along the B * N rows of idx (row-major): each attends only
        within itself and its RoPE positions restart at 0 (no cache)."""
        B, N = idx.shape
        if cu_seqlens is not None:
            if cache is not None:
                raise ValueError("Transformer: cu_seqlens (packed documents) cannot be used with a cache")
            if cu_seqlens.dim() != 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != B * N:
                raise ValueError(f"Transformer: cu_seqlens must be (S + 1,) prefix sums from 0 to B * N = {B * N}")
            lens = cu_seqlens.diff().long()
            max_len = int(lens.max()) if lens.numel() else 0
            if max_len > self.cfg.max_seq_len:
                raise ValueError(f"Transformer: a document of {max_len} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
            starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lens, output_size=B * N)  # (B * N,)
            pos = torch.arange(B * N, device=idx.device) - starts  # restarts at each document
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # (B * N, D/2)
            x = self.drop(self.tok_emb(idx))
            for i, layer in enumerate(self.layers):
                x = layer(x, cos, sin, None, i, (cu_seqlens, max_len))
            return self.norm(x)
        start = 0 if cache is None else cache.length  # position of idx[:, 0]
        if cache is None and N > self.cfg.max_seq_len:
            raise ValueError(f"Transformer: sequence length {N} exceeds max_seq_len {self.cfg.max_seq_len}")
        if cache is not None:
            if cache.batch_size != B or cache.n_layers != len(self.layers):
                raise ValueError(f"Transformer: cache was made for batch {cache.batch_size} and {cache.n_layers} layers, "
                                 f"got batch {B} and {len(self.layers)} layers")
            if start + N > cache.capacity:
                raise ValueError(f"Transformer: cache holds {start} of {cache.capacity} positions, "
                                 f"no room for {N} more (reset it or re-prefill a cropped context)")
        cos, sin = self.rope_cos[start : start + N], self.rope_sin[start : start + N]
        x = self.drop(self.tok_emb(idx))  # (B, N, dim)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i)
        if cache is not None:
            cache.length += N
        return self.norm(x)

    def new_cache(self, batch_size: int = 1, capacity: Optional[int] = None) -> KVCache:
        """An empty KVCache for incremental decoding (capacity defaults to max_seq_len)."""
        return KVCache(self.cfg, batch_size, capacity)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, reduction: str = "mean",
                cache: Optional[KVCache] = None, cu_seqlens: Optional[torch.Tensor] = None):
        """idx (B, N) token ids. With `cache` (see new_cache), idx continues the cached tokens: positions start at
        cache.length and the cache grows by N. targets -100 are ignored (label masking). cu_seqlens: packed
        documents (see hidden_states); targets that cross a document boundary should be ignore_index (-100)."""
        h = self.hidden_states(idx, cache, cu_seqlens)  # (B, N, dim)
        cap = self.cfg.logit_softcap
        if cap is not None:  # soft-capped logits: materialized (the fused linear + cross-entropy has no cap)
            logits = softcap_logits(F.linear(h, self.head_weight), cap)  # (B, N, V)
            if targets is None:
                return logits
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                   ignore_index=-100, reduction=reduction)
        if targets is None:
            return F.linear(h, self.head_weight)  # (B, N, V)
        return ops.linear_cross_entropy(h, self.head_weight, targets, reduction=reduction)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
