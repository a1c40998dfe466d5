"""Linear + cross-entropy, readable fp32 reference: materializes the (tokens, vocab) logits."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """x: (T, H), weight: (V, H), target: (T,) int64 -> cross_entropy(x @ weight^T + bias, target)."""
    logits = x.float() @ weight.float().t()  # (T, V)
    if bias is not None:
        logits = logits + bias.float()
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)


def cross_entropy_chunk(logits: torch.Tensor, target: torch.Tensor, scale: float, ignore_index: int):
    """What the in-place chunk kernel computes, out of place: (per-row loss fp32, scale * dloss/dlogits)."""
    z = logits.float()
    valid = target != ignore_index
    t = torch.where(valid, target, torch.zeros_like(target))
    # log_softmax, not logsumexp: a +inf logit gives NaN as in F.cross_entropy (logsumexp would return inf)
    nll = -torch.log_softmax(z, dim=-1).gather(1, t[:, None])[:, 0]
    loss = torch.where(valid, nll, torch.zeros_like(nll))
    grad = torch.softmax(z, dim=-1)
    grad[torch.arange(z.shape[0]), t] -= 1.0
    grad = grad * scale * valid[:, None]
    return loss, grad.to(logits.dtype)
