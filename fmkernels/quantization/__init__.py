"""Model transforms for low-bit linear layers, applied in place (torchao-style):

    fk.quantize_(model, fk.Int8DynamicConfig())                      # nn.Linear -> Int8Linear (W8A8)
    fk.quantize_(model, fk.Int4WeightOnlyConfig(group_size=128))     # nn.Linear -> Int4Linear (W4A16)
    fk.quantize_(model, fk.Int4WeightOnlyConfig(method="gptq"), calibration=batches)   # calibrated (also "awq")
    fk.quantize_(model, fk.Int8DynamicConfig(smoothquant_alpha=0.5), calibration=batches)   # SmoothQuant W8A8
    fk.quantize_(model, fk.Int8WeightOnlyConfig())                   # nn.Linear -> Int8WeightOnlyLinear (W8A16)
    fk.quantize_(model, fk.Float8Config())                           # nn.Linear -> Float8Linear (GPU; CPU: reference)
    fk.quantize_(model, fk.Int8TrainingConfig())                     # nn.Linear -> Int8TrainingLinear (training)
    fk.prepare_qat_(model, fk.Int8DynamicConfig()); train; fk.convert_(model)   # QAT with fake quant (STE)

`filter_fn(module, fqn) -> bool` picks layers; by default every nn.Linear whose dtype the kernels support (any
in_features: int4 / int8 weight-only groups that do not divide K are zero-padded). quantize_ logs a one-line
summary (converted N of M layers, each skip with its reason) on logger "fmkernels.quantization", at WARNING when
something was skipped, and keeps it in `model.fmk_quantize_summary`.

calibration (for SmoothQuant, AWQ, GPTQ): an iterable of input batches (a tensor -> model(t), a tuple ->
model(*t), a dict -> model(**t)) or a callable run as calibration(model). Everything is computed before the
model is touched: after an error the model is unchanged. GGUF files: load_gguf(path) (fmkernels.quantization.gguf).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .._dispatch import BACKEND_NAMES
from ..nn.linear import is_dense_linear
from ..nn.quantized import Float8Linear, Int4Linear, Int8Linear, Int8TrainingLinear, Int8WeightOnlyLinear, QATLinear
from ..reference.quant import INT4_GROUP_SIZES
from . import methods as _M
from .gguf import load_gguf

__all__ = [
    "quantize_",
    "prepare_qat_",
    "convert_",
    "Int8DynamicConfig",
    "Int4WeightOnlyConfig",
    "Int8WeightOnlyConfig",
    "load_gguf",
    "Float8Config",
    "Int8TrainingConfig",
]

log = logging.getLogger("fmkernels.quantization")

FilterFn = Callable[[nn.Module, str], bool]


@dataclass(frozen=True)
class Int8DynamicConfig:
    """W8A8: int8 per-channel weights, dynamic per-token int8 activations (Int8Linear).

    smoothquant_alpha (needs calibration): migrate activation outliers into the weights, s = max|X|^alpha /
    max|W|^(1 - alpha) per input channel, folded into the preceding norm (or, for v -> o, into v_proj's rows)
    where the graph allows, else applied per channel in the layer (x * smooth_inv). 0.5 is the usual choice."""

    backend: Optional[str] = None
    smoothquant_alpha: Optional[float] = None

    def __post_init__(self):
        _check_backend(self.backend, "Int8DynamicConfig")
        a = self.smoothquant_alpha
        if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1):
            raise ValueError(f"Int8DynamicConfig: smoothquant_alpha must be None or a float in [0, 1], got {a!r}")

    @property
    def needs_calibration(self) -> bool:
        return self.smoothquant_alpha is not None


@dataclass(frozen=True)
class Int4WeightOnlyConfig:
    """W4A16: int4 weights with group-wise scales along K (and zero points unless symmetric) (Int4Linear).
    act_terms: 2 = ~15-bit activations in the CPU kernel (default), 1 = W4A8 (faster for large batches).
    method: "rtn" (round to nearest; mse_search=True searches a shrunk range per group), "awq" (activation-aware
    per-channel scales + range search) or "gptq" (error-compensating rounding with the calibration Hessian); awq
    and gptq need calibration and are asymmetric. Same packed format and kernels for every method."""

    group_size: int = 128
    symmetric: bool = False
    act_terms: int = 2
    backend: Optional[str] = None
    method: str = "rtn"
    mse_search: bool = False

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("awq", "gptq")

    def __post_init__(self):
        if self.method not in ("rtn", "awq", "gptq"):
            raise ValueError(f"Int4WeightOnlyConfig: method must be 'rtn', 'awq' or 'gptq', got {self.method!r}")
        if not isinstance(self.mse_search, bool):
            raise TypeError(f"Int4WeightOnlyConfig: mse_search must be a bool, got {type(self.mse_search).__name__}")
        if self.symmetric is True and self.method != "rtn":
            raise ValueError(f"Int4WeightOnlyConfig: method={self.method!r} is asymmetric; symmetric=True needs 'rtn'")
        if isinstance(self.group_size, bool) or self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"Int4WeightOnlyConfig: group_size must be one of {INT4_GROUP_SIZES}, got {self.group_size!r}")
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"Int4WeightOnlyConfig: symmetric must be a bool, got {type(self.symmetric).__name__}")
        if self.act_terms not in (1, 2):
            raise ValueError(f"Int4WeightOnlyConfig: act_terms must be 1 or 2, got {self.act_terms!r}")
        _check_backend(self.backend, "Int4WeightOnlyConfig")


@dataclass(frozen=True)
class Int8WeightOnlyConfig:
    """W8A16: int8 symmetric weights with per-output-channel scales (group_size=None) or group-wise scales along K
    (a multiple of 4, e.g. 32 like GGUF Q8_0), float activations (Int8WeightOnlyLinear)."""

    group_size: Optional[int] = None
    backend: Optional[str] = None

    needs_calibration = False

    def __post_init__(self):
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g <= 0 or g % 4):
            raise ValueError(f"Int8WeightOnlyConfig: group_size must be None or a positive multiple of 4, got {g!r}")
        _check_backend(self.backend, "Int8WeightOnlyConfig")


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
    """How a config quantizes one nn.Linear. build(config, linear, w, b, smooth_inv, hessian) -> module, where w / b
    are the fp32 weight and bias after any calibration scaling, smooth_inv the per-input-channel 1 / s kept at run
    time (None when folded or unused) and hessian GPTQ's (None otherwise); unsupported(linear, config) -> why this
    layer cannot take the format (None when it can)."""

    build: Callable[..., nn.Module]
    unsupported: Optional[Callable[[nn.Linear, object], Optional[str]]] = None


HANDLERS: dict[type, Handler] = {}


def register_handler(config_cls: type, build, unsupported=None) -> None:
    """Make quantize_ accept `config_cls` (the module a config builds is found here, not by an isinstance chain)."""
    HANDLERS[config_cls] = Handler(build, unsupported)


def _handler(config) -> Optional[Handler]:
    for cls in type(config).__mro__:
        if cls in HANDLERS:
            return HANDLERS[cls]
    return None




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


def quantize_(model: nn.Module, config, filter_fn: Optional[FilterFn] = None, *, calibration=None) -> nn.Module:
    """Replace the model's nn.Linear layers in place by quantized ones; returns the model.

    filter_fn(module, fqn) -> bool picks layers (default: every nn.Linear the format supports; unsupported
    layers are skipped and named in the summary). Raises ValueError if filter_fn picks a layer the format can't
    take. calibration: input batches or a callable (see the module docstring), for configs that need it.
    """
    _check_config(config, "quantize_")
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_: model must be an nn.Module, got {type(model).__name__}")
    needs = getattr(config, "needs_calibration", False)
    if needs and calibration is None:
        raise ValueError(f"quantize_: {_config_name(config)} needs calibration data: pass calibration= (an iterable "
                         f"of input batches or a callable that runs the model)")
    if calibration is not None and not needs:
        log.info("quantize_(%s): calibration is not used by this config", _config_name(config))
    if isinstance(config, Float8Config) and not any(p.is_cuda for p in model.parameters()):
        log.warning("quantize_(Float8Config): no CUDA parameters; fp8 layers on CPU run the reference implementation")
    if is_dense_linear(model) and (filter_fn is None or filter_fn(model, "")):
        raise ValueError("quantize_: the model itself is a layer to replace; wrap it in a container (nn.Sequential)")

    total, skipped, chosen = 0, [], {}  # chosen: fqn -> (parent, name, linear)
    for fqn, parent in list(model.named_modules()):
        for name, child in parent.named_children():
            full = f"{fqn}.{name}" if fqn else name
            if not is_dense_linear(child):  # exact classes: never re-quantize our own subclasses
                continue
            if filter_fn is not None and not filter_fn(child, full):
                continue
            total += 1
            why = _unsupported_reason(child, config)
            if why is not None:
                if filter_fn is not None:
                    raise ValueError(f"quantize_: layer '{full}' was selected by filter_fn but {why}")
                skipped.append((full, why))
                continue
            chosen[full] = (parent, name, child)

    # ---- plan (nothing in the model changes until every new module is built)
    weights = {f: (lin.weight.detach().float().clone(), None if lin.bias is None else lin.bias.detach().float().clone())
               for f, (_, _, lin) in chosen.items()}
    smooth_inv, norm_updates, notes = {}, {}, []
    hess = {}
    if needs and chosen:
        layers = {f: lin for f, (_, _, lin) in chosen.items()}
        method = getattr(config, "method", "smoothquant")
        stats = _M.collect(model, layers, calibration, absmax=method == "smoothquant", absmean=method == "awq",
                           sample=method == "awq", hessian=method == "gptq")
        if method == "gptq":
            hess = {f: st.hessian for f, st in stats.items()}
        else:
            notes.append(_plan_smoothing(model, config, stats, weights, smooth_inv, norm_updates))
    new = {f: _build(config, chosen[f][2], *weights[f], smooth_inv.get(f), hess.get(f)) for f in chosen}

    # ---- apply
    with torch.no_grad():
        for nf, (w, b) in norm_updates.items():
            norm = model.get_submodule(nf)
            norm.weight.copy_(w.to(norm.weight.dtype))
            if b is not None:
                norm.bias.copy_(b.to(norm.bias.dtype))
    for f, (parent, name, _) in chosen.items():
        setattr(parent, name, new[f])
    summary = f"quantize_({_config_name(config)}): converted {len(chosen)} of {total} linear layers"
    if any(notes):
        summary += "; " + "; ".join(n for n in notes if n)
    if skipped:
        summary += "; skipped " + ", ".join(f"'{f}' ({why})" for f, why in skipped)
    model.fmk_quantize_summary = summary
    log.log(logging.WARNING if skipped else logging.INFO, "%s", summary)
    return model


def _config_name(config) -> str:
    if isinstance(config, Int4WeightOnlyConfig):
        extra = "+mse" if config.mse_search else ""
        return f"Int4WeightOnlyConfig g{config.group_size} {config.method}{extra}"
    if isinstance(config, Int8DynamicConfig) and config.smoothquant_alpha is not None:
        return f"Int8DynamicConfig smoothquant_alpha={config.smoothquant_alpha}"
    if isinstance(config, Int8WeightOnlyConfig):
        return f"Int8WeightOnlyConfig {'per-channel' if config.group_size is None else f'g{config.group_size}'}"
    return type(config).__name__


def _plan_smoothing(model, config, stats, weights, smooth_inv, norm_updates) -> str:
    """SmoothQuant / AWQ scales for every group of layers sharing an input: W *= s (columns) in `weights`, and
    x / s folded into the producing norm (norm_updates) or kept per layer (smooth_inv = 1 / s)."""
    awq = isinstance(config, Int4WeightOnlyConfig)
    gs = config.group_size if awq else None
    groups = []
    for f, st in stats.items():
        g = st.group if st.group is not None and st.group <= stats.keys() else frozenset([f])
        if g not in groups:
            groups.append(g)
    folded = runtime = 0
    for g in groups:
        members = sorted(g)
        ws = [weights[f][0] for f in members]
        if awq:
            x = torch.cat([stats[f].x_sample() for f in members[:1]])
            s = _M.awq_scales(x, stats[members[0]].absmean, ws, gs)
        else:
            s = _M.smoothquant_scales(stats[members[0]].absmax, ws, config.smoothquant_alpha)
        for f in members:
            weights[f] = (weights[f][0] * s[None, :], weights[f][1])
        producers = {stats[f].producer for f in members}
        prod = producers.pop() if len(producers) == 1 else None
        norm = model.get_submodule(prod) if prod else None
        if norm is not None and norm.weight.shape == s.shape and prod not in norm_updates:
            w = norm.weight.detach().float() / s
            b = getattr(norm, "bias", None)
            norm_updates[prod] = (w, None if b is None else b.detach().float() / s)
            folded += 1
        elif _fold_into_v(model, members, s, weights, stats):
            folded += 1
        else:
            for f in members:
                smooth_inv[f] = 1.0 / s
            runtime += 1
    kind = "AWQ" if awq else "SmoothQuant"
    return f"{kind}: {folded} input scalings folded into the preceding layer, {runtime} kept per channel"


def _fold_into_v(model, members, s, weights, stats) -> bool:
    """o_proj's input is attention over v_proj's outputs: with o.in == v.out, x / s is v's rows / s."""
    if len(members) != 1 or not members[0].endswith("o_proj"):
        return False
    vf = members[0][: -len("o_proj")] + "v_proj"
    if vf not in weights:
        return False
    wv, bv = weights[vf]
    if wv.shape[0] != s.shape[0]:
        return False
    weights[vf] = (wv / s[:, None], None if bv is None else bv / s)
    return True


def _linear_from(w: torch.Tensor, b: Optional[torch.Tensor], device) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
    lin.weight = nn.Parameter(w.to(device), requires_grad=False)
    if b is not None:
        lin.bias = nn.Parameter(b.to(device), requires_grad=False)
    return lin


def _build(config, linear: nn.Linear, w, b, smooth_inv, hessian) -> nn.Module:
    return _handler(config).build(config, linear, w, b, smooth_inv, hessian)


def _build_int4(config, linear, w, b, smooth_inv, hessian) -> nn.Module:
    device, G = linear.weight.device, config.group_size
    if config.method == "gptq":
        q, s, z = _M.gptq_int4(w, hessian, G)
    elif config.method == "awq" or config.mse_search:
        q, s, z = _M.int4_rtn(_M.pad_k(w, G), G, mse=True)
    elif config.symmetric:
        return Int4Linear.from_float(_linear_from(w, b, device), group_size=G, symmetric=True,
                                     act_terms=config.act_terms, backend=config.backend)
    else:
        q, s, z = _M.int4_rtn(_M.pad_k(w, G), G)
    return Int4Linear.from_quantized(q.to(device), s.to(device), z.to(device), linear.in_features, b,
                                     group_size=G, act_terms=config.act_terms, backend=config.backend,
                                     smooth_inv=smooth_inv).to(device)


def _smoothed(m: nn.Module, smooth_inv, device) -> nn.Module:
    if smooth_inv is not None:
        m.smooth_inv = smooth_inv.to(device)
    return m


def _build_int8_dynamic(config, linear, w, b, smooth_inv, hessian) -> nn.Module:
    device = linear.weight.device
    return _smoothed(Int8Linear.from_float(_linear_from(w, b, device), backend=config.backend), smooth_inv, device)


def _build_int8_weight_only(config, linear, w, b, smooth_inv, hessian) -> nn.Module:
    device = linear.weight.device
    m = Int8WeightOnlyLinear.from_float(_linear_from(w, b, device), group_size=config.group_size,
                                        backend=config.backend)
    return _smoothed(m, smooth_inv, device)


register_handler(Int8DynamicConfig, _build_int8_dynamic)
register_handler(Int4WeightOnlyConfig, _build_int4)
register_handler(Int8WeightOnlyConfig, _build_int8_weight_only)
register_handler(Float8Config, lambda c, lin, *_: Float8Linear.from_float(lin, backend=c.backend))
register_handler(Int8TrainingConfig, lambda c, lin, *_: Int8TrainingLinear.from_float(lin),
                 lambda lin, c: None if min(lin.in_features, lin.out_features) >= c.min_features else
                 f"smaller than min_features={c.min_features} ({lin.in_features}->{lin.out_features}): "
                 f"int8 would not pay")


def prepare_qat_(model: nn.Module, config, filter_fn: Optional[FilterFn] = None) -> nn.Module:
    """Insert fake quantization (straight-through estimator) for Int8DynamicConfig or Int4WeightOnlyConfig:
    nn.Linear -> QATLinear sharing the original parameters. Train, then convert_(model)."""
    _check_config(config, "prepare_qat_", (Int8DynamicConfig, Int4WeightOnlyConfig))

    def select(m, fqn):
        if not is_dense_linear(m) or (filter_fn is not None and not filter_fn(m, fqn)):
            return False
        why = _unsupported_reason(m, config)
        if why is None and isinstance(config, Int4WeightOnlyConfig) and m.in_features % config.group_size:
            why = f"in_features={m.in_features} is not a multiple of group_size={config.group_size} (QAT)"
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
