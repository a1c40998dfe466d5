"""Data selection vs uniform sampling at the same FLOPs budget (scoring forwards counted), tiny model, byte
tokenizer, 30 stdlib files. Writes a markdown report (docs/data_selection.md holds one run of it).

    OMP_WAIT_POLICY=PASSIVE nice -n 10 .venv/bin/python scripts/selection_report.py --steps 400 --out runs/sel

Runs (each with its own full lr schedule, max_steps chosen so that training + online scoring FLOPs match the
uniform run's training FLOPs):
  uniform          BatchSampler, `steps` steps
  online loss      select_mode=online, select_ratio=0.5 (train on the 16 highest-loss of 32 candidates)
  online RHO       the same, score = loss - reference loss (select_reference = the reference run)
  offline loss     select_mode=offline, select_ratio=0.5, select_scorer = the reference run: the top half of the
                   windows by the reference model's loss; `steps` training steps, the one-off scoring pass is
                   reported beside (it scores the whole training split once)
  online ..., same steps   the online runs again with `steps` steps (more FLOPs): does a selected step teach more?
The reference run (uniform, `ref_steps` steps on the same corpus) is a one-off cost shared by the RHO and offline
runs, reported separately as RHO-loss does.
"""
import argparse
import csv
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from fmkernels.data import stdlib_files  # noqa: E402
from fmkernels.train import TrainConfig, train  # noqa: E402
from fmkernels.train.selection import forward_flops_per_token, train_flops_per_token  # noqa: E402


def curve(run: Path):
    with open(run / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["val_bpb"]]
    return [(int(r["step"]), float(r["train_time_s"]), float(r["flops"]), float(r["val_bpb"])) for r in rows]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400, help="uniform run's steps (the FLOPs budget)")
    ap.add_argument("--ref_steps", type=int, default=200)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seq_len", type=int, default=64)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--files", default="100:130", help="slice of the stdlib file list used as the corpus")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/selection")
    ap.add_argument("--md", default=None, help="also write the markdown here")
    ap.add_argument("--only", default=None, help="comma-separated run names to (re)run; others are read from --out")
    a = ap.parse_args()
    root = Path(a.out)
    c = root / "corpus"
    lo, hi = map(int, a.files.split(":"))
    if not c.exists():
        c.mkdir(parents=True)
        for rel, p in stdlib_files()[lo:hi]:
            (c / rel.replace("/", "__")).write_bytes(p.read_bytes())
    base = dict(preset=a.preset, tokenizer="byte", seq_len=a.seq_len, batch_size=a.batch_size, progress=False,
                sample_tokens=0, log_every=10, corpus=str(c), dtype="fp32", val_fraction=0.2, lr=3e-3,
                warmup_steps=20, eval_tokens=32768, seed=a.seed, save_every=100000,
                # the setup these figures were measured with (before make train's defaults became Muon + wsd + QK-norm)
                optimizer="adamw", lr_schedule="cosine", qk_norm=False)
    only = set(a.only.split(",")) if a.only else None

    def run(name, **kw):
        out = root / name
        if only is not None and name not in only and (out / "summary.json").exists():
            return json.loads((out / "summary.json").read_text())
        shutil.rmtree(out, ignore_errors=True)
        steps = kw["max_steps"]
        cfg = TrainConfig.build(None, dict(base, out_dir=str(out), eval_every=max(1, steps // 4), **kw))
        print(f"running {name} ({steps} steps) ...", flush=True)
        s = train(cfg, log=lambda m: None)
        print(f"  {name}: val bpb {s['val_bpb']:.4f}, {s['train_time_s']:.0f} s, {s['flops']:.3g} FLOPs", flush=True)
        return s

    ref = run("reference", max_steps=a.ref_steps)
    cfg0 = TrainConfig.build(None, dict(base, max_steps=1))
    mcfg = cfg0.model_config(256)
    T, B = a.seq_len, a.batch_size
    import math

    cand = math.ceil(B / a.ratio)
    train_step = train_flops_per_token(mcfg, T) * B * T
    fwd = forward_flops_per_token(mcfg, T) * cand * T
    steps_loss = round(a.steps * train_step / (train_step + fwd))
    steps_rho = round(a.steps * train_step / (train_step + 2 * fwd))
    refdir = str(root / "reference")
    online = dict(select_mode="online", select_ratio=a.ratio)
    rho = dict(online, select_reference=refdir)
    plan = [  # (name, run directory, fields)
        ("uniform", "uniform", dict(max_steps=a.steps)),
        ("online loss", "online_loss", dict(online, max_steps=steps_loss)),
        ("online RHO", "online_rho", dict(rho, max_steps=steps_rho)),
        ("offline loss (scorer = reference)", "offline_loss",
         dict(max_steps=a.steps, select_mode="offline", select_ratio=a.ratio, select_scorer=refdir)),
        ("online loss, same steps (more FLOPs)", "online_loss_steps", dict(online, max_steps=a.steps)),
        ("online RHO, same steps (more FLOPs)", "online_rho_steps", dict(rho, max_steps=a.steps)),
    ]
    runs = {name: run(d, **kw) for name, d, kw in plan}
    dirs = {name: d for name, d, _ in plan}
    L = []
    L.append(f"Corpus: stdlib files [{a.files}] ({sum(p.stat().st_size for p in c.iterdir()) / 1e6:.1f} MB), byte tokenizer, "
             f"val_fraction 0.2; {a.preset} preset, seq {T}, batch {B}, lr 3e-3 cosine, fp32, seed {a.seed}. "
             f"Reference run: uniform, {a.ref_steps} steps ({ref['flops']:.3g} FLOPs, {ref['train_time_s']:.0f} s; "
             f"val bpb {ref['val_bpb']:.4f}), a one-off cost not in the budgets below.")
    L.append("")
    L.append("| run | steps | training FLOPs | scoring FLOPs | total FLOPs | train time (s) | val bits/byte (full split) | vs uniform |")
    L.append("|---|---|---|---|---|---|---|---|")
    u = runs["uniform"]
    for name, s in runs.items():
        tr = s["step"] * train_step
        sc = s["flops"] - tr
        L.append(f"| {name} | {s['step']} | {tr:.3g} | {sc:.3g} | {s['flops']:.3g} | {s['train_time_s']:.0f} | "
                 f"{s['val_bpb']:.4f} | {s['val_bpb'] - u['val_bpb']:+.4f} |")
    L.append("")
    L.append("Validation bits/byte during the runs, at 1/4, 1/2 and 3/4 of each run's steps (first 32,768 validation "
             "tokens) and at the end (full split); FLOPs (training + scoring) and training seconds at that point:")
    L.append("")
    L.append("| run | 1/4 | 1/2 | 3/4 | end |")
    L.append("|---|---|---|---|---|")
    for name, d in dirs.items():
        pts = curve(root / d)
        pts = pts[:-1][:3] + pts[-1:]
        L.append(f"| {name} | " + " | ".join(f"{v:.3f} @ {f:.2g} / {t:.0f} s" for _, t, f, v in pts) + " |")
    text = "\n".join(L)
    print(text)
    if a.md:
        Path(a.md).write_text(text + "\n")


if __name__ == "__main__":
    main()
