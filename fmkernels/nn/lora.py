"""LoRA adapters: `LoRALinear` wraps any linear layer (nn.Linear, Int8Linear, Int4Linear, ...) with a frozen base
and a trainable low-rank update, y = base(x) + (alpha / rank) * B(A(dropout(x))).

A is initialised like nn.Linear (Kaiming uniform), B with zeros, so a freshly wrapped model computes exactly
what the base model did. With a quantized base (Int8Linear / Int4Linear) this is QLoRA-style fine-tuning:
the base stays quantized and frozen, only A and B train.

    apply_lora(model, rank=8, alpha=16, dropout=0.0, targets=("wqkv", "wo", "w13", "w2"))  # wraps in place
    merge_lora(model)   # folds every adapter back into a dense nn.Linear (W + alpha / rank * B @ A)
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

from .. import ops

__all__ = ["LoRALinear", "apply_lora", "merge_lora", "lora_parameters"]


def _base_dense_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's weight as a dense fp32 (out, in) tensor."""
    if isinstance(base, nn.Linear):
        return base.weight.detach().float()
    if hasattr(base, "dequantized_weight"):
        return base.dequantized_weight().detach().float()
    raise TypeError(f"LoRALinear: cannot read a dense weight from a {type(base).__name__} base "
                    f"(expected nn.Linear or a module with dequantized_weight())")


class LoRALinear(nn.Module):
    """A frozen linear `base` plus a trainable rank-`rank` update scaled by alpha / rank."""

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 splits: Optional[Sequence[int]] = None):
        """splits: output sizes of a fused projection (e.g. [q, k, v] rows of wqkv): one rank-`rank` adapter per
        part (what PEFT puts on q_proj, k_proj, v_proj), sharing one A matmul: A (S*rank, in), B (out, rank)
        with part i's rows using columns i*rank .. (i+1)*rank of A x (B acts block-diagonally)."""
        super().__init__()
        in_f, out_f = getattr(base, "in_features", None), getattr(base, "out_features", None)
        if not isinstance(in_f, int) or not isinstance(out_f, int):
            raise TypeError(f"LoRALinear: base must be a linear layer with in_features / out_features, "
                            f"got {type(base).__name__}")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRALinear: rank must be a positive integer, got {rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRALinear: dropout must be in [0, 1), got {dropout!r}")
        splits = [int(v) for v in splits] if splits else [out_f]
        if sum(splits) != out_f or min(splits) < 1:
            raise ValueError(f"LoRALinear: splits must be positive sizes summing to out_features {out_f}, got {splits}")
        self.splits = splits
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = in_f, out_f
        self.rank, self.alpha, self.scaling = rank, float(alpha), float(alpha) / rank
        dev = next((t.device for t in list(base.parameters()) + list(base.buffers())), torch.device("cpu"))
        self.lora_A = nn.Parameter(torch.empty(len(splits) * rank, in_f, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(out_f, rank, device=dev))
        for a in self.lora_A.split(rank):  # each part initialised as its own (rank, in) nn.Linear weight
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _b_full(self) -> torch.Tensor:
        """B as the (out, S*rank) matrix of the fused parts (block-diagonal when there are several)."""
        if len(self.splits) == 1:
            return self.lora_B
        return torch.block_diag(*self.lora_B.split(self.splits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # quantized bases pass the straight-through dx = dy @ W_deq (fmkernels.ops.quant)
        return ops.lora_update(y, self.lora_dropout(x), self.lora_A, self.lora_B, self.splits, self.rank,
                               self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """The adapter's dense update (out, in), fp32."""
        with torch.no_grad():
            return (self._b_full().float() @ self.lora_A.float()) * self.scaling

    def merged(self) -> nn.Linear:
        """A dense nn.Linear computing what this module computes in eval mode (base weight + B @ A * scaling)."""
        w = _base_dense_weight(self.base) + self.delta_weight()
        bias = getattr(self.base, "bias", None)
        lin = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=w.device)
        with torch.no_grad():
            lin.weight.copy_(w)
            if bias is not None:
                lin.bias.copy_(bias.detach().float())
        return lin

    def extra_repr(self) -> str:
        sp = f", splits={self.splits}" if len(self.splits) > 1 else ""
        return f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}{sp}"


def _targets(targets: Union[str, Iterable[str]]) -> list[str]:
    if isinstance(targets, str):
        targets = [t for t in targets.split(",")]
    out = [t.strip() for t in targets if t.strip()]
    if not out:
        raise ValueError("apply_lora: targets is empty (give module names, e.g. 'wqkv,wo,w13,w2')")
    return out


def _matches(name: str, targets: Sequence[str]) -> bool:
    """A module matches a target when the target is its full dotted name or its last component(s)."""
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: Union[str, Iterable[str]] = ("wqkv", "wo", "w13", "w2"),
               freeze_others: bool = True, splits=None) -> list[str]:
    """Wrap every linear submodule whose name matches `targets` in a LoRALinear (in place). With
    freeze_others (the default) every other parameter of the model is frozen. Returns the wrapped names.
    splits(name) -> the output sizes of a fused projection, or None (see LoRALinear). Raises ValueError when nothing matched (a LoRA run that trains nothing is an error, not a no-op)."""
    tg = _targets(targets)
    found = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoRALinear) or not name or not _matches(name, tg):
            continue
        if not (isinstance(getattr(mod, "in_features", None), int) and isinstance(getattr(mod, "out_features", None), int)):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, LoRALinear):
            continue
        found.append((parent, child, name, mod))
    if not found:
        raise ValueError(f"apply_lora: no linear module matches targets {tg}")
    if freeze_others:
        for p in model.parameters():
            p.requires_grad_(False)
    for parent, child, name, mod in found:
        setattr(parent, child, LoRALinear(mod, rank, alpha, dropout, splits(name) if splits else None))
    return [n for _, _, n, _ in found]


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear in `model` by its merged dense nn.Linear (in place; also returns the model).
    The merged layers' parameters are trainable again (requires_grad as nn.Linear creates them)."""
    if isinstance(model, LoRALinear):
        return model.merged()
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, mod.merged())
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if n.endswith("lora_A") or n.endswith("lora_B")]
