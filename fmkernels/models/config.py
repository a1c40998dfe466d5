"""TransformerConfig and the size presets (tiny .. ~1B parameters)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional


class ConfigError(ValueError):
    """A bad configuration value; the message names the field."""


@dataclass
class TransformerConfig:
    vocab_size: int = 256
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: Optional[int] = None  # None: = n_heads (no GQA); must divide n_heads
    ffn_dim: Optional[int] = None  # None: 8/3 * dim rounded up to a multiple of 64 (Llama)
    max_seq_len: int = 256
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    attention: str = "auto"  # "auto" (fmkernels.flash_attention when present, else SDPA) | "flash" | "sdpa"
    # ---- pretrained-architecture switches (Hugging Face Llama / Mistral / Qwen2 / Qwen3; fmkernels/train/hf_source.py)
    attn_head_dim: Optional[int] = None  # None: dim // n_heads; set when the checkpoint says otherwise (Qwen3)
    qkv_bias: bool = False  # q/k/v projections with bias (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3; `fmk train --qk_norm true`)
    logit_softcap: Optional[float] = None  # logits -> c * tanh(logits / c) (Gemma 2); None: off

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_dim is None:
            self.ffn_dim = 64 * ((8 * self.dim // 3 + 63) // 64)
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"model config: {name} must be a positive integer, got {v!r}")
        if self.attn_head_dim is not None and (not isinstance(self.attn_head_dim, int) or self.attn_head_dim < 2):
            raise ConfigError(f"model config: attn_head_dim must be None or an integer >= 2, got {self.attn_head_dim!r}")
        if self.attn_head_dim is None and self.dim % self.n_heads:
            raise ConfigError(f"model config: n_heads ({self.n_heads}) must divide dim ({self.dim})")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model config: n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"model config: head dim = {self.head_dim} must be even (rotary embedding)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model config: dropout must be in [0, 1), got {self.dropout!r}")
        if self.attention not in ("auto", "flash", "sdpa"):
            raise ConfigError(f"model config: attention must be 'auto', 'flash' or 'sdpa', got {self.attention!r}")
        if self.logit_softcap is not None and not (isinstance(self.logit_softcap, (int, float))
                                                    and 0 < self.logit_softcap < float("inf")):
            raise ConfigError(f"model config: logit_softcap must be None or a finite number > 0, got {self.logit_softcap!r}")
        if not self.norm_eps > 0:
            raise ConfigError(f"model config: norm_eps must be > 0, got {self.norm_eps!r}")

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim if self.attn_head_dim is not None else self.dim // self.n_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"model config: unknown field(s) {', '.join(unknown)}")
        return cls(**d)

    def num_params(self) -> int:
        D, F, L, V = self.dim, self.ffn_dim, self.n_layers, self.vocab_size
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        per_layer = D * (q + 2 * kv) + q * D + 3 * D * F + 2 * D + (q + 2 * kv) * self.qkv_bias \
            + 2 * self.head_dim * self.qk_norm
        return V * D * (1 if self.tie_embeddings else 2) + L * per_layer + D


# Model-size presets. Parameter counts with the byte vocab (256) / BPE 8192 in the comments.
PRESETS: dict[str, dict] = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128),  # ~0.1M: tests
    "small": dict(dim=256, n_layers=4, n_heads=4, max_seq_len=256),  # ~3.2M (+2.1M with vocab 8192)
    "medium": dict(dim=384, n_layers=6, n_heads=6, max_seq_len=256),  # ~10.7M (+3.1M with 8192)
    "base": dict(dim=768, n_layers=12, n_heads=12, max_seq_len=1024),  # ~85M + embeddings
    "large": dict(dim=1024, n_layers=24, n_heads=16, n_kv_heads=8, max_seq_len=2048),  # ~290M
    "xl": dict(dim=2048, n_layers=18, n_heads=32, n_kv_heads=8, max_seq_len=2048),  # ~0.9B
}
