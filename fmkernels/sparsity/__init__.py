"""Sparsity workflow: `sparsify_(model, config)` prunes the Linear layers of a model in place (magnitude or
Wanda; 2:4, block or unstructured), gradual pruning for sparse fine-tuning, and the pruning criteria."""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import nn

from ..nn.sparse import SparseLinear
from . import masks, pruning
from .config import BlockSparseConfig, SemiStructuredConfig, UnstructuredConfig
from .gradual import GradualPruner
from .masks import keep_masks_on_step, reapply_masks_, sparsity_of

__all__ = [
    "sparsify_", "SemiStructuredConfig", "BlockSparseConfig", "UnstructuredConfig", "GradualPruner",
    "collect_act_norms", "keep_masks_on_step", "reapply_masks_", "sparsity_of",
]


@torch.no_grad()
def collect_act_norms(model: nn.Module, calibration: Iterable, modules: dict) -> dict:
    """L2 norm of every input channel of each module in `modules` ({fqn: nn.Linear}) over all calibration
    tokens: ||X_j||_2 with X the (tokens, in_features) input. Each calibration item is passed to
    model(item) (model(*item) for a tuple, model(**item) for a dict)."""
    sq = {n: torch.zeros(m.in_features, dtype=torch.float64, device=m.weight.device) for n, m in modules.items()}
    hooks = []
    for n, m in modules.items():
        def hook(mod, args, n=n):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sq[n] += (x * x).sum(0)
        hooks.append(m.register_forward_pre_hook(hook))
    try:
        for item in calibration:
            if isinstance(item, dict):
                model(**item)
            elif isinstance(item, (tuple, list)):
                model(*item)
            else:
                model(item)
    finally:
        for h in hooks:
            h.remove()
    return {n: v.sqrt().float() for n, v in sq.items()}


def _fits(m: nn.Linear, config) -> bool:
    if isinstance(config, SemiStructuredConfig):
        return m.in_features % 4 == 0
    if isinstance(config, BlockSparseConfig):
        b = config.block_size
        return m.in_features % b == 0 and m.out_features % b == 0
    return True


def sparsify_(model: nn.Module, config, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
              calibration: Optional[Iterable] = None) -> nn.Module:
    """Prune the nn.Linear layers of `model` in place and return it.

    config: SemiStructuredConfig (layers become SparseLinear 2:4), BlockSparseConfig (SparseLinear bsr) or
    UnstructuredConfig (weights stay dense with a kept-mask that survives training).
    filter_fn(module, fqn) -> bool selects layers (default: every nn.Linear whose shape fits the pattern).
    calibration: iterable of model inputs, required for method="wanda" (the input-channel norms).
    """
    if not isinstance(config, (SemiStructuredConfig, BlockSparseConfig, UnstructuredConfig)):
        raise TypeError(f"sparsify_: config must be SemiStructuredConfig, BlockSparseConfig or UnstructuredConfig, "
                        f"got {type(config).__name__}")
    targets = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and not isinstance(m, SparseLinear):
            if (filter_fn(m, name) if filter_fn is not None else _fits(m, config)):
                if not _fits(m, config):
                    raise ValueError(f"sparsify_: {name} ({m.in_features} -> {m.out_features}) does not fit {config}")
                targets[name] = m
    norms = {}
    if config.method == "wanda":
        if calibration is None:
            raise ValueError("sparsify_: method='wanda' needs calibration=<iterable of model inputs>")
        norms = collect_act_norms(model, calibration, targets)
    for name, m in targets.items():
        sc = pruning.scores_for(m.weight, config.method, norms.get(name))
        if isinstance(config, SemiStructuredConfig):
            new = SparseLinear.from_dense(m, format="2:4", mask=pruning.mask_24(sc))
        elif isinstance(config, BlockSparseConfig):
            bm = pruning.mask_blocks(sc, config.block_size, config.sparsity)
            new = SparseLinear.from_dense(m, format="bsr", block_size=config.block_size,
                                          mask=pruning.expand_block_mask(bm, config.block_size))
        else:
            masks.apply_mask_(m, pruning.mask_unstructured(sc, config.sparsity, per_row=config.method == "wanda"))
            continue
        new.train(m.training)
        _set_submodule(model, name, new)
    return model


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    if name == "":
        raise ValueError("sparsify_: the model itself is a Linear; wrap it in a module")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
