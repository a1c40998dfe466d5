"""What a run measures and writes besides checkpoints: the language-model evaluation over validation windows
(the trainer's and `fmk eval`'s), metrics.csv (one row per log interval and per evaluation), TensorBoard scalars
when asked for, the loss-curve PNG, the progress bar and the printed summary."""
from __future__ import annotations

import contextlib
import csv
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from ..data import bits_per_byte, eval_windows

CSV_FIELDS = ["step", "train_time_s", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "val_bpb",
              "flops"]


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

    def plot(self, title: str) -> Optional[Path]:
        if not self.enabled or not self.path.exists():
            return None
        try:
            import matplotlib
        except ImportError:
            print("matplotlib is not installed (pip install fmkernels[plot]): no loss-curve PNG", flush=True)
            return None
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        tr = [(int(r["tokens"]), float(r["loss"])) for r in rows if r["loss"] not in ("", "nan")]
        va = [(int(r["tokens"]), float(r["val_loss"])) for r in rows if r["val_loss"] != ""]
        fig, ax = plt.subplots(figsize=(7, 4))
        if tr:
            ax.plot(*zip(*tr), label="train loss", lw=1)
        if va:
            ax.plot(*zip(*va), "o-", label="validation loss")
        ax.set_xlabel("tokens")
        ax.set_ylabel("loss (nats / token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        out = self.path.parent / "loss_curve.png"
        fig.tight_layout()
        fig.savefig(out, dpi=110)
        plt.close(fig)
        return out


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


def progress_bar(cfg, train_time: float, step: int):
    """A time-budgeted run (max_time_s) counts seconds of training, so the bar's ETA is real; else steps."""
    if cfg.max_time_s is not None:
        return tqdm(total=round(cfg.max_time_s), initial=round(train_time), unit="s", dynamic_ncols=True,
                    file=sys.stderr, bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} s [{elapsed}<{remaining}{postfix}]")
    return tqdm(total=cfg.max_steps, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr)


def summary_lines(s: dict, out: Path, sample_prompt: str, extra: list) -> list[str]:
    """The printed summary of a run (extra: the loop features' lines)."""
    lines = [
        "", "=== fmk train summary ===",
        f"stopped: {s['stop_reason']} at step {s['step']} (exit code {s['exit_code']})",
        f"tokens seen: {s['tokens']:,} in {s['train_time_s']:.1f} s of training ({s['tokens_per_s']:,.0f} tokens/s)",
        f"final train loss: {s['final_train_loss']:.4f}",
    ]
    if "val_bpb" in s:
        lines.append(f"validation (full split): loss {s['val_loss']:.4f}, {s['val_bpb']:.4f} bits per byte")
    if s.get("best_val_bpb") is not None:
        lines.append(f"best validation bits per byte: {s['best_val_bpb']:.4f}")
    lines += extra
    lines.append(f"checkpoint: {s.get('checkpoint')}")
    lines.append(f"metrics: {out / 'metrics.csv'}; loss curve: {s.get('loss_curve')}")
    if s.get("sample") is not None:
        lines += ["--- sample ---", sample_prompt + s["sample"], "--------------"]
    return lines
