"""Transfer-learning switches of the one training loop (no second trainer):

- init_from: start from a pretrained checkpoint (its weights, architecture and tokenizer) on a new corpus;
- freeze_embeddings / freeze_blocks k: freeze the token embedding (and with it the tied head) and the first k
  blocks (frozen parameters get no gradient and are left out of the optimizer);
- layer_lr_decay d: block i of L trains at lr * d ** (L - i), the embedding at lr * d ** (L + 1), the final
  norm (and an untied head) at lr;
- lora_rank r > 0: LoRA adapters (fmkernels.nn.LoRALinear) on lora_targets, everything else frozen;
  lora_base int8 / int4 quantizes the frozen base first (QLoRA-style).

A LoRA checkpoint stores the adapters next to the frozen base; `load_model` (fmk eval / generate / a later
--from) rebuilds the adapters from the saved config and merges them into dense weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..models.config import ConfigError, TransformerConfig
from .checkpoint import load_checkpoint, resolve_checkpoint


def load_pretrained(path, ck: Optional[dict] = None) -> dict:
    """{model: dense fmk-layout state dict, model_config: TransformerConfig, tokenizer_dir: Path, path: Path}.
    A checkpoint trained with LoRA is merged into dense weights first; a compressed one (2:4, int8, int4) is
    dequantized / densified. ck: the already loaded checkpoint of `path`."""
    cpath = resolve_checkpoint(path) if ck is None else Path(ck["path"])
    ck = load_checkpoint(cpath) if ck is None else ck
    mcfg = TransformerConfig.from_dict(ck["state"]["model_config"])
    from .multitask import strip_task_heads

    sd = strip_task_heads(ck["model"])  # task heads belong to their run; the trunk is what transfers
    cfg = ck["state"].get("config", {})
    from .compress import build_model, densify, is_compressed

    if is_compressed(sd):  # fmk prune / quantize or a sparsity="2:4" run: dense (dequantized) weights
        sd = densify(build_model(mcfg, sd, ck["state"].get("compress"))).state_dict()
    elif int(cfg.get("lora_rank", 0) or 0) > 0:
        from ..models import Transformer

        model = Transformer(mcfg)
        attach_lora(model, cfg)
        model.load_state_dict(sd)
        sd = merge_to_dense(model).state_dict()
    return {"model": sd, "model_config": mcfg, "tokenizer_dir": cpath / "tokenizer", "path": cpath, "checkpoint": ck}


def attach_lora(model: nn.Module, cfg) -> list[str]:
    """Quantize the base (lora_base) and wrap lora_targets in LoRALinear, from a TrainConfig or its dict."""
    from ..nn.lora import apply_lora

    get = (lambda k, d=None: cfg.get(k, d)) if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    base = get("lora_base", "dense") or "dense"
    targets = get("lora_targets", "wqkv,wo,w13,w2")
    if base != "dense":
        _quantize_targets(model, base, targets, get("lora_group_size", None))
    splits = None
    mcfg = getattr(model, "cfg", None)
    if get("hf") and mcfg is not None:  # one adapter per HF projection (q, k, v / gate, up), as PEFT places them
        D = mcfg.head_dim
        parts = {"wqkv": [mcfg.n_heads * D, mcfg.n_kv_heads * D, mcfg.n_kv_heads * D], "w13": [mcfg.ffn_dim] * 2}
        splits = lambda name: parts.get(name.rsplit(".", 1)[-1])
    try:
        return apply_lora(model, int(get("lora_rank")), float(get("lora_alpha", 16.0)), float(get("lora_dropout", 0.0)),
                          targets, splits=splits)
    except ValueError as e:
        raise ConfigError(f"config: lora_targets {targets!r}: {e}") from e


def _quantize_targets(model: nn.Module, kind: str, targets: str, group_size: Optional[int] = None) -> None:
    from ..nn.lora import _matches, _targets
    from ..nn.linear import is_dense_linear
    from ..nn.quantized import Int4Linear, Int8Linear

    tg = _targets(targets)
    cls = Int8Linear if kind == "int8" else Int4Linear
    for name, mod in list(model.named_modules()):
        if is_dense_linear(mod) and _matches(name, tg):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if cls is Int4Linear:
                g = group_size or next((v for v in (128, 64, 32) if mod.in_features % v == 0), 128)
                if mod.in_features % g:
                    raise ConfigError(f"config: lora_group_size {g} must divide in_features "
                                      f"{mod.in_features} of {name} (int4 QLoRA base)")
                setattr(parent, child, cls.from_float(mod, group_size=g))
            else:
                setattr(parent, child, cls.from_float(mod))


def merge_to_dense(model: nn.Module) -> nn.Module:
    from ..nn.lora import merge_lora

    return merge_lora(model)


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


def _block_index(name: str) -> Optional[int]:
    parts = name.split(".")
    if len(parts) > 1 and parts[0] == "layers" and parts[1].isdigit():
        return int(parts[1])
    return None


def lr_scale(name: str, n_layers: int, decay: float) -> float:
    """Layer-wise lr multiplier: top (final norm, untied head) 1, block i decay ** (L - i), embedding
    decay ** (L + 1)."""
    if decay == 1.0:
        return 1.0
    if name.startswith("tok_emb."):
        return decay ** (n_layers + 1)
    blk = _block_index(name)
    if blk is not None:
        return decay ** (n_layers - blk)
    return 1.0


def param_groups(model: nn.Module, weight_decay: float, n_layers: int, decay: float) -> list[dict]:
    """AdamW groups by (lr scale, decay or not); each group carries lr_scale for the loop's schedule."""
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        clean = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
        if clean.startswith("module."):  # DDP
            clean = clean[len("module."):]
        s = lr_scale(clean, n_layers, decay)
        wd = weight_decay if p.dim() >= 2 else 0.0
        g = groups.setdefault((s, wd), {"params": [], "weight_decay": wd, "lr_scale": s})
        g["params"].append(p)
    return list(groups.values())


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return train, total


def merge_checkpoint(path, out_dir) -> Path:
    """Write a dense copy of a (LoRA) checkpoint into out_dir: adapters folded into the weights, LoRA fields of the
    saved config reset, no optimizer state. `fmk eval` / `generate` / `finetune --from` load it like any other."""
    from .checkpoint import list_checkpoints, save_checkpoint

    pre = load_pretrained(path)
    ck = pre["checkpoint"]
    out = Path(out_dir)
    if list_checkpoints(out):
        raise ConfigError(f"merge: out_dir {str(out)!r} already holds checkpoints; choose another out_dir")
    state = dict(ck["state"])
    cfg = dict(state.get("config", {}))
    cfg.update(lora_rank=0, lora_base="dense", out_dir=str(out))
    state.update(config=cfg, merged_from=str(pre["path"]))
    return save_checkpoint(out, int(state.get("step", 0)), pre["model"], {}, state, ck["tokenizer"])
