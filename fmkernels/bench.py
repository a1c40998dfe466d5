"""`fmk bench`: run benchmarks/ with pytest-benchmark and write bench-results/ (results.md, results.json,
one PNG per benchmark group). Ratios are within one run: each group's peer (peer=True) is the baseline."""
from __future__ import annotations

import importlib.util

import json
import os
import subprocess
import sys
from pathlib import Path


class BenchError(RuntimeError):
    """`fmk bench` cannot run here (no benchmarks/ checkout, or the dev extra is missing); nothing was written."""


def find_benchmarks_dir() -> Path:
    here = Path(__file__).resolve().parent.parent / "benchmarks"
    for cand in (Path.cwd() / "benchmarks", here):
        if (cand / "harness.py").exists():
            return cand
    raise BenchError(
        "benchmarks/ not found: run `fmk bench` from a checkout of fmkernels (the suite is not installed in wheels)"
    )


def check_requirements() -> None:
    missing = [m for m in ("pytest", "pytest_benchmark") if importlib.util.find_spec(m) is None]
    if missing:
        raise BenchError(f"the benchmark suite needs {' and '.join(missing)}: pip install 'fmkernels[dev]' "
                         f"(or pip install pytest pytest-benchmark)")


def run_benchmarks(out_dir: str = "bench-results", select: str | None = None, quick: bool = False, extra=None) -> int:
    bdir = find_benchmarks_dir()
    check_requirements()  # before anything is written: no empty bench-results/ on failure
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "pytest-benchmark.json"
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if quick:
        env["FMK_BENCH_QUICK"] = "1"
    cmd = [sys.executable, "-m", "pytest", str(bdir), "-q", "-p", "no:cacheprovider",
           f"--benchmark-json={raw}", "--benchmark-columns=median,min,max", "--benchmark-sort=name",
           "-o", "python_files=bench_*.py"]
    if select:
        cmd += ["-k", select]
    if extra:
        cmd += [a for a in extra if a != "--"]
    rc = subprocess.call(cmd, cwd=bdir.parent, env=env)
    if raw.exists():
        report = write_report(json.loads(raw.read_text()), out)
        print(report)
        print(f"\nwrote {out}/results.md, {out}/results.json and plots")
    return rc


def _rows(data: dict) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for b in data.get("benchmarks", []):
        ei = b.get("extra_info", {})
        med = b["stats"]["median"]
        row = {
            "label": ei.get("label", b["name"]),
            "ms": med * 1e3,
            "peer": bool(ei.get("peer")),
            "flops": ei.get("flops"),
            "bytes": ei.get("bytes"),
            "peak": ei.get("peak"),
            "peak_kind": ei.get("peak_kind"),
            "peak_mem_bytes": ei.get("peak_mem_bytes"),
        }
        if row["flops"]:
            row["throughput"] = row["flops"] / med / 1e9
            row["unit"] = "GFLOP/s" if "gflops" in (row["peak_kind"] or "gflops") else "GOP/s"
        elif row["bytes"]:
            row["throughput"] = row["bytes"] / med / 1e9
            row["unit"] = "GB/s"
        if row.get("throughput") and row["peak"]:
            row["pct_peak"] = 100.0 * row["throughput"] / row["peak"]
        groups.setdefault(b.get("group") or b["name"], []).append(row)
    for rows in groups.values():
        peer = next((r for r in rows if r["peer"]), None)
        for r in rows:
            r["speedup_vs_peer"] = (peer["ms"] / r["ms"]) if peer else None
    return groups


