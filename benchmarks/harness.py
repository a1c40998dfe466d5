"""Shared benchmark helper: shapes, machine info and peaks, and how each measurement is recorded.

Every benchmark calls `measure(benchmark, fn, group=..., label=..., flops=..., nbytes=..., peer=...)`.
The label names the backend ("fmk-cpu", "fmk-reference", ...) or the PyTorch peer ("torch ..."); the peer
of a group carries peer=True so reports can quote speedups as ratios within one run.
`fmk bench` turns the pytest-benchmark JSON into bench-results/ (markdown, JSON, PNG).
"""
from __future__ import annotations

import functools
import os
import platform
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

QUICK = os.environ.get("FMK_BENCH_QUICK", "0") == "1"


@functools.lru_cache(maxsize=None)
def cpu_mhz() -> float:
    """Core clock for peak estimates: FMK_CPU_GHZ if set, else cpufreq's max, else /proc/cpuinfo's "cpu MHz"
    (on VMs that is often the base clock: Zen 4 here reports 2596 MHz but runs near 3.66 GHz, so shares of
    peak computed from it are overstated by ~1.4x)."""
    if os.environ.get("FMK_CPU_GHZ"):
        return float(os.environ["FMK_CPU_GHZ"]) * 1000.0
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as f:
            return float(f.read()) / 1000.0
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.split(":")[1])
    except OSError:
        pass
    return 2500.0


@functools.lru_cache(maxsize=None)
def machine_info() -> dict:
    import fmkernels

    d = fmkernels.info()
    return {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cpu_mhz": cpu_mhz(),
        "isa": d["cpu_isa"],
        "torch": torch.__version__,
        "fmkernels": d["fmkernels"],
        "gpu": d["gpu"],
        "peaks": peaks(),
    }


@functools.lru_cache(maxsize=None)
def peaks() -> dict:
    """Rough peaks of this CPU: fp32 FMA = threads * GHz * 32 flop/cycle (2x AVX-512 FMA lanes-equivalent),
    bf16 dot products 2x that, int8 VNNI 4x; memory bandwidth measured once with a 256 MB copy."""
    ghz = cpu_mhz() / 1000.0
    thr = torch.get_num_threads()
    fp32 = thr * ghz * 32.0
    a = torch.empty(64 * 1024 * 1024)
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t)
    gbs = 2 * a.numel() * 4 / best / 1e9
    out = {"fp32_gflops": fp32, "bf16_gflops": 2 * fp32, "int8_gops": 4 * fp32, "mem_gbs": gbs}
    if torch.cuda.is_available():  # device copy bandwidth (H200 datasheet: 4.8 TB/s)
        ga = torch.empty(256 * 1024 * 1024, device="cuda")
        gb = torch.empty_like(ga)
        gb.copy_(ga)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            gb.copy_(ga)
        end.record()
        torch.cuda.synchronize()
        out["gpu_mem_gbs"] = 10 * 2 * ga.numel() * 4 / (start.elapsed_time(end) / 1e3) / 1e9
        del ga, gb
    return out


def measure(
    benchmark,
    fn,
    *,
    group: str,
    label: str,
    flops: float | None = None,
    nbytes: float | None = None,
    peak: str = "fp32_gflops",
    peer: bool = False,
    rounds: int | None = None,
    params: dict | None = None,
):
    """Time fn() with pytest-benchmark (1 warmup round) and record throughput metadata for the report."""
    benchmark.group = group
    benchmark.name = label
    benchmark.extra_info.update(
        {
            "label": label,
            "flops": flops,
            "bytes": nbytes,
            "peak_kind": peak,
            "peak": peaks().get(peak),
            "mem_peak_gbs": peaks()["mem_gbs"],
            "peer": peer,
            **(params or {}),
        }
    )
    if rounds is None:
        rounds = 3 if QUICK else 10
    return benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)


def peak_memory(fn) -> int:
    """Peak resident memory added while fn runs, in bytes (CPU: torch's profiler memory counters)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.key_averages()
    return max((e.cpu_memory_usage for e in events), default=0)
