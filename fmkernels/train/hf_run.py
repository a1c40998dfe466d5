"""Commands on runs of pretrained Hugging Face / GGUF decoders (`fmk finetune --hf`, whose model source is
hf_source.HFModelSource): the Python entry point `finetune_hf`, and what `fmk eval`, `fmk generate` and
`fmk export` do with such a run.

A LoRA run's checkpoints hold the adapters (lora_A / lora_B) and the optimizer state only; the base is rebuilt from
the `hf` path recorded in the run, and its fingerprint (hf_source.fingerprint) must match, so an adapter is never
applied to another base model. A full fine-tuning run's checkpoints hold all weights.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from ..data.sft import SFTData, prepare_sft
from ..models.config import ConfigError
from . import hf_source
from .checkpoint import load_checkpoint, resolve_checkpoint
from .hf_source import is_adapter_key  # noqa: F401  (re-exported for tests)
from ..nn.lora import LoRALinear
from .config import TrainConfig
from .model_source import attach_lora, merge_to_dense
from .trainer import train

def is_hf_run(ck: dict) -> bool:
    return bool(ck["state"].get("hf")) or bool(ck["state"].get("config", {}).get("hf"))


def load_run(path, hf: Optional[str] = None, merge: bool = True, log=lambda m: None):
    """(model, tokenizer, checkpoint, source) of a --hf run: the base from its recorded path (or `hf`), adapters
    loaded and, with merge, folded into dense weights."""
    ck = load_checkpoint(resolve_checkpoint(path))
    cfg = ck["state"]["config"]
    src = hf_source.load_source(hf or cfg["hf"], ck["state"]["model_config"]["max_seq_len"], False, log)
    hf_source.check_fingerprint(ck, src.fingerprint, hf or cfg["hf"])
    model = src.model
    adapters_only = int(cfg.get("lora_rank", 0) or 0) > 0
    if adapters_only:
        attach_lora(model, cfg)
        model.load_state_dict(hf_source.merge_adapters(model, ck["model"]))
    else:
        model.load_state_dict(ck["model"])
    if adapters_only and merge:
        merge_to_dense(model)
    model.eval()
    return model, ck["tokenizer"], ck, src


@torch.no_grad()
def evaluate_run(path, data: Optional[str] = None, max_tokens: Optional[int] = None, batch_size: int = 4,
                 hf: Optional[str] = None) -> dict:
    """Held-out loss (nats per loss token), perplexity and bits per byte of a --hf run (or, with `hf` and no run,
    of the base model) on the held-out split of `data` (default: the run's data)."""
    if path is not None:
        model, tok, ck, src = load_run(path, hf)
        cfg = ck["state"]["config"]
        seq_len = ck["state"]["model_config"]["max_seq_len"]
    else:
        src = hf_source.load_source(hf, None)  # the model's positions (held-out loss does not depend on packing)
        model, tok, ck, cfg, seq_len = src.model.eval(), src.tokenizer, None, {}, min(512, src.mcfg.max_seq_len)
    data = data or cfg.get("data")
    if data is None:
        raise ConfigError("eval: give --data FILE (the run has no data file recorded)")
    sft = prepare_sft(data, tok, seq_len, cfg.get("val_fraction", 0.05), cfg.get("train_on", "completion"),
                      cfg.get("text_field", "text"), False, log=lambda m: None)
    return evaluate_model(model, sft, batch_size, max_tokens) | dict(
        checkpoint=str(ck["path"]) if ck else None, step=ck["state"]["step"] if ck else 0, data=str(data))


def evaluate_model(model, sft: SFTData, batch_size: int = 4, max_tokens: Optional[int] = None, autocast=None) -> dict:
    r = sft.evaluate(model, batch_size, max_tokens, autocast)
    return dict(val_loss=r["loss"], val_ppl=r["ppl"], val_bpb=r["bpb"], tokens=r["tokens"], bytes=r["bytes"],
                eval_s=r["eval_s"])


# ------------------------------------------------------------------------------------------------ export


def _fresh_out(out_dir) -> tuple[Path, Path]:
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"export: out_dir {str(out)!r} exists and is not empty; choose another (nothing written)")
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return out, tmp


def _finish(tmp: Path, out: Path) -> Path:
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out


