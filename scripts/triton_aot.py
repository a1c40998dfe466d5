"""Ahead-of-time check of every Triton kernel in fmkernels/triton/: compiled to real cubins for sm_80 and sm_90
(no GPU needed: the Triton wheel carries the NVIDIA backend, ptxas and cuobjdump), at the block configurations
the launchers choose, for every dtype and constexpr variant; per kernel, variant and arch it records registers,
shared memory, spills and whether the SASS holds tensor-core instructions (HMMA/IMMA/HGMMA/IGMMA/QGMMA...).

Fails (exit 1) on: a compile error; shared memory above the arch's per-block limit; spills (local-memory
stores) in a kernel marked speed-critical without an explanation; a matmul-like kernel (one with a tl.dot)
without tensor-core instructions; a @triton.jit kernel of fmkernels/triton/ that has no entry in SPECS below.

  python scripts/triton_aot.py                        # writes fmkernels/gpu_build/triton_aot.json + docs/gpu_build.md
  python scripts/triton_aot.py --out DIR              # writes DIR/triton_aot.json and DIR/triton_aot.md
  python scripts/triton_aot.py --no-cache             # recompile even when the sources' hash is unchanged

Results are cached per module by a hash of the module's source, its specs here and the triton version: a module
whose key matches the committed report (fmkernels/gpu_build/triton_aot.json) or the last local run
(~/.cache/fmkernels/triton_aot.json) is not recompiled; Triton's own cache (~/.triton/cache) keeps each cubin.
`fmk info --gpu-build` prints the committed table. Run with TRITON_INTERPRET unset (it is removed here).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ARCHS = (80, 90)
# Per-block dynamic shared memory limits (CUDA C Programming Guide, compute capabilities table):
# sm_80 (A100) 163 KiB, sm_90 (H100) 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# SASS opcodes that run on the tensor cores (Ampere mma.sync -> HMMA/IMMA; Hopper wgmma -> *GMMA).
TC_RE = re.compile(r"\b(HMMA|IMMA|BMMA|DMMA|HGMMA|IGMMA|QGMMA|BGMMA|UTCHMMA|UTCQMMA|UTCIMMA|OMMA)\b")
COMMITTED = ROOT / "fmkernels" / "gpu_build" / "triton_aot.json"
SPILL_RE = re.compile(r"\bSTL(\.[A-Z0-9]+)*\b")
DTYPE_PTR = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}


@dataclass
class Variant:
    label: str
    ptrs: dict  # pointer argument -> pointer type ("*fp16", ...); every other non-constexpr arg is a scalar
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 0  # 0: Triton's default (3)
    archs: tuple = ARCHS
    floats: tuple = ()  # scalar args that are fp32 (the rest are i32)
    skip: dict = field(default_factory=dict)  # arch -> why this variant is not built there
    spill_ok: str = ""  # why spills of this variant are accepted (reported, not failed)


@dataclass
class Spec:
    module: str
    kernel: str
    matmul: bool  # has a tl.dot: must reach the tensor cores
    speed_critical: bool = True
    spill_ok: str = ""  # explanation when spills are accepted
    variants: list = field(default_factory=list)


def _float_variants(ptrs_of, consts_list, warps=4, floats=()):
    """One Variant per float dtype x constexpr dict; ptrs_of(dtype) -> pointer types."""
    out = []
    for dt in ("fp32", "bf16", "fp16"):
        for c in consts_list:
            tag = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in c.items())
            out.append(Variant(f"{dt} {tag}", ptrs_of(dt), dict(c), warps, floats=floats))
    return out


def build_specs() -> list[Spec]:
    """Block configurations read from the launchers themselves (their _blocks/_block helpers) where they
    have one; the literal launch constants otherwise (the GPU branch of each launcher)."""
    from fmkernels.triton import flash_attention as fa, int8_mm as i8, rms_norm as rn, swiglu as sw

    specs = []
    # ---- RMSNorm: BLOCK = _block(H); H = 4096 (BLOCK 4096, the cap) and H = 576 (SmolLM2, BLOCK 1024)
    blocks = sorted({rn._block(4096), rn._block(576)})
    specs.append(Spec("rms_norm", "_rms_norm_fwd_kernel", matmul=False, variants=_float_variants(
        lambda d: {"X": DTYPE_PTR[d], "W": DTYPE_PTR[d], "Y": DTYPE_PTR[d], "RSTD": "*fp32"},
        [dict(HAS_WEIGHT=w, BLOCK=b) for w in (True, False) for b in blocks], floats=("eps",))))
    specs.append(Spec("rms_norm", "_rms_norm_bwd_kernel", matmul=False, variants=_float_variants(
        lambda d: {"DY": DTYPE_PTR[d], "X": DTYPE_PTR[d], "W": DTYPE_PTR[d], "RSTD": "*fp32", "DX": DTYPE_PTR[d],
                   "DW_PARTIAL": "*fp32"},
        [dict(HAS_WEIGHT=True, COMPUTE_DW=dw, BLOCK=b) for dw in (True, False) for b in blocks]
        + [dict(HAS_WEIGHT=False, COMPUTE_DW=False, BLOCK=rn._block(4096))])))
    # ---- SwiGLU: BLOCK = _block(F); F = 11008 (BLOCK 4096) and F = 1536 (SmolLM2, BLOCK 2048)
    sblocks = sorted({sw._block(11008), sw._block(1536)})
    specs.append(Spec("swiglu", "_swiglu_fwd_kernel", matmul=False, variants=_float_variants(
        lambda d: {"A": DTYPE_PTR[d], "B": DTYPE_PTR[d], "Y": DTYPE_PTR[d]}, [dict(BLOCK=b) for b in sblocks])))
    specs.append(Spec("swiglu", "_swiglu_bwd_kernel", matmul=False, variants=_float_variants(
        lambda d: {"G": DTYPE_PTR[d], "A": DTYPE_PTR[d], "B": DTYPE_PTR[d], "OUT": DTYPE_PTR[d]},
        [dict(BLOCK=b) for b in sblocks])))
    # ---- RoPE: BLOCK = next_power_of_2(max(D // 2, 16)); D = 64, 128
    specs.append(Spec("rope", "_rope_kernel", matmul=False, variants=_float_variants(
        lambda d: {"Q": DTYPE_PTR[d], "K": DTYPE_PTR[d], "QO": DTYPE_PTR[d], "KO": DTYPE_PTR[d], "COS": "*fp32",
                   "SIN": "*fp32"}, [dict(BLOCK=32), dict(BLOCK=64)], floats=("sign",))))
    # ---- cross-entropy chunk: BLOCK = min(next_power_of_2(V), 4096). A softmax pass over logits that the op
    # computed with torch.matmul (cuBLAS): no tl.dot here, so no tensor cores to expect from this kernel.
    specs.append(Spec("cross_entropy", "_ce_kernel", matmul=False, variants=_float_variants(
        lambda d: {"Z": DTYPE_PTR[d], "T": "*i64", "LOSS": "*fp32"}, [dict(BLOCK=4096)], floats=("scale",))))
    # ---- flash attention: (BLOCK_M, BLOCK_N, BLOCK_D, warps) = fa._blocks(D, cuda, dtype, bwd) for D = 32, 64, 128,
    # 256; mask variants (causal = HAS_RIGHT, sliding window = both) at D = 64 and 128.
    import torch

    cuda = _FakeCuda()
    tdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    for kname, ptr_names, bwd in (
        ("_fwd_kernel", {"Q": 0, "K": 0, "V": 0, "O": 0, "LSE": "*fp32"}, False),
        ("_bwd_dkdv_kernel", {"Q": 0, "K": 0, "V": 0, "DO": 0, "LSE2": "*fp32", "DELTA": "*fp32", "DK": 0, "DV": 0}, True),
        ("_bwd_dq_kernel", {"Q": 0, "K": 0, "V": 0, "DO": 0, "LSE2": "*fp32", "DELTA": "*fp32", "DQ": 0}, True),
    ):
        variants = []
        args = getattr(fa, kname).arg_names
        # varlen (packed sequences, cu_seqlens pointers) where the kernels have it: at D = 64 / 128 only
        varlens = (False, True) if "VARLEN" in args else (None,)
        for dt in ("fp32", "bf16", "fp16"):
            ptrs = {n: (DTYPE_PTR[dt] if t == 0 else t) for n, t in ptr_names.items()}
            ptrs.update({n: "*i32" for n in ("CU_Q", "CU_K") if n in args})
            for D, varlen in ((D, vl) for D in (32, 64, 128, 256) for vl in varlens if not vl or D in (64, 128)):
                BM, BN, BD, warps = fa._blocks(D, cuda, tdt[dt], bwd=bwd)
                masks = ((False, False), (False, True), (True, True)) if D in (64, 128) else ((False, False),)
                for left, right in masks:
                    c = dict(HAS_LEFT=left, HAS_RIGHT=right, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD)
                    if varlen is not None:
                        c["VARLEN"] = varlen
                    variants.append(Variant(f"{dt} D={D} left={int(left)} right={int(right)}"
                                            f"{' varlen' if varlen else ''} {BM}x{BN}x{BD} w{warps}",
                                            ptrs, c, warps, floats=("scale", "scale_log2"),
                                            spill_ok=FA_FP32_SPILLS if dt == "fp32" else ""))
        specs.append(Spec("flash_attention", kname, matmul=True, variants=variants))
    # ---- int8 W8A8: _blocks(M, N) for M <= 32 and M > 32; dynamic per-row quantization BLOCK <= 4096
    variants = []
    for M in (16, 4096):
        BM, BN, BK = i8._blocks(M, 4096, False)
        for out, out_int in (("fp32", False), ("bf16", False), ("fp16", False), ("i32", True)):
            variants.append(Variant(f"out {out} {BM}x{BN}x{BK}",
                                    {"A": "*i8", "B": "*i8", "A_SCALE": "*fp32", "B_SCALE": "*fp32",
                                     "BIAS": "*fp32", "C": "*" + out},
                                    dict(HAS_BIAS=not out_int, OUT_INT=out_int, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK),
                                    i8._warps(BM)))
    specs.append(Spec("int8_mm", "_int8_mm_kernel", matmul=True, variants=variants))
    specs.append(Spec("int8_mm", "_quantize_rows_kernel", matmul=False, variants=[
        Variant(f"{dt} BLOCK=4096", {"X": DTYPE_PTR[dt], "Q": "*i8", "S": "*fp32"}, dict(BLOCK=4096))
        for dt in ("fp32", "bf16", "fp16")]))
    # ---- int8 weight-only (W8A16): its launcher's (16 if M <= 16 else 64, 64, 64), 8 warps at 64 rows; fp32
    # activations dot in tf32 on the GPU (IEEE only under the interpreter)
    if (ROOT / "fmkernels" / "triton" / "int8_weight_only_mm.py").exists():
        variants = [Variant(f"{dt} {BM}x64x64", {"X": DTYPE_PTR[dt], "W": "*u8", "SCALE": "*fp32",
                                                  "BIAS": DTYPE_PTR[dt], "C": DTYPE_PTR[dt]},
                            dict(HAS_BIAS=True, IEEE_DOT=False, BLOCK_M=BM, BLOCK_N=64, BLOCK_K=64),
                            8 if BM == 64 else 4)
                    for dt in ("fp32", "bf16", "fp16") for BM in (16, 64)]
        specs.append(Spec("int8_weight_only_mm", "_int8_wo_mm_kernel", matmul=True, variants=variants))
    # ---- int4 weight-only: (16 if M <= 16 else 64, 64, 64); fp32 activations dot in tf32 on the GPU
    variants = []
    for dt in ("fp32", "bf16", "fp16"):
        for BM in (16, 64):
            variants.append(Variant(f"{dt} {BM}x64x64",
                                    {"X": DTYPE_PTR[dt], "W": "*u8", "SCALE": "*fp32", "ZERO": "*fp32",
                                     "BIAS": DTYPE_PTR[dt], "C": DTYPE_PTR[dt]},
                                    dict(HAS_BIAS=True, IEEE_DOT=False, BLOCK_M=BM, BLOCK_N=64, BLOCK_K=64), 8 if BM == 64 else 4))
    specs.append(Spec("int4_mm", "_int4_mm_kernel", matmul=True, variants=variants))
    # ---- fp8 e4m3: (64, 128, 64), 8 warps; fp8 tensor-core dots exist from sm_89 on (the dispatcher refuses sm_80)
    variants = [Variant(f"e4m3 -> {dt} 64x128x64",
                        {"A": "*fp8e4nv", "B": "*fp8e4nv", "A_SCALE": "*fp32", "B_SCALE": "*fp32", "BIAS": DTYPE_PTR[dt],
                         "C": DTYPE_PTR[dt]},
                        dict(HAS_BIAS=True, UPCAST=False, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64), 8,
                        archs=(90,), skip={80: "fp8 tensor cores need sm_89+ (fp8_mm's dispatch check refuses sm_80)"})
                for dt in ("fp32", "bf16", "fp16")]
    specs.append(Spec("fp8_mm", "_fp8_mm_kernel", matmul=True, variants=variants))
    # ---- 2:4 sparse: (64, 64, 32), 8 warps; float and int8 (exact int32) variants
    variants = [Variant(f"{dt} 64x64x32", {"X": DTYPE_PTR[dt], "V": DTYPE_PTR[dt], "META": "*i32",
                                           "BIAS": DTYPE_PTR[dt], "Y": DTYPE_PTR[dt]},
                        dict(HAS_BIAS=True, IS_INT8=False, IEEE_DOT=False, DOT_PRECISION=_prec(dt), BLOCK_M=64,
                             BLOCK_N=64, BLOCK_K=32), 8)
                for dt in ("fp32", "bf16", "fp16")]
    variants.append(Variant("int8 -> i32 64x64x32", {"X": "*i8", "V": "*i8", "META": "*i32", "BIAS": "*i8", "Y": "*i32"},
                            dict(HAS_BIAS=False, IS_INT8=True, IEEE_DOT=False, DOT_PRECISION="tf32", BLOCK_M=64,
                                 BLOCK_N=64, BLOCK_K=32), 8))
    specs.append(Spec("sparse24_mm", "_sparse24_mm_kernel", matmul=True, variants=variants))
    # 2:4 values gradient (sddmm): (BLOCK_M, BLOCK_N, BLOCK_G) = (64, 64, 16), 4 warps; operands upcast to fp32,
    # so its dot is fp32 at Triton's default precision (tf32)
    specs.append(Spec("sparse24_mm", "_sparse24_sddmm_kernel", matmul=True, variants=[
        Variant(f"{dt} 64x64x(16x4)", {"GY": DTYPE_PTR[dt], "X": DTYPE_PTR[dt], "META": "*i32", "OUT": "*fp32"},
                dict(BLOCK_M=64, BLOCK_N=64, BLOCK_G=16)) for dt in ("fp32", "bf16", "fp16")]))
    # ---- BSR: BLOCK_M = 64 (32 for fp32 with 64x64 blocks), block sizes B = 16, 32, 64 (BSR_BLOCK_SIZES)
    variants = []
    for dt in ("fp32", "bf16", "fp16"):
        for b in (16, 32, 64):
            bm = 32 if (b == 64 and dt == "fp32") else 64
            variants.append(Variant(f"{dt} B={b} BM={bm}", {"X": DTYPE_PTR[dt], "BLK": DTYPE_PTR[dt], "ROW_PTR": "*i32",
                                                           "COL_IDX": "*i32", "BIAS": DTYPE_PTR[dt], "Y": DTYPE_PTR[dt]},
                                    dict(HAS_BIAS=True, B=b, BLOCK_M=bm, IEEE_DOT=False, DOT_PRECISION=_prec(dt))))
    specs.append(Spec("bsr_mm", "_bsr_mm_kernel", matmul=True, variants=variants))
    return specs


def _prec(dt: str) -> str:
    """DOT_PRECISION as fmkernels.triton.fp32_dot_precision() gives it under PyTorch's default policy
    ("highest": tf32x3); it only matters for fp32 operands."""
    return "tf32x3" if dt == "fp32" else "tf32"


FA_FP32_SPILLS = ("fp32 attention is the accuracy path on GPUs (bf16/fp16 the speed path): tf32 operands take "
                  "twice the registers of bf16 ones, and the few spills left are accepted")


class _FakeCuda:
    """Stands in for a torch.device('cuda') in the launchers' block pickers (they read .type only)."""

    type = "cuda"


