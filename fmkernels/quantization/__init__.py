"""Model transforms for low-bit linear layers, applied in place (torchao-style):

    fk.quantize_(model, fk.Int8DynamicConfig())                      # nn.Linear -> Int8Linear (W8A8)
    fk.quantize_(model, fk.Int4WeightOnlyConfig(group_size=128))     # nn.Linear -> Int4Linear (W4A16)
    fk.quantize_(model, fk.Float8Config())                           # nn.Linear -> Float8Linear (GPU; CPU: reference)
    fk.quantize_(model, fk.Int8TrainingConfig())                     # nn.Linear -> Int8TrainingLinear (training)
    fk.prepare_qat_(model, fk.Int8DynamicConfig()); train; fk.convert_(model)   # QAT with fake quant (STE)

`filter_fn(module, fqn) -> bool` picks layers; by default every nn.Linear whose shape the kernels support,
the others are skipped with a logged reason (logger "fmkernels.quantization").
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .._dispatch import BACKEND_NAMES
from ..nn.linear import is_dense_linear
from ..nn.quantized import Float8Linear, Int4Linear, Int8Linear, Int8TrainingLinear, QATLinear
from ..reference.quant import INT4_GROUP_SIZES

__all__ = [
    "quantize_",
    "prepare_qat_",
    "convert_",
    "Int8DynamicConfig",
    "Int4WeightOnlyConfig",
    "Float8Config",
    "Int8TrainingConfig",
]

log = logging.getLogger("fmkernels.quantization")

FilterFn = Callable[[nn.Module, str], bool]


@dataclass(frozen=True)
class Int8DynamicConfig:
    """W8A8: int8 per-channel weights, dynamic per-token int8 activations (Int8Linear)."""

    backend: Optional[str] = None

    def __post_init__(self):
        _check_backend(self.backend, "Int8DynamicConfig")


@dataclass(frozen=True)
class Int4WeightOnlyConfig:
    """W4A16: int4 weights with group-wise scales along K (and zero points unless symmetric) (Int4Linear).
    act_terms: 2 = ~15-bit activations in the CPU kernel (default), 1 = W4A8 (faster for large batches)."""

    group_size: int = 128
    symmetric: bool = False
    act_terms: int = 2
    backend: Optional[str] = None

    def __post_init__(self):
        if isinstance(self.group_size, bool) or self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"Int4WeightOnlyConfig: group_size must be one of {INT4_GROUP_SIZES}, got {self.group_size!r}")
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"Int4WeightOnlyConfig: symmetric must be a bool, got {type(self.symmetric).__name__}")
        if self.act_terms not in (1, 2):
            raise ValueError(f"Int4WeightOnlyConfig: act_terms must be 1 or 2, got {self.act_terms!r}")
        _check_backend(self.backend, "Int4WeightOnlyConfig")


@dataclass(frozen=True)
class Float8Config:
    """fp8 e4m3 weights and dynamic per-token fp8 activations (Float8Linear). GPU kernels (sm89+); on CPU the
    layers run the reference implementation (correct, slower than fp32) and quantize_ logs a warning."""

    backend: Optional[str] = None

    def __post_init__(self):
        _check_backend(self.backend, "Float8Config")


@dataclass(frozen=True)
class Int8TrainingConfig:
    """int8 training: forward and grad-input matmuls on int8 kernels with dynamic scaling, grad-weight and master
    weights in fp32 (Int8TrainingLinear). Only layers with in/out features >= min_features are converted."""

    min_features: int = 64

    def __post_init__(self):
        if not isinstance(self.min_features, int) or self.min_features < 1:
            raise ValueError(f"Int8TrainingConfig: min_features must be a positive int, got {self.min_features!r}")


@dataclass(frozen=True)
class Handler:
    """How a config quantizes one nn.Linear: convert(linear, config) -> module, and unsupported(linear, config) ->
    why this layer cannot take the format (None when it can)."""

    convert: Callable[[nn.Linear, object], nn.Module]
    unsupported: Optional[Callable[[nn.Linear, object], Optional[str]]] = None


HANDLERS: dict[type, Handler] = {}


def register_handler(config_cls: type, convert, unsupported=None) -> None:
    """Make quantize_ accept `config_cls` (the module a config builds is found here, not by an isinstance chain)."""
    HANDLERS[config_cls] = Handler(convert, unsupported)


def _handler(config) -> Optional[Handler]:
    for cls in type(config).__mro__:
        if cls in HANDLERS:
            return HANDLERS[cls]
    return None


register_handler(Int8DynamicConfig, lambda lin, c: Int8Linear.from_float(lin, backend=c.backend))
register_handler(Int4WeightOnlyConfig,
                 lambda lin, c: Int4Linear.from_float(lin, group_size=c.group_size, symmetric=c.symmetric,
                                                      act_terms=c.act_terms, backend=c.backend),
                 lambda lin, c: None if lin.in_features % c.group_size == 0 else
                 f"in_features={lin.in_features} is not a multiple of group_size={c.group_size}")
register_handler(Float8Config, lambda lin, c: Float8Linear.from_float(lin, backend=c.backend))
register_handler(Int8TrainingConfig, lambda lin, c: Int8TrainingLinear.from_float(lin),
                 lambda lin, c: None if min(lin.in_features, lin.out_features) >= c.min_features else
                 f"smaller than min_features={c.min_features} ({lin.in_features}->{lin.out_features}): "
                 f"int8 would not pay")
_CONFIGS = tuple(HANDLERS)


def _check_backend(backend, who):
    if backend is not None and backend not in BACKEND_NAMES:
        raise ValueError(f"{who}: backend must be None or one of {BACKEND_NAMES}, got {backend!r}")


def _check_config(config, who, allowed=None):
    allowed = allowed or tuple(HANDLERS)
    if not isinstance(config, allowed):
        names = ", ".join(c.__name__ for c in allowed)
        raise TypeError(f"{who}: config must be one of {names}, got {type(config).__name__}")


def _unsupported_reason(linear: nn.Linear, config) -> Optional[str]:
    """Why this layer cannot take the config's format (None when it can)."""
    if linear.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"weight dtype {linear.weight.dtype} is not a float type"
    h = _handler(config)
    return h.unsupported(linear, config) if h is not None and h.unsupported is not None else None