def export_run(path, out_dir, peft: bool = False, hf: Optional[str] = None) -> Path:
    """Write a --hf run as a Hugging Face directory (merged weights, config.json, tokenizer files) or, with peft,
    as a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) for the run's base model. The output
    is written beside out_dir and renamed into place when complete."""
    ck0 = load_checkpoint(resolve_checkpoint(path))
    if not is_hf_run(ck0):
        raise ConfigError(f"export: {path} is not a run of `fmk finetune --hf` (export writes Hugging Face formats)")
    cfg = ck0["state"]["config"]
    if peft and int(cfg.get("lora_rank", 0) or 0) == 0:
        raise ConfigError("export: --peft needs a LoRA run (lora_rank > 0); this run fine-tuned all weights")
    out, tmp = _fresh_out(out_dir)
    try:
        model, tok, ck, src = load_run(path, hf, merge=not peft)
        hfc = hf_source.hf_config_from_dict(ck["state"]["hf"]["config"])
        if peft:
            _write_peft(model, cfg, src, hfc, tmp)
        else:
            from transformers import AutoModelForCausalLM

            hf_model = AutoModelForCausalLM.from_config(hfc, dtype=torch.float32)
            sd = hf_source.fmk_to_hf({k: v.detach().float().cpu() for k, v in model.state_dict().items()},
                                     model.cfg)
            missing, unexpected = hf_model.load_state_dict(sd, strict=False)
            if [k for k in missing if "rotary" not in k] or unexpected:
                raise ConfigError(f"export: layout mismatch (missing {missing[:4]}, unexpected {unexpected[:4]})")
            hf_model.save_pretrained(str(tmp), safe_serialization=True)
            tok.tok.save_pretrained(str(tmp))
        (tmp / "fmk_export.json").write_text(json.dumps(dict(checkpoint=str(ck["path"]), step=ck["state"]["step"],
                                                             base=cfg["hf"], peft=peft), indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _finish(tmp, out)


PEFT_NAMES = {"wqkv": ("self_attn", ("q_proj", "k_proj", "v_proj")), "wo": ("self_attn", ("o_proj",)),
              "w13": ("mlp", ("gate_proj", "up_proj")), "w2": ("mlp", ("down_proj",))}


def _write_peft(model, cfg, src, hfc, out: Path) -> None:
    """Our adapters -> PEFT's: a fused projection's part i is PEFT's module i with A = rows i*r.. of our A and
    B = its rows of our B (the same product), written by peft itself on a base built from the config."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    r = int(cfg["lora_rank"])
    targets, weights = set(), {}
    for name, m in model.named_modules():
        if not isinstance(m, LoRALinear):
            continue
        parts = name.split(".")  # layers.i.attn.wqkv
        layer, leaf = parts[1], parts[-1]
        if leaf not in PEFT_NAMES:
            raise ConfigError(f"export --peft: adapter on {name} has no PEFT counterpart")
        sub, names = PEFT_NAMES[leaf]
        A = m.lora_A.detach().float().cpu()
        Bs = m.lora_B.detach().float().cpu().split(m.splits)
        if len(Bs) != len(names):
            raise ConfigError(f"export --peft: {name} has one adapter over the fused projection; PEFT needs one per "
                              f"{'/'.join(names)} (train with --hf, which splits them)")
        for j, (nm, Bj) in enumerate(zip(names, Bs)):
            targets.add(nm)
            key = f"model.layers.{layer}.{sub}.{nm}"
            weights[key] = (A[j * r:(j + 1) * r].clone(), Bj.clone())
    base = AutoModelForCausalLM.from_config(hfc, dtype=torch.float32)
    lcfg = LoraConfig(r=r, lora_alpha=float(cfg.get("lora_alpha", 16.0)), lora_dropout=float(cfg.get("lora_dropout", 0.0)),
                      target_modules=sorted(targets), bias="none", task_type="CAUSAL_LM")
    pm = get_peft_model(base, lcfg)
    n = 0
    for name, mod in pm.named_modules():
        for key, (A, B) in weights.items():
            if name.endswith(key) and hasattr(mod, "lora_A"):
                with torch.no_grad():
                    mod.lora_A["default"].weight.copy_(A)
                    mod.lora_B["default"].weight.copy_(B)
                n += 1
    if n != len(weights):
        raise ConfigError(f"export --peft: placed {n} of {len(weights)} adapters")
    pm.peft_config["default"].base_model_name_or_path = str(cfg["hf"])
    pm.save_pretrained(str(out))


# ------------------------------------------------------------------------------------------------ entry point


def finetune_hf(hf: str, data: Optional[str] = None, out_dir: str = "runs/hf", **fields) -> dict:
    """The Python twin of `fmk finetune --hf PATH --data FILE ...`: any TrainConfig field as a keyword
    (lora_rank=16, max_steps=100, dtype="bf16", ...); returns the run summary."""
    overrides = dict(hf_defaults(fields), hf=hf, out_dir=out_dir, **fields)
    if data is not None:
        overrides["data"] = data
    return train(TrainConfig.build(None, overrides))


def hf_defaults(given: dict) -> dict:
    """Defaults of a --hf run for the fields the caller did not give (fine-tuning, not pretraining)."""
    lora = int(given.get("lora_rank", 0) or 0) > 0
    d = dict(lr=2e-4 if lora else 2e-5, weight_decay=0.0, warmup_steps=10, seq_len=512, batch_size=4,
             eval_every=50, save_every=50, eval_tokens=16384, sample_tokens=0, min_lr_ratio=0.1)
    return {k: v for k, v in d.items() if k not in given}
