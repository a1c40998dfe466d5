"""CPU allocator tuning for training processes: keep freed memory for reuse instead of handing it back to the OS.

PyTorch's CPU tensors come from malloc. glibc returns memory to the kernel in two ways: blocks >= the mmap
threshold are mmap'd and unmapped on free (dynamic threshold, at most 32 MiB), and free memory at the top of the
heap beyond the trim threshold is released. A training step allocates and frees the same activations every
step, so each step page-faults them in again (4 KiB faults, zero-filled). Measured on 2 cores Zen 4, d384 x 6
layers, batch 8 x 256, vocab 8192, fp32 (`benchmarks/bench_train.py`):
  default glibc          fmkernels model 37k-112k faults per step, plain PyTorch model 33k-87k (its logits
                         are 3 x 32 MiB mmap'd blocks)
  tune_cpu_allocator()   0-5 faults per step for both; the fmkernels step 1.09-1.27 s -> 1.00-1.06 s
This is the effect PyTorch's CPU tuning guide gets from preloading jemalloc or tcmalloc; this does it for glibc's
malloc in-process with mallopt(), no LD_PRELOAD. The cost: the process keeps its high-water mark of heap
memory resident (its peak RSS is unchanged). `fmk train` calls it on CPU (`--tune_allocator false` turns it off).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import warnings

__all__ = ["tune_cpu_allocator"]

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3
_INT_MAX = 2**31 - 1


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (musl and others have no such symbol)
        libc.mallopt
    except (OSError, AttributeError):
        return None
    return libc


def tune_cpu_allocator(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 30) -> bool:
    """Raise glibc malloc's mmap and trim thresholds so freed activations are reused without page faults.

    mmap_threshold: allocations at least this large (bytes) are mmap'd and unmapped on free (glibc default:
        dynamic, 128 KiB up to 32 MiB). trim_threshold: free memory at the top of the heap kept before it is
        released (glibc default: dynamic, twice the mmap threshold). Both in [1, 2**31 - 1].
    Returns True when applied; False (with a warning saying why) when the C library is not glibc, another
    allocator is preloaded (LD_PRELOAD), or GLIBC_TUNABLES already sets malloc options (the user's choice wins).
    Process-wide and idempotent; it changes where memory comes from, never any result.
    """
    for name, v in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= _INT_MAX:
            raise ValueError(f"tune_cpu_allocator: {name} must be an int in [1, 2**31 - 1] (bytes), got {v!r}")
    preload = os.environ.get("LD_PRELOAD", "")
    if any(a in preload for a in ("jemalloc", "tcmalloc", "mimalloc")):
        warnings.warn(f"tune_cpu_allocator: LD_PRELOAD={preload!r} replaces malloc; glibc settings left alone",
                      stacklevel=2)
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        warnings.warn("tune_cpu_allocator: GLIBC_TUNABLES already sets malloc options; left as they are", stacklevel=2)
        return False
    libc = _glibc()
    if libc is None:
        warnings.warn("tune_cpu_allocator: the C library is not glibc; allocator left as it is", stacklevel=2)
        return False
    # Order matters: setting either disables glibc's dynamic adjustment of both.
    ok = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold)) == 1
    ok = libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(trim_threshold)) == 1 and ok
    if not ok:
        warnings.warn("tune_cpu_allocator: mallopt refused the thresholds; allocator left as it is", stacklevel=2)
    return ok