def write_report(data: dict, out: Path) -> str:
    groups = _rows(data)
    lines = ["# fmkernels benchmark results", ""]
    mi = data.get("machine_info", {}).get("fmkernels", {})
    if mi:
        lines.append(f"Machine: {mi.get('cpu')} {mi.get('threads')} threads, ISA {mi.get('isa')}, "
                     f"torch {mi.get('torch')}, peaks {mi.get('peaks')}")
        lines.append("")
    lines += ["| group | impl | median ms | throughput | % peak | speedup vs peer |", "|---|---|---|---|---|---|"]
    for g, rows in sorted(groups.items()):
        for r in sorted(rows, key=lambda r: r["ms"]):
            thr = f"{r['throughput']:.1f} {r['unit']}" if r.get("throughput") else ""
            pct = f"{r['pct_peak']:.0f}%" if r.get("pct_peak") else ""
            sp = f"{r['speedup_vs_peer']:.2f}x" if r.get("speedup_vs_peer") else ""
            label = r["label"] + (" (peer)" if r["peer"] else "")
            lines.append(f"| {g} | {label} | {r['ms']:.3f} | {thr} | {pct} | {sp} |")
    md = "\n".join(lines)
    (out / "results.md").write_text(md + "\n")
    (out / "results.json").write_text(json.dumps({"machine": mi, "groups": groups}, indent=2, default=str))
    _plots(groups, out)
    return md


# bar colour by kind of implementation (legend in every plot)
KIND_COLORS = {"PyTorch peer": "tab:gray", "fmkernels reference": "tab:orange", "fmkernels CPU": "tab:blue",
               "fmkernels Triton": "tab:green", "fmkernels CUDA": "tab:purple", "other": "tab:cyan"}


def bar_kind(row: dict) -> str:
    """Which kind a benchmark row is, from harness.py's labels ("fmk-cpu", "fmk-reference", "torch ...")."""
    label = row["label"].lower()
    if row.get("peer") or label.startswith("torch"):
        return "PyTorch peer"
    if "reference" in label or label.endswith("-ref"):
        return "fmkernels reference"
    if "triton" in label:
        return "fmkernels Triton"
    if "cuda" in label:
        return "fmkernels CUDA"
    if label.startswith("fmk") or "fmkernels" in label:
        return "fmkernels CPU"
    return "other"


def bar_text(row: dict) -> str:
    """The value written at the end of a bar: time, throughput, speedup over the group's peer."""
    parts = [f"{row['ms']:.3g} ms"]
    if row.get("throughput"):
        parts.append(f"{row['throughput']:.1f} {row['unit']}")
    sp = row.get("speedup_vs_peer")
    if sp and not row.get("peer"):
        parts.append(f"{sp:.2f}x vs peer")
    elif row.get("peer"):
        parts.append("peer (1.00x)")
    return ", ".join(parts)


def _plots(groups: dict, out: Path) -> None:
    """One PNG per group: horizontal bars (median ms, fastest first), each with its time, throughput and speedup
    over the PyTorch peer written beside it, coloured by kind. ~1000 px wide at any row count."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        print("matplotlib not installed (pip install fmkernels[plot]): no PNG plots")
        return
    for g, rows in groups.items():
        rows = sorted(rows, key=lambda r: r["ms"])
        kinds = [bar_kind(r) for r in rows]
        fig, ax = plt.subplots(figsize=(10, 1.6 + 0.5 * len(rows)))
        ax.barh(range(len(rows)), [r["ms"] for r in rows], color=[KIND_COLORS[k] for k in kinds])
        ax.set_yticks(range(len(rows)), [r["label"] for r in rows], fontsize=9)
        top = max(r["ms"] for r in rows)
        for i, r in enumerate(rows):
            ax.text(r["ms"] + top * 0.01, i, bar_text(r), va="center", fontsize=8.5)
        ax.set_xlim(0, top * 1.6)  # room for the text
        ax.set_xlabel("median time per call, ms (lower is better)")
        ax.set_title(g, fontsize=10)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
        present = list(dict.fromkeys(kinds))
        ax.legend(handles=[Patch(color=KIND_COLORS[k], label=k) for k in present], fontsize=8, loc="upper right")  # fastest (shortest) bars are on top
        fig.tight_layout()
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in g)
        fig.savefig(out / f"{safe}.png", dpi=100)
        plt.close(fig)
