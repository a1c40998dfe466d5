"""The optimizer and schedule of a run: AdamW (fused where available) over parameter groups by (layer-wise lr scale,
weight decay or not), linear warmup then cosine decay to min_lr_ratio * lr."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..models.config import ConfigError


def lr_at(cfg, step: int, progress: float) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = min(max(progress, 0.0), 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def schedule_progress(cfg, step: int, train_time_s: float) -> float:
    """Where the run is in its schedule: the step fraction, or the spent time budget when max_time_s is set."""
    progress = step / cfg.max_steps
    if cfg.max_time_s is not None:
        progress = max(progress, train_time_s / cfg.max_time_s)
    return progress


def set_lr(opt, lr: float) -> None:
    """The schedule's lr on every group, times the group's layer-wise lr_scale."""
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def _block_index(name: str) -> Optional[int]:
    parts = name.split(".")
    if len(parts) > 1 and parts[0] == "layers" and parts[1].isdigit():
        return int(parts[1])
    return None


def lr_scale(name: str, n_layers: int, decay: float) -> float:
    """Layer-wise lr multiplier: top (final norm, untied head) 1, block i decay ** (L - i), embedding
    decay ** (L + 1)."""
    if decay == 1.0:
        return 1.0
    if name.startswith("tok_emb."):
        return decay ** (n_layers + 1)
    blk = _block_index(name)
    if blk is not None:
        return decay ** (n_layers - blk)
    return 1.0


def param_groups(model: nn.Module, weight_decay: float, n_layers: int, decay: float) -> list[dict]:
    """AdamW groups by (lr scale, decay or not); each group carries lr_scale for the loop's schedule."""
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        clean = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
        if clean.startswith("module."):  # DDP
            clean = clean[len("module."):]
        s = lr_scale(clean, n_layers, decay)
        wd = weight_decay if p.dim() >= 2 else 0.0
        g = groups.setdefault((s, wd), {"params": [], "weight_decay": wd, "lr_scale": s})
        g["params"].append(p)
    return list(groups.values())


def make_optimizer(model, cfg, fsdp: bool, n_layers: int = 0):
    groups = param_groups(model, cfg.weight_decay, n_layers, cfg.layer_lr_decay)
    if not groups:
        raise ConfigError("config: every parameter is frozen (freeze_embeddings / freeze_blocks / LoRA): nothing to train")
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    if not fsdp:
        try:
            return torch.optim.AdamW(groups, fused=True, **kw)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.AdamW(groups, foreach=True, **kw)


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return train, total
