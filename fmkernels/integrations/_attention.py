"""Attention entry points used by patch(): the fused-kernel call, the plain-PyTorch SDPA interceptor, and the
Hugging Face `AttentionInterface` function. No transformers import here (the HF fallback is passed in).

Which calls the kernel can take is decided in one place, `fmkernels.nn.attention.sdpa_fallback_reason`; the
plain-PyTorch interceptor is that module's SDPA drop-in plus the report's counters.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..nn.attention import scaled_dot_product_attention, sdpa_fallback_reason
from ..ops import flash_attention


def autocast_qkv(q, k, v):
    """Under torch.autocast, SDPA runs in the autocast dtype (it is on autocast's lower-precision list); the
    custom op is not, so cast here. This is what makes HF Llama under bf16 autocast fused: its RoPE multiplies
    bf16 q/k by fp32 cos/sin, so q/k arrive in fp32 and v in bf16."""
    dev = q.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        q, k, v = (t.to(dt) if t.is_floating_point() else t for t in (q, k, v))
    return q, k, v


def _kernel_reason(q, k, v) -> Optional[str]:
    """Why the fused kernel cannot take these (B, H, N, D) tensors (None when it can); GQA allowed."""
    return sdpa_fallback_reason(q, k, v, enable_gqa=True)


def count(stats: Optional[dict], key: str) -> None:
    """Run-time counters of the report (skipped while torch.compile traces: they would count traces, not calls)."""
    if stats is None or torch.compiler.is_compiling():
        return
    stats[key] = stats.get(key, 0) + 1


# ---------------------------------------------------------------------------------------------------------------
# Plain PyTorch: F.scaled_dot_product_attention calls made inside a patched module's forward.


def sdpa_replacement(stats, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False):
    """F.scaled_dot_product_attention semantics; the fused kernel where it can express the call, else SDPA
    (fmkernels.nn.scaled_dot_product_attention), counted in the report."""
    if attn_mask is None and dropout_p == 0.0:
        query, key, value = autocast_qkv(query, key, value)
    why = sdpa_fallback_reason(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    count(stats, "attention_fused" if why is None else f"attention_fallback_{why}")
    return scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                        is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


class SDPAMode(TorchFunctionMode):
    """Routes F.scaled_dot_product_attention to `sdpa_replacement` while active (entered by a patched forward)."""

    def __init__(self, stats: Optional[dict] = None):
        super().__init__()
        self.stats = stats

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return sdpa_replacement(self.stats, *args, **kwargs)
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face transformers 5.x AttentionInterface function (registered as "fmkernels" by fmkernels.integrations.hf).
#
# Contract (read from transformers 5.24 integrations/sdpa_attention.py and masking_utils.py):
#   query (B, Hq, Nq, D), key/value (B, Hkv, Nk, D) with kv heads NOT repeated; attention_mask is what the
#   registered mask function (sdpa_mask) built: None when plain causal/bidirectional attention suffices, else a
#   bool (B, 1, Nq, Nk) mask, True = attend; is_causal is not passed by the model code (module.is_causal);
#   dropout / scaling are keywords; the return value is (output (B, Nq, Hq, D), None).
#   SDPA's `is_causal` is only used when Nq > 1 and no mask; with Nk > Nq (prefill into an empty static cache)
#   it is top-left aligned, which sdpa_attention_forward expresses by cropping k/v to the first Nq positions.
#   Masks: bidirectional key-padding (right-padded encoder batches) runs the kernel per sequence on its valid
#   keys; every other mask (causal + padding, packed sequences, sliding windows) runs the reference path.


def _key_padding_varlen(module, query, key, value, mask, dropout, scaling, is_causal, kwargs):
    """Bidirectional attention with a key-padding mask (BERT-style padded batches): each sequence's valid keys
    are a prefix, the same for every query row. Run the kernel per sequence on its valid keys (what SDPA with
    that mask computes, padded query rows included). Eager only: the lengths are read from the mask.
    Returns (B, Nq, Hq, D) or None when the mask is anything else."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if (causal or dropout != 0.0 or torch.compiler.is_compiling() or mask.dtype != torch.bool or mask.dim() != 4
            or mask.shape[1] != 1 or mask.shape[0] != query.shape[0] or mask.shape[2] != query.shape[2]
            or mask.shape[3] != key.shape[2]
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
            or kwargs.get("s_aux") is not None):
        return None
    query, key, value = autocast_qkv(query, key, value)
    if _kernel_reason(query, key, value) is not None:
        return None
    keep = mask[:, 0, 0, :]  # (B, Nk)
    lengths = keep.sum(-1)  # (B,)
    prefix = torch.arange(keep.shape[1], device=keep.device)[None, :] < lengths[:, None]
    if not bool((mask == keep[:, None, None, :]).all()) or not bool((keep == prefix).all()) or not bool(
            (lengths > 0).all()):
        return None
    outs = []
    for b, n in enumerate(lengths.tolist()):
        kb, vb = key[b: b + 1, :, :n], value[b: b + 1, :, :n]
        outs.append(flash_attention(query[b: b + 1], kb, vb, causal=False, softmax_scale=scaling))
    return torch.cat(outs).transpose(1, 2).contiguous()  # (B, Nq, Hq, D)


_EAGER_ONLY_KWARGS = ("softcap", "s_aux")  # logit softcapping (Gemma 2), attention sinks (GPT-OSS): SDPA has neither


def make_hf_attention(hf_fallback, eager_fallback=None):
    """hf_fallback: transformers' sdpa_attention_forward (the reference for calls the kernel cannot express).
    eager_fallback: the model's own eager attention (for calls SDPA cannot compute either: softcapping, sinks, or a
    module marked `_fmkernels_eager` because its model declares `_supports_sdpa = False`)."""

    def fallback(module, *args, **kwargs):
        if eager_fallback is not None and (getattr(module, "_fmkernels_eager", False)
                                           or any(kwargs.get(k) is not None for k in _EAGER_ONLY_KWARGS)):
            return eager_fallback(module, *args, **kwargs)
        return hf_fallback(module, *args, **kwargs)

    def fmkernels_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                    is_causal=None, **kwargs):
        stats = getattr(module, "_fmkernels_stats", None)
        why = None
        if attention_mask is not None:
            out = _key_padding_varlen(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
            if out is not None:
                count(stats, "attention_fused_varlen")
                return out, None
            why = "mask"
        elif dropout != 0.0:
            why = "dropout"
        elif any(kwargs.get(k) is not None for k in _EAGER_ONLY_KWARGS):
            why = next(k for k in _EAGER_ONLY_KWARGS if kwargs.get(k) is not None)
        elif kwargs.get("position_bias") is not None:
            why = "position_bias"
        else:
            query, key, value = autocast_qkv(query, key, value)
            why = _kernel_reason(query, key, value)
        if why is not None:
            count(stats, f"attention_fallback_{why}")
            return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                            is_causal=is_causal, **kwargs)
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        Nq = query.shape[2]
        causal = bool(causal) and Nq > 1  # decode step (Nq = 1): the query sees every cached key
        if causal and key.shape[2] > Nq:  # empty static cache prefill: top-left alignment, as SDPA does
            key, value = key[:, :, :Nq], value[:, :, :Nq]
        count(stats, "attention_fused")
        out = flash_attention(query, key, value, causal=causal, softmax_scale=scaling)  # (B, Hq, Nq, D)
        return out.transpose(1, 2).contiguous(), None  # (B, Nq, Hq, D)

    return fmkernels_attention_forward

