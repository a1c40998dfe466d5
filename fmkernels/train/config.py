"""TrainConfig: every knob of a run, built from a preset, then a YAML file, then command-line overrides, and
validated at start with errors that name the field.

It is a composition of per-component sections (model, data, optimization, runtime, model transforms,
fine-tuning, LoRA, augmentation, data selection, tasks, run/evaluation, sampling); each section declares its
fields with their help text and choices (the CLI's --help is generated from them) and validates itself.
Access stays flat (`cfg.lr`, `TrainConfig(lora_rank=8)`, `--lora_rank 8` / `--lora-rank 8`, `cfg.to_dict()` in
state.json); `cfg.sections()` is the nested view, and a YAML file may be flat or nested by section
(`lora: {rank: 8}` is `lora_rank: 8`).
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from .. import _ext
from ..models.config import PRESETS, ConfigError, TransformerConfig

MODEL_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "rope_base", "norm_eps", "tie_embeddings",
                "dropout", "init_std", "attention", "qk_norm", "logit_softcap")
TASKS = ("lm", "pkg")
SAMPLING = ("all", "proportional", "temperature")
WEIGHTING = ("fixed", "uncertainty")


def opt(default, help: str, choices: Optional[tuple] = None, default_text: Optional[str] = None):
    """A config field: its default, one line of help, the accepted values when they are a fixed set."""
    md = {"help": help, "choices": choices, "default_text": default_text}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=md)
    return field(default=default, metadata=md)


def _bad(cfg, name, why):
    raise ConfigError(f"config: {name} {why}, got {getattr(cfg, name)!r}")


def _positive_ints(cfg, *names):
    for name in names:
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            _bad(cfg, name, "must be a positive integer")


def _choice(cfg, name, choices):
    if getattr(cfg, name) not in choices:
        _bad(cfg, name, "must be one of " + ", ".join(repr(c) for c in choices))


def _existing_path(cfg, name, what="a checkpoint directory or a run directory"):
    v = getattr(cfg, name)
    if v is not None and not os.path.exists(v):
        _bad(cfg, name, f"does not exist ({what})")


def parse_tasks(spec: str) -> list[str]:
    names = [t.strip() for t in str(spec).split(",") if t.strip()]
    if not names:
        raise ConfigError(f"config: tasks must name at least one of {', '.join(TASKS)}, got {spec!r}")
    bad = [t for t in names if t not in TASKS]
    if bad:
        raise ConfigError(f"config: tasks: unknown task(s) {', '.join(bad)}; known: {', '.join(TASKS)}, got {spec!r}")
    if len(set(names)) != len(names):
        raise ConfigError(f"config: tasks names a task twice, got {spec!r}")
    return names


def parse_weights(spec: str, tasks: list[str]) -> dict:
    """'lm=1,pkg=0.5' -> {lm: 1.0, pkg: 0.5}; tasks not named get 1."""
    w = {t: 1.0 for t in tasks}
    for part in [p.strip() for p in str(spec or "").split(",") if p.strip()]:
        name, eq, val = part.partition("=")
        name = name.strip()
        if not eq or name not in tasks:
            raise ConfigError(f"config: task_weights must be 'task=weight,...' over the tasks {', '.join(tasks)}, "
                              f"got {spec!r}")
        try:
            v = float(val)
        except ValueError:
            raise ConfigError(f"config: task_weights: weight of {name} must be a number, got {val!r}") from None
        if not (v >= 0 and math.isfinite(v)):
            raise ConfigError(f"config: task_weights: weight of {name} must be finite and >= 0, got {v!r}")
        w[name] = v
    if not any(w.values()):
        raise ConfigError(f"config: task_weights: every weight is 0, got {spec!r}")
    return w


# ---------------------------------------------------------------------------------------------------- sections
class Section:
    """A component's fields. `validate` checks them (and the rules that tie them to other sections' fields);
    `prefix` is dropped from field names in a nested YAML mapping."""

    title = ""
    prefix = ""

    def validate(self) -> None:
        pass


@dataclass
class ModelSection(Section):
    title, prefix = "model (a preset fills these; any can be overridden)", ""
    preset: str = opt("small", "model size preset", tuple(PRESETS))
    dim: Optional[int] = opt(None, "model width", default_text="from the preset")
    n_layers: Optional[int] = opt(None, "transformer blocks", default_text="from the preset")
    n_heads: Optional[int] = opt(None, "attention heads", default_text="from the preset")
    n_kv_heads: Optional[int] = opt(None, "key/value heads (GQA; divides n_heads)", default_text="from the preset")
    ffn_dim: Optional[int] = opt(None, "MLP hidden width", default_text="from the preset")
    rope_base: float = opt(10000.0, "RoPE base frequency")
    norm_eps: float = opt(1e-5, "RMSNorm epsilon")
    tie_embeddings: bool = opt(True, "share the token embedding with the output layer")
    dropout: float = opt(0.0, "dropout probability")
    init_std: float = opt(0.02, "weight init standard deviation")
    attention: str = opt("auto", "attention kernel: fused flash attention, or PyTorch SDPA", ("auto", "flash", "sdpa"))
    qk_norm: bool = opt(True, "per-head RMSNorm of q and k before RoPE (QK-norm; make train: -0.06 bits per byte with "
                              "Muon + wsd, docs/pretraining.md)")
    logit_softcap: Optional[float] = opt(None, "cap output logits at c * tanh(logits / c) (materializes the logits: "
                                         "the fused linear + cross-entropy has no cap)", default_text="off")
    model_impl: str = opt("fmkernels", "fmkernels (fused kernels) or plain (the plain-PyTorch twin)",
                          ("fmkernels", "plain"))

    def validate(self):
        _choice(self, "model_impl", ("fmkernels", "plain"))
        if self.logit_softcap is not None and not (0 < self.logit_softcap < math.inf):
            _bad(self, "logit_softcap", "must be a finite number > 0 (or none: off)")


@dataclass
class DataSection(Section):
    title, prefix = "data", ""
    corpus: str = opt("stdlib", "'stdlib' (embedded Python standard library), a directory, a .txt or a .jsonl file")
    stdlib_tests: bool = opt(False, "include the stdlib's test folders")
    text_field: str = opt("text", "JSON Lines field holding the text")
    tokenizer: str = opt("bpe", "tokenizer kind", ("byte", "bpe"))
    vocab_size: int = opt(4096, "BPE vocabulary size (ignored for byte)")
    val_fraction: float = opt(0.05, "fraction of documents held out for validation")

    def validate(self):
        _positive_ints(self, "vocab_size")
        if not 0 < self.val_fraction < 1:
            _bad(self, "val_fraction", "must be in (0, 1)")
        _choice(self, "tokenizer", ("byte", "bpe"))
        if self.tokenizer == "bpe" and self.vocab_size < 257:
            _bad(self, "vocab_size", "must be > 256 for a BPE tokenizer")
        if self.corpus != "stdlib" and not os.path.exists(self.corpus):
            _bad(self, "corpus", "does not exist (a directory, .txt or .jsonl path, or 'stdlib')")


@dataclass
class OptimSection(Section):
    title, prefix = "optimization", ""
    seq_len: int = opt(256, "tokens per training window")
    pack_mode: str = opt("document", "document: packed documents attend only within themselves (varlen attention), "
                                     "RoPE positions restart per document, boundary targets ignored; concat: one "
                                     "stream", ("document", "concat"))
    batch_size: int = opt(16, "windows per micro-batch (per process)")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    max_steps: int = opt(1_000_000, "optimizer steps (given alone: a step-based, reproducible run)")
    max_time_s: Optional[float] = opt(300.0, "stop after this much training time; the lr schedule then follows time "
                                             "(dropped when max_steps is given without it)")
    optimizer: str = opt("auto", "muon: Muon (momentum, Newton-Schulz orthogonalized, 5 iterations in bf16) for the "
                                 "blocks' 2-D weight matrices, AdamW for embeddings, head and norms; adamw: AdamW for "
                                 "every parameter; auto: muon when pretraining from scratch (no init_from, LoRA, QAT, "
                                 "int8 training, sparsity or FSDP), else adamw", ("auto", "adamw", "muon"))
    muon_lr: Optional[float] = opt(None, "Muon's peak lr, scaled per matrix by sqrt(max(1, out / in)) (Keller Jordan's); none: "
                                   "lr with the AdamW-matched update RMS (0.2 * sqrt(max(out, in)); Moonshot), so lr "
                                   "and weight_decay carry over", default_text="none: lr, RMS-matched")
    muon_momentum: float = opt(0.95, "Muon momentum (Nesterov)")
    lr: float = opt(3e-3, "peak learning rate")
    lr_schedule: str = opt("wsd", "cosine: warmup then cosine decay to min_lr_ratio * lr; wsd: warmup, constant lr, "
                                     "then a linear decay to min_lr_ratio * lr over the last decay_fraction of the run",
                           ("cosine", "wsd"))
    decay_fraction: float = opt(0.2, "wsd: share of the run (steps or training time) spent decaying")
    min_lr_ratio: float = opt(0.1, "decay floor, as a fraction of lr")
    warmup_steps: int = opt(50, "linear warmup steps")
    weight_decay: float = opt(0.1, "AdamW weight decay (matrices only)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "gradient norm clip (0 disables)")
    seed: int = opt(0, "random seed (init, data order, dropout, augmentation)")

    def validate(self):
        _positive_ints(self, "seq_len", "batch_size", "grad_accum", "max_steps")
        _choice(self, "pack_mode", ("document", "concat"))
        if self.lr <= 0:
            _bad(self, "lr", "must be > 0")
        _choice(self, "optimizer", ("auto", "adamw", "muon"))
        _choice(self, "lr_schedule", ("cosine", "wsd"))
        if self.muon_lr is not None and not self.muon_lr > 0:
            _bad(self, "muon_lr", "must be > 0 (or none: lr, RMS-matched)")
        if not 0 <= self.muon_momentum < 1:
            _bad(self, "muon_momentum", "must be in [0, 1)")
        if not 0 < self.decay_fraction <= 1:
            _bad(self, "decay_fraction", "must be in (0, 1]")
        if self.optimizer == "muon" and getattr(self, "distributed", "auto") == "fsdp":
            _bad(self, "optimizer", "'muon' is not supported with distributed 'fsdp' (sharded matrices; use ddp)")
        if not 0 <= self.min_lr_ratio <= 1:
            _bad(self, "min_lr_ratio", "must be in [0, 1]")
        if self.warmup_steps < 0:
            _bad(self, "warmup_steps", "must be >= 0")
        if self.max_time_s is not None and self.max_time_s <= 0:
            _bad(self, "max_time_s", "must be > 0")
        if self.grad_clip < 0:
            _bad(self, "grad_clip", "must be >= 0 (0 disables clipping)")


@dataclass
class RuntimeSection(Section):
    title, prefix = "runtime", ""
    dtype: str = opt("auto", "auto: bf16 autocast where bf16 matmuls are fast (AVX-512 BF16 / AMX CPUs, GPUs)",
                     ("auto", "bf16", "fp32"))
    activation_checkpointing: bool = opt(False, "recompute each block in the backward")
    compile: bool = opt(False, "torch.compile the model")
    threads: Optional[int] = opt(None, "torch threads", default_text="torch's default")
    tune_allocator: bool = opt(True, "CPU: fmkernels.tune_cpu_allocator() (no page faults on reused activations)")
    distributed: str = opt("auto", "auto: ddp under torchrun", ("auto", "none", "ddp", "fsdp"))

    def validate(self):
        _choice(self, "dtype", ("auto", "fp32", "bf16"))
        _choice(self, "distributed", ("auto", "none", "ddp", "fsdp"))


@dataclass
class TransformSection(Section):
    title, prefix = "model transforms (fmkernels/train/converters.py)", ""
    int8_training: bool = opt(False, "int8 forward/backward matmuls (quantize_ with Int8TrainingConfig)")
    sparsity: Optional[str] = opt(None, "2:4: semi-structured sparse linears (sparsify_)", ("2:4",))
    qat: Optional[str] = opt(None, "fake-quantize the block linears while training (quantization-aware)",
                             ("int8", "int4"))
    qat_group_size: int = opt(128, "int4 QAT group size along in_features", (32, 64, 128, 256))

    def validate(self):
        if self.qat not in (None, "int8", "int4"):
            _bad(self, "qat", "must be None, 'int8' or 'int4'")
        if self.qat is not None and (getattr(self, "lora_rank", 0) or self.int8_training or self.sparsity):
            _bad(self, "qat", "cannot be combined with lora_rank, int8_training or sparsity")
        if self.qat_group_size not in (32, 64, 128, 256):
            _bad(self, "qat_group_size", "must be 32, 64, 128 or 256")
        if self.sparsity is not None and self.sparsity != "2:4":
            _bad(self, "sparsity", "must be '2:4' (semi-structured)")


@dataclass
class FinetuneSection(Section):
    title, prefix = "fine-tuning (fmk finetune --from CHECKPOINT sets init_from)", ""
    init_from: Optional[str] = opt(None, "a checkpoint (or run directory): its weights, architecture and tokenizer")
    freeze_embeddings: bool = opt(False, "freeze the token embedding (and so the tied head)")
    freeze_blocks: int = opt(0, "freeze the first k transformer blocks")
    layer_lr_decay: float = opt(1.0, "block i of L trains at lr * decay ** (L - i), the embedding decay ** (L + 1)")

    def validate(self):
        if self.freeze_blocks < 0:
            _bad(self, "freeze_blocks", "must be >= 0")
        if not 0 < self.layer_lr_decay <= 1:
            _bad(self, "layer_lr_decay", "must be in (0, 1]")
        _existing_path(self, "init_from")


@dataclass
class LoRASection(Section):
    title, prefix = "LoRA", "lora_"
    lora_rank: int = opt(0, "> 0: LoRA adapters on lora_targets, every other weight frozen")
    lora_alpha: float = opt(16.0, "LoRA scaling numerator (update scaled by alpha / rank)")
    lora_dropout: float = opt(0.0, "dropout on the adapter input")
    lora_targets: str = opt("wqkv,wo,w13,w2", "comma-separated module names (last name component or full path)")
    lora_base: str = opt("dense", "int8 / int4: quantize the frozen base first (QLoRA)", ("dense", "int8", "int4"))
    lora_group_size: Optional[int] = opt(None, "int4 QLoRA base group size (32/64/128/256; a partial last group "
                                         "is zero-padded); None: per layer the one of 128, 64, 32 that pads least")

    def validate(self):
        if self.lora_rank < 0:
            _bad(self, "lora_rank", "must be >= 0 (0 disables LoRA)")
        if self.lora_alpha <= 0:
            _bad(self, "lora_alpha", "must be > 0")
        if not 0 <= self.lora_dropout < 1:
            _bad(self, "lora_dropout", "must be in [0, 1)")
        _choice(self, "lora_base", ("dense", "int8", "int4"))
        _choice(self, "lora_group_size", (None, 32, 64, 128, 256))
        if self.lora_base != "dense" and self.lora_rank == 0:
            _bad(self, "lora_base", "needs lora_rank > 0 (a quantized base is frozen; only adapters train)")
        if self.lora_rank and getattr(self, "model_impl", "fmkernels") != "fmkernels":
            _bad(self, "lora_rank", "needs model_impl 'fmkernels'")


@dataclass
class HFSection(Section):
    title, prefix = "pretrained Hugging Face / GGUF decoders (fmk finetune --hf; fmkernels/train/hf_source.py)", ""
    hf: Optional[str] = opt(None, "a Hugging Face model directory or a .gguf file (Llama, Mistral, Qwen2, Qwen3)")
    data: Optional[str] = opt(None, ".txt or .jsonl (text, prompt/completion or messages)",
                              default_text="none: the --corpus documents as text")
    train_on: str = opt("completion", "loss on completion / assistant tokens only, or on all tokens",
                        ("completion", "all"))
    strict: bool = opt(False, "error instead of truncating (with a warning) sequences longer than seq_len / positions")

    def validate(self):
        _choice(self, "train_on", ("completion", "all"))
        if self.data is not None and not self.hf:
            _bad(self, "data", "is for fine-tuning a pretrained model: give --hf PATH too (or use --corpus)")
        if self.hf is None:
            return
        _existing_path(self, "hf", "a Hugging Face model directory or a .gguf file")
        _existing_path(self, "data", "a .txt or .jsonl file")
        if getattr(self, "init_from", None) is not None:
            _bad(self, "hf", "cannot be combined with init_from (--from): one model source")
        if getattr(self, "model_impl", "fmkernels") != "fmkernels":
            _bad(self, "model_impl", "must be 'fmkernels' with hf")
        for name, off in (("tasks", "lm"), ("select_mode", "none"), ("qat", None), ("sparsity", None),
                          ("int8_training", False), ("aug_crop", 0.0), ("aug_token_dropout", 0.0),
                          ("aug_span_mask", 0.0), ("aug_rename", 0.0)):
            if getattr(self, name, off) != off:
                _bad(self, name, f"is not supported with hf yet (leave it at {off!r})")


@dataclass
class AugmentSection(Section):
    title, prefix = "augmentation of training batches (fmkernels/data/augment.py; validation untouched)", "aug_"
    aug_crop: float = opt(0.0, "probability per row of a random crop offset")
    aug_token_dropout: float = opt(0.0, "probability per input token of replacing it by another token of its row")
    aug_span_mask: float = opt(0.0, "probability per row of overwriting one span of aug_span_len input tokens")
    aug_span_len: int = opt(8, "masked span length")
    aug_rename: float = opt(0.0, "probability per training .py document of consistent local-name renaming")

    def validate(self):
        for name in ("aug_crop", "aug_token_dropout", "aug_span_mask", "aug_rename"):
            if not 0 <= getattr(self, name) <= 1:
                _bad(self, name, "must be a probability in [0, 1]")
        if self.aug_span_len < 1:
            _bad(self, "aug_span_len", "must be >= 1")


@dataclass
class SelectionSection(Section):
    title, prefix = "data selection (fmkernels/train/selection.py)", "select_"
    select_mode: str = opt("none", "online: score candidates, train on the top; offline: score once, keep the top",
                           ("none", "online", "offline"))
    select_ratio: float = opt(0.5, "online: batch_size of ceil(batch_size / ratio) candidates; offline: fraction kept")
    select_reference: Optional[str] = opt(None, "checkpoint: score = loss - its loss (RHO-loss)",
                                          default_text="none: score = loss")
    select_scorer: Optional[str] = opt(None, "offline: the checkpoint that scores the corpus (required there)")

    def validate(self):
        _choice(self, "select_mode", ("none", "online", "offline"))
        if not 0 < self.select_ratio <= 1:
            _bad(self, "select_ratio", "must be in (0, 1]")
        if self.select_mode == "offline" and not self.select_scorer:
            _bad(self, "select_scorer", "is required with select_mode 'offline' (the checkpoint that scores the corpus)")
        if self.select_mode == "none" and (self.select_scorer or self.select_reference):
            _bad(self, "select_mode", "is 'none' but select_scorer / select_reference is set; choose 'online' or "
                 "'offline'")
        if self.select_mode == "online" and self.select_scorer:
            _bad(self, "select_scorer", "is for select_mode 'offline' (online selection scores with the model being "
                 "trained)")
        _existing_path(self, "select_reference")
        _existing_path(self, "select_scorer")
        if self.select_mode != "none" and getattr(self, "distributed", "auto") == "fsdp":
            _bad(self, "select_mode", "is not supported with distributed 'fsdp' (use ddp)")


@dataclass
class TaskSection(Section):
    title, prefix = "task heads and multitask learning (fmkernels/train/multitask.py)", ""
    tasks: str = opt("lm", "lm | pkg (package classification) | lm,pkg (multitask: one trunk, both heads)")
    task_weights: str = opt("", "fixed loss weights 'lm=1,pkg=0.5' (unnamed tasks: 1)")
    task_weighting: str = opt("fixed", "uncertainty: learned exp(-s_i) L_i + s_i (Kendall et al.)", WEIGHTING)
    task_sampling: str = opt("all", "all: every task every micro-step; else one task drawn per micro-step", SAMPLING)
    task_temperature: float = opt(2.0, "task_sampling temperature: p_i ~ n_i ** (1 / T)")
    cls_classes: int = opt(8, "pkg: the packages with the most training text")
    cls_pool: str = opt("mean", "pkg: pooled hidden state -> classes", ("mean", "last"))
    cls_chunks_per_file: int = opt(16, "pkg: at most this many seq_len chunks per file")

    def validate(self):
        tasks = parse_tasks(self.tasks)
        parse_weights(self.task_weights, tasks)
        if self.task_sampling not in SAMPLING:
            raise ConfigError(f"config: task_sampling must be one of {', '.join(SAMPLING)}, got {self.task_sampling!r}")
        if self.task_weighting not in WEIGHTING:
            raise ConfigError(f"config: task_weighting must be one of {', '.join(WEIGHTING)}, got "
                              f"{self.task_weighting!r}")
        if not (self.task_temperature > 0 and math.isfinite(self.task_temperature)):
            raise ConfigError(f"config: task_temperature must be a finite number > 0, got {self.task_temperature!r}")
        if not isinstance(self.cls_classes, int) or self.cls_classes < 2:
            raise ConfigError(f"config: cls_classes must be an integer >= 2, got {self.cls_classes!r}")
        if self.cls_pool not in ("mean", "last"):
            raise ConfigError(f"config: cls_pool must be 'mean' or 'last' (a causal trunk has no [CLS]), got "
                              f"{self.cls_pool!r}")
        if not isinstance(self.cls_chunks_per_file, int) or self.cls_chunks_per_file < 1:
            raise ConfigError(f"config: cls_chunks_per_file must be a positive integer, got {self.cls_chunks_per_file!r}")
        if tasks != ["lm"]:
            if getattr(self, "model_impl", "fmkernels") != "fmkernels":
                raise ConfigError(f"config: tasks {self.tasks!r} needs model_impl 'fmkernels' (hidden_states), got "
                                  f"{self.model_impl!r}")
            corpus = getattr(self, "corpus", "stdlib")
            if "pkg" in tasks and corpus != "stdlib" and not Path(corpus).is_dir():
                raise ConfigError(f"config: task pkg needs corpus 'stdlib' or a directory (labels are top-level "
                                  f"folders), got {corpus!r}")


@dataclass
class RunSection(Section):
    title, prefix = "evaluation, logging, checkpoints", ""
    eval_every: int = opt(200, "evaluate every N steps")
    eval_tokens: Optional[int] = opt(65536, "cap for periodic evaluations; the final one covers the full split")
    final_eval: bool = opt(True, "evaluate on the full validation split at the end")
    yardstick: bool = opt(True, "after the final evaluation: xz -9e's bits per byte on the same validation bytes, "
                                "alone and with the training split as context (cached per corpus; not training time)")
    log_every: int = opt(10, "log a metrics row every N steps")
    out_dir: str = opt("runs/default", "run directory (checkpoints, metrics.csv, train.log, summary.json)")
    save_every: int = opt(200, "checkpoint every N steps")
    keep_last: int = opt(2, "checkpoints kept (>= 2: resume falls back to the previous one)")
    resume: bool = opt(False, "continue from out_dir's last checkpoint")
    max_nonfinite: int = opt(5, "stop after this many non-finite steps in a row")
    tensorboard: bool = opt(False, "also write TensorBoard scalars (needs tensorboard)")
    progress: bool = opt(True, "progress bar")

    def validate(self):
        _positive_ints(self, "log_every", "eval_every", "save_every", "max_nonfinite")
        if self.keep_last < 2:
            _bad(self, "keep_last", "must be >= 2 (resume falls back to the previous checkpoint)")


@dataclass
class SampleSection(Section):
    title, prefix = "sample printed at the end", ""
    sample_tokens: int = opt(200, "tokens to generate (0: none)")
    sample_prompt: str = opt("def ", "prompt")
    temperature: float = opt(0.8, "sampling temperature (<= 0: greedy)")
    top_k: Optional[int] = opt(40, "top-k sampling (none: off)")


SECTIONS: dict[str, type] = {
    "model": ModelSection, "data": DataSection, "optim": OptimSection, "runtime": RuntimeSection,
    "transforms": TransformSection, "finetune": FinetuneSection, "lora": LoRASection, "hf": HFSection, "augment": AugmentSection,
    "selection": SelectionSection, "tasks": TaskSection, "run": RunSection, "sample": SampleSection,
}


@dataclass
class TrainConfig(SampleSection, RunSection, TaskSection, SelectionSection, AugmentSection, HFSection, LoRASection,
                  FinetuneSection, TransformSection, RuntimeSection, OptimSection, DataSection, ModelSection):
    """Every field of every section, flat."""

    # ------------------------------------------------------------------ construction
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def section_of(cls, name: str) -> str:
        for sec, scls in SECTIONS.items():
            if name in scls.__dataclass_fields__:
                return sec
        raise KeyError(name)

    def sections(self) -> dict:
        """{section name: that section's dataclass, filled from this config} (the nested view)."""
        return {sec: scls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(scls)})
                for sec, scls in SECTIONS.items()}

    @classmethod
    def _flatten(cls, values: dict) -> dict:
        out = {}
        for k, v in values.items():
            if k in SECTIONS and isinstance(v, dict):
                scls = SECTIONS[k]
                for sk, sv in v.items():
                    name = sk if sk in scls.__dataclass_fields__ else scls.prefix + sk
                    if name not in scls.__dataclass_fields__:
                        raise ConfigError(f"config: {k}.{sk} is not a field of section {k!r}; its fields: "
                                          f"{', '.join(scls.__dataclass_fields__)}")
                    out[name] = sv
            else:
                out[k] = v
        return out

    @classmethod
    def build(cls, yaml_path: Optional[str] = None, overrides: Optional[dict] = None) -> "TrainConfig":
        """preset defaults <- YAML file (flat or nested by section) <- overrides; unknown keys and bad values raise
        ConfigError."""
        values: dict[str, Any] = {}
        if yaml_path:
            if not os.path.exists(yaml_path):
                raise ConfigError(f"config: YAML file {yaml_path!r} does not exist")
            with open(yaml_path) as f:
                loaded = yaml.safe_load(f) or {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"config: {yaml_path} must hold a mapping of field: value")
            values.update(cls._flatten(loaded))
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
        """Each section validates its own fields (and the rules that tie them to other sections)."""
        for scls in SECTIONS.values():
            scls.validate(self)
        self.model_config(256 if self.tokenizer == "byte" else self.vocab_size)  # shapes: heads | dim, ...

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def resolved_dtype(self) -> str:
        """'auto' -> 'bf16' where bf16 matmuls beat fp32 (measured on the AMD Zen 4 CI machine, AVX-512 BF16:
        2-2.7x fp32 matmul throughput), else 'fp32' (e.g. AVX-512 without BF16, where bf16 is slower)."""
        if self.dtype != "auto":
            return self.dtype
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        try:
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


def field_base_type(name: str):
    """bool / int / float / str of a field (Optional stripped)."""
    hint = _hints()[name]
    args = typing.get_args(hint)
    return next((a for a in args if a is not type(None)), hint) if args else hint


def field_help(name: str) -> dict:
    """{help, choices, default, default_text, type, optional} of a field, for the CLI."""
    f = TrainConfig.__dataclass_fields__[name]
    hint = _hints()[name]
    return dict(help=f.metadata.get("help", ""), choices=f.metadata.get("choices"), default=f.default,
                default_text=f.metadata.get("default_text"), type=field_base_type(name),
                optional=type(None) in typing.get_args(hint))


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
