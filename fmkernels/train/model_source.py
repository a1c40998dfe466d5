"""The bottom of the trainer: checkpoints and presets -> models. Imports nothing from fmkernels/train/ but the
checkpoint file format.

- `ModelSource` (the seam the trainer builds its model through): a tokenizer to encode the data with, a model
  config, the model with its weights, and the state-dict layout a checkpoint stores. Built in: `CheckpointSource`
  (--from / init_from: an fmk checkpoint or run directory) and `ScratchSource` (a preset plus overrides); other
  sources (a Hugging Face directory, a GGUF file) register with `register_model_source`.
- Loading a checkpoint as a model: `load_pretrained` (dense trunk weights: LoRA merged, compressed layers densified,
  task heads stripped), `load_model` (for fmk eval / generate: compressed layers kept so their kernels run),
  `build_model` / `apply_structure` (rebuild 2:4 / int8 / int4 layers from a state dict), `densify`,
  `attach_lora` / `merge_to_dense` (LoRA adapters, QLoRA bases).
"""
from __future__ import annotations

import dataclasses
import importlib
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..models import PlainTransformer, Transformer, TransformerConfig, fmk_to_plain_state_dict, plain_to_fmk_state_dict
from ..models.config import ConfigError
from ..nn.linear import is_dense_linear
from ..nn.lora import _matches, _targets, apply_lora, merge_lora
from ..nn.quantized import Int4Linear, Int8Linear
from ..nn.sparse import SparseLinear
from .checkpoint import load_checkpoint, load_weights, resolve_checkpoint
from .rundir import as_trained


# ---------------------------------------------------------------------------------------------------- structure
def compressed_modules(sd: dict) -> dict:
    """{module fqn: "2:4" | "int8" | "int4"} for every compressed module whose state is in the state dict."""
    out = {}
    for k, v in sd.items():
        if k.endswith(".meta") and k[: -len(".meta")] + ".values" in sd:
            out[k[: -len(".meta")]] = "2:4"
        elif k.endswith(".weight_packed"):
            out[k[: -len(".weight_packed")]] = "int8" if v.dtype == torch.int8 else "int4"
    return out


def is_compressed(sd: dict) -> bool:
    return bool(compressed_modules(sd))


def is_lora_checkpoint(ck: dict) -> bool:
    """Was this checkpoint trained with LoRA adapters (lora_rank > 0 in its saved config)?"""
    return int((ck["state"].get("config") or {}).get("lora_rank", 0) or 0) > 0


def strip_task_heads(state_dict: dict) -> dict:
    """A checkpoint's trunk weights (what `fmk eval` / `generate` / `finetune --from` load): task heads dropped."""
    return {k: v for k, v in state_dict.items() if not k.startswith("task_heads.")}


