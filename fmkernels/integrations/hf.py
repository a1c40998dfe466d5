"""Hugging Face transformers 5.x support for fmkernels.patch (imported only when a transformers model is patched).

attention     every model using the AttentionInterface (Llama, Mistral, Qwen2/3, BERT, GPT-2, ...): the
              "fmkernels" attention function + mask function (sdpa_mask) are registered once, and
              set_attn_implementation("fmkernels") is applied to the outermost transformers models in the tree.
rms_norm      Llama-family RMSNorm classes (weight * normalized, no offset) -> fmkernels.ops.rms_norm.
rope          Llama-family attention classes: their forward runs with `apply_rotary_pos_emb` bound to
              fmkernels.ops.rope (same code object, private globals: other instances are untouched).
swiglu        Llama-family MLPs with SiLU: down(swiglu(gate(x), up(x))).
cross_entropy Llama-family *ForCausalLM in training with labels: fused linear + cross-entropy on the last
              hidden state, logits never materialized (the output's logits are None then).
"""
from __future__ import annotations

import inspect
import sys
import types

import torch
import torch.nn.functional as F
from torch import nn

import transformers
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .. import ops
from . import _attention as attn
from ._undo import set_attr, swap_class, swapped_class

NAME = "fmkernels"
# Model families whose RMSNorm / rotary / MLP / CausalLM code is the Llama code (checked by class name and module).
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")

_registered = False


def register() -> None:
    """Register the "fmkernels" attention and mask functions with transformers (idempotent)."""
    global _registered
    if not _registered:
        AttentionInterface.register(NAME, attn.make_hf_attention(sdpa_attention_forward, eager_attention))
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _registered = True


def eager_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """The attention module's own `eager_attention_forward` (from its modeling file: Gemma 2's applies softcapping,
    GPT-OSS's its sinks), fed what the "fmkernels" mask function (sdpa_mask) built: a bool mask (True = attend)
    becomes the additive mask eager code expects, and no mask with a causal module becomes SDPA's is_causal mask
    (top-left aligned: Nq > 1 and Nk > Nq only happens on prefill into an empty static cache)."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    Nq, Nk = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    mask = attention_mask
    if mask is None and causal and Nq > 1:
        i = torch.arange(Nq, device=query.device)[:, None]
        mask = (i >= torch.arange(Nk, device=query.device)[None, :])[None, None]  # (1, 1, Nq, Nk)
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~mask, torch.finfo(query.dtype).min)
    return eager(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def hf_models(model: nn.Module) -> list:
    """The outermost transformers PreTrainedModels in `model`'s tree (the model itself, or e.g. inside PEFT)."""
    out, inside = [], set()
    for m in model.modules():
        if isinstance(m, PreTrainedModel) and id(m) not in inside:
            out.append(m)
            inside.update(id(x) for x in m.modules())
    return out


def _family(m: nn.Module):
    mod = type(m).__module__
    for fam in LLAMA_FAMILY:
        if mod == f"transformers.models.{fam}.modeling_{fam}":
            return fam
    return None


