"""Training-step benchmark: fmkernels Transformer vs the same architecture in plain PyTorch (PlainTransformer:
nn.Linear, F.scaled_dot_product_attention, F.cross_entropy), fp32 and bf16 autocast, side by side in one run.

Speed: both models (same init, same batch) live in one process and their steps ALTERNATE (fmk, plain, fmk,
plain ...), so a noisy neighbour on this shared machine hits both alike; tokens/s from the median step time.
Memory: each (model, dtype, vocab) point runs 3 steps in its own subprocess; peak memory = max RSS during the
steps minus RSS before the first step (activations + gradients + optimizer state + logits). Quote ratios.

    .venv/bin/python benchmarks/bench_train.py                 # anchor config + vocab 32768 memory check
    .venv/bin/python benchmarks/bench_train.py --quick         # fewer steps
    .venv/bin/python benchmarks/bench_train.py --vocabs 8192 --dtypes fp32,int8   # one vocab, two modes
dtype int8 = the trainer's `--int8_training true` switch (fmkernels.Int8TrainingConfig) on the fmkernels model,
against the plain model in fp32 (a precision change, reported as its own row, not as fp32).
Allocator: both models share the process, so both get the same malloc settings. Default: stock glibc (what a
plain PyTorch user runs). `--allocator tuned` applies fmkernels.tune_cpu_allocator() (what `fmk train` does on
CPU) to both: neither model then page-faults its activations back every step. Both are worth reading: the
plain model's materialized logits cost it page faults under stock glibc, which is part of the fused model's
lead there (vocab 8192 fp32 1.25x stock vs 1.18x tuned in one session; bf16 1.43x vs 1.30x).
Writes bench-results/bench_train.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    """Peak RSS of this process image (VmHWM; unlike ru_maxrss it is not inherited across fork + exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- pytest-benchmark entry (`fmk bench -k train_step`): one training step at the anchor config, fmkernels model
# vs plain twin, fp32 / bf16 autocast / int8-training switch. The script above adds peak memory and
# strictly alternating steps; this puts the step into the suite's report.
def _step_fn(impl: str, dtype: str, vocab: int = 8192, dim: int = 384, layers: int = 6, heads: int = 6,
             batch: int = 8, seq: int = 256):
    import torch

    import fmkernels
    from fmkernels.models import PlainTransformer, Transformer, TransformerConfig

    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads, max_seq_len=seq)
    model = (Transformer if impl == "fmkernels" else PlainTransformer)(cfg)
    if dtype == "int8" and impl == "fmkernels":
        fmkernels.quantize_(model, fmkernels.Int8TrainingConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, vocab, (batch, seq))
    y = torch.randint(0, vocab, (batch, seq))

    def fn():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    flops = 6 * model.num_params() * batch * seq  # ~6 N T: matmul FLOPs (tied head counted once), attention not
    fn.model = model
    return fn, flops


def run_point(impl: str, dtype: str, vocab: int, dim: int, layers: int, heads: int, batch: int, seq: int,
              steps: int) -> dict:
    import torch

    step, _ = _step_fn(impl, dtype, vocab, dim, layers, heads, batch, seq)

    rss0 = _rss_bytes()
    max0 = _hwm_bytes()
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = _hwm_bytes()
    med = statistics.median(times)
    return dict(impl=impl, dtype=dtype, vocab=vocab, params=sum(p.numel() for p in step.model.parameters()),
                step_s=med, tokens_per_s=batch * seq / med, peak_mem_mb=(max(peak, max0) - rss0) / 2**20,
                threads=torch.get_num_threads())


def speed_pair(dtype: str, vocab: int, dim: int, layers: int, heads: int, batch: int, seq: int, steps: int) -> dict:
    import torch

    from fmkernels.models import PlainTransformer, Transformer, TransformerConfig, fmk_to_plain_state_dict

    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads, max_seq_len=seq)
    fm = Transformer(cfg)
    pl = PlainTransformer(cfg)
    pl.load_state_dict(fmk_to_plain_state_dict(fm.state_dict(), cfg))
    if dtype == "int8":  # the trainer's int8_training switch on the fmkernels model; both models step in fp32
        import fmkernels

        fmkernels.quantize_(fm, fmkernels.Int8TrainingConfig())
    opts = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for m in (fm, pl)}
    x = torch.randint(0, vocab, (batch, seq))
    y = torch.randint(0, vocab, (batch, seq))

    def step(m):
        t = time.perf_counter()
        if dtype == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = m(x, y)
        else:
            loss = m(x, y)
        loss.backward()
        opts[id(m)].step()
        opts[id(m)].zero_grad(set_to_none=True)
        return time.perf_counter() - t

    for _ in range(2):
        step(fm), step(pl)
    tf, tp = [], []
    for _ in range(steps):
        tf.append(step(fm))
        tp.append(step(pl))
    mf, mp = statistics.median(tf), statistics.median(tp)
    return dict(fmk_tokens_per_s=batch * seq / mf, plain_tokens_per_s=batch * seq / mp, speedup=mp / mf,
                fmk_step_times=tf, plain_step_times=tp)


