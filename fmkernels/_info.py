"""fmkernels.info(): what was built, what this machine has, and which backend each op picks."""
from __future__ import annotations

import platform

import torch

from . import _dispatch, _ext
from ._version import __version__


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
    from ._gpu_build import prefer_triton

    return {
        "gpu_prefers_triton": prefer_triton(),
        "fmkernels": __version__,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "cpu_extension": status.get("fmkernels._C", {}),
        "cuda_extension": status.get("fmkernels._C_cuda", {}),
        "cpu": platform.processor() or platform.machine(),
        "cpu_isa": {k: feats.get(k, False) for k in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")},
        "cpu_isa_in_use": cpu_ext.isa() if cpu_ext is not None else "n/a (extension not loaded)",
        "threads": torch.get_num_threads(),
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
        f"CPU extension : {ext_line(d['cpu_extension'])}",
        f"CUDA extension: {ext_line(d['cuda_extension'])}",
        "CPU ISA       : " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in d["cpu_isa"].items())
        + f"   (kernels use: {d['cpu_isa_in_use']}, {d['threads']} threads)",
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