def _prefix(fam: str) -> str:
    return {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[fam]


# ------------------------------------------------------------------------------------------------- attention


def _attention(model, state, report):
    register()
    n = 0
    refused = []
    for pm in hf_models(model):
        configs = {}  # every config set_attn_implementation may touch: the modules' and their sub-configs
        todo = [getattr(m, "config", None) for m in pm.modules()]
        while todo:
            cfg = todo.pop()
            if isinstance(cfg, transformers.PreTrainedConfig) and id(cfg) not in configs:
                configs[id(cfg)] = (cfg, cfg._attn_implementation_internal)
                todo.extend(getattr(cfg, k, None) for k in getattr(cfg, "sub_configs", {}) or {})
        pm.set_attn_implementation(NAME)
        if pm.config._attn_implementation != NAME:
            refused.append(type(pm).__name__)

        def undo(configs=configs):
            for cfg, impl in configs.values():
                cfg._attn_implementation_internal = impl

        state.undo.append(undo)
        for m in pm.modules():
            cfg = getattr(m, "config", None)
            if hasattr(m, "is_causal") and cfg is not None and getattr(cfg, "_attn_implementation", None) == NAME:
                set_attr(state, m, "_fmkernels_stats", report.calls)
                if not getattr(type(pm), "_supports_sdpa", True):  # e.g. Gemma 2: fall back to its eager code
                    set_attr(state, m, "_fmkernels_eager", True)
                n += 1
    if refused:
        report.notes.append(f"attention: {', '.join(refused)} refused set_attn_implementation (not on the "
                            "AttentionInterface)")
    return n, None if n else "no attention module uses transformers' AttentionInterface"


# ------------------------------------------------------------------------------------------------- rms_norm


def _rms_forward(self, hidden_states):
    return ops.rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _rms_norm(model, state, report):
    n = 0
    for m in model.modules():
        fam = _family(m)
        if fam and type(m).__name__ == f"{_prefix(fam)}RMSNorm" and hasattr(m, "variance_epsilon"):
            swap_class(state, m, swapped_class(type(m), "rms_norm", {"forward": _rms_forward}))
            n += 1
    return n, None if n else "no Llama-family RMSNorm module (other norms, e.g. LayerNorm, are left alone)"


# ------------------------------------------------------------------------------------------------- rope


def _make_rope(orig):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        # q: (B, Hq, N, D), k: (B, Hkv, N, D); cos/sin: (Bc, N, D) with the two halves equal (HF rotate_half).
        # The kernel takes one position table for the whole batch: used when Bc == 1 (positions shared by
        # every row: training, unpadded inference); per-row positions (left-padded generate) use HF's code.
        D = q.shape[-1]
        if unsqueeze_dim != 1 or cos.dim() != 3 or cos.shape[0] != 1 or cos.shape[-1] != D or D % 2 \
                or q.dim() != 4 or k.dim() != 4 or k.dtype != q.dtype or cos.shape[1] != q.shape[2]:
            return orig(q, k, cos, sin, unsqueeze_dim)
        qr, kr = ops.rope(q.transpose(1, 2), k.transpose(1, 2), cos[0, :, : D // 2], sin[0, :, : D // 2])
        return qr.transpose(1, 2), kr.transpose(1, 2)  # (B, H, N, D) views

    return apply_rotary_pos_emb


_ROPE_FORWARDS: dict = {}


def _rope_forward_for(cls):
    """cls.forward's code with `apply_rotary_pos_emb` rebound to fmkernels.ops.rope (None if not applicable)."""
    if cls in _ROPE_FORWARDS:
        return _ROPE_FORWARDS[cls]
    inner = inspect.unwrap(cls.forward)
    g = inner.__globals__
    fwd = None
    if "apply_rotary_pos_emb" in inner.__code__.co_names and callable(g.get("apply_rotary_pos_emb")):
        g2 = dict(g)
        g2["apply_rotary_pos_emb"] = _make_rope(g["apply_rotary_pos_emb"])
        fn = types.FunctionType(inner.__code__, g2, inner.__name__, inner.__defaults__, inner.__closure__)
        fn.__kwdefaults__ = inner.__kwdefaults__
        takes_cache = "cache" in inspect.signature(inner).parameters

        def forward(self, *args, **kwargs):
            if takes_cache and "past_key_values" in kwargs and "cache" not in kwargs:
                kwargs["cache"] = kwargs.pop("past_key_values")  # what the deprecate_kwarg wrapper does
            return fn(self, *args, **kwargs)

        fwd = forward
    _ROPE_FORWARDS[cls] = fwd
    return fwd


def _rope(model, state, report):
    n = 0
    for m in model.modules():
        fam = _family(m)
        if fam and type(m).__name__ == f"{_prefix(fam)}Attention":
            fwd = _rope_forward_for(type(m))
            if fwd is not None:
                swap_class(state, m, swapped_class(type(m), "rope", {"forward": fwd}))
                n += 1
    if n:
        report.notes.append("rope: batches with per-row position_ids (e.g. left-padded generate) use HF's RoPE")
    return n, None if n else "no Llama-family attention module (RoPE is recognised in Llama/Mistral/Qwen2/Qwen3)"


# ------------------------------------------------------------------------------------------------- swiglu


def _mlp_forward(self, x):
    return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _swiglu(model, state, report):
    n = 0
    for m in model.modules():
        fam = _family(m)
        if fam and type(m).__name__ == f"{_prefix(fam)}MLP" and _is_silu(getattr(m, "act_fn", None)):
            swap_class(state, m, swapped_class(type(m), "swiglu", {"forward": _mlp_forward}))
            n += 1
    return n, None if n else "no Llama-family SiLU-gated MLP (GPT-2/BERT MLPs use GELU and are left alone)"


# ------------------------------------------------------------------------------------------------- cross_entropy


# The fused loss runs with the op's own chunk policy (fmkernels.ops.cross_entropy.default_chunk_size: ~16 MiB of
# logits, >= 256 tokens in fp32, >= 1024 in 16-bit). 1024 tokens x vocab 32000 x hidden 512, fwd+bwd, 2 cores
# Zen 4, medians of 5 alternating, two runs, against the 8M-logit chunks this integration used before (262 tokens):
# fp32 256 tokens 577 / 642 ms vs 622 / 637 (a tie); bf16 autocast 1024 tokens 337 / 349 ms vs 416 / 429.
# (Unfused F.linear + F.cross_entropy, fp32: 784 ms.)


def _causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                       inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
    if "past_key_values" in kwargs and cache is None:
        cache = kwargs.pop("past_key_values")
    orig = self._fmkernels_orig_class.forward
    stats = self.__dict__.get("_fmkernels_stats")
    if (labels is None or not self.training or not torch.is_grad_enabled() or torch.compiler.is_compiling()
            or type(self.lm_head) is not nn.Linear or not isinstance(logits_to_keep, int) or logits_to_keep != 0
            or kwargs.get("return_dict") is False):
        if labels is not None:
            attn.count(stats, "cross_entropy_unfused")
        return orig(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    cache=cache, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                    logits_to_keep=logits_to_keep, **kwargs)
    num_items = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
    h = outputs.last_hidden_state  # (B, N, H)
    if shift_labels is None:  # tokens < n predict n (as transformers' ForCausalLMLoss)
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    reduction = "sum" if num_items is not None else "mean"
    loss = ops.linear_cross_entropy(
        h, self.lm_head.weight, shift_labels.to(h.device).contiguous(), self.lm_head.bias,
        ignore_index=ignore_index, reduction=reduction,
    )
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    attn.count(stats, "cross_entropy_fused")
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return CausalLMOutputWithPast(loss=loss, logits=None, cache=outputs.cache, hidden_states=outputs.hidden_states,
                                  attentions=outputs.attentions)


def _cross_entropy(model, state, report):
    n = 0
    for m in model.modules():
        fam = _family(m)
        if fam and type(m).__name__ == f"{_prefix(fam)}ForCausalLM" and hasattr(m, "lm_head") and hasattr(m, "model"):
            set_attr(state, m, "_fmkernels_stats", report.calls)
            swap_class(state, m, swapped_class(type(m), "cross_entropy", {"forward": _causal_lm_forward}))
            n += 1
    if n:
        report.notes.append("cross_entropy: fused only in training with labels (outputs.logits is None then); "
                            "eval, no-grad and torch.compile'd calls compute logits as before")
    return n, None if n else "no Llama-family *ForCausalLM head"


_KINDS = {"attention": _attention, "rms_norm": _rms_norm, "rope": _rope, "swiglu": _swiglu,
          "cross_entropy": _cross_entropy}


def apply(kind, model, state, report):
    return _KINDS[kind](model, state, report)
