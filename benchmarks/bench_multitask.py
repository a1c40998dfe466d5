"""Each task trained alone vs together (multitask), same step budget, on the embedded stdlib corpus: next-token
LM (validation bits per byte) and stdlib-package classification (held-out accuracy, files held out), plus the
classification head on the LM-pretrained trunk. One seed: a first look, not a study (docs/multitask.md).

    nice -n 10 .venv/bin/python benchmarks/bench_multitask.py --out runs/multitask          # tiny preset, 300 steps
    nice -n 10 .venv/bin/python benchmarks/bench_multitask.py --seed 1 --out runs/multitask_s1   # another seed
    nice -n 10 .venv/bin/python benchmarks/bench_multitask.py --steps 50 --out /tmp/mt      # smoke run
"""
import argparse
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from fmkernels.train import TrainConfig, train  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/multitask", help="work directory (one run folder per row)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=None, help="row names to run, separated by ';' (default: all)")
    a = ap.parse_args()
    root = Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    base = dict(preset=a.preset, tokenizer="byte", seq_len=a.seq_len, batch_size=a.batch_size, max_steps=a.steps,
                progress=False, sample_tokens=0, eval_every=10**9, save_every=10**9, log_every=25, corpus="stdlib",
                val_fraction=0.2, lr=3e-3, warmup_steps=20, cls_classes=a.classes, dtype="fp32", seed=a.seed,
                # the setup these figures were measured with (before make train's defaults became Muon + wsd + QK-norm)
                optimizer="adamw", lr_schedule="cosine", qk_norm=False)
    runs = {
        "lm alone": dict(tasks="lm"),
        "pkg alone": dict(tasks="pkg"),
        "lm+pkg, all, fixed 1:1": dict(tasks="lm,pkg"),
        "lm+pkg, all, uncertainty": dict(tasks="lm,pkg", task_weighting="uncertainty"),
        "lm+pkg, all, fixed 1:0.2": dict(tasks="lm,pkg", task_weights="pkg=0.2"),
        "lm+pkg, all, fixed 1:1, grad_clip 4": dict(tasks="lm,pkg", grad_clip=4.0),
        "lm+pkg, proportional sampling": dict(tasks="lm,pkg", task_sampling="proportional"),
        "lm+pkg, temperature 3 sampling": dict(tasks="lm,pkg", task_sampling="temperature", task_temperature=3.0),
        "pkg on the lm-alone trunk (finetune --from)": dict(tasks="pkg", init_from="@lm alone"),
        "pkg head on the frozen lm-alone trunk": dict(tasks="pkg", init_from="@lm alone", freeze_embeddings=True,
                                                      freeze_blocks="@n_layers"),
    }
    only = {n.strip() for n in a.only.split(";")} if a.only else None
    results = json.loads((root / "results.json").read_text()) if (root / "results.json").exists() else {}
    for name, kw in runs.items():
        if only and name not in only:
            continue
        out = root / name.replace(" ", "_").replace(",", "").replace(":", "-").replace("(", "").replace(")", "")
        shutil.rmtree(out, ignore_errors=True)
        kw = dict(kw)
        if str(kw.get("init_from", "")).startswith("@"):
            src = results.get(kw["init_from"][1:], {}).get("out")
            if not src:
                print(f"skipping {name!r}: run {kw['init_from'][1:]!r} first")
                continue
            kw["init_from"] = src
        if kw.get("freeze_blocks") == "@n_layers":
            from fmkernels.models.config import PRESETS

            kw["freeze_blocks"] = PRESETS[a.preset]["n_layers"]
        s = train(TrainConfig.build(None, dict(base, out_dir=str(out), **kw)), log=lambda m: None)
        t = s.get("tasks") or {}
        r = dict(out=str(out), train_time_s=s["train_time_s"], steps=s["step"], val_bpb=s.get("val_bpb"),
                 pkg=t.get("pkg"), weights=t.get("weights"), probs=t.get("probs"))
        results[name] = r
        (root / "results.json").write_text(json.dumps(results, indent=1))
        pk = r["pkg"] or {}
        print(f"{name}: val bpb {r['val_bpb']:.4f}; pkg acc {pk.get('val_acc', float('nan')):.4f} (balanced "
              f"{pk.get('balanced_acc', float('nan')):.4f}, majority {pk.get('majority_acc', float('nan')):.4f}); "
              f"{r['train_time_s']:.0f} s; weights {r['weights']}; probs {r['probs']}", flush=True)
    print("\n| run | LM val bits/byte | pkg held-out acc | pkg balanced acc | train s |\n|---|---|---|---|---|")
    for name, r in results.items():
        pk = r["pkg"] or {}
        acc = f"{pk['val_acc']:.4f}" if pk else "-"
        bal = f"{pk['balanced_acc']:.4f}" if pk else "-"
        print(f"| {name} | {r['val_bpb']:.4f} | {acc} | {bal} | {r['train_time_s']:.0f} |")


if __name__ == "__main__":
    main()
