"""What a run measures and writes besides checkpoints: the language-model evaluation over validation windows
(the trainer's and `fmk eval`'s), metrics.csv (one row per log interval and per evaluation), TensorBoard scalars
when asked for, and the printed summary (the plot: plots.py; the progress bar: progress.py)."""
from __future__ import annotations

import contextlib
import csv
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..data import bits_per_byte, eval_windows
from ..models.config import ConfigError
from ..data.compressor import compressor_baseline

CSV_FIELDS = ["step", "train_time_s", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "val_bpb",
              "flops", "val_set"]  # val_set: "first N tokens" (periodic evals, eval_tokens) or "full" (the split)


class Metrics:
    def __init__(self, out: Path, enabled: bool, tb=None):
        self.path, self.enabled, self.tb = Path(out) / "metrics.csv", enabled, tb

    def row(self, row: dict) -> None:
        if not self.enabled:
            return
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            if new:
                w.writeheader()
            w.writerow({k: row.get(k, "") for k in CSV_FIELDS})
        if self.tb is not None:
            for k in ("loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "val_bpb"):
                if row.get(k, "") != "":
                    self.tb.add_scalar(k, float(row[k]), row["step"])

    def truncate(self, step: int) -> None:
        """After a resume, drop rows logged past the checkpoint by the interrupted run."""
        if not self.enabled or not self.path.exists():
            return
        with open(self.path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            w.writeheader()
            w.writerows(rows)

    def open_tensorboard(self):
        """A SummaryWriter in out/tb that also receives every row's scalars (the tensorboard package is optional)."""
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional: the tensorboard package
        except Exception as e:
            raise ConfigError(f"config: tensorboard=true needs the tensorboard package ({e})") from e
        self.tb = SummaryWriter(str(self.path.parent / "tb"))
        return self.tb

    def train_row(self, step: int, train_time_s: float, tokens: int, loss: float, lr: float, grad_norm: float,
                  tokens_per_s: float, flops: float) -> None:
        self.row(dict(step=step, train_time_s=f"{train_time_s:.3f}", tokens=tokens, loss=repr(loss), lr=f"{lr:.6g}",
                      grad_norm=f"{grad_norm:.4g}", tokens_per_s=f"{tokens_per_s:.1f}", flops=f"{flops:.4g}"))

    def eval_row(self, step: int, train_time_s: float, tokens: int, vl: float, vb: float, flops: float,
                 max_tokens: Optional[int], full: bool) -> None:
        self.row(dict(step=step, train_time_s=f"{train_time_s:.3f}", tokens=tokens, val_loss=f"{vl:.6f}",
                      val_bpb=f"{vb:.6f}", flops=f"{flops:.4g}", val_set="full" if full else f"first {max_tokens} tokens"))


@torch.no_grad()
def lm_eval(model, ids: np.ndarray, token_bytes: np.ndarray, seq_len: int, batch_size: int, device,
            autocast=contextlib.nullcontext, max_tokens: Optional[int] = None) -> dict:
    """Next-token loss of `model` over the windows of `ids` (the first max_tokens, or all): {loss (nats per token),
    bpb (bits per byte), tokens, bytes, forward_s}. model(x, y, reduction="sum") -> summed loss."""
    tb = torch.from_numpy(token_bytes)
    nll, n_tok, n_bytes, fwd_s, xs, ys = 0.0, 0, 0, 0.0, [], []

    def flush():
        nonlocal nll, n_tok, n_bytes, fwd_s
        if not xs:
            return
        x, y = torch.stack(xs).to(device), torch.stack(ys).to(device)
        t0 = time.perf_counter()
        with autocast():
            nll += float(model(x, y, reduction="sum"))
        fwd_s += time.perf_counter() - t0
        n_tok += y.numel()
        n_bytes += int(tb[y.cpu()].sum())
        xs.clear()
        ys.clear()

    for x, y in eval_windows(ids, seq_len, max_tokens):
        if xs and x.shape[0] != xs[0].shape[0]:
            flush()
        xs.append(x)
        ys.append(y)
        if len(xs) == batch_size:
            flush()
    flush()
    return dict(loss=nll / max(n_tok, 1), bpb=bits_per_byte(nll, n_bytes), tokens=n_tok, bytes=n_bytes,
                forward_s=fwd_s)


def summary_lines(s: dict, out: Path, sample_prompt: str, extra: list, best_what: str = "") -> list[str]:
    """The printed summary of a run (extra: the loop features' lines; best_what: what the periodic evaluations
    covered)."""
    lines = [
        "", "=== fmk train summary ===",
        f"stopped: {s['stop_reason']} at step {s['step']} (exit code {s['exit_code']})",
        f"tokens seen: {s['tokens']:,} in {s['train_time_s']:.1f} s of training ({s['tokens_per_s']:,.0f} tokens/s)"
        + (f"; data preparation (tokenizer + tokenization, cached after the first run) {s['data_prep_s']:.1f} s and "
           f"final evaluation {s.get('eval_time_s', 0.0):.1f} s, not training time" if "data_prep_s" in s else ""),
        f"final train loss: {s['final_train_loss']:.4f}",
    ]
    if "val_bpb" in s:
        lines.append(f"validation (full split): loss {s['val_loss']:.4f}, {s['val_bpb']:.4f} bits per byte")
    lines += yardstick_lines(s.get("compressor_bpb"), s.get("val_bpb"), s.get("compressor_time_s"))
    if s.get("best_val_bpb") is not None:
        lines.append(f"best periodic validation bits per byte ({best_what}): {s['best_val_bpb']:.4f}")
    lines += extra
    lines.append(f"checkpoint: {s.get('checkpoint')}")
    lines.append(f"metrics: {out / 'metrics.csv'}; loss curve: {s.get('loss_curve')}")
    if s.get("sample") is not None:
        lines += ["--- sample ---", sample_prompt + s["sample"], "--------------"]
    return lines


COMPRESSOR_NAMES = {"xz": "xz -9e", "bz2": "bzip2 -9", "zlib": "zlib -9"}


def compressor_yardstick(corpus: str, val_fraction: float, include_tests: bool, text_field: str = "text",
                         methods=("xz",)) -> dict:
    """{compressor_bpb: {method: {alone, with_train}}, compressor_time_s} for the validation bytes the full-split
    evaluation scores (fmkernels/data/compressor.py; cached per corpus hash and split in the cache root, so only the
    first run on a corpus pays: on the stdlib corpus, 11.6 MB training + 0.5 MB validation text, xz -9e took 0.6 s
    for the validation split alone and ~24 s per pass over the training (+ validation) text, two passes; 2-core
    EPYC under load)."""
    t0 = time.perf_counter()
    r = compressor_baseline(corpus, val_fraction, include_tests, text_field, methods)
    return dict(compressor_bpb=r["bpb"], compressor_time_s=time.perf_counter() - t0)


def yardstick_lines(bpb: Optional[dict], model_bpb: Optional[float] = None, seconds: Optional[float] = None,
                    ) -> list[str]:
    """`compressor yardstick (same validation bytes): xz -9e 1.497 bits per byte alone, 1.130 with the training
    split as context; this model 1.285 (+0.155 vs xz with context)`, one line per compressor."""
    lines = []
    for m, v in (bpb or {}).items():
        line = (f"compressor yardstick (same validation bytes): {COMPRESSOR_NAMES.get(m, m)} {v['alone']:.3f} bits "
                f"per byte alone, {v['with_train']:.3f} with the training split as context")
        if model_bpb is not None:
            d = model_bpb - v["with_train"]
            line += f"; this model {model_bpb:.3f} ({d:+.3f} vs {m} with context: {'beats' if d < 0 else 'behind'})"
        lines.append(line)
    if lines and seconds is not None:
        lines[-1] += f" [{seconds:.1f} s, not training time]"
    return lines


def evaluate_data(model, data, batch_size: int, seq_len: int, device, autocast, max_tokens: Optional[int]) -> dict:
    """lm_eval over data.val, or data.evaluate(...) for data that scores itself (label masks, packed documents)."""
    if hasattr(data, "evaluate"):
        return data.evaluate(model, batch_size, max_tokens, autocast)
    return lm_eval(model, data.val, data.token_bytes, seq_len, batch_size, device, autocast, max_tokens)


def eval_scope(max_tokens: Optional[int], n_val: int, full_word: str = "full split") -> str:
    """What an evaluation over the first max_tokens of n_val validation tokens covered."""
    return full_word if max_tokens is None or max_tokens >= n_val else f"first {max_tokens:,} tokens"


def _model_and_data(cfg) -> tuple[str, str]:
    """(what the weights start from, what the text is): a pretrained HF / GGUF source (--hf) or the preset (also
    that of a --from checkpoint); --data or the corpus."""
    src = getattr(cfg, "hf", None)
    model = f"from {os.path.basename(os.path.normpath(src))}" if src else f"preset={cfg.preset}"
    return model, getattr(cfg, "data", None) or cfg.corpus


def run_title(cfg, mcfg) -> str:
    """The loss plot's title: model source or preset, implementation, shape, tokenizer, corpus."""
    model, data = _model_and_data(cfg)
    if getattr(cfg, "hf", None):
        tok = f"its tokenizer ({mcfg.vocab_size})"
    else:
        tok = f"{cfg.tokenizer} tokenizer" + (f" {mcfg.vocab_size}" if cfg.tokenizer == "bpe" else "")
    return f"{model} ({cfg.model_impl}, dim {mcfg.dim} x {mcfg.n_layers} layers), {tok}; {os.path.basename(data)}"


def start_line(cfg, mcfg, data, info, n_params: int, dtype: str, optimizer: str = "adamw") -> str:
    """The run's first log line: model, corpus, world, threads, dtype."""
    model, corpus = _model_and_data(cfg)
    return (f"fmk train: {cfg.model_impl} model {model} {n_params / 1e6:.2f}M params "
            f"(dim {mcfg.dim}, {mcfg.n_layers} layers, {mcfg.n_heads} heads / {mcfg.n_kv_heads} kv, "
            f"vocab {mcfg.vocab_size}); corpus {corpus} hash {data.corpus_hash[:16]} "
            f"({len(data.train):,} train / {len(data.val):,} val tokens, {data.n_docs[0]}/{data.n_docs[1]} docs); "
            f"world {info.world} ({info.mode}); threads {torch.get_num_threads()}; dtype {dtype}; "
            f"optimizer {optimizer}, {getattr(cfg, 'lr_schedule', 'cosine')} schedule")
