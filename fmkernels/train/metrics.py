"""What a run writes besides checkpoints: metrics.csv (one row per log interval and per evaluation), TensorBoard
scalars when asked for, and the loss-curve PNG."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

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