# ------------------------------------------------------------------------------------------------ discovery


def discover_names() -> dict[str, list[str]]:
    """module -> the @triton.jit functions it launches (`name[grid](...)`), read from the source (helpers called
    from kernels are excluded); no import, so it works under TRITON_INTERPRET=1 too."""
    out = {}
    for path in sorted((ROOT / "fmkernels" / "triton").glob("*.py")):
        src = path.read_text()
        jit = re.findall(r"@triton\.jit(?:\([^)]*\))?\s*\ndef\s+(\w+)", src)
        names = sorted(n for n in jit if re.search(rf"\b{n}\s*\[", src))
        if names:
            out[path.stem] = names
    return out


CHECK_VERSION = "1"  # bump when what is recorded per variant changes: invalidates every cached entry


def module_key(module: str, specs: list) -> str:
    """Cache key of one module's results: triton version, its kernels' Triton cache keys (their source and the
    @triton.jit helpers they call; launcher edits do not count) and its specs here (the block configurations)."""
    import triton

    mod = importlib.import_module(f"fmkernels.triton.{module}")
    h = hashlib.sha256(f"{CHECK_VERSION} {triton.__version__}".encode())
    for s in specs:
        if s.module == module:
            h.update(getattr(mod, s.kernel).cache_key.encode())
            h.update(repr((s.kernel, s.matmul, s.spill_ok, s.variants)).encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ compile


def _tool(name: str) -> str:
    import triton

    cand = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if cand.exists():
        return str(cand)
    for d in (os.environ.get("CUDA_HOME", "/usr/local/cuda"), "/usr/local/cuda"):
        if (Path(d) / "bin" / name).exists():
            return str(Path(d) / "bin" / name)
    return name


def sass_facts(cubin: bytes) -> dict:
    """registers, static shared, stack, local-memory stores and tensor-core opcodes of a cubin's kernels."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        res = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True,
                             check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    return analyse(res, sass)


def analyse(resource_usage: str, sass: str) -> dict:
    def num(key):
        m = re.search(rf"\b{key}:(\d+)", resource_usage)
        return int(m.group(1)) if m else 0

    tc = sorted(set(TC_RE.findall(sass)))
    return {"registers": num("REG"), "static_shared": num("SHARED"), "stack": num("STACK"),
            "local": num("LOCAL"), "spill_stores": len(SPILL_RE.findall(sass)), "tensor_core_ops": tc}


def compile_one(module: str, kernel: str, v: Variant, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(f"fmkernels.triton.{module}"), kernel)
    sig, attrs = {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in v.ptrs:
            sig[p.name] = v.ptrs[p.name]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned, as at run time
        elif p.name in v.floats:
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
    missing = set(v.ptrs) - set(sig)
    if missing:
        raise ValueError(f"{kernel}: spec names unknown arguments {sorted(missing)}")
    consts = {n: v.constexprs[n] for n in v.constexprs}
    unknown = [p.name for p in fn.params if p.is_constexpr and p.name not in consts and p.default is inspect._empty]
    if unknown:
        raise ValueError(f"{kernel}: spec gives no value for constexpr {unknown}")
    t0 = time.time()
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=_options(v))
    except TypeError:  # a Triton whose ASTSource takes attrs in another form: without alignment hints
        src = ASTSource(fn=fn, signature=sig, constexprs=consts)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=_options(v))
    facts = sass_facts(k.asm["cubin"])
    facts["shared"] = int(getattr(k.metadata, "shared", 0) or 0)
    facts["num_warps"] = v.num_warps
    facts["num_stages"] = v.num_stages or 3
    facts["compile_s"] = round(time.time() - t0, 2)
    return facts


FACT_KEYS = ("registers", "static_shared", "stack", "local", "spill_stores", "tensor_core_ops", "shared", "num_warps",
             "num_stages", "compile_s")


def _options(v: Variant) -> dict:
    return {"num_warps": v.num_warps, **({"num_stages": v.num_stages} if v.num_stages else {})}


def _job(args):
    module, kernel, v, arch = args
    try:
        return args, compile_one(module, kernel, v, arch), None
    except Exception as e:  # reported as a compile error of this variant
        msg = f"{type(e).__name__}: {e}"
        return args, None, msg[-2000:]


def run(jobs: int, reuse: list) -> dict:
    """Compile what no earlier report (`reuse`: report dicts) holds under the same module key; check all."""
    specs = build_specs()
    found = discover_names()
    failures = []
    listed = {(s.module, s.kernel) for s in specs}
    for mod, names in found.items():
        for n in names:
            if (mod, n) not in listed:
                failures.append(f"{mod}.{n}: @triton.jit kernel with no entry in scripts/triton_aot.py SPECS")
    keys = {m: module_key(m, specs) for m in sorted({s.module for s in specs})}
    results, reused = {}, set()
    for m, key in keys.items():
        for rep in reuse:
            if rep.get("module_keys", {}).get(m) != key:
                continue
            for r in rep["rows"]:
                if r["module"] == m and "skipped" not in r:
                    results[(m, r["kernel"], r["variant"], int(r["arch"][3:]))] = (
                        {k: r[k] for k in FACT_KEYS if k in r} if "error" not in r else None, r.get("error"))
            reused.add(m)
            break
    work = [(s.module, s.kernel, v, a) for s in specs for v in s.variants for a in v.archs
            if (s.module, s.kernel, v.label, a) not in results]
    with cf.ProcessPoolExecutor(max_workers=jobs) if jobs > 1 and len(work) > 1 else _Serial() as ex:
        for (mod, kern, v, arch), facts, err in ex.map(_job, work):
            results[(mod, kern, v.label, arch)] = (facts, err)
    rows = []
    for s in specs:
        for v in s.variants:
            for arch in ARCHS:
                row = {"module": s.module, "kernel": s.kernel, "variant": v.label, "arch": f"sm_{arch}",
                       "matmul": s.matmul}
                if arch in v.skip:
                    row["skipped"] = v.skip[arch]
                    rows.append(row)
                    continue
                if arch not in v.archs:
                    continue
                facts, err = results[(s.module, s.kernel, v.label, arch)]
                if err:
                    row["error"] = err
                    failures.append(f"{s.kernel} [{v.label}] sm_{arch}: compile error: {err.splitlines()[0][:300]}")
                    rows.append(row)
                    continue
                row.update(facts)
                problems = []
                if facts["shared"] > SMEM_LIMIT[arch]:
                    problems.append(f"shared memory {facts['shared']} B > sm_{arch} limit {SMEM_LIMIT[arch]} B")
                spill_ok = v.spill_ok or s.spill_ok
                if facts["spill_stores"] and s.speed_critical and not spill_ok:
                    problems.append(f"{facts['spill_stores']} local-memory stores (register spills)")
                if s.matmul and not facts["tensor_core_ops"]:
                    problems.append("matmul-like kernel without tensor-core instructions in its SASS")
                if facts["spill_stores"] and spill_ok:
                    row["spill_note"] = spill_ok
                row["problems"] = problems
                failures += [f"{s.kernel} [{v.label}] sm_{arch}: {p}" for p in problems]
                rows.append(row)
    import triton

    return {"triton": triton.__version__, "module_keys": keys, "reused": sorted(reused), "compiled": len(work),
            "archs": [f"sm_{a}" for a in ARCHS],
            "smem_limit": {f"sm_{a}": SMEM_LIMIT[a] for a in ARCHS}, "rows": rows, "failures": failures}


class _Serial:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def map(self, f, it):
        return map(f, it)


# ------------------------------------------------------------------------------------------------ report


def markdown(rep: dict) -> str:
    lines = [f"# Triton AOT check (triton {rep['triton']})", "",
             "Compiled with `python scripts/triton_aot.py` for sm_80 and sm_90 without a GPU. regs: registers per "
             "thread; smem: shared memory per block (bytes; limit sm_80 163 KiB, sm_90 227 KiB); spills: "
             "local-memory stores in the SASS; tensor cores: the MMA opcodes found.", "",
             "| kernel | variant | arch | warps | regs | smem | spills | tensor cores | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['kernel']} | {r['variant']} | {r['arch']} | | | | | | skipped: {r['skipped']} |")
            continue
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['variant']} | {r['arch']} | | | | | | COMPILE ERROR |")
            continue
        tc = ", ".join(r["tensor_core_ops"]) or ("-" if not r["matmul"] else "NONE")
        status = "; ".join(r["problems"]) or ("ok" + (f" (spills: {r['spill_note']})" if r.get("spill_note") else ""))
        lines.append(f"| {r['kernel']} | {r['variant']} | {r['arch']} | {r['num_warps']} | {r['registers']} | "
                     f"{r['shared']} | {r['spill_stores']} | {tc} | {status} |")
    lines += ["", f"Failures: {len(rep['failures'])}"] + [f"- {f}" for f in rep["failures"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None,
                    help="directory for triton_aot.json and triton_aot.md (default: the committed copies, "
                         "fmkernels/gpu_build/triton_aot.json and docs/gpu_build.md)")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--no-cache", action="store_true")
    args = ap.parse_args(argv)
    # the interpreter would turn @triton.jit into InterpretedFunction (set here, not at import: importing this
    # module, as tests and scripts/cuda_sass.py do, must leave the environment alone)
    os.environ.pop("TRITON_INTERPRET", None)
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except Exception as e:
        print(f"triton_aot: triton with its NVIDIA backend is not importable ({e}); nothing to check")
        return 0
    t0 = time.time()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fmkernels" / "triton_aot.json"
    reuse = []
    if not args.no_cache:
        for path in (COMMITTED, cache):
            try:
                reuse.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                pass
    rep = run(args.jobs, reuse)
    rep["seconds"] = round(time.time() - t0, 1)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(rep, indent=1))
    except OSError:
        pass
    json_path = (args.out / "triton_aot.json") if args.out else COMMITTED
    md_path = (args.out / "triton_aot.md") if args.out else ROOT / "docs" / "gpu_build.md"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(rep, indent=1) + "\n")
    md = markdown(rep)
    md_path.write_text(md)
    n = sum(1 for r in rep["rows"] if "registers" in r)
    print(f"triton_aot: {n} kernel variants for {', '.join(rep['archs'])} ({rep['compiled']} compiled now, modules "
          f"reused from the cache: {', '.join(rep['reused']) or 'none'}) in {rep['seconds']} s; "
          f"{len(rep['failures'])} failures; wrote {json_path}, {md_path}")
    for f in rep["failures"]:
        print("  FAIL", f)
    return 1 if rep["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
