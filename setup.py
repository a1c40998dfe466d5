"""Build for fmkernels: one CPU extension (fmkernels._C) and, where CUDA is usable, one CUDA extension
(fmkernels._C_cuda).

Rules (see README, "Install into your own environment"):
- never a `-std` flag (torch picks C++20) and never a host-specific `-march`: AVX-512 code uses per-function
  `__attribute__((target(...)))` and is chosen at run time from CPUID, so a wheel built here runs anywhere;
- the CUDA extension is built when torch has CUDA and nvcc is found, or when FMK_FORCE_CUDA=1;
  FMK_SKIP_CUDA=1 skips it; MAX_JOBS is honoured by torch's BuildExtension (ninja);
- FMK_BUILD_EXT=0 installs the Python package alone: the Makefile does `pip install -e .` that way once and
  then `setup.py build_ext --inplace`, whose ninja build in build/ recompiles only the files that changed
  (a PEP 660 editable build compiles in a fresh temp dir every time);
- release builds carry no debug info (-g0 after Python's own -g: the CPU .so is ~1.2 MB instead of ~24 MB);
  FMK_DEBUG=1 builds -O0 -g;
- torch's headers are included as system headers (-isystem), so GCC's warnings from them (~1,200 false
  positives per build) are not printed; our own code keeps -Wall;
- the torch version the extensions were built against is written beside them (fmkernels/_build_info.json);
  fmkernels/_ext.py checks it at import (see the README, "Install into your own environment");
- torch must be importable in the build environment: an isolated build (`pip install .` without
  --no-build-isolation) stops with the one-line fix instead of producing a wheel without kernels.
"""
import glob
import json
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _guess_cuda_home() -> None:
    """torch derives CUDA_HOME from `which nvcc`; when nvcc on PATH is a wrapper script (e.g. /usr/local/bin/nvcc
    exec-ing /usr/local/cuda-X/bin/nvcc) that guess has no headers. Point CUDA_HOME at the real toolkit."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    cands = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    try:
        if os.path.getsize(nvcc) < 4096:
            with open(nvcc, errors="ignore") as f:
                cands += [os.path.dirname(os.path.dirname(t)) for t in f.read().split() if t.endswith("/bin/nvcc")]
    except OSError:
        pass
    for home in cands:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


def _want_cuda(torch_mod) -> bool:
    if _env_flag("FMK_SKIP_CUDA"):
        return False
    if _env_flag("FMK_FORCE_CUDA"):
        return True
    from torch.utils.cpp_extension import CUDA_HOME

    has_nvcc = CUDA_HOME is not None or shutil.which("nvcc") is not None
    return torch_mod.version.cuda is not None and has_nvcc


# setup.py commands that compile (building an sdist or metadata needs no torch)
_BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install", "bdist_egg"}
NO_TORCH_MESSAGE = (
    "fmkernels: torch is not importable in this build environment (pip builds in an isolated environment "
    "by default). Install torch first, then run:  pip install --no-build-isolation fmkernels  "
    "(or `pip install --no-build-isolation .` in a checkout)"
)


def _build_info_class(base, info: dict):
    """BuildExtension that also writes fmkernels/_build_info.json next to the built extensions."""

    class BuildWithInfo(base):
        def run(self):
            super().run()
            if not self.extensions:
                return
            out_dir = os.path.dirname(self.get_ext_fullpath(self.extensions[0].name))
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, "_build_info.json"), "w") as f:
                json.dump(dict(info, extensions=[e.name for e in self.extensions]), f, indent=1)
                f.write("\n")

    return BuildWithInfo


def _gcc_intrinsic_warning_flags() -> list:
    """GCC 12 reports -W(maybe-)uninitialized inside its own AVX-512 headers once they are inlined into our code
    (`__m512i __Y = __Y;` in _mm512_undefined_*; GCC bug 105593, fixed in GCC 13): 1,184 of the 1,215 warnings of
    a CPU build here. Off for GCC < 13 only; other compilers keep the checks."""
    import re
    import subprocess

    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    m = re.search(r"\b(\d+)\.\d+\.\d+", out.splitlines()[0] if out else "")
    if "clang" in out.lower() or not m or int(m.group(1)) >= 13:
        return []
    return ["-Wno-maybe-uninitialized", "-Wno-uninitialized"]


def _extensions():
    if os.environ.get("FMK_BUILD_EXT", "1") == "0":  # Makefile: editable install of the Python package only
        return [], {}
    _guess_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, include_paths
    except ImportError:
        if _BUILD_COMMANDS.intersection(sys.argv[1:]):
            sys.exit(NO_TORCH_MESSAGE)
        return [], {}

    debug = _env_flag("FMK_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    system_headers = [f for p in include_paths() for f in ("-isystem", p)]
    cxx_flags = opt + ["-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas"] \
        + _gcc_intrinsic_warning_flags() + system_headers
    include_dirs = [os.path.join(ROOT, "csrc")]

    cpu_sources = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    exts = [
        CppExtension(
            name="fmkernels._C",
            sources=cpu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]

    if _want_cuda(torch):
        cu_sources = sorted(
            os.path.relpath(p, ROOT)
            for pat in ("*.cu", "*.cpp")
            for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", pat))
        )
        archs = os.environ.get("FMK_CUDA_ARCHS", "80;90a").split(";")
        gencode = []
        for a in archs:
            gencode += [f"-gencode=arch=compute_{a},code=sm_{a}"]
        exts.append(
            CUDAExtension(
                name="fmkernels._C_cuda",
                sources=cu_sources,
                include_dirs=include_dirs,
                extra_compile_args={
                    "cxx": opt,
                    "nvcc": opt + ["--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"] + gencode,
                },
            )
        )
    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "debug": debug}
    return exts, {"build_ext": _build_info_class(BuildExtension.with_options(no_python_abi_suffix=False), info)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
