"""Compress-then-recover table: validation bits per byte and forward tokens/s of a pretrained checkpoint, dense vs
int8 (W8A8), int4 g128 (weight-only), 2:4 one-shot (Wanda) and 2:4 after sparse fine-tuning (plus int4 g128 after
QAT with --qat). Every variant is written by `fmk prune` / `fmk quantize` (the same functions) and loaded back the
way `fmk eval` loads it. Writes docs/compress.md's table.

    fmk train --preset small --ffn_dim 768 --max_time_s 240 --eval_every 1000000 --out_dir runs/pre_small
    OMP_WAIT_POLICY=PASSIVE nice -n 10 .venv/bin/python scripts/compress_table.py --checkpoint runs/pre_small \\
        --out runs/compress --recover_steps 60 --md docs/compress_table.md

Speed: every model runs the same (batch, seq_len) batch, interleaved round-robin for --rounds rounds, at 2 threads
and at 1 thread; the median is reported (the machine is shared: ratios, not absolute figures, carry).
"""
import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from fmkernels.train.compress import prune_checkpoint, quantize_checkpoint  # noqa: E402
from fmkernels.train.evaluate import load_model  # noqa: E402


@torch.no_grad()
def speeds(models: dict, batch: torch.Tensor, rounds: int, threads: int) -> dict:
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times = {k: [] for k in models}
        for m in models.values():  # warm-up (packing caches, plans)
            m(batch)
        for _ in range(rounds):
            for k, m in models.items():
                t0 = time.perf_counter()
                m(batch)
                times[k].append(time.perf_counter() - t0)
        return {k: batch.numel() / statistics.median(v) for k, v in times.items()}
    finally:
        torch.set_num_threads(old)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", default="runs/compress")
    ap.add_argument("--recover_steps", type=int, default=60)
    ap.add_argument("--recover_lr", type=float, default=3e-4)
    ap.add_argument("--batch_size", type=int, default=None, help="recovery batch size (default: the checkpoint's)")
    ap.add_argument("--eval_tokens", type=int, default=None, help="default: the full validation split")
    ap.add_argument("--qat", action="store_true", help="add int4 g128 after QAT (recover_steps steps)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--speed_batch", type=int, default=8)
    ap.add_argument("--md", default=None)
    a = ap.parse_args()
    root = Path(a.out)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    kw = dict(eval_tokens=a.eval_tokens, log=lambda m: print("  " + m, flush=True))
    rkw = dict(lr=a.recover_lr, batch_size=a.batch_size)
    print("2:4 (wanda) + recovery ...", flush=True)
    pr = prune_checkpoint(a.checkpoint, root / "sparse24", method="wanda", recover_steps=a.recover_steps, **kw, **rkw)
    print("int8 ...", flush=True)
    q8 = quantize_checkpoint(a.checkpoint, root / "int8", format="int8", **kw)
    print("int4 g128 ...", flush=True)
    q4 = quantize_checkpoint(a.checkpoint, root / "int4", format="int4", group_size=128, **kw)
    rows = [pr[0], q8[1], q4[1], pr[1], pr[2]]
    names = ["dense", "int8 (W8A8, one-shot)", "int4 g128 (weight-only, one-shot)", "2:4 one-shot (Wanda)",
             f"2:4 after {a.recover_steps} recovery steps"]
    ckpts = [a.checkpoint, root / "int8", root / "int4", root / "sparse24" / "oneshot", root / "sparse24"]
    if a.qat:
        print("int4 g128 + QAT ...", flush=True)
        qq = quantize_checkpoint(a.checkpoint, root / "int4_qat", format="int4", group_size=128,
                                 recover_steps=a.recover_steps, **kw, **rkw)
        rows.append(qq[2])
        names.append(f"int4 g128 after {a.recover_steps} QAT steps")
        ckpts.append(root / "int4_qat")
    models = {n: load_model(p)[0] for n, p in zip(names, ckpts)}
    T = next(iter(models.values())).cfg.max_seq_len
    batch = torch.randint(0, next(iter(models.values())).cfg.vocab_size, (a.speed_batch, T),
                          generator=torch.Generator().manual_seed(0))
    s2 = speeds(models, batch, a.rounds, 2)
    s1 = speeds(models, batch, a.rounds, 1)
    d = names[0]
    L = ["| model | val bits/byte | val loss | tokens/s, 2 threads | vs dense | tokens/s, 1 thread | vs dense |",
         "|---|---|---|---|---|---|---|"]
    for n, r in zip(names, rows):
        L.append(f"| {n} | {r['val_bpb']:.4f} | {r['val_loss']:.4f} | {s2[n]:,.0f} | {s2[n] / s2[d]:.2f}x | "
                 f"{s1[n]:,.0f} | {s1[n] / s1[d]:.2f}x |")
    text = (f"Checkpoint {a.checkpoint}; validation: {rows[0]['tokens']:,} tokens of {rows[0]['corpus']}; speed: forward "
            f"(logits) of a ({a.speed_batch}, {T}) batch, median of {a.rounds} interleaved rounds.\n\n" + "\n".join(L))
    print(text)
    if a.md:
        Path(a.md).write_text(text + "\n")


if __name__ == "__main__":
    main()
