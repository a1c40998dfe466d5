"""Loading the compiled extensions. Import never fails: a missing or incompatible extension (not built,
built for another torch, no CUDA) warns once and the ops that need it fall back to another backend.
`fmkernels.info()` reports what loaded and why not."""
from __future__ import annotations

import importlib
import json
import os
import warnings

import torch

_STATE: dict[str, dict] = {}
_WARNED_TORCH = False
BUILD_INFO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")


def build_info() -> dict | None:
    """What setup.py recorded when it built the extensions ({"torch": "2.13.0", "torch_cuda": None, "debug": False,
    "extensions": [...]}), or None (no record: a build older than the record, or no build).
    FMK_BUILD_INFO=path reads another record (tests fake a build for another torch with it)."""
    try:
        with open(os.environ.get("FMK_BUILD_INFO") or BUILD_INFO) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _release(version: str) -> str:
    return version.split("+", 1)[0]  # "2.13.0+cpu" -> "2.13.0": the local label names the wheel flavour


def torch_mismatch() -> str | None:
    """Why the compiled extensions must not be loaded into this torch (None: they may).

    Rule: the extensions load only into the torch release they were built against (same X.Y.Z; a local label
    such as +cpu / +cu128 is not compared). torch's C++ ABI is not stable across releases: a wheel built for 2.13
    beside 2.14 may fail with undefined symbols, or load and misbehave. FMK_IGNORE_TORCH_VERSION=1 loads anyway.
    No record (a build from before the record existed) is not a mismatch."""
    info = build_info()
    if not info or not info.get("torch") or os.environ.get("FMK_IGNORE_TORCH_VERSION", "0") == "1":
        return None
    built, running = info["torch"], torch.__version__
    if _release(built) == _release(running):
        return None
    return f"built against torch {built}, running torch {running}"


def _load(module: str, label: str, quiet: bool) -> object | None:
    global _WARNED_TORCH
    if module in _STATE:
        return _STATE[module]["module"]
    info = build_info() or {}
    why = torch_mismatch() if module in info.get("extensions", [module]) else None  # only what that build made
    if why is not None:
        _STATE[module] = {"module": None, "loaded": False, "error": f"torch version mismatch: {why}"}
        if not _WARNED_TORCH:  # one warning for all extensions
            _WARNED_TORCH = True
            warnings.warn(
                f"fmkernels: the compiled kernels were {why}; they are not loaded (torch's C++ ABI changes "
                f"between releases) and every op uses its reference or Triton backend. Rebuild for this torch: "
                f"`pip install --no-build-isolation --force-reinstall --no-deps fmkernels` (or `make build` in a "
                f"checkout); FMK_IGNORE_TORCH_VERSION=1 loads them anyway.",
                RuntimeWarning,
                stacklevel=3,
            )
        return None
    try:
        mod = importlib.import_module(module)
        _STATE[module] = {"module": mod, "loaded": True, "error": None}
    except Exception as e:  # ImportError, OSError (undefined symbol: built for another torch), ...
        _STATE[module] = {"module": None, "loaded": False, "error": f"{type(e).__name__}: {e}"}
        if not quiet:
            warnings.warn(
                f"fmkernels: the {label} extension ({module}) could not be loaded ({type(e).__name__}: {e}). "
                f"Ops fall back to slower backends; rebuild with `pip install --no-build-isolation -e .` "
                f"(or `make build`). `fmk info` shows which backend each op uses.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _STATE[module]["module"]


def cpu_ext():
    """fmkernels._C (CPU kernels), or None. FMK_DISABLE_EXT=1 pretends it is missing (for tests)."""
    if os.environ.get("FMK_DISABLE_EXT", "0") == "1":
        _STATE.setdefault("fmkernels._C", {"module": None, "loaded": False, "error": "disabled by FMK_DISABLE_EXT=1"})
        return None
    return _load("fmkernels._C", "CPU", quiet=False)


def cuda_ext():
    """fmkernels._C_cuda (CUDA kernels), or None. Quiet when torch has no CUDA: nothing to miss then."""
    if os.environ.get("FMK_DISABLE_EXT", "0") == "1":
        return None
    quiet = not torch.cuda.is_available()
    return _load("fmkernels._C_cuda", "CUDA", quiet=quiet)


def has_cpu_ext() -> bool:
    return cpu_ext() is not None


def has_cuda_ext() -> bool:
    return cuda_ext() is not None


def status() -> dict[str, dict]:
    cpu_ext()
    cuda_ext()
    return {k: {"loaded": v["loaded"], "error": v["error"]} for k, v in _STATE.items()}


def cpu_features() -> dict[str, bool]:
    """ISA extensions of this CPU: from the extension's CPUID probe, else from /proc/cpuinfo."""
    ext = cpu_ext()
    if ext is not None:
        return dict(ext.cpu_features())
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    names = {
        "avx2": "avx2", "f16c": "f16c", "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512vl": "avx512vl",
        "avx512dq": "avx512dq", "avx512_vnni": "avx512_vnni", "avx512_bf16": "avx512_bf16",
        "avx512_fp16": "avx512_fp16", "avx512_vbmi": "avx512vbmi", "amx_tile": "amx_tile", "amx_bf16": "amx_bf16", "amx_int8": "amx_int8",
    }
    return {k: v in flags for k, v in names.items()}
