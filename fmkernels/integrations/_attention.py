"""Attention entry points used by patch(): the fused-kernel call, the plain-PyTorch SDPA interceptor, and the
Hugging Face `AttentionInterface` function. No transformers import here (the HF fallback is passed in).

Which calls the kernel can take is decided in one place, `fmkernels.nn.attention.sdpa_fallback_reason`; the
plain-PyTorch interceptor is that module's SDPA drop-in plus the report's counters.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..nn.attention import scaled_dot_product_attention, sdpa_fallback_reason
from ..ops import flash_attention, flash_attention_varlen


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
    """F.scaled_dot_product_attention semantics; the fused kernel where it can express the call (a padding or
    packed-document mask through the varlen / key-range kernels), else SDPA (fmkernels.nn.scaled_dot_product_attention),
    counted in the report."""
    if attn_mask is not None and dropout_p == 0.0 and (enable_gqa or key.shape[1] == query.shape[1]):
        out = mask_kernel(query, key, value, attn_mask, scale)
        if out is not None:
            count(stats, "attention_fused_varlen")
            return out.transpose(1, 2)
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
#   Masks (mask_kernel): key padding, left or right, causal or not (padded batches, left-padded generate) runs
#   flash_attention(seqused_k=, seqstart_k=); block-diagonal causal masks (packed documents, from restarting
#   position_ids) and the cu_seq_lens_q/k keyword arguments run flash_attention_varlen on the flattened rows;
#   any other mask (holes, sliding windows) runs the reference path, counted as attention_fallback_mask.


def _intervals(m: torch.Tensor):
    """m: bool (B, Nq, Nk). Per row: first and one-past-last visible key (lo, hi), and whether it sees any."""
    nk = m.shape[-1]
    any_row = m.any(-1)
    lo = m.int().argmax(-1)
    hi = nk - m.flip(-1).int().argmax(-1)
    return any_row, torch.where(any_row, lo, 0), torch.where(any_row, hi, 0)


def _causal_br(nq: int, nk: int, device) -> torch.Tensor:
    i = torch.arange(nq, device=device)[:, None] + (nk - nq)
    return torch.arange(nk, device=device)[None, :] <= i  # (Nq, Nk) bottom-right aligned


def analyze_mask(mask: torch.Tensor, nq: int, nk: int):
    """What a boolean (B, 1, Nq, Nk) mask (True = attend) is, when the kernels can run it without it:
      ("range", causal, key_start, key_end): causal (bottom-right) or not, batch entry b sees keys
          [key_start[b], key_end[b]) (left / right padding, padded generate);
      ("packed", cu_seqlens, max_len): Nq == Nk, causal within documents packed along each row of the batch
          (block-diagonal causal, as transformers builds from restarting position_ids);
      None otherwise. Reads the mask (host syncs): eager only; the caller caches the answer per mask tensor."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2:] != (nq, nk):
        return None
    m = mask[:, 0]  # (B, Nq, Nk)
    B = m.shape[0]
    any_row, lo, hi = _intervals(m)
    ks = torch.where(any_row, lo, nk).amin(-1)  # (B,)
    ke = hi.amax(-1)
    ke = torch.maximum(ke, ks)
    j = torch.arange(nk, device=m.device)
    keys = (j[None, :] >= ks[:, None]) & (j[None, :] < ke[:, None])  # (B, Nk)
    causal = _causal_br(nq, nk, m.device)
    exp_full = keys[:, None, :].expand(B, nq, nk)
    exp_causal = exp_full & causal
    checks = [(m == exp_causal).all(), (m == exp_full).all()]
    packed = nq == nk
    if packed:  # each row starts its document's keys: rows where lo == i start a document
        i = torch.arange(nq, device=m.device)
        starts = (lo == i[None, :]) & any_row  # (B, N)
        doc = starts.int().cumsum(-1)  # (B, N): document id, 0 before the first start
        exp_packed = (doc[:, :, None] == doc[:, None, :]) & causal & (doc[:, :, None] > 0)
        checks.append((m == exp_packed).all())
    ok = torch.stack(checks).tolist()  # one sync
    if ok[0] or ok[1]:
        return ("range", bool(ok[0]), ks.to(torch.int32), ke.to(torch.int32))
    if packed and ok[2] and bool(any_row.all()):
        bounds = torch.nonzero(starts.reshape(-1)).flatten()  # row 0 of every batch entry starts a document
        cu = torch.cat([bounds, torch.tensor([B * nq], device=m.device)]).to(torch.int32)
        return ("packed", cu, int(cu.diff().max().item()))
    return None


