"""patch() / unpatch(): swap fmkernels ops into an already-built model, in place, and undo it exactly.

Mechanisms (all per instance: another model of the same class in the same process is untouched):
  - module replacement: torch.nn.RMSNorm -> fmkernels.nn.RMSNorm sharing the same weight Parameter;
  - class swap: `module.__class__` becomes a cached subclass of its own class that overrides `forward`
    (isinstance checks, state_dict keys, parameters, PEFT/FSDP wrapping keep working); unpatch swaps it back;
  - Hugging Face attention: the official `AttentionInterface` / `AttentionMaskInterface` registration plus
    `set_attn_implementation("fmkernels")` (see fmkernels/integrations/hf.py);
  - plain PyTorch attention: F.scaled_dot_product_attention calls made during the model's forward are routed
    through a TorchFunctionMode entered by the (class-swapped) root forward;
  - linear: fmkernels.quantize_ / fmkernels.sparsify_ with the given config; unpatch restores the modules and
    weights from a snapshot taken before.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .. import nn as fnn
from ..quantization import quantize_
from ..sparsity import sparsify_
from . import _attention
from ._undo import _State, set_attr, set_child, swap_class, swapped_class  # noqa: F401

KINDS = ("attention", "rms_norm", "rope", "swiglu", "cross_entropy", "linear")
_STATE_ATTR = "_fmkernels_patch"


@dataclass
class PatchReport:
    """What patch() did. `model` is the patched model (patched in place); `replaced[kind]` counts the modules
    (or attention modules / call sites) switched to fmkernels; `skipped[kind]` says why a kind did nothing;
    `calls` holds run-time counters (fused attention calls and fallbacks with their reason) that grow as the
    model runs (not counted while torch.compile traces)."""

    model: nn.Module
    replaced: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    calls: dict = field(default_factory=dict)

    @property
    def fallbacks(self) -> dict:
        return {k: v for k, v in self.calls.items() if "fallback" in k}

    def __str__(self) -> str:
        lines = [f"fmkernels.patch({type(self.model).__name__}):"]
        for kind in KINDS:
            if kind in self.replaced:
                lines.append(f"  {kind:<14} {self.replaced[kind]} replaced")
            if kind in self.skipped:
                lines.append(f"  {kind:<14} skipped: {self.skipped[kind]}")
        for n in self.notes:
            lines.append(f"  note: {n}")
        if self.calls:
            lines.append("  calls: " + ", ".join(f"{k}={v}" for k, v in sorted(self.calls.items())))
        return "\n".join(lines)

    __repr__ = __str__


def is_fmkernels_model(model: nn.Module) -> bool:
    """fmkernels' own fused model (fmkernels.models.Transformer); its plain-PyTorch twin is patched as any model."""
    return type(model).__module__ == "fmkernels.models.transformer"


def _hf_loaded() -> bool:
    return "transformers" in sys.modules  # a transformers model cannot exist unless transformers was imported


# ---------------------------------------------------------------------------------------------------------------
# Kinds for plain PyTorch modules


def _rms_norm_torch(model: nn.Module, state: _State) -> int:
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.RMSNorm:
                set_child(state, parent, name, fnn.RMSNorm.from_torch(child))
                n += 1
    return n


def _root_forward_with_sdpa_mode(self, *args, **kwargs):
    with _attention.SDPAMode(self.__dict__.get("_fmkernels_stats")):
        return self._fmkernels_orig_class.forward(self, *args, **kwargs)


def _attention_plain(model: nn.Module, state: _State, report: PatchReport) -> int:
    cls = swapped_class(type(model), "sdpa", {"forward": _root_forward_with_sdpa_mode})
    set_attr(state, model, "_fmkernels_stats", report.calls)
    swap_class(state, model, cls)
    report.notes.append(
        "attention: F.scaled_dot_product_attention calls inside the model's forward go to the fused kernel "
        "(masked / dropout calls fall back to SDPA and are counted in report.calls)"
    )
    return 1


