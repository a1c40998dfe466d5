"""TrainConfig: every knob of a run, flat (so any field is a command-line override: --field value), built
from a preset, then a YAML file, then command-line overrides, and validated at start with errors that name
the field."""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from ..models.config import PRESETS, ConfigError, TransformerConfig

MODEL_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "rope_base", "norm_eps", "tie_embeddings",
                "dropout", "init_std", "attention")


@dataclass
class TrainConfig:
    # ---- model (a preset fills these; any can be overridden)
    preset: str = "small"
    dim: Optional[int] = None
    n_layers: Optional[int] = None
    n_heads: Optional[int] = None
    n_kv_heads: Optional[int] = None
    ffn_dim: Optional[int] = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    attention: str = "auto"
    model_impl: str = "fmkernels"  # "fmkernels" (fused kernels) | "plain" (the plain-PyTorch twin)
    # ---- data
    corpus: str = "stdlib"  # "stdlib" (embedded) | a directory | a .txt file | a .jsonl file
    stdlib_tests: bool = False  # include the stdlib's test folders (see fmkernels/data/corpus.py)
    text_field: str = "text"  # JSON Lines field holding the text
    tokenizer: str = "bpe"  # "byte" | "bpe"
    vocab_size: int = 4096  # BPE vocabulary (ignored for byte)
    val_fraction: float = 0.05
    # ---- optimization
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 1_000_000
    # Stop after this much training time; the lr schedule then follows time. Applies only when max_steps is not
    # given (an explicit max_steps means a step-based, reproducible run unless max_time_s is also given).
    max_time_s: Optional[float] = 300.0
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    dtype: str = "auto"  # "auto" (bf16 autocast where bf16 matmuls are fast: AVX-512 BF16 / AMX CPUs, GPUs) | "bf16" | "fp32"
    activation_checkpointing: bool = False
    compile: bool = False
    int8_training: bool = False  # fmkernels.quantize_(model, Int8TrainingConfig()) when available
    sparsity: Optional[str] = None  # e.g. "2:4": fmkernels.sparsify_(model, SemiStructuredConfig()) when available
    threads: Optional[int] = None
    tune_allocator: bool = True  # CPU: fmkernels.tune_cpu_allocator() (no page faults on reused activations)
    # ---- fine-tuning (fmk finetune --from CHECKPOINT sets init_from; see fmkernels/train/finetune.py)
    init_from: Optional[str] = None  # a checkpoint (or run directory): its weights, architecture and tokenizer
    freeze_embeddings: bool = False  # freeze tok_emb (and so the tied head)
    freeze_blocks: int = 0  # freeze the first k transformer blocks
    layer_lr_decay: float = 1.0  # block i of L gets lr * decay ** (L - i); the embedding decay ** (L + 1)
    lora_rank: int = 0  # > 0: LoRA adapters on lora_targets, every other weight frozen
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "wqkv,wo,w13,w2"  # comma-separated module names (last name component or full path)
    lora_base: str = "dense"  # "dense" | "int8" | "int4": quantize the frozen base before adding adapters (QLoRA)
    lora_group_size: Optional[int] = None  # int4 QLoRA base group size (32/64/128/256); None: per layer the largest
    # of 128, 64, 32 dividing in_features
    # ---- pretrained Hugging Face / GGUF decoders (fmk finetune --hf; fmkernels/train/hf_source.py)
    hf: Optional[str] = None  # a Hugging Face model directory or a .gguf file (Llama, Mistral, Qwen2, Qwen3)
    data: Optional[str] = None  # .txt | .jsonl (text, prompt/completion or messages); None: the corpus as text
    train_on: str = "completion"  # "completion" (loss on completion / assistant tokens) | "all"
    strict: bool = False  # error (instead of truncating with a warning) on sequences longer than seq_len / positions
    # ---- data augmentation of training batches (validation untouched; fmkernels/data/augment.py)
    aug_crop: float = 0.0  # probability per row of a random crop offset (drop the first k in [1, T/2] tokens)
    aug_token_dropout: float = 0.0  # probability per input token of replacing it by another token of its row
    aug_span_mask: float = 0.0  # probability per row of overwriting one span of aug_span_len input tokens
    aug_span_len: int = 8
    aug_rename: float = 0.0  # probability per training .py document of consistent local-name renaming (at tokenization)
    # ---- data selection (fmkernels/train/selection.py)
    select_mode: str = "none"  # "none" | "online" (score candidates, train on the top) | "offline" (score once, keep top)
    select_ratio: float = 0.5  # online: batch_size of ceil(batch_size / ratio) candidates; offline: fraction kept
    select_reference: Optional[str] = None  # checkpoint: score = loss - its loss (RHO-loss); None: score = loss
    select_scorer: Optional[str] = None  # offline: the checkpoint that scores the corpus (required there)
    # ---- quantization-aware training (fmk quantize --recover_steps; fmkernels.prepare_qat_)
    qat: Optional[str] = None  # "int8" | "int4": fake-quantize the block linears while training
    qat_group_size: int = 128  # int4 group size along in_features
    # ---- task heads and multitask learning (fmkernels/train/multitask.py)
    tasks: str = "lm"  # "lm" | "pkg" (package classification) | "lm,pkg" (multitask: one trunk, both heads)
    task_weights: str = ""  # fixed loss weights "lm=1,pkg=0.5" (unnamed tasks: 1)
    task_weighting: str = "fixed"  # "fixed" | "uncertainty" (learned exp(-s_i) L_i + s_i, Kendall et al.)
    task_sampling: str = "all"  # "all" (every task every micro-step) | "proportional" | "temperature"
    task_temperature: float = 2.0  # task_sampling temperature: p_i ~ n_i ** (1 / T)
    cls_classes: int = 8  # pkg: the packages with the most training text (held-out files in each)
    cls_pool: str = "mean"  # pkg: "mean" | "last" pooled hidden state -> classes
    cls_chunks_per_file: int = 16  # pkg: at most this many seq_len chunks per file
    # ---- evaluation, logging, checkpoints
    eval_every: int = 200
    eval_tokens: Optional[int] = 65536  # cap for periodic evals; the final eval covers the full split
    final_eval: bool = True
    log_every: int = 10
    out_dir: str = "runs/default"
    save_every: int = 200
    keep_last: int = 2
    resume: bool = False
    max_nonfinite: int = 5  # stop after this many non-finite steps in a row
    distributed: str = "auto"  # "auto" (ddp under torchrun) | "none" | "ddp" | "fsdp"
    tensorboard: bool = False
    progress: bool = True
    sample_tokens: int = 200
    sample_prompt: str = "def "
    temperature: float = 0.8
    top_k: Optional[int] = 40

    # ------------------------------------------------------------------ construction
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def build(cls, yaml_path: Optional[str] = None, overrides: Optional[dict] = None) -> "TrainConfig":
        """preset defaults <- YAML file <- overrides; unknown keys and bad values raise ConfigError."""
        values: dict[str, Any] = {}
        if yaml_path:
            import yaml

            if not os.path.exists(yaml_path):
                raise ConfigError(f"config: YAML file {yaml_path!r} does not exist")
            with open(yaml_path) as f:
                loaded = yaml.safe_load(f) or {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"config: {yaml_path} must hold a mapping of field: value")
            values.update(loaded)
        values.update(overrides or {})
        if "max_steps" in values and "max_time_s" not in values:
            values["max_time_s"] = None
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ConfigError(f"config: unknown field(s) {', '.join(unknown)}; known fields: {', '.join(cls.field_names())}")
        cfg = cls(**{k: coerce(k, v) for k, v in values.items()})
        cfg.validate()
        return cfg

    def model_config(self, vocab_size: int) -> TransformerConfig:
        if self.preset not in PRESETS:
            raise ConfigError(f"config: preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        d = dict(PRESETS[self.preset])
        for k in MODEL_FIELDS:
            v = getattr(self, k)
            if v is not None:
                d[k] = v
        d["max_seq_len"] = self.seq_len
        d["vocab_size"] = vocab_size
        return TransformerConfig(**d)

    def validate(self) -> None:
        def bad(name, why):
            raise ConfigError(f"config: {name} {why}, got {getattr(self, name)!r}")

        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "log_every", "eval_every", "save_every",
                     "max_nonfinite", "vocab_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                bad(name, "must be a positive integer")
        if self.keep_last < 2:
            bad("keep_last", "must be >= 2 (resume falls back to the previous checkpoint)")
        if self.lr <= 0:
            bad("lr", "must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            bad("min_lr_ratio", "must be in [0, 1]")
        if self.warmup_steps < 0:
            bad("warmup_steps", "must be >= 0")
        if not 0 < self.val_fraction < 1:
            bad("val_fraction", "must be in (0, 1)")
        if self.dtype not in ("auto", "fp32", "bf16"):
            bad("dtype", "must be 'auto', 'fp32' or 'bf16'")
        if self.tokenizer not in ("byte", "bpe"):
            bad("tokenizer", "must be 'byte' or 'bpe'")
        if self.tokenizer == "bpe" and self.vocab_size < 257:
            bad("vocab_size", "must be > 256 for a BPE tokenizer")
        if self.model_impl not in ("fmkernels", "plain"):
            bad("model_impl", "must be 'fmkernels' or 'plain'")
        if self.distributed not in ("auto", "none", "ddp", "fsdp"):
            bad("distributed", "must be 'auto', 'none', 'ddp' or 'fsdp'")
        if self.max_time_s is not None and self.max_time_s <= 0:
            bad("max_time_s", "must be > 0")
        if self.corpus != "stdlib" and not os.path.exists(self.corpus):
            bad("corpus", "does not exist (a directory, .txt or .jsonl path, or 'stdlib')")
        if self.freeze_blocks < 0:
            bad("freeze_blocks", "must be >= 0")
        if not 0 < self.layer_lr_decay <= 1:
            bad("layer_lr_decay", "must be in (0, 1]")
        if self.lora_rank < 0:
            bad("lora_rank", "must be >= 0 (0 disables LoRA)")
        if self.lora_alpha <= 0:
            bad("lora_alpha", "must be > 0")
        if not 0 <= self.lora_dropout < 1:
            bad("lora_dropout", "must be in [0, 1)")
        if self.lora_base not in ("dense", "int8", "int4"):
            bad("lora_base", "must be 'dense', 'int8' or 'int4'")
        if self.lora_base != "dense" and self.lora_rank == 0:
            bad("lora_base", "needs lora_rank > 0 (a quantized base is frozen; only adapters train)")
        if self.lora_rank and self.model_impl != "fmkernels":
            bad("lora_rank", "needs model_impl 'fmkernels'")
        if self.train_on not in ("completion", "all"):
            bad("train_on", "must be 'completion' or 'all'")
        if self.lora_group_size not in (None, 32, 64, 128, 256):
            bad("lora_group_size", "must be 32, 64, 128 or 256")
        if self.data is not None and not self.hf:
            bad("data", "is for fine-tuning a pretrained model: give --hf PATH too (or use --corpus)")
        if self.hf is not None:
            if self.init_from is not None:
                bad("hf", "cannot be combined with init_from (--from): one model source")
            if self.data is not None and not os.path.exists(self.data):
                bad("data", "does not exist (a .txt or .jsonl file)")
            if self.model_impl != "fmkernels":
                bad("model_impl", "must be 'fmkernels' with hf")
            for name, off in (("tasks", "lm"), ("select_mode", "none"), ("qat", None), ("sparsity", None)):
                if getattr(self, name) != off:
                    bad(name, f"is not supported with hf yet (leave it at {off!r})")
            if self.int8_training or any(getattr(self, n) for n in ("aug_crop", "aug_token_dropout", "aug_span_mask",
                                                                    "aug_rename")):
                bad("hf", "cannot be combined with int8_training or token augmentation yet")
        if self.init_from is not None and not os.path.exists(self.init_from):
            bad("init_from", "does not exist (a checkpoint directory or a run directory)")
        for name in ("aug_crop", "aug_token_dropout", "aug_span_mask", "aug_rename"):
            if not 0 <= getattr(self, name) <= 1:
                bad(name, "must be a probability in [0, 1]")
        if self.aug_span_len < 1:
            bad("aug_span_len", "must be >= 1")
        if self.select_mode not in ("none", "online", "offline"):
            bad("select_mode", "must be 'none', 'online' or 'offline'")
        if not 0 < self.select_ratio <= 1:
            bad("select_ratio", "must be in (0, 1]")
        if self.select_mode == "offline" and not self.select_scorer:
            bad("select_scorer", "is required with select_mode 'offline' (the checkpoint that scores the corpus)")
        if self.select_mode == "none" and (self.select_scorer or self.select_reference):
            bad("select_mode", "is 'none' but select_scorer / select_reference is set; choose 'online' or 'offline'")
        if self.select_mode == "online" and self.select_scorer:
            bad("select_scorer", "is for select_mode 'offline' (online selection scores with the model being trained)")
        for name in ("select_reference", "select_scorer"):
            if getattr(self, name) is not None and not os.path.exists(getattr(self, name)):
                bad(name, "does not exist (a checkpoint directory or a run directory)")
        if self.select_mode != "none" and self.distributed == "fsdp":
            bad("select_mode", "is not supported with distributed 'fsdp' (use ddp)")
        if self.qat not in (None, "int8", "int4"):
            bad("qat", "must be None, 'int8' or 'int4'")
        if self.qat is not None and (self.lora_rank or self.int8_training or self.sparsity):
            bad("qat", "cannot be combined with lora_rank, int8_training or sparsity")
        if self.qat_group_size not in (32, 64, 128, 256):
            bad("qat_group_size", "must be 32, 64, 128 or 256")
        if self.grad_clip < 0:
            bad("grad_clip", "must be >= 0 (0 disables clipping)")
        from .multitask import validate_task_fields

        validate_task_fields(self)
        self.model_config(256 if self.tokenizer == "byte" else self.vocab_size)  # shapes: heads | dim, ...

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def resolved_dtype(self) -> str:
        """'auto' -> 'bf16' where bf16 matmuls beat fp32 (measured on the AMD Zen 4 CI machine, AVX-512 BF16:
        2-2.7x fp32 matmul throughput), else 'fp32' (e.g. AVX-512 without BF16, where bf16 is slower)."""
        if self.dtype != "auto":
            return self.dtype
        import torch

        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        try:
            from .. import _ext

            ext = _ext.cpu_ext()
            feats = ext.cpu_features() if ext is not None else {}
        except Exception:
            feats = {}
        return "bf16" if (feats.get("avx512_bf16") or feats.get("amx_bf16")) else "fp32"


_HINTS = None


def _hints():
    global _HINTS
    if _HINTS is None:
        _HINTS = typing.get_type_hints(TrainConfig)
    return _HINTS


def coerce(name: str, value: Any) -> Any:
    """Turn a string from the command line (or a YAML scalar) into the field's type; ConfigError names it."""
    hint = _hints().get(name)
    if hint is None:
        raise ConfigError(f"config: unknown field {name}")
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"config: {name} cannot be None")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            s = str(value).lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if base is int:
            if isinstance(value, bool):
                raise ValueError(value)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if base is float:
            return float(value)
        if base is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config: {name} must be {getattr(base, '__name__', base)}, got {value!r}") from None
    return value
