"""The optimizer and schedule of a run: AdamW (fused where available) over parameter groups by (layer-wise lr scale,
weight decay or not), or Muon (BatchedMuon: torch.optim.Muon with batched Newton-Schulz) for the blocks' 2-D weight matrices with AdamW for the rest;
linear warmup then cosine decay to min_lr_ratio * lr, or warmup-stable-decay (wsd)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..models.config import ConfigError
from .muon import BatchedMuon


def lr_at(cfg, step: int, progress: float) -> float:
    """The peak-lr-scaled schedule at `step` (warmup counts steps) and `progress` in [0, 1] (steps or training time
    done). cosine: lr * (m + (1 - m) (1 + cos(pi p)) / 2); wsd: lr until p = 1 - decay_fraction, then linear to
    m * lr at p = 1 (m = min_lr_ratio)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = min(max(progress, 0.0), 1.0)
    m = cfg.min_lr_ratio
    if getattr(cfg, "lr_schedule", "cosine") == "wsd":
        start = 1.0 - cfg.decay_fraction
        if p <= start:
            return cfg.lr
        return cfg.lr * (1.0 - (1.0 - m) * (p - start) / cfg.decay_fraction)
    return cfg.lr * (m + (1 - m) * 0.5 * (1 + math.cos(math.pi * p)))


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
        s = lr_scale(_clean(name), n_layers, decay)
        wd = weight_decay if p.dim() >= 2 else 0.0
        g = groups.setdefault((s, wd), {"params": [], "weight_decay": wd, "lr_scale": s})
        g["params"].append(p)
    return list(groups.values())


def _clean(name: str) -> str:
    clean = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
    return clean[len("module."):] if clean.startswith("module.") else clean  # DDP


def is_muon_param(name: str, p: torch.Tensor) -> bool:
    """Muon takes the transformer blocks' 2-D weight matrices (wqkv, wo, w13, w2 and the plain twin's split ones);
    the embedding, the (tied or untied) head, norms and biases stay with AdamW (Keller Jordan's split)."""
    return p.dim() == 2 and _block_index(_clean(name)) is not None


def adamw(groups, cfg, fsdp: bool):
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    if not fsdp:
        try:
            return torch.optim.AdamW(groups, fused=True, **kw)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.AdamW(groups, foreach=True, **kw)


class MultiOptimizer:
    """Several optimizers stepped as one (Muon + AdamW): the loop sets `lr` on `param_groups` (each group's
    lr_scale times the schedule), steps, zeroes and checkpoints it like a single optimizer."""

    def __init__(self, *optimizers):
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for o in self.optimizers for p, s in o.state.items()}

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers], "kinds": self.kinds()}

    def kinds(self) -> list[str]:
        return [getattr(o, "kind", type(o).__name__) for o in self.optimizers]

    def load_state_dict(self, sd: dict) -> None:
        kinds = self.kinds()
        if not isinstance(sd, dict) or sd.get("kinds") != kinds:
            got = sd.get("kinds") if isinstance(sd, dict) and "kinds" in sd else "a single optimizer's state"
            raise ConfigError(f"config: optimizer: the checkpoint holds {got}, this run builds {kinds} "
                              "(resume with the optimizer the run was started with)")
        for o, s in zip(self.optimizers, sd["optimizers"]):
            o.load_state_dict(s)


def resolved_optimizer(cfg, fsdp: bool = False) -> str:
    """'adamw' or 'muon' for cfg.optimizer; 'auto' is Muon where it was measured to win (make train, pretraining from
    scratch: docs/pretraining.md) and AdamW where it was not measured or cannot run: fine-tuning a checkpoint, LoRA,
    QAT, int8 training, 2:4 sparsity (a dense orthogonalized update), FSDP (sharded matrices)."""
    optimizer = getattr(cfg, "optimizer", "adamw")
    if optimizer != "auto":
        return optimizer
    elsewhere = (fsdp or getattr(cfg, "distributed", "auto") == "fsdp" or getattr(cfg, "init_from", None)
                 or getattr(cfg, "lora_rank", 0) or getattr(cfg, "qat", None) or getattr(cfg, "int8_training", False)
                 or getattr(cfg, "sparsity", None))
    return "adamw" if elsewhere else "muon"


def make_optimizer(model, cfg, fsdp: bool, n_layers: int = 0):
    optimizer = resolved_optimizer(cfg, fsdp)
    if optimizer == "muon" and getattr(cfg, "optimizer", "adamw") == "auto" and not any(
            is_muon_param(n, p) for n, p in model.named_parameters() if p.requires_grad):
        optimizer = "adamw"  # auto on a model without block matrices (a custom module tree)
    if optimizer == "muon":
        return make_muon(model, cfg, fsdp, n_layers)
    groups = param_groups(model, cfg.weight_decay, n_layers, cfg.layer_lr_decay)
    if not groups:
        raise ConfigError("config: every parameter is frozen (freeze_embeddings / freeze_blocks / LoRA): nothing to train")
    return adamw(groups, cfg, fsdp)


def make_muon(model, cfg, fsdp: bool, n_layers: int = 0) -> MultiOptimizer:
    """Muon for the block matrices (lr_scale = muon_lr / lr so the loop's schedule drives both), AdamW for the rest.
    muon_lr None: Muon at lr with the AdamW-matched update RMS (adjust_lr_fn 'match_rms_adamw'); else at muon_lr with
    the original sqrt(max(1, out / in)) scaling."""
    if fsdp:
        raise ConfigError("config: optimizer 'muon' is not supported with distributed 'fsdp' (use ddp)")
    muon_groups: dict[float, dict] = {}
    other: dict[tuple, dict] = {}
    ratio = 1.0 if cfg.muon_lr is None else cfg.muon_lr / cfg.lr
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        s = lr_scale(_clean(name), n_layers, cfg.layer_lr_decay)
        if is_muon_param(name, p):
            g = muon_groups.setdefault(s, {"params": [], "weight_decay": cfg.weight_decay, "lr_scale": s * ratio})
        else:
            wd = cfg.weight_decay if p.dim() >= 2 else 0.0
            g = other.setdefault((s, wd), {"params": [], "weight_decay": wd, "lr_scale": s})
        g["params"].append(p)
    if not muon_groups and not other:
        raise ConfigError("config: every parameter is frozen (freeze_embeddings / freeze_blocks / LoRA): nothing to train")
    if not muon_groups:
        raise ConfigError("config: optimizer 'muon' found no trainable 2-D block matrix (parameters named "
                          "'layers.<i>.*.weight'); use optimizer 'adamw' for this model")
    opts = []
    if muon_groups:
        adjust = "match_rms_adamw" if cfg.muon_lr is None else "original"
        opts.append(BatchedMuon(list(muon_groups.values()), lr=cfg.lr * ratio, weight_decay=cfg.weight_decay,
                                     momentum=cfg.muon_momentum, nesterov=True, ns_steps=5, adjust_lr_fn=adjust))
    if other:
        opts.append(adamw(list(other.values()), cfg, fsdp))
    return MultiOptimizer(*opts)


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return train, total
