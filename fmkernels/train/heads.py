"""Task heads on a pretrained trunk, and the per-task loss weights of a multitask run.

- `pool(h, lengths, mode)`: (B, N, D) hidden states of right-padded rows -> (B, D): "mean" over the valid
  positions, "last" valid position (for a causal decoder it has seen the whole row), "first" (BERT's [CLS]).
- `ClassificationHead`: pooled hidden state -> dropout -> Linear(D, C) logits.
- `TaskHeads`: the heads of a run (ModuleDict) plus, for uncertainty weighting, one learned log-variance
  s_i per task. It is attached to the trunk as `model.task_heads`, so the trunk's own parameter names (and
  with them freezing, layer-wise lr decay, LoRA targets and checkpoints) are unchanged; the language-modelling
  task uses the trunk's own (tied) output layer and adds no head.

Loss weighting (`combine`):
  fixed        L = sum_i w_i L_i
  uncertainty  L = sum_i w_i (exp(-s_i) L_i + s_i)   (Kendall, Gal & Cipolla 2018, the form used for
               classification/cross-entropy losses; s_i = log sigma_i^2 is learned, optimum s_i = log L_i,
               so a task with a larger loss is down-weighted)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

POOLS = ("mean", "last", "first")


def pool(h: torch.Tensor, lengths: Optional[torch.Tensor] = None, mode: str = "mean") -> torch.Tensor:
    """h (B, N, D), lengths (B,) valid positions per right-padded row (None: all N) -> (B, D)."""
    if h.dim() != 3:
        raise ValueError(f"pool: h must be (B, N, D), got shape {tuple(h.shape)}")
    if mode not in POOLS:
        raise ValueError(f"pool: mode must be one of {', '.join(POOLS)}, got {mode!r}")
    B, N, _ = h.shape
    if lengths is None:
        lengths = torch.full((B,), N, dtype=torch.long, device=h.device)
    if lengths.shape != (B,):
        raise ValueError(f"pool: lengths must be ({B},), got shape {tuple(lengths.shape)}")
    if bool((lengths < 1).any()) or bool((lengths > N).any()):
        raise ValueError(f"pool: lengths must be in [1, {N}], got {lengths.tolist()}")
    if mode == "first":
        return h[:, 0]
    if mode == "last":
        return h[torch.arange(B, device=h.device), lengths - 1]
    mask = (torch.arange(N, device=h.device)[None, :] < lengths[:, None]).to(h.dtype)  # (B, N)
    return (h * mask[..., None]).sum(1) / lengths[:, None].to(h.dtype)


class ClassificationHead(nn.Module):
    def __init__(self, dim: int, n_classes: int, pool_mode: str = "mean", dropout: float = 0.0, init_std: float = 0.02):
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"ClassificationHead: n_classes must be >= 2, got {n_classes}")
        if pool_mode not in POOLS:
            raise ValueError(f"ClassificationHead: pool_mode must be one of {', '.join(POOLS)}, got {pool_mode!r}")
        self.pool_mode = pool_mode
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.proj = nn.Linear(dim, n_classes)
        nn.init.normal_(self.proj.weight, 0.0, init_std)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """h (B, N, D) -> logits (B, C) in fp32."""
        z = pool(h, lengths, self.pool_mode)  # (B, D)
        return self.proj(self.drop(z)).float()


class TaskHeads(nn.Module):
    """The heads of a run (`heads[name]`; the LM task has none) and the per-task log-variances `log_var`
    (a parameter when uncertainty-weighted, a buffer of zeros otherwise), in the order of `tasks`."""

    def __init__(self, tasks: list, heads: dict, weights: dict, uncertainty: bool):
        super().__init__()
        self.tasks = list(tasks)
        self.heads = nn.ModuleDict(heads)
        self.register_buffer("weights", torch.tensor([float(weights[t]) for t in self.tasks]))
        self.uncertainty = uncertainty
        if uncertainty:
            self.log_var = nn.Parameter(torch.zeros(len(self.tasks)))
        else:
            self.register_buffer("log_var", torch.zeros(len(self.tasks)))

    def combine(self, losses: dict) -> torch.Tensor:
        """losses {task: scalar} (a subset of tasks: the ones sampled this micro-step) -> weighted total."""
        total = None
        for name, loss in losses.items():
            i = self.tasks.index(name)
            w = self.weights[i]
            if self.uncertainty:
                s = self.log_var[i]
                term = w * (torch.exp(-s) * loss + s)
            else:
                term = w * loss
            total = term if total is None else total + term
        if total is None:
            raise ValueError("TaskHeads.combine: no task loss given")
        return total

    def effective_weights(self) -> dict:
        """{task: the multiplier its loss gets now} (w_i, or w_i exp(-s_i) when uncertainty-weighted)."""
        w = self.weights * torch.exp(-self.log_var.detach()) if self.uncertainty else self.weights
        return {t: float(w[i]) for i, t in enumerate(self.tasks)}


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels)


__all__ = ["POOLS", "pool", "ClassificationHead", "TaskHeads", "classification_loss"]