def _linear(model: nn.Module, state: _State, cfg) -> int:
    mod = type(cfg).__module__
    if mod.startswith("fmkernels.quantization"):
        fn = quantize_
    elif mod.startswith("fmkernels.sparsity"):
        fn = sparsify_
    else:
        raise TypeError(
            f"fmkernels.patch: linear must be a quantization config (e.g. fmkernels.Int8DynamicConfig()) or a "
            f"sparsity config (e.g. fmkernels.SemiStructuredConfig()), got {type(cfg).__name__}"
        )
    # Snapshot: every module's class and attribute dicts, and a copy of every Linear weight (sparsify_ may
    # prune in place). Restoring them undoes any module replacement or in-place edit.
    snap = []
    for m in model.modules():
        d = {k: (type(v)(v) if isinstance(v, dict) else v) for k, v in m.__dict__.items()}
        snap.append((m, m.__class__, d))
    weights = [(m.weight, m.weight.detach().clone()) for m in model.modules() if isinstance(m, nn.Linear)]
    before = [m for m in model.modules() if isinstance(m, nn.Linear)]
    fn(model, cfg)
    weights = [(p, c) for p, c in weights if not torch.equal(p.detach(), c)]  # keep only what was edited in place
    now = {id(m) for m in model.modules()}
    changed = sum(1 for m in before if id(m) not in now or type(m) is not nn.Linear)
    changed = max(changed, len(weights))

    def undo():
        for m, cls, d in snap:
            m.__class__ = cls
            m.__dict__.clear()
            m.__dict__.update({k: (type(v)(v) if isinstance(v, dict) else v) for k, v in d.items()})
        with torch.no_grad():
            for p, c in weights:
                p.copy_(c)

    state.undo.append(undo)
    return changed


# ---------------------------------------------------------------------------------------------------------------


def patch(
    model: nn.Module,
    *,
    attention: bool = True,
    rms_norm: bool = True,
    rope: bool = True,
    swiglu: bool = True,
    cross_entropy: bool = True,
    linear=None,
) -> PatchReport:
    """Swap fmkernels ops into `model` in place and return a `PatchReport` (`report.model` is the model).

    Works on built instances of Hugging Face transformers 5.x models (Llama, Mistral, Qwen2/3: attention,
    RMSNorm, RoPE, SwiGLU MLP, fused linear + cross-entropy; attention in every model on transformers'
    AttentionInterface, e.g. BERT, GPT-2, Gemma 1-3, Phi-3, OLMo 2, GPT-OSS: calls the kernel cannot express fall
    back to SDPA, or to the model's own eager code where SDPA cannot compute them either (Gemma 2's logit
    softcapping, GPT-OSS's sinks; tests/test_integration_families.py)), on plain PyTorch models
    (torch.nn.RMSNorm modules; F.scaled_dot_product_attention calls) and on PEFT-wrapped models. Each kind
    switches on when its fmkernels op is part of the build; otherwise the report says why it was skipped.
    linear: a quantization config (applied with fmkernels.quantize_) or a sparsity config (fmkernels.sparsify_).
    Patch before wrapping with FSDP/DDP/torch.compile. Undo with `fmkernels.unpatch(model)`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fmkernels.patch: model must be a torch.nn.Module, got {type(model).__name__}")
    if _STATE_ATTR in model.__dict__:
        raise ValueError("fmkernels.patch: this model is already patched; call fmkernels.unpatch(model) first")
    report = PatchReport(model=model)
    state = _State(report)
    wanted = {"attention": attention, "rms_norm": rms_norm, "rope": rope, "swiglu": swiglu,
              "cross_entropy": cross_entropy}
    hf = None
    if _hf_loaded():
        from . import hf as _hf

        if _hf.hf_models(model):
            hf = _hf
    try:
        if linear is not None:
            report.replaced["linear"] = _linear(model, state, linear)
        for kind, on in wanted.items():
            if not on:
                report.skipped[kind] = "disabled by the caller"
                continue
            if is_fmkernels_model(model):
                report.skipped[kind] = "fmkernels model: already runs on fmkernels ops"
                continue
            n, why = 0, None
            if hf is not None:
                n, why = hf.apply(kind, model, state, report)
            if kind == "rms_norm":
                n += _rms_norm_torch(model, state)
            elif kind == "attention" and hf is None:
                n += _attention_plain(model, state, report)
            if n:
                report.replaced[kind] = n
            else:
                report.skipped[kind] = why or "no matching module in this model"
    except BaseException:
        for fn in reversed(state.undo):
            fn()
        raise
    model.__dict__[_STATE_ATTR] = state
    return report


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the modules, classes, attention implementation and weights patch() changed. Returns the model."""
    state = model.__dict__.pop(_STATE_ATTR, None)
    if state is None:
        raise ValueError("fmkernels.unpatch: this model was not patched by fmkernels.patch")
    for fn in reversed(state.undo):
        fn()
    return model


def get_report(model: nn.Module) -> Optional[PatchReport]:
    """The report of the patch currently applied to `model` (None when not patched)."""
    state = model.__dict__.get(_STATE_ATTR)
    return None if state is None else state.report