def _convert_linear(linear: nn.Linear, config) -> nn.Module:
    return _handler(config).convert(linear, config)


def _replace(model: nn.Module, make, select) -> list[str]:
    """Replace every child module m (at any depth) for which select(m, fqn) is true by make(m)."""
    done = []
    if select(model, ""):
        raise ValueError("quantize_: the model itself is a layer to replace; wrap it in a container (nn.Sequential)")
    for fqn, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{fqn}.{name}" if fqn else name
            if select(child, full):
                setattr(parent, name, make(child))
                done.append(full)
    return done


def quantize_(model: nn.Module, config, filter_fn: Optional[FilterFn] = None) -> nn.Module:
    """Replace the model's nn.Linear layers in place by quantized ones; returns the model.

    filter_fn(module, fqn) -> bool picks layers (default: every nn.Linear the format supports; unsupported
    layers are skipped with a logged reason). Raises ValueError if filter_fn picks a layer the format can't take.
    """
    _check_config(config, "quantize_")
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(config, Float8Config) and not any(p.is_cuda for p in model.parameters()):
        log.warning("quantize_(Float8Config): no CUDA parameters; fp8 layers on CPU run the reference implementation")

    def select(m, fqn):
        if not is_dense_linear(m):  # exact classes: never re-quantize our own subclasses
            return False
        if filter_fn is not None and not filter_fn(m, fqn):
            return False
        why = _unsupported_reason(m, config)
        if why is not None:
            if filter_fn is not None:
                raise ValueError(f"quantize_: layer '{fqn}' was selected by filter_fn but {why}")
            log.info("quantize_: skipping '%s': %s", fqn, why)
            return False
        return True

    done = _replace(model, lambda m: _convert_linear(m, config), select)
    log.info("quantize_(%s): converted %d layers", type(config).__name__, len(done))
    return model


def prepare_qat_(model: nn.Module, config, filter_fn: Optional[FilterFn] = None) -> nn.Module:
    """Insert fake quantization (straight-through estimator) for Int8DynamicConfig or Int4WeightOnlyConfig:
    nn.Linear -> QATLinear sharing the original parameters. Train, then convert_(model)."""
    _check_config(config, "prepare_qat_", (Int8DynamicConfig, Int4WeightOnlyConfig))

    def select(m, fqn):
        if not is_dense_linear(m) or (filter_fn is not None and not filter_fn(m, fqn)):
            return False
        why = _unsupported_reason(m, config)
        if why is not None:
            log.info("prepare_qat_: skipping '%s': %s", fqn, why)
            return False
        return True

    if isinstance(config, Int8DynamicConfig):
        make = lambda m: QATLinear.from_float(m, kind="int8")  # noqa: E731
    else:
        make = lambda m: QATLinear.from_float(m, kind="int4", group_size=config.group_size,  # noqa: E731
                                              symmetric=config.symmetric)
    _replace(model, make, select)
    model._fmk_qat_config = config
    return model


def convert_(model: nn.Module) -> nn.Module:
    """Turn every QATLinear (from prepare_qat_) into the real quantized layer (Int8Linear / Int4Linear)."""
    config = getattr(model, "_fmk_qat_config", None)
    kw = {}
    if isinstance(config, Int4WeightOnlyConfig):
        kw = {"act_terms": config.act_terms}
    if config is not None and config.backend is not None:
        kw["backend"] = config.backend
    done = _replace(model, lambda m: m.to_quantized(**kw), lambda m, fqn: isinstance(m, QATLinear))
    if not done:
        raise ValueError("convert_: the model has no QATLinear layers; call prepare_qat_(model, config) first")
    if hasattr(model, "_fmk_qat_config"):
        del model._fmk_qat_config
    return model
