"""Task heads and multitask learning as switches of the one training loop (fmkernels/train/trainer.py).

    --tasks lm          plain language modelling (the default; no TaskSet, the loop is unchanged)
    --tasks pkg         sequence classification only: which package (stdlib package / top-level folder of a
                        directory corpus) a chunk of code comes from, a ClassificationHead on the trunk
    --tasks lm,pkg      multitask: one trunk, both losses

    --task_weights lm=1,pkg=0.5            fixed per-task loss weights (default 1 each)
    --task_weighting uncertainty           learned weights exp(-s_i) (+ s_i), Kendall et al. (see heads.py)
    --task_sampling all                    every task's loss in every micro-step (default)
    --task_sampling proportional           one task per micro-step, drawn with p_i ~ n_i (its training examples)
    --task_sampling temperature --task_temperature T   p_i ~ n_i ** (1 / T)  (T = 1: proportional, T -> inf: uniform)

The draw of micro-step (step, micro) is seeded by (seed, step, micro, rank), so a resumed run replays it.
Metrics: lm -> validation loss / bits per byte (the trainer's own evaluation); pkg -> held-out accuracy,
loss, and the majority-class baseline. They go to the log, `tasks.csv` (per-task train losses and weights every
log_every steps, evaluations every eval_every steps) and summary.json["tasks"].
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..data.tasks import majority_accuracy, package_split, token_chunks
from ..models.config import ConfigError  # noqa: F401
from .config import SAMPLING, TASKS, WEIGHTING, TaskSection, parse_tasks, parse_weights  # noqa: F401
from .heads import POOLS, ClassificationHead, TaskHeads, classification_loss
from .model_source import strip_task_heads

TASK_CSV = ["step", "kind", "task", "train_loss", "weight", "prob", "val_loss", "val_acc", "val_bpb", "majority_acc"]


def validate_task_fields(cfg) -> None:
    """The task section's own validation (fmkernels/train/config.py TaskSection)."""
    TaskSection.validate(cfg)


def sampling_probs(sizes: dict, mode: str, temperature: float = 1.0) -> dict:
    """{task: n_i} -> {task: p_i}: proportional p_i ~ n_i, temperature p_i ~ n_i ** (1 / T); 'all' -> all 1."""
    if mode == "all":
        return {t: 1.0 for t in sizes}
    if mode not in ("proportional", "temperature"):
        raise ValueError(f"sampling_probs: mode must be one of {', '.join(SAMPLING)}, got {mode!r}")
    if any(n <= 0 for n in sizes.values()):
        raise ValueError(f"sampling_probs: sizes must be > 0, got {sizes}")
    T = 1.0 if mode == "proportional" else float(temperature)
    if not T > 0:
        raise ValueError(f"sampling_probs: temperature must be > 0, got {temperature!r}")
    logs = np.array([math.log(n) / T for n in sizes.values()])
    p = np.exp(logs - logs.max())
    p /= p.sum()
    return {t: float(pi) for t, pi in zip(sizes, p)}


class PackageTask:
    """Held-out-by-file package classification on token chunks of the run's own tokenizer."""

    name = "pkg"

    def __init__(self, cfg, tokenizer, log: Callable[[str], None] = print):
        split = package_split(cfg.corpus, cfg.val_fraction, cfg.cls_classes, cfg.stdlib_tests, cfg.text_field)
        self.classes = split.classes
        enc = tokenizer.encode
        self.train = [torch.from_numpy(a) for a in token_chunks(split.train, enc, cfg.seq_len, cfg.cls_chunks_per_file)]
        self.val = [torch.from_numpy(a) for a in token_chunks(split.val, enc, cfg.seq_len, cfg.cls_chunks_per_file)]
        self.baseline = majority_accuracy(self.train[2].numpy(), self.val[2].numpy())
        self.seed, self.batch_size = cfg.seed, cfg.batch_size
        log(f"task pkg: {len(self.classes)} classes ({', '.join(self.classes)}); {len(self.train[0])} training chunks "
            f"from {len(split.train)} files, {len(self.val[0])} held-out chunks from {len(split.val)} files; "
            f"majority-class baseline {self.baseline['majority_acc']:.4f} "
            f"({self.classes[self.baseline['majority_class']]})")

    @property
    def size(self) -> int:
        return len(self.train[0])

    def head(self, dim: int, cfg) -> ClassificationHead:
        return ClassificationHead(dim, len(self.classes), cfg.cls_pool, cfg.dropout, cfg.init_std)

    def batch(self, step: int, micro: int, rank: int):
        rng = np.random.default_rng([self.seed, step, micro, rank, 0xC15])
        idx = torch.from_numpy(rng.integers(0, self.size, size=self.batch_size))
        return self.train[0][idx], self.train[1][idx], self.train[2][idx]

    def loss(self, model, step: int, micro: int, rank: int, device) -> torch.Tensor:
        x, n, y = (t.to(device) for t in self.batch(step, micro, rank))
        logits = model.task_heads.heads["pkg"](model.hidden_states(x), n)  # (B, C)
        return classification_loss(logits, y)

    @torch.no_grad()
    def evaluate(self, model, device, autocast, batch_size: int) -> dict:
        x, n, y = self.val
        correct, nll, per_class = 0, 0.0, np.zeros((len(self.classes), 2))
        for s in range(0, len(x), batch_size):
            xb, nb, yb = x[s : s + batch_size].to(device), n[s : s + batch_size].to(device), y[s : s + batch_size].to(device)
            with autocast():
                logits = model.task_heads.heads["pkg"](model.hidden_states(xb), nb)
            nll += float(torch.nn.functional.cross_entropy(logits.float(), yb, reduction="sum"))
            pred = logits.argmax(-1)
            correct += int((pred == yb).sum())
            for c, ok in zip(yb.tolist(), (pred == yb).tolist()):
                per_class[c] += (ok, 1)
        acc = correct / len(x)
        return dict(val_acc=acc, val_loss=nll / len(x), balanced_acc=float(np.mean(per_class[:, 0] / per_class[:, 1])),
                    n_val=len(x), n_classes=len(self.classes), classes=self.classes, **self.baseline)


