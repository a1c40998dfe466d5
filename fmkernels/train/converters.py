"""Model converters: the transforms a run applies to the model it built, as an ordered list built from the config
and applied in one place (torchtitan's model converters). Each is a small object with `convert(model, log)`; a
factory returns None when its switch is off. Order: int8 training, 2:4 sparsity, QAT, freezing, LoRA (LoRA last:
it wraps whatever the layers have become, and freezes everything but its adapters).

A new transform is a new converter (`register_converter`), not an edit to the trainer.
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from ..models.config import ConfigError
from ..nn.quantized import QATLinear
from ..quantization import Int4WeightOnlyConfig, Int8DynamicConfig, Int8TrainingConfig, prepare_qat_, quantize_
from ..sparsity import SemiStructuredConfig, sparsify_
from .model_source import attach_lora
from .optim import _block_index, trainable_summary


class ModelConverter:
    name = "converter"

    def convert(self, model: nn.Module, log: Callable[[str], None]) -> None:
        raise NotImplementedError


class Int8Training(ModelConverter):
    """quantize_(model, Int8TrainingConfig()): int8 forward and backward matmuls in the block linears."""

    name = "int8_training"

    def convert(self, model, log):
        quantize_(model, Int8TrainingConfig())


class Sparsity(ModelConverter):
    """sparsify_(model, SemiStructuredConfig()): 2:4 semi-structured linears (the pattern fixed while training)."""

    name = "sparsity"

    def __init__(self, pattern: str):
        if pattern != "2:4":
            raise ConfigError(f"config: sparsity must be '2:4' (semi-structured), got {pattern!r}")
        self.pattern = pattern

    def convert(self, model, log):
        sparsify_(model, SemiStructuredConfig())


def apply_qat(model: nn.Module, kind: str, group_size: int = 128) -> int:
    """prepare_qat_ on every nn.Linear the format takes (the trainer's `qat` switch); returns how many."""
    cfg = Int8DynamicConfig() if kind == "int8" else Int4WeightOnlyConfig(group_size=group_size)
    prepare_qat_(model, cfg)
    n = sum(isinstance(m, QATLinear) for m in model.modules())
    if n == 0:
        raise ConfigError(f"config: qat={kind!r} found no linear layer it can quantize (group_size {group_size})")
    return n


class QAT(ModelConverter):
    """Fake int8 / int4 quantization of the block linears while training (fmk quantize --recover_steps)."""

    name = "qat"

    def __init__(self, kind: str, group_size: int):
        self.kind, self.group_size = kind, group_size

    def convert(self, model, log):
        n = apply_qat(model, self.kind, self.group_size)
        log(f"QAT: fake {self.kind} quantization on {n} block linears")


def apply_freezing(model: nn.Module, freeze_embeddings: bool, freeze_blocks: int) -> list[str]:
    """requires_grad_(False) on the embedding and the first `freeze_blocks` blocks; returns frozen names."""
    layers = getattr(model, "layers", None)
    n_layers = len(layers) if layers is not None else 0
    if freeze_blocks > n_layers:
        raise ConfigError(f"config: freeze_blocks must be <= n_layers ({n_layers}), got {freeze_blocks}")
    frozen = []
    for name, p in model.named_parameters():
        blk = _block_index(name)
        if (freeze_embeddings and name.startswith("tok_emb.")) or (blk is not None and blk < freeze_blocks):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def _log_trainable(model, log, note: str = "") -> None:
    n_tr, n_all = trainable_summary(model)
    log(f"trainable parameters: {n_tr:,} of {n_all:,} ({100 * n_tr / max(n_all, 1):.2f}%){note}")


class Freeze(ModelConverter):
    """freeze_embeddings / freeze_blocks k: no gradient (and no optimizer state) for the embedding, the first k blocks."""

    name = "freeze"

    def __init__(self, embeddings: bool, blocks: int, report: bool = True):
        self.embeddings, self.blocks, self.report = embeddings, blocks, report

    def convert(self, model, log):
        if apply_freezing(model, self.embeddings, self.blocks) and self.report:
            _log_trainable(model, log)


class LoRA(ModelConverter):
    """LoRA adapters on lora_targets (lora_base int8 / int4: the frozen base quantized first, QLoRA-style)."""

    name = "lora"

    def __init__(self, cfg):
        self.cfg = cfg

    def convert(self, model, log):
        cfg = self.cfg
        wrapped = attach_lora(model, cfg)
        log(f"LoRA rank {cfg.lora_rank} alpha {cfg.lora_alpha:g} on {len(wrapped)} modules ({cfg.lora_base} base); "
            f"every other weight frozen")
        _log_trainable(model, log, " (the quantized base weights are buffers, not counted)" if cfg.lora_base != "dense"
                       else "")


_FACTORIES: list[tuple[str, Callable]] = [
    ("int8_training", lambda cfg: Int8Training() if cfg.int8_training else None),
    ("sparsity", lambda cfg: Sparsity(cfg.sparsity) if cfg.sparsity else None),
    ("qat", lambda cfg: QAT(cfg.qat, cfg.qat_group_size) if cfg.qat else None),
    ("freeze", lambda cfg: Freeze(cfg.freeze_embeddings, cfg.freeze_blocks, report=cfg.lora_rank == 0)
     if (cfg.freeze_embeddings or cfg.freeze_blocks) else None),
    ("lora", lambda cfg: LoRA(cfg) if cfg.lora_rank > 0 else None),
]


def register_converter(name: str, factory: Callable, after: Optional[str] = None) -> None:
    """factory(cfg) -> ModelConverter or None; placed after the converter named `after` (default: last)."""
    global _FACTORIES
    _FACTORIES = [f for f in _FACTORIES if f[0] != name]
    names = [f[0] for f in _FACTORIES]
    pos = names.index(after) + 1 if after in names else len(_FACTORIES)
    _FACTORIES.insert(pos, (name, factory))


def build_converters(cfg) -> list[ModelConverter]:
    """The run's converters, in order; the ones whose switch is off are left out."""
    return [c for c in (f(cfg) for _, f in _FACTORIES) if c is not None]


def apply_converters(model: nn.Module, converters: list[ModelConverter], log: Callable[[str], None]) -> nn.Module:
    for c in converters:
        c.convert(model, log)
    return model