_MASK_CACHE: list = [None]  # (weakref to the mask, its version, nq, nk, analysis): layers share one mask


def analyze_mask_cached(mask: torch.Tensor, nq: int, nk: int):
    c = _MASK_CACHE[0]
    if c is not None and c[0]() is mask and c[1] == mask._version and c[2:4] == (nq, nk):
        return c[4]
    res = analyze_mask(mask, nq, nk)
    try:
        _MASK_CACHE[0] = (weakref.ref(mask), mask._version, nq, nk, res)
    except TypeError:
        pass
    return res


def _packed_call(query, key, value, cu_q, cu_k, max_q, max_k, causal, scaling):
    """(B, H, N, D) rows flattened to (B*N, H, D), the varlen kernel, back to (B, Nq, Hq, D)."""
    B, Hq, Nq, D = query.shape
    flat = lambda x: x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])  # noqa: E731  (B*N, H, D)
    out = flash_attention_varlen(flat(query), flat(key), flat(value), cu_q, cu_k, max_q, max_k,
                                           causal=causal, softmax_scale=scaling)
    return out.view(B, Nq, Hq, D)


def mask_kernel(query, key, value, mask, scaling, kwargs=None):
    """The fused kernels for a masked call they can express: packed sequences given as flash-attention keyword
    arguments (cu_seq_lens_q/k, max_length_q/k), or a boolean mask that is key padding (left or right, causal or
    not) or block-diagonal causal (packed documents). Returns (B, Nq, Hq, D), or None (the caller falls back).
    Eager only: reading the mask needs the host."""
    if torch.compiler.is_compiling():
        return None
    query, key, value = autocast_qkv(query, key, value)
    if _kernel_reason(query, key, value) is not None:
        return None
    B, Hq, Nq, D = query.shape
    Nk = key.shape[2]
    kwargs = kwargs or {}
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if isinstance(cu_q, torch.Tensor) and isinstance(cu_k, torch.Tensor):
        cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
        if cu_q.dim() != 1 or cu_q.shape != cu_k.shape or Nq != Nk:
            return None
        if int(cu_q[-1]) != B * Nq or int(cu_k[-1]) != B * Nk:
            return None
        mq = kwargs.get("max_length_q")
        mk = kwargs.get("max_length_k")
        mq = int(mq) if mq is not None else int(cu_q.diff().max())
        mk = int(mk) if mk is not None else int(cu_k.diff().max())
        return _packed_call(query, key, value, cu_q, cu_k, mq, mk, True, scaling)
    if mask is None:
        return None
    info = analyze_mask_cached(mask, Nq, Nk)
    if info is None:
        return None
    if info[0] == "range":
        _, causal, ks, ke = info
        out = flash_attention(query, key, value, causal=causal, softmax_scale=scaling, seqused_k=ke - ks,
                                        seqstart_k=ks)  # (B, Hq, Nq, D)
        return out.transpose(1, 2)
    _, cu, mx = info
    return _packed_call(query, key, value, cu, cu, mx, mx, True, scaling)


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
        packed_kw = kwargs.get("cu_seq_lens_q") is not None
        if (attention_mask is not None or packed_kw) and dropout == 0.0 and kwargs.get("position_bias") is None \
                and kwargs.get("softcap") is None and kwargs.get("s_aux") is None:
            out = mask_kernel(query, key, value, attention_mask, scaling, kwargs)
            if out is not None:
                count(stats, "attention_fused_varlen")
                return out.contiguous(), None
        if attention_mask is not None:
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

