"""Dense weights with a fixed kept-mask that survives training: the mask is a buffer (`weight_mask`,
saved in the state dict), the gradient of pruned weights is zeroed, and the weight is re-masked before each
forward and after each optimizer step (`keep_masks_on_step`), so momentum or weight decay cannot revive a
pruned weight."""
from __future__ import annotations

import torch
from torch import nn


def apply_mask_(module: nn.Module, mask: torch.Tensor) -> None:
    """Attach (or replace) the kept-mask of module.weight and zero the pruned weights now."""
    mask = mask.to(device=module.weight.device, dtype=torch.bool)
    if tuple(mask.shape) != tuple(module.weight.shape):
        raise ValueError(f"apply_mask_: mask shape {tuple(mask.shape)} != weight shape {tuple(module.weight.shape)}")
    if hasattr(module, "weight_mask") and isinstance(module.weight_mask, torch.Tensor):
        module.weight_mask.copy_(mask)
    else:
        module.register_buffer("weight_mask", mask)
        module._fmk_mask_hooks = (
            module.register_forward_pre_hook(_premask),
            module.weight.register_hook(lambda g, m=module: g * m.weight_mask.to(g.dtype)),
        )
    with torch.no_grad():
        module.weight.mul_(module.weight_mask.to(module.weight.dtype))


def _premask(module, args):
    with torch.no_grad():
        module.weight.mul_(module.weight_mask.to(module.weight.dtype))


def remove_mask_(module: nn.Module) -> None:
    hooks = getattr(module, "_fmk_mask_hooks", None)
    if hooks:
        for h in hooks:
            h.remove()
        del module._fmk_mask_hooks
    if "weight_mask" in module._buffers:
        del module._buffers["weight_mask"]


def masked_modules(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(getattr(m, "weight_mask", None), torch.Tensor)]


@torch.no_grad()
def reapply_masks_(model: nn.Module) -> None:
    for _, m in masked_modules(model):
        m.weight.mul_(m.weight_mask.to(m.weight.dtype))


def keep_masks_on_step(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Re-mask every masked weight of `model` after each `optimizer.step()`; returns the hook handle."""
    return optimizer.register_step_post_hook(lambda *_: reapply_masks_(model))


def sparsity_of(model: nn.Module) -> float:
    tot = zero = 0
    for _, m in masked_modules(model):
        tot += m.weight_mask.numel()
        zero += int((~m.weight_mask).sum())
    return zero / max(1, tot)
