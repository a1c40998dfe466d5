"""Gradual pruning during training: the sparsity of every selected Linear rises from `initial` to `final`
on a cubic schedule between `start_step` and `end_step`; masks are recomputed every `frequency` steps from the
current weights (magnitude, or Wanda with stored activation norms) and kept through optimizer steps."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from . import masks, pruning


class GradualPruner:
    def __init__(self, model: nn.Module, *, final_sparsity: float, start_step: int, end_step: int,
                 initial_sparsity: float = 0.0, frequency: int = 10, pattern: str = "unstructured",
                 block_size: int = 32, method: str = "magnitude",
                 filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
                 act_norms: Optional[dict] = None, optimizer: Optional[torch.optim.Optimizer] = None):
        if not 0.0 <= initial_sparsity <= final_sparsity < 1.0:
            raise ValueError(f"GradualPruner: need 0 <= initial_sparsity <= final_sparsity < 1, got "
                             f"{initial_sparsity}, {final_sparsity}")
        if end_step <= start_step:
            raise ValueError(f"GradualPruner: end_step ({end_step}) must be after start_step ({start_step})")
        if pattern not in ("unstructured", "block"):
            raise ValueError(f"GradualPruner: pattern must be 'unstructured' or 'block', got {pattern!r}")
        if frequency < 1:
            raise ValueError(f"GradualPruner: frequency must be >= 1, got {frequency}")
        self.model, self.final, self.initial = model, final_sparsity, initial_sparsity
        self.start, self.end, self.frequency = start_step, end_step, frequency
        self.pattern, self.block_size, self.method = pattern, block_size, method
        self.act_norms = act_norms or {}
        filter_fn = filter_fn or (lambda m, n: isinstance(m, nn.Linear))
        self.targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and filter_fn(m, n)]
        self.current = None
        self._hook = masks.keep_masks_on_step(optimizer, model) if optimizer is not None else None

    def sparsity_at(self, step: int) -> float:
        return pruning.cubic_sparsity(step, self.start, self.end, self.initial, self.final)

    @torch.no_grad()
    def step(self, step: int) -> float:
        """Call once per training step (after optimizer.step()); updates masks when due. Returns the target."""
        s = self.sparsity_at(step)
        due = step >= self.start and (step - self.start) % self.frequency == 0 or step == self.end
        if (due and s != self.current) or (self.current is None and s > 0):
            for name, m in self.targets:
                sc = pruning.scores_for(m.weight, self.method, self.act_norms.get(name))
                if hasattr(m, "weight_mask"):
                    sc = sc * m.weight_mask  # never revive: a pruned weight scores 0
                if self.pattern == "unstructured":
                    mk = pruning.mask_unstructured(sc, s, per_row=self.method == "wanda")
                else:
                    mk = pruning.expand_block_mask(pruning.mask_blocks(sc, self.block_size, s), self.block_size)
                masks.apply_mask_(m, mk)
            self.current = s
        masks.reapply_masks_(self.model)
        return s
