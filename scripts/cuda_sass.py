"""SASS check of csrc/cuda/: every .cu built to a cubin for sm_80 and sm_90a with nvcc (no GPU needed), each
kernel's registers, shared memory, spills and tensor-core opcodes (HMMA/IMMA/HGMMA/...) read back with cuobjdump.

Joined with the Triton AOT report (fmkernels/gpu_build/triton_aot.json), it decides for each op whether GPU
dispatch should prefer Triton: where the op's CUDA kernels are SIMT (no tensor-core opcode on either arch) and
its Triton kernels reach the tensor cores on both. fmkernels._gpu_build reads the result at import; `fmk info`
prints it.

  python scripts/cuda_sass.py                 # writes fmkernels/gpu_build/cuda_sass.json (+ a table on stdout)
  python scripts/cuda_sass.py --out DIR       # writes DIR/cuda_sass.json
Exits 0 (with a message) when nvcc is not installed; 1 when a .cu fails to build.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from triton_aot import TC_RE, SPILL_RE  # noqa: E402  (one definition of what counts as a tensor-core opcode)

ARCHS = ("80", "90a")
# csrc/cuda file -> the dispatched ops its kernels implement, and the Triton module of the same ops.
FILE_OPS = {
    "flash_attention": (("flash_attention",), "flash_attention"),
    "int8_mm": (("int8_mm", "int8_linear", "quantize_per_row"), "int8_mm"),
    "int4_mm": (("int4_mm",), "int4_mm"),
    "fp8_mm": (("fp8_mm",), "fp8_mm"),
    "sparse24_mm": (("sparse24_mm",), "sparse24_mm"),
    "bsr_mm": (("bsr_mm",), "bsr_mm"),
    "rms_norm": (("rms_norm",), "rms_norm"),
    "rope": (("rope",), "rope"),
    "swiglu": (("swiglu",), "swiglu"),
    "cross_entropy": (("linear_cross_entropy",), "cross_entropy"),
}
# Kernels that are no matmul (elementwise/reductions): tensor cores are not expected of them.
NOT_MATMUL = re.compile(r"quantize_rows|rms_norm|rope|swiglu|ce_chunk")


def find_nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
        cand = Path(home) / "bin" / "nvcc"
        nvcc = str(cand) if cand.exists() else None
    return nvcc


def _cuobjdump() -> str:
    try:
        import triton

        cand = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if cand.exists():
            return str(cand)
    except Exception:
        pass
    return shutil.which("cuobjdump") or "cuobjdump"


def _demangle_short(name: str) -> str:
    """The kernel's identifier from a mangled _Z name: the <length><identifier> pieces, the one ending in _kernel."""
    i, ids = 0, []
    while i < len(name):
        m = re.match(r"\d+", name[i:])
        if not m:
            i += 1
            continue
        n, j = int(m.group(0)), i + len(m.group(0))
        ident = name[j:j + n]
        if n and len(ident) == n and re.fullmatch(r"[A-Za-z_]\w*", ident):
            ids.append(ident)
            i = j + n
        else:
            i = j
    kern = [x for x in ids if x.endswith("_kernel")]
    return kern[-1] if kern else (ids[-1] if ids else name)


