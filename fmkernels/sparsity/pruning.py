"""Pruning criteria and masks: magnitude and Wanda (|W_ij| * ||X_j||_2, Sun et al. 2023), for unstructured,
2:4 and block patterns. Masks are bool tensors of the weight's shape, True = kept."""
from __future__ import annotations

from typing import Optional

import torch


def magnitude_scores(w: torch.Tensor) -> torch.Tensor:
    return w.detach().float().abs()


def wanda_scores(w: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor:
    """|W| * ||X_j||: act_norm (in_features,) is the L2 norm of input channel j over the calibration tokens."""
    if act_norm.shape != (w.shape[1],):
        raise ValueError(f"wanda_scores: act_norm must have shape ({w.shape[1]},), got {tuple(act_norm.shape)}")
    return w.detach().float().abs() * act_norm.float().to(w.device).unsqueeze(0)


def mask_24(scores: torch.Tensor) -> torch.Tensor:
    """Keep the 2 highest scores in every group of 4 along the last dim (ties: lower index)."""
    N, K = scores.shape
    if K % 4:
        raise ValueError(f"mask_24: in_features={K} must be a multiple of 4")
    g = scores.reshape(N, K // 4, 4)
    top = torch.sort(g, dim=-1, descending=True, stable=True).indices[..., :2]
    return torch.zeros_like(g, dtype=torch.bool).scatter_(-1, top, True).reshape(N, K)


def mask_unstructured(scores: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Keep the (1 - sparsity) fraction of highest scores, over the whole tensor or within each row."""
    if sparsity <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if per_row:
        k = int(round(scores.shape[1] * sparsity))
        if k == 0:
            return torch.ones_like(scores, dtype=torch.bool)
        drop = torch.sort(scores, dim=1, stable=True).indices[:, :k]
        return torch.ones_like(scores, dtype=torch.bool).scatter_(1, drop, False)
    flat = scores.flatten()
    k = int(round(flat.numel() * sparsity))
    if k == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    drop = torch.sort(flat, stable=True).indices[:k]
    return torch.ones_like(flat, dtype=torch.bool).scatter_(0, drop, False).reshape(scores.shape)


def block_scores(scores: torch.Tensor, block_size: int) -> torch.Tensor:
    N, K = scores.shape
    b = block_size
    if N % b or K % b:
        raise ValueError(f"block_scores: weight shape {(N, K)} must be a multiple of block_size={b}")
    return scores.reshape(N // b, b, K // b, b).sum(dim=(1, 3))  # (N/b, K/b)


def mask_blocks(scores: torch.Tensor, block_size: int, sparsity: float) -> torch.Tensor:
    """Block mask (N/b, K/b): in every block row keep the round((1 - sparsity) * K/b) highest-scoring blocks
    (at least 1)."""
    bs = block_scores(scores, block_size)
    nkeep = max(1, int(round(bs.shape[1] * (1.0 - sparsity))))
    keep = torch.sort(bs, dim=1, descending=True, stable=True).indices[:, :nkeep]
    return torch.zeros_like(bs, dtype=torch.bool).scatter_(1, keep, True)


def expand_block_mask(bm: torch.Tensor, block_size: int) -> torch.Tensor:
    return bm.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)


def scores_for(w: torch.Tensor, method: str, act_norm: Optional[torch.Tensor]) -> torch.Tensor:
    if method == "magnitude":
        return magnitude_scores(w)
    if method == "wanda":
        if act_norm is None:
            raise ValueError("wanda pruning needs calibration data: pass calibration=... to sparsify_")
        return wanda_scores(w, act_norm)
    raise ValueError(f"unknown pruning method {method!r}")


def cubic_sparsity(step: int, start_step: int, end_step: int, initial: float, final: float) -> float:
    """Gradual pruning schedule (Zhu & Gupta 2017): s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3."""
    if step <= start_step:
        return initial
    if step >= end_step:
        return final
    frac = (step - start_step) / max(1, end_step - start_step)
    return final + (initial - final) * (1.0 - frac) ** 3
