"""fmkernels.info(): what was built, what this machine has, and which backend each op picks."""
from __future__ import annotations

import inspect
import os
import platform
import re
from pathlib import Path

import torch

from . import _autograd, _dispatch, _ext, _gpu_build
from ._version import __version__

PACKAGE = Path(__file__).resolve().parent
CSRC = PACKAGE.parent / "csrc"  # present in a checkout or an sdist, not in a wheel


def _triton_version() -> str | None:
    if _dispatch.triton_import_error() is not None:
        return None
    import triton

    return triton.__version__


def _backend_for(op: _dispatch.Op, device: str) -> str:
    """The backend an fp32 call would use (or, for ops that take no fp32, a call in their first dtype)."""
    dtypes = [torch.float32] + [d for b in op.backends.values() for d in (b.dtypes or ())]
    for dtype in dict.fromkeys(dtypes):
        try:
            return op.select(_dispatch.Query(device=device, dtype=dtype)).name
        except _dispatch.BackendError:
            continue
    return "none"


def info() -> dict:
    """A dict with package/torch/triton versions, extension status, CPU ISA, GPU, and per-op backends."""
    status = _ext.status()
    feats = _ext.cpu_features()
    cpu_ext = _ext.cpu_ext()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    ops = {
        name: {"cpu": _backend_for(op, "cpu"), "cuda": _backend_for(op, "cuda"), "backends": list(op.backends)}
        for name, op in sorted(_dispatch.OPS.items())
    }
    return {
        "gpu_prefers_triton": _gpu_build.prefer_triton(),
        "fmkernels": __version__,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "cpu_extension": status.get("fmkernels._C", {}),
        "cuda_extension": status.get("fmkernels._C_cuda", {}),
        "built_with_torch": (_ext.build_info() or {}).get("torch"),
        "cpu": platform.processor() or platform.machine(),
        "cpu_isa": {k: feats.get(k, False) for k in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")},
        "cpu_isa_in_use": _isa_in_use(cpu_ext),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "gpu": gpu,
        "ops": ops,
    }


def format_info(d: dict) -> str:
    def ext_line(s: dict) -> str:
        if not s:
            return "not attempted"
        return "loaded" if s.get("loaded") else f"not loaded ({s.get('error')})"

    lines = [
        f"fmkernels {d['fmkernels']}   torch {d['torch']}   triton {d['triton'] or 'not installed'}   python {d['python']}",
        f"CPU extension : {ext_line(d['cpu_extension'])}"
        + (f"   (built against torch {d['built_with_torch']})" if d.get("built_with_torch") else ""),
        f"CUDA extension: {ext_line(d['cuda_extension'])}",
        "CPU ISA       : " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in d["cpu_isa"].items())
        + f"   (kernels use: {d['cpu_isa_in_use']}, {d['threads']} threads, "
        f"OMP_WAIT_POLICY={d.get('omp_wait_policy') or 'unset'})",
        f"GPU           : {d['gpu'] or 'none'}",
        "",
        f"{'op':<22}{'on CPU tensors':<18}{'on CUDA tensors':<18}backends",
    ]
    for name, o in d["ops"].items():
        lines.append(f"{name:<22}{o['cpu']:<18}{o['cuda']:<18}{', '.join(o['backends'])}")
    for name, why in d.get("gpu_prefers_triton", {}).items():
        lines.append(f"  {name}: on CUDA tensors Triton goes before CUDA ({why})")
    if d.get("gpu_prefers_triton"):
        lines.append("  (`fmk info --gpu-build`: registers, shared memory, spills and tensor cores of every GPU kernel)")
    return "\n".join(lines)


def _isa_in_use(cpu_ext) -> str:
    if cpu_ext is None:
        return "n/a (extension not loaded)"
    try:
        return cpu_ext.isa()
    except ValueError as e:  # a bad FMK_CPU_ISA: every CPU kernel call raises the same message
        return f"error: {e}"
def _schema_files() -> dict:
    """fmkernels:: schema name -> the csrc files that implement it (m.impl("name", ...)), from a checkout."""
    out: dict = {}
    if not CSRC.is_dir():
        return out
    for f in sorted(CSRC.rglob("*")):
        if f.suffix not in (".cpp", ".cu"):
            continue
        for name in re.findall(r'm\.impl\("(\w+)"', f.read_text(errors="replace")):
            files = out.setdefault(name, [])
            files.append(f)
            stem = f.stem.removesuffix("_binding")
            # the kernel file of a binding (rope_binding.cpp -> rope.cu), or the op's own (quant_binding.cpp ->
            # int8_mm.cu), and the sources an op is split into (flash_attention_fwd.cpp, ...)
            for kernel in [f.with_name(f"{stem}.cu"), f.with_name(f"{name}.cu")] + sorted(f.parent.glob(f"{stem}_*")):
                if kernel.suffix in (".cpp", ".cu") and not kernel.stem.endswith("_binding") and kernel.exists() \
                        and kernel not in files:
                    files.append(kernel)
    return out


def _rel(f: Path) -> str:
    try:
        return str(f.relative_to(PACKAGE.parent))
    except ValueError:
        return str(f)


def op_files() -> dict:
    """{op: {backend: [files]}} read from the dispatch registry: each backend's Python file, the Triton module
    its launcher lives in, the C++ / CUDA sources implementing the schemas it calls (from a checkout), and the
    file holding the op's autograd."""
    schemas = _schema_files()
    out = {}
    for name, op in sorted(_dispatch.OPS.items()):
        per = {}
        for bname, b in op.backends.items():
            files = [PACKAGE.parent / f for f in b.files if (PACKAGE.parent / f).exists()]  # csrc: a checkout
            key = {"cpu": "/cpu/", "cuda": "/cuda/"}.get(bname)
            schema = getattr(getattr(b.fn, "_schema", None), "name", None)  # an OpOverload: fmkernels::name
            if schema is not None and key:
                files += [f for f in schemas.get(schema.split("::")[-1], []) if key in str(f)]
            elif not b.files:
                try:
                    files.append(Path(inspect.getsourcefile(b.fn)))
                    src = inspect.getsource(b.fn)
                except (TypeError, OSError):
                    src = ""
                if "triton_module()" in src:
                    src += inspect.getsource(inspect.getmodule(b.fn).triton_module)
                files += [PACKAGE / "triton" / f"{t}.py" for t in re.findall(r"from \.\.triton import (\w+)", src)]
                if key:
                    for sch in re.findall(r"torch\.ops\.fmkernels\.(\w+)", src):
                        files += [f for f in schemas.get(sch, []) if key in str(f)]
            per[bname] = list(dict.fromkeys(_rel(f) for f in files))
        bwd = _autograd.BACKWARDS.get(name)
        if bwd is not None:
            per["autograd"] = [_rel(Path(inspect.getsourcefile(bwd.make_backward)))]
        out[name] = per
    return out


def format_op_files(d: dict) -> str:
    lines = []
    for name, per in d.items():
        lines.append(name)
        for b, files in per.items():
            lines.append(f"  {b:<10} {', '.join(files) if files else '-'}")
    return "\n".join(lines)