def build(cu: Path, arch: str, nvcc: str, tmp: Path) -> list[dict]:
    cubin = tmp / f"{cu.stem}.sm_{arch}.cubin"
    cmd = [nvcc, "-cubin", "-O3", "--expt-relaxed-constexpr", f"-I{ROOT / 'csrc'}",
           f"-gencode=arch=compute_{arch},code=sm_{arch}", str(cu), "-o", str(cubin)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"nvcc failed for {cu.name} sm_{arch}:\n{r.stderr[-3000:]}")
    tool = _cuobjdump()
    res = subprocess.run([tool, "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    sass = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    rows = []
    # resource usage: " Function NAME:\n  REG:.. STACK:.. SHARED:.. LOCAL:.."
    usage = dict(re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", res))
    # SASS: "Function : NAME" headers, each followed by its code
    parts = re.split(r"\n\s*Function : (\S+)\n", sass)
    for name, body in zip(parts[1::2], parts[2::2]):
        u = usage.get(name, "")

        def num(key):
            m = re.search(rf"\b{key}:(\d+)", u)
            return int(m.group(1)) if m else 0

        rows.append({"file": cu.name, "arch": f"sm_{arch}", "kernel": _demangle_short(name), "symbol": name,
                     "registers": num("REG"), "shared": num("SHARED"), "stack": num("STACK"),
                     "spill_stores": len(SPILL_RE.findall(body)),
                     "tensor_core_ops": sorted(set(TC_RE.findall(body)))})
    return rows


def decide(rows: list[dict], triton_rep: dict | None) -> dict:
    """op -> {cuda: 'tensor cores'|'SIMT'|..., triton: ..., prefer: 'triton'|'cuda', why}."""
    tri_tc = {}
    if triton_rep:
        for r in triton_rep.get("rows", []):
            if "registers" in r and r.get("matmul"):
                tri_tc.setdefault(r["module"], []).append(bool(r["tensor_core_ops"]))
    out = {}
    for stem, (ops, tmod) in FILE_OPS.items():
        ks = [r for r in rows if r["file"] == f"{stem}.cu" and not NOT_MATMUL.search(r["kernel"])]
        if not ks:
            continue
        cuda_tc = all(r["tensor_core_ops"] for r in ks)
        cuda_any = any(r["tensor_core_ops"] for r in ks)
        t = tri_tc.get(tmod)
        t_tc = bool(t) and all(t)
        for op in ops:
            if op == "quantize_per_row":
                continue  # elementwise: the int8 file's matmul kernel decides for the matmul ops only
            cuda_kind = "tensor cores" if cuda_tc else ("partly tensor cores" if cuda_any else "SIMT")
            prefer = "triton" if (not cuda_any and t_tc) else "cuda"
            why = (f"CUDA kernels in {stem}.cu are SIMT (no tensor-core opcode on sm_80/sm_90a); the Triton kernels "
                   f"of fmkernels/triton/{tmod}.py reach the tensor cores") if prefer == "triton" else \
                  f"CUDA kernels in {stem}.cu: {cuda_kind}"
            out[op] = {"cuda": cuda_kind, "triton": "tensor cores" if t_tc else ("SIMT" if t is not None else "n/a"),
                       "prefer": prefer, "why": why}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    nvcc = find_nvcc()
    if nvcc is None:
        print("cuda_sass: nvcc not found (CUDA toolkit absent); nothing to check")
        return 0
    t0 = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
            for arch in ARCHS:
                rows += build(cu, arch, nvcc, Path(d))
    tri_path = ROOT / "fmkernels" / "gpu_build" / "triton_aot.json"
    tri = json.loads(tri_path.read_text()) if tri_path.exists() else None
    nv = next((ln for ln in subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.splitlines()
               if "release" in ln), "nvcc")
    rep = {"nvcc": nv, "archs": [f"sm_{a}" for a in ARCHS], "rows": rows, "ops": decide(rows, tri),
           "seconds": round(time.time() - t0, 1)}
    path = (args.out / "cuda_sass.json") if args.out else ROOT / "fmkernels" / "gpu_build" / "cuda_sass.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rep, indent=1) + "\n")
    print("| file | kernel | arch | instances | max regs | max smem | spills | tensor cores |\n|---|---|---|---|---|---|---|---|")
    groups: dict = {}
    for r in rows:
        g = groups.setdefault((r["file"], r["kernel"], r["arch"]), [])
        g.append(r)
    for (f, k, a), g in groups.items():
        tc = sorted(set().union(*(set(r["tensor_core_ops"]) for r in g)))
        print(f"| {f} | {k} | {a} | {len(g)} | {max(r['registers'] for r in g)} | {max(r['shared'] for r in g)} | "
              f"{sum(r['spill_stores'] for r in g)} | {', '.join(tc) or '-'} |")
    print()
    for op, d in rep["ops"].items():
        print(f"{op:<22} cuda: {d['cuda']:<22} triton: {d['triton']:<14} -> {d['prefer']}")
    print(f"cuda_sass: {len(rows)} kernels in {rep['seconds']} s; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
