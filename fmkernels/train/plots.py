"""The run's loss plot (loss_curve.png) from metrics.csv and tasks.csv.

- validation points measured on the first `eval_tokens` tokens (periodic evals) and on the full split (the final
  eval) are different series, never one line (joining them drew a false uptick at the end of every run);
- a multitask run's objective is not a language-model loss: the LM training loss comes from tasks.csv (task lm),
  other tasks' training losses go on a second axis (nats per example), the combined objective is not drawn as
  "train loss".
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(v) -> Optional[float]:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if x == x else None  # NaN -> None


def plot_run(out_dir, title: str) -> Optional[Path]:
    out = Path(out_dir)
    rows = _read(out / "metrics.csv")
    if not rows:
        return None
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install fmkernels[plot]): no loss-curve PNG", flush=True)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens_at = {int(r["step"]): int(r["tokens"]) for r in rows if r.get("tokens")}
    task_rows = [r for r in _read(out / "tasks.csv") if r.get("kind") == "train"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax2 = None
    if task_rows:  # multitask: per-task training losses
        for task in dict.fromkeys(r["task"] for r in task_rows):
            pts = [(tokens_at.get(int(r["step"])), _num(r["train_loss"])) for r in task_rows if r["task"] == task]
            pts = [(t, v) for t, v in pts if t is not None and v is not None]
            if not pts:
                continue
            if task == "lm":
                ax.plot(*zip(*pts), lw=1, label="train loss (lm)")
            else:
                ax2 = ax2 or ax.twinx()
                ax2.plot(*zip(*pts), lw=1, color="tab:purple", alpha=0.8, label=f"train loss ({task})")
        if ax2 is not None:
            ax2.set_ylabel("task loss (nats / example)")
    else:
        tr = [(int(r["tokens"]), _num(r["loss"])) for r in rows if _num(r.get("loss")) is not None]
        if tr:
            ax.plot(*zip(*tr), lw=1, label="train loss")
    val = [r for r in rows if _num(r.get("val_loss")) is not None]
    sets = {}
    for r in val:  # files from before val_set existed: one unnamed series
        sets.setdefault(r.get("val_set") or "", []).append((int(r["tokens"]), _num(r["val_loss"])))
    for name, pts in sets.items():
        if name == "full":
            ax.plot(*zip(*pts), "*", ms=12, color="tab:red", label="validation loss (full split)")
        else:
            label = "validation loss" + (f" ({name})" if name else "")
            ax.plot(*zip(*pts), "o-", ms=4, color="tab:orange", label=label)
    ax.set_xlabel("tokens")
    ax.set_ylabel("language-model loss (nats / token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if ax2 is not None:
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=8)
    png = out / "loss_curve.png"
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