def _set(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_structure(model: nn.Module, sd: dict, spec: Optional[dict] = None) -> nn.Module:
    """Replace the nn.Linear layers that hold compressed state in `sd` by empty compressed modules of that format
    (load_state_dict then fills them)."""
    spec = spec or {}
    for fqn, kind in compressed_modules(sd).items():
        try:
            lin = model.get_submodule(fqn)
        except AttributeError:
            raise ConfigError(f"checkpoint: compressed module {fqn!r} does not exist in the model") from None
        if not isinstance(lin, nn.Linear):
            raise ConfigError(f"checkpoint: compressed module {fqn!r} is a {type(lin).__name__}, not an nn.Linear")
        bias = f"{fqn}.bias" in sd
        K, N = lin.in_features, lin.out_features
        if kind == "2:4":
            new = SparseLinear(K, N, bias, format="2:4")
        elif kind == "int8":
            new = Int8Linear(K, N, bias)
        else:
            G = sd[f"{fqn}.weight_scale"].shape[0]  # groups over K padded to the group size
            gs = spec.get("group_size") or next((g for g in (32, 64, 128, 256) if -(-K // g) == G), K // G)
            new = Int4Linear(K, N, bias, group_size=gs, symmetric=bool(spec.get("symmetric", False)),
                             act_terms=int(spec.get("act_terms", 2)))
        _set(model, fqn, new)
    return model


def build_model(mcfg: TransformerConfig, sd: dict, spec: Optional[dict] = None) -> Transformer:
    """A Transformer with the structure (dense or compressed) of `sd`, loaded from it, in eval mode."""
    model = apply_structure(Transformer(mcfg), sd, spec)
    model.load_state_dict(sd)
    return model.eval()


@torch.no_grad()
def densify(model: nn.Module) -> nn.Module:
    """Every SparseLinear / Int8Linear / Int4Linear -> nn.Linear holding its (dequantized) dense weight."""
    for fqn, m in list(model.named_modules()):
        if isinstance(m, SparseLinear):
            _set(model, fqn, m.to_dense())
        elif isinstance(m, (Int8Linear, Int4Linear)):
            w = m.dequantized_weight()[: m.out_features, : m.in_features].float()
            lin = nn.Linear(m.in_features, m.out_features, m.bias is not None)
            lin.weight.copy_(w)
            if m.bias is not None:
                lin.bias.copy_(m.bias)
            _set(model, fqn, lin)
    return model


# ---------------------------------------------------------------------------------------------------- LoRA
def attach_lora(model: nn.Module, cfg) -> list[str]:
    """Quantize the base (lora_base) and wrap lora_targets in LoRALinear, from a TrainConfig or its dict."""
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
    """int8 / int4 frozen bases for QLoRA; int4 group size: group_size, or per layer the one of 128, 64, 32 that pads
    in_features least, the largest on a tie (SmolLM2's 576 takes 64; Int4Linear zero-pads a partial last group)."""
    tg = _targets(targets)
    cls = Int8Linear if kind == "int8" else Int4Linear
    for name, mod in list(model.named_modules()):
        if is_dense_linear(mod) and _matches(name, tg):
            if cls is Int4Linear:
                k = mod.in_features
                g = group_size or min((128, 64, 32), key=lambda v: (-(-k // v) * v - k, -v))
                _set(model, name, cls.from_float(mod, group_size=g))
            else:
                _set(model, name, cls.from_float(mod))


def merge_to_dense(model: nn.Module) -> nn.Module:
    return merge_lora(model)


# ---------------------------------------------------------------------------------------------------- loading
def load_pretrained(path, ck: Optional[dict] = None) -> dict:
    """{model: dense fmk-layout state dict, model_config: TransformerConfig, tokenizer_dir: Path, path: Path,
    checkpoint: the loaded checkpoint}. A checkpoint trained with LoRA is merged into dense weights first (a QLoRA
    base dequantized); a compressed one (2:4, int8, int4) is densified. ck: the already loaded checkpoint of `path`."""
    cpath = resolve_checkpoint(path) if ck is None else Path(ck["path"])
    ck = load_checkpoint(cpath) if ck is None else ck
    mcfg = TransformerConfig.from_dict(ck["state"]["model_config"])
    sd = strip_task_heads(ck["model"])  # task heads belong to their run; the trunk is what transfers
    cfg = ck["state"].get("config", {})
    # LoRA first: a QLoRA checkpoint's frozen base is int8 / int4 (`...wo.base.weight_packed`), which is_compressed
    # also sees; those modules only exist once the adapters are attached.
    if is_lora_checkpoint(ck):
        model = Transformer(mcfg)
        attach_lora(model, cfg)
        model.load_state_dict(sd)
        sd = densify(merge_to_dense(model)).state_dict()
    elif is_compressed(sd):  # fmk prune / quantize or a sparsity="2:4" run: dense (dequantized) weights
        sd = densify(build_model(mcfg, sd, ck["state"].get("compress"))).state_dict()
    return {"model": sd, "model_config": mcfg, "tokenizer_dir": cpath / "tokenizer", "path": cpath, "checkpoint": ck}


def load_model(path) -> tuple[Transformer, object, dict]:
    """A Transformer (LoRA adapters of a fine-tuned checkpoint merged in; the 2:4 / int8 / int4 layers of a compressed
    one kept, so their kernels run), its tokenizer, the checkpoint."""
    # weights, config and tokenizer only; a corrupted newest checkpoint of a run directory falls back to the previous
    ck = load_weights(path, log=lambda m: print(m, file=sys.stderr))
    if is_compressed(ck["model"]) and not is_lora_checkpoint(ck):
        mcfg = TransformerConfig.from_dict(ck["state"]["model_config"])
        return build_model(mcfg, strip_task_heads(ck["model"]), ck["state"].get("compress")), ck["tokenizer"], ck
    pre = load_pretrained(ck["path"], ck)
    model = Transformer(pre["model_config"])
    model.load_state_dict(pre["model"])
    model.eval()
    return model, pre["checkpoint"]["tokenizer"], pre["checkpoint"]


# ---------------------------------------------------------------------------------------------------- sources
class ModelSource:
    """Where a run's model comes from. The trainer calls, in order: tokenizer_dir() / tokenizer() (before the data
    is prepared), model_config(cfg, vocab_size), build(cfg, mcfg, device); and state_for_checkpoint /
    state_from_checkpoint around every save and resume."""

    name = "base"

    def tokenizer_dir(self) -> Optional[Path]:
        """The saved tokenizer the data must be encoded with (None: the data builds one from the config)."""
        return None

    def tokenizer(self):
        """A ready tokenizer object (encode / decode / vocab_size / token_bytes / save), or None."""
        return None

    def model_config(self, cfg, vocab_size: int):
        raise NotImplementedError

    def build(self, cfg, mcfg, device) -> nn.Module:
        raise NotImplementedError

    def state_for_checkpoint(self, sd: dict) -> dict:
        return sd

    def state_from_checkpoint(self, sd: dict) -> dict:
        return sd

    def describe(self) -> Optional[str]:
        return None

    def record(self, cfg, mcfg, tokenizer):
        """The config to record in state.json / the log / the plot: by default `cfg`; a source whose model is not
        the config's (a checkpoint) returns cfg with the model and tokenizer fields of what was built."""
        return cfg

    def prepare_data(self, cfg, log):
        """The run's data when the source defines it (a pretrained model's tokenizer and packed documents:
        an object with the DataBundle fields plus sampler(...) and evaluate(...)); None: the trainer's corpus."""
        return None

    def checkpoint_state(self) -> dict:
        """Extra entries for every checkpoint's state.json (e.g. the base model a LoRA checkpoint needs)."""
        return {}

    def check_checkpoint(self, ck: dict) -> None:
        """Refuse a checkpoint made for another model (raise ConfigError); called before a resume loads it."""


class _TransformerSource(ModelSource):
    """Our Transformer (model_impl fmkernels) or its plain twin (model_impl plain, stored in the fmk layout)."""

    def __init__(self, cfg):
        self.impl = cfg.model_impl
        self.mcfg: Optional[TransformerConfig] = None

    def _cls(self):
        return Transformer if self.impl == "fmkernels" else PlainTransformer

    def build(self, cfg, mcfg, device) -> nn.Module:
        self.mcfg = mcfg
        return self._cls()(mcfg).to(device)

    def state_for_checkpoint(self, sd: dict) -> dict:
        return plain_to_fmk_state_dict(sd, self.mcfg) if self.impl == "plain" else sd

    def state_from_checkpoint(self, sd: dict) -> dict:
        return fmk_to_plain_state_dict(sd, self.mcfg) if self.impl == "plain" else sd

    def check_checkpoint(self, ck: dict) -> None:
        """A resumed run must build the architecture it saved (e.g. a run started before QK-norm became the
        default, resumed without --qk_norm false): name each differing switch instead of a state_dict key error."""
        saved = ck.get("state", {}).get("model_config")
        if self.mcfg is None or not isinstance(saved, dict):
            return
        try:
            old = TransformerConfig.from_dict(saved)
        except (ConfigError, TypeError):
            return
        diffs = [f"{f.name} {getattr(self.mcfg, f.name)!r} here, {getattr(old, f.name)!r} in the checkpoint"
                 for f in dataclasses.fields(TransformerConfig)
                 if f.name != "max_seq_len" and getattr(self.mcfg, f.name) != getattr(old, f.name)]
        if diffs:
            raise ConfigError("config: --resume: the checkpoint's model differs from this run's: " + "; ".join(diffs)
                              + " (pass the switches the run was started with)")


class ScratchSource(_TransformerSource):
    """A freshly initialised model of the config's preset (plus any model field given)."""

    name = "scratch"

    def model_config(self, cfg, vocab_size: int) -> TransformerConfig:
        return cfg.model_config(vocab_size)


class CheckpointSource(_TransformerSource):
    """init_from: an fmk checkpoint or run directory; its architecture, weights (dense trunk) and tokenizer."""

    name = "checkpoint"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.pre = load_pretrained(cfg.init_from)

    def tokenizer_dir(self) -> Optional[Path]:
        return Path(self.pre["tokenizer_dir"])

    def model_config(self, cfg, vocab_size: int) -> TransformerConfig:
        return dataclasses.replace(self.pre["model_config"], max_seq_len=cfg.seq_len)

    def build(self, cfg, mcfg, device) -> nn.Module:
        model = super().build(cfg, mcfg, device)
        model.load_state_dict(self.state_from_checkpoint(self.pre["model"]))
        return model

    def describe(self) -> str:
        return f"fine-tuning from {self.pre['path']} (architecture and tokenizer from the checkpoint)"

    def record(self, cfg, mcfg, tokenizer):
        return as_trained(cfg, mcfg, tokenizer, self.pre["checkpoint"]["state"].get("config"))


_SOURCES: list[tuple[str, Callable, Callable]] = [
    ("checkpoint", lambda cfg: bool(getattr(cfg, "init_from", None)), CheckpointSource),
    ("scratch", lambda cfg: True, ScratchSource),
]
# Modules that register further sources, imported on the first model_source_for call (optional dependencies
# such as transformers load only then). One line per source module.
SOURCE_MODULES: list[str] = ["fmkernels.train.hf_source"]


def register_model_source(name: str, match: Callable, factory: Callable, first: bool = False) -> None:
    """match(cfg) -> bool; factory(cfg) -> ModelSource. first: ahead of the built-in sources (else before scratch)."""
    global _SOURCES
    _SOURCES = [s for s in _SOURCES if s[0] != name]
    entry = (name, match, factory)
    if first:
        _SOURCES.insert(0, entry)
    else:
        _SOURCES.insert(len(_SOURCES) - 1, entry)


def model_source_for(cfg) -> ModelSource:
    """The first registered source whose match(cfg) holds."""
    for mod in SOURCE_MODULES:
        importlib.import_module(mod)
    for name, match, factory in _SOURCES:
        if match(cfg):
            return factory(cfg)
    raise ConfigError("config: no model source matches this configuration")
