"""What the GPU kernels compile to, read from the reports that scripts/triton_aot.py and scripts/cuda_sass.py
write into fmkernels/gpu_build/ (built without a GPU: real cubins for sm_80 / sm_90, SASS read back):

- `prefer_triton()`: the ops whose CUDA kernels are SIMT while their Triton kernels reach the tensor cores; GPU
  dispatch puts Triton first for them (`apply_preferences`, called once when fmkernels.ops is imported).
- `format_gpu_build()`: the tables `fmk info --gpu-build` prints.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Optional

from . import _dispatch

BUILD_DIR = Path(__file__).resolve().parent / "gpu_build"


@functools.lru_cache(maxsize=None)
def _load(name: str) -> Optional[dict]:
    try:
        return json.loads((BUILD_DIR / name).read_text())
    except (OSError, ValueError):
        return None


def triton_aot() -> Optional[dict]:
    return _load("triton_aot.json")


def cuda_sass() -> Optional[dict]:
    return _load("cuda_sass.json")


def prefer_triton() -> dict[str, str]:
    """op name -> why Triton goes before CUDA on CUDA tensors."""
    rep = cuda_sass()
    if not rep:
        return {}
    return {op: d["why"] for op, d in rep.get("ops", {}).items() if d.get("prefer") == "triton"}


def apply_preferences() -> None:
    for name, _why in prefer_triton().items():
        op = _dispatch.OPS.get(name)
        if op is None or "triton" not in op.backends:
            continue
        order = op.auto_order.get("cuda") or _dispatch.AUTO_ORDER["cuda"]
        if "cuda" in order and "triton" in order and order.index("triton") > order.index("cuda"):
            rest = tuple(b for b in order if b != "triton")
            i = rest.index("cuda")
            op.auto_order["cuda"] = rest[:i] + ("triton",) + rest[i:]


def format_gpu_build() -> str:
    out = []
    tri = triton_aot()
    if tri is None:
        out.append("Triton AOT report: none (run `python scripts/triton_aot.py`)")
    else:
        rows = [r for r in tri["rows"] if "registers" in r]
        out.append(f"Triton kernels compiled for {', '.join(tri['archs'])} without a GPU (triton {tri['triton']}): "
                   f"{len(rows)} variants, {len(tri['failures'])} failures")
        out.append(f"{'kernel':<24}{'arch':<7}{'variants':>9}{'max regs':>10}{'max smem':>10}{'spills':>8}  tensor cores")
        agg: dict = {}
        for r in rows:
            a = agg.setdefault((r["kernel"], r["arch"]), {"n": 0, "regs": 0, "smem": 0, "spills": 0, "tc": set(),
                                                         "matmul": r["matmul"]})
            a["n"] += 1
            a["regs"] = max(a["regs"], r["registers"])
            a["smem"] = max(a["smem"], r["shared"])
            a["spills"] += 1 if r["spill_stores"] else 0
            a["tc"].update(r["tensor_core_ops"])
        for (k, arch), a in agg.items():
            tc = ", ".join(sorted(a["tc"])) or ("NONE" if a["matmul"] else "- (no matmul)")
            out.append(f"{k:<24}{arch:<7}{a['n']:>9}{a['regs']:>10}{a['smem']:>10}{a['spills']:>8}  {tc}")
        for r in tri["rows"]:
            if "skipped" in r:
                out.append(f"  skipped: {r['kernel']} [{r['variant']}] {r['arch']}: {r['skipped']}")
        for f in tri["failures"]:
            out.append(f"  FAIL {f}")
        out.append("  (spills column: variants with any local-memory store; per-variant table: docs/gpu_build.md)")
    out.append("")
    cs = cuda_sass()
    if cs is None:
        out.append("CUDA SASS report: none (run `python scripts/cuda_sass.py`; needs nvcc)")
    else:
        out.append(f"CUDA kernels (csrc/cuda, {', '.join(cs['archs'])}, {cs['nvcc']}): which reach the tensor cores")
        out.append(f"{'op':<22}{'CUDA kernels':<22}{'Triton kernels':<16}GPU dispatch prefers")
        for op, d in cs["ops"].items():
            out.append(f"{op:<22}{d['cuda']:<22}{d['triton']:<16}{d['prefer']}")
        for op, why in prefer_triton().items():
            out.append(f"  {op}: Triton first: {why}")
    return "\n".join(out)