def _pytest_params():
    import pytest

    return pytest.mark.parametrize("impl", ["fmkernels", "plain"]), pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])


try:
    _impl_param, _dtype_param = _pytest_params()

    @_impl_param
    @_dtype_param
    def test_train_step(benchmark, impl, dtype):
        from benchmarks.harness import QUICK, measure

        if dtype == "int8" and impl == "plain":
            dtype_plain = "fp32"  # the int8 row compares against plain fp32
        else:
            dtype_plain = dtype
        fn, flops = _step_fn(impl, dtype if impl == "fmkernels" else dtype_plain)
        measure(benchmark, fn, group=f"train step {dtype} d384 x 6 layers, batch 8 x 256, vocab 8192",
                label=f"fmkernels ({dtype})" if impl == "fmkernels" else f"plain PyTorch eager ({dtype_plain})",
                peer=impl == "plain", flops=flops, rounds=3 if QUICK else 5)
except ImportError:  # pytest is not installed: the script still runs
    pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--vocabs", default="8192,32768")
    p.add_argument("--dtypes", default="fp32,bf16,int8",
                   help="fp32 | bf16 (autocast, both models) | int8 (fmkernels with the int8_training switch vs plain fp32)")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=1, help="interleaved repeats of each point")
    p.add_argument("--allocator", choices=("default", "tuned"), default="default",
                   help="default: stock glibc malloc; tuned: fmkernels.tune_cpu_allocator() for the whole process "
                        "(both models), as fmk train does")
    p.add_argument("--out", default="bench-results/bench_train.json")
    p.add_argument("--point", default=None, help=argparse.SUPPRESS)  # internal: run one point, print JSON
    a = p.parse_args(argv)
    steps = a.steps or (3 if a.quick else 6)
    if a.allocator == "tuned":
        from fmkernels.allocator import tune_cpu_allocator

        tune_cpu_allocator()
    if a.point:
        impl, dtype, vocab = a.point.split(",")
        r = run_point(impl, dtype, int(vocab), a.dim, a.layers, a.heads, a.batch, a.seq, steps)
        print("RESULT " + json.dumps(r))
        return 0
    import torch

    results, speed = [], {}
    for vocab in [int(v) for v in a.vocabs.split(",")]:
        for dtype in a.dtypes.split(","):
            sp = speed_pair(dtype, vocab, a.dim, a.layers, a.heads, a.batch, a.seq, steps)
            speed[(vocab, dtype)] = sp
            print(f"  speed {dtype} vocab {vocab}: fmkernels {sp['fmk_tokens_per_s']:.0f} tok/s, plain "
                  f"{sp['plain_tokens_per_s']:.0f} tok/s ({sp['speedup']:.2f}x)", flush=True)
            for _ in range(a.repeats):
                for impl in ("fmkernels", "plain"):
                    cmd = [sys.executable, __file__, "--point", f"{impl},{dtype},{vocab}", "--steps", "1",
                           "--dim", str(a.dim), "--layers", str(a.layers), "--heads", str(a.heads),
                           "--batch", str(a.batch), "--seq", str(a.seq), "--allocator", a.allocator]
                    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                    r = json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
                    results.append(r)
                    print(f"  memory {impl:9s} {dtype} vocab {vocab}: peak +{r['peak_mem_mb']:.0f} MB", flush=True)
    # aggregate: best (max tokens/s) per point, median peak memory
    agg = {}
    for r in results:
        k = (r["vocab"], r["dtype"], r["impl"])
        agg.setdefault(k, []).append(r)
    print(f"\nTraining step, d{a.dim} x {a.layers} layers, batch {a.batch} x seq {a.seq} "
          f"({torch.get_num_threads()} threads), fused AdamW, median of {steps} alternating steps, "
          f"{a.allocator} allocator\n")
    print("| vocab | dtype | fmkernels tok/s | plain tok/s | speedup | fmk peak MB | plain peak MB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for vocab in sorted({k[0] for k in agg}):
        for dtype in a.dtypes.split(","):
            f, pl = agg.get((vocab, dtype, "fmkernels")), agg.get((vocab, dtype, "plain"))
            if not f or not pl:
                continue
            sp = speed[(vocab, dtype)]
            ft, pt = sp["fmk_tokens_per_s"], sp["plain_tokens_per_s"]
            fm = statistics.median(r["peak_mem_mb"] for r in f)
            pm = statistics.median(r["peak_mem_mb"] for r in pl)
            rows.append(dict(vocab=vocab, dtype=dtype, fmk_tokens_per_s=ft, plain_tokens_per_s=pt, speedup=ft / pt,
                             fmk_peak_mb=fm, plain_peak_mb=pm, memory_ratio=fm / pm))
            print(f"| {vocab} | {dtype} | {ft:.0f} | {pt:.0f} | {ft / pt:.2f}x | {fm:.0f} | {pm:.0f} | {fm / pm:.2f}x |")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump({"config": vars(a), "memory_points": results, "speed": {f"{k[0]}-{k[1]}": v for k, v in speed.items()},
                   "summary": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
