"""Text generation from a trained model, with a KV cache.

With the cache (models that have `new_cache`, i.e. fmkernels.models.Transformer): the prompt is run once
(prefill), then each new token costs one single-token forward that reads the cached keys/values. When the
context reaches max_seq_len, the cache is refilled from the last max_seq_len // 2 tokens (positions restart at
0, as in the uncached path, which re-runs the context cropped to max_seq_len at every step).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _sample(logits: torch.Tensor, temperature: float, top_k: Optional[int], g: torch.Generator) -> torch.Tensor:
    """logits (1, V) -> next token id (1, 1)."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        v, _ = torch.topk(logits, min(top_k, logits.shape[-1]))
        logits[logits < v[:, -1:]] = -float("inf")
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=g).to(logits.device)


@torch.no_grad()
def generate_ids(model, ids: list[int], max_new_tokens: int = 200, temperature: float = 0.8,
                 top_k: Optional[int] = 40, seed: int = 0, use_cache: bool = True,
                 stop_id: Optional[int] = None) -> list[int]:
    """Token ids in -> the prompt's continuation (max_new_tokens ids, or up to and including stop_id).
    temperature <= 0: greedy."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"generate: top_k must be None or an int >= 0, got {top_k!r}")
    model.eval()
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    idx = torch.tensor([list(ids) or [0]], dtype=torch.long, device=device)
    L = model.cfg.max_seq_len
    cache = model.new_cache(1) if use_cache and hasattr(model, "new_cache") else None
    out: list[int] = []
    if cache is not None:
        logits = model(idx[:, -L:], cache=cache)[:, -1, :]  # prefill
    for i in range(max_new_tokens):
        if cache is None:
            logits = model(idx[:, -L:])[:, -1, :]  # (1, V): the cropped context, re-run
        nxt = _sample(logits, temperature, top_k, g)
        out.append(int(nxt))
        if stop_id is not None and out[-1] == stop_id:
            break
        idx = torch.cat([idx, nxt], dim=1)
        if cache is not None and i + 1 < max_new_tokens:
            if cache.length >= L:  # full: refill from the newest half of the context
                cache.reset()
                logits = model(idx[:, -max(1, L // 2):], cache=cache)[:, -1, :]
            else:
                logits = model(nxt, cache=cache)[:, -1, :]  # one token
    return out


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
             top_k: Optional[int] = 40, seed: int = 0, use_cache: bool = True) -> str:
    """Sample a continuation of `prompt` (temperature / top-k; temperature <= 0 is greedy)."""
    ids = tokenizer.encode(prompt) or [0]
    return tokenizer.decode(generate_ids(model, ids, max_new_tokens, temperature, top_k, seed, use_cache))


def run_sample(model, tokenizer, cfg) -> Optional[str]:
    """The summary's sample of a finished run (sample_tokens > 0; our own model, not sharded: model None)."""
    if model is None or cfg.sample_tokens <= 0 or cfg.model_impl != "fmkernels":
        return None
    return generate(model, tokenizer, cfg.sample_prompt, cfg.sample_tokens, cfg.temperature, cfg.top_k, cfg.seed)