class TaskSet:
    """The tasks of a run: heads attached to the trunk (model.task_heads), batches, the combined loss."""

    def __init__(self, cfg, data, model, device, rank: int = 0, log: Callable[[str], None] = print,
                 out_dir: Optional[Path] = None):
        self.cfg, self.device, self.rank, self.log = cfg, device, rank, log
        self.names = parse_tasks(cfg.tasks)
        self.pkg = PackageTask(cfg, data.tokenizer, log) if "pkg" in self.names else None
        sizes = {}
        for t in self.names:
            sizes[t] = max(1, len(data.train) // cfg.seq_len) if t == "lm" else self.pkg.size
        self.sizes = sizes
        self.probs = sampling_probs(sizes, cfg.task_sampling, cfg.task_temperature)
        heads = {"pkg": self.pkg.head(model.cfg.dim, cfg)} if self.pkg else {}
        model.task_heads = TaskHeads(self.names, heads, parse_weights(cfg.task_weights, self.names),
                                     cfg.task_weighting == "uncertainty").to(device)
        self._sums = {t: [0.0, 0] for t in self.names}
        self.csv = (out_dir / "tasks.csv") if out_dir is not None else None
        if len(self.names) > 1:
            how = ("every task every micro-step" if cfg.task_sampling == "all" else
                   "one task per micro-step, p = " + ", ".join(f"{t} {p:.3f}" for t, p in self.probs.items()))
            log(f"multitask: {', '.join(self.names)} (examples {', '.join(f'{t} {n}' for t, n in sizes.items())}); "
                f"{how}; {cfg.task_weighting} weights {model.task_heads.effective_weights()}")

    def sample(self, step: int, micro: int) -> list[str]:
        if self.cfg.task_sampling == "all" or len(self.names) == 1:
            return list(self.names)
        rng = np.random.default_rng([self.cfg.seed, step, micro, self.rank, 0x7A5])
        p = np.array([self.probs[t] for t in self.names])
        return [self.names[int(rng.choice(len(self.names), p=p / p.sum()))]]

    def loss(self, model, step: int, micro: int, lm_batch) -> torch.Tensor:
        """The weighted loss of the tasks drawn for (step, micro); model is the unwrapped trunk with task_heads.
        lm_batch: (x, y) already on the device (the trainer's sampler, augmented)."""
        losses = {}
        for t in self.sample(step, micro):
            if t == "lm":
                x, y = lm_batch
                losses[t] = model(x, y)
            else:
                losses[t] = self.pkg.loss(model, step, micro, self.rank, self.device)
            s = self._sums[t]
            s[0] += float(losses[t].detach())
            s[1] += 1
        return model.task_heads.combine(losses)

    def log_train(self, step: int, model) -> None:
        w = model.task_heads.effective_weights()
        for t in self.names:
            s = self._sums[t]
            if s[1]:
                self._row(dict(step=step, kind="train", task=t, train_loss=f"{s[0] / s[1]:.6f}", weight=f"{w[t]:.6g}",
                               prob=f"{self.probs[t]:.4f}"))
            self._sums[t] = [0.0, 0]

    def evaluate(self, model, autocast, batch_size: int, step: int, lm: Optional[tuple] = None) -> dict:
        out = {}
        if "lm" in self.names and lm is not None:
            out["lm"] = dict(val_loss=lm[0], val_bpb=lm[1])
        if self.pkg is not None:
            was = model.training
            model.eval()
            out["pkg"] = self.pkg.evaluate(model, self.device, autocast, batch_size)
            if was:
                model.train()
            r = out["pkg"]
            self.log(f"step {step}: task pkg held-out accuracy {r['val_acc']:.4f} (balanced {r['balanced_acc']:.4f}), "
                     f"loss {r['val_loss']:.4f}; majority-class baseline {r['majority_acc']:.4f}")
        for t, r in out.items():
            self._row(dict(step=step, kind="eval", task=t, val_loss=f"{r['val_loss']:.6f}",
                           val_acc=f"{r['val_acc']:.6f}" if "val_acc" in r else "",
                           val_bpb=f"{r['val_bpb']:.6f}" if "val_bpb" in r else "",
                           majority_acc=f"{r['majority_acc']:.6f}" if "majority_acc" in r else ""))
        if len(self.names) > 1:
            out["weights"] = model.task_heads.effective_weights()
            out["probs"] = dict(self.probs)
        return out

    def truncate_csv(self, step: int) -> None:
        """After a resume, drop tasks.csv rows logged past the checkpoint by the interrupted run."""
        if self.csv is None or not self.csv.exists():
            return
        with open(self.csv, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        with open(self.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=TASK_CSV)
            w.writeheader()
            w.writerows(rows)

    def _row(self, row: dict) -> None:
        if self.csv is None:
            return
        new = not self.csv.exists()
        with open(self.csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=TASK_CSV)
            if new:
                w.writeheader()
            w.writerow({k: row.get(k, "") for k in TASK_CSV})


__all__ = ["TASKS", "SAMPLING", "WEIGHTING", "parse_tasks", "parse_weights", "sampling_probs", "PackageTask",
           "TaskSet", "strip_task_heads", "POOLS"]
