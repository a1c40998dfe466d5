"""Data augmentation vs none, tiny model, byte tokenizer, same step budget (one seed: a first look, not a study).

    .venv/bin/python benchmarks/bench_augment.py            # 30 stdlib files (~2.7 MB), 400 steps (< 1 epoch)
    .venv/bin/python benchmarks/bench_augment.py --small    # 6 files (~0.5 MB), 600 steps (several epochs)
"""
import argparse
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from fmkernels.data import stdlib_files  # noqa: E402
from fmkernels.train import TrainConfig, train  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--out", default=None, help="work directory (default: a temporary one)")
    a = ap.parse_args()
    root = Path(a.out or tempfile.mkdtemp(prefix="fmk-aug-"))
    c = root / "corpus"
    shutil.rmtree(c, ignore_errors=True)
    c.mkdir(parents=True)
    for rel, p in stdlib_files()[100:106] if a.small else stdlib_files()[100:130]:
        (c / rel.replace("/", "__")).write_bytes(p.read_bytes())
    base = dict(preset="tiny", tokenizer="byte", seq_len=64, batch_size=16, max_steps=600 if a.small else 400,
                progress=False, sample_tokens=0, eval_every=100000, log_every=50, corpus=str(c), dtype="fp32",
                val_fraction=0.2, lr=3e-3, warmup_steps=20,
                # the setup these figures were measured with (before make train's defaults became Muon + wsd + QK-norm)
                optimizer="adamw", lr_schedule="cosine", qk_norm=False)
    runs = {"none": {}, "token_dropout 0.1": dict(aug_token_dropout=0.1), "span_mask 0.5": dict(aug_span_mask=0.5),
            "crop 0.5": dict(aug_crop=0.5), "rename 0.5": dict(aug_rename=0.5),
            "all": dict(aug_token_dropout=0.1, aug_span_mask=0.5, aug_crop=0.5, aug_rename=0.5)}
    print("| augmentation | final train loss | val loss | val bits/byte |\n|---|---|---|---|")
    for name, kw in runs.items():
        out = root / name.replace(" ", "_")
        shutil.rmtree(out, ignore_errors=True)
        s = train(TrainConfig.build(None, dict(base, out_dir=str(out), **kw)), log=lambda m: None)
        print(f"| {name} | {s['final_train_loss']:.4f} | {s['val_loss']:.4f} | {s['val_bpb']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
