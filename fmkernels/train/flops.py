"""The run's cost model: matmul FLOPs per token (PaLM's accounting, causal attention counted in full). Used for
the `flops` column of metrics.csv and the summary (training + data-selection scoring)."""
from __future__ import annotations

from ..models.config import TransformerConfig


def forward_flops_per_token(mcfg: TransformerConfig, seq_len: int) -> float:
    """Matmul FLOPs of one forward per token: 2 * (block weights + head) + attention 4 * L * T * dim."""
    D, L, V = mcfg.dim, mcfg.n_layers, mcfg.vocab_size
    kv = mcfg.n_kv_heads * mcfg.head_dim
    per_layer = D * (D + 2 * kv) + D * D + 3 * D * mcfg.ffn_dim
    return 2.0 * (L * per_layer + V * D) + 4.0 * L * seq_len * D


def train_flops_per_token(mcfg: TransformerConfig, seq_len: int) -> float:
    return 3.0 * forward_flops_per_token(mcfg, seq_len)
