"""Text generation from a trained model (no KV cache: the context, cropped to max_seq_len, is re-run)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
             top_k: Optional[int] = 40, seed: int = 0) -> str:
    model.eval()
    g = torch.Generator().manual_seed(seed)
    ids = tokenizer.encode(prompt) or [0]
    idx = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    L = model.cfg.max_seq_len
    for _ in range(max_new_tokens):
        ctx = idx[:, -L:]
        logits = model(ctx)[:, -1, :].float()  # (1, V)
        if temperature <= 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                v, _ = torch.topk(logits, min(top_k, logits.shape[-1]))
                logits[logits < v[:, -1:]] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=g).to(idx.device)
        idx = torch.cat([idx, nxt], dim=1)
    return tokenizer.decode(idx[0, len(ids):].tolist())
