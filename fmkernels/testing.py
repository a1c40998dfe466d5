"""The project's assertion helpers (used by tests/, usable by anyone extending fmkernels).

Tolerance rule for float kernels: the error of a kernel against the fp32 reference must be at most
`factor` (2) times the error of plain PyTorch computing the same thing in the same low precision, plus a
small rounding floor. The baseline error comes from the data, not from a hand-picked atol.

For quantized kernels: signal-to-quantization-noise ratio (SQNR, dB) floors, and bit-exactness of the
integer part (`assert_exact`).
"""
from __future__ import annotations

import math
import os
import socket
from typing import Iterable, Optional, Sequence

import torch

from . import _dispatch

# The standard odd shapes (design.md): along sequence / rows, and along hidden / feature dims.
ODD_ROWS: tuple[int, ...] = (1, 7, 97, 1025)
ODD_HIDDEN: tuple[int, ...] = (8, 96, 4097)
ODD_HEAD_DIMS: tuple[int, ...] = (16, 40, 59, 64, 80, 96, 128, 256)

# Machine epsilon-scale floors per dtype, applied to max-abs error relative to the reference's scale.
_FLOOR = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0


def rms_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.detach().double() - b.detach().double()).pow(2).mean().sqrt().item()


def error_budget(ref: torch.Tensor, baseline: torch.Tensor, dtype: torch.dtype, factor: float = 2.0) -> float:
    """Allowed max-abs error: factor * (baseline's error vs ref) + floor * scale(ref)."""
    scale = ref.detach().abs().max().item() if ref.numel() else 0.0
    floor = _FLOOR.get(dtype, 1e-6) * max(scale, 1.0)
    return factor * max_abs_err(baseline, ref) + floor


def assert_close_to_reference(
    out: torch.Tensor,
    ref: torch.Tensor,
    baseline: torch.Tensor,
    *,
    factor: float = 2.0,
    name: str = "output",
    dtype: Optional[torch.dtype] = None,
) -> None:
    """Assert |out - ref| <= factor * |baseline - ref| + floor (max-abs, elementwise over the tensor).

    out: the kernel's result; ref: the fp32 reference (computed from the same low-precision inputs);
    baseline: plain PyTorch computing the op in the kernel's precision.
    """
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    dtype = dtype or out.dtype
    assert torch.isfinite(out.float()).all() or not torch.isfinite(ref.float()).all(), f"{name}: non-finite values"
    err = max_abs_err(out, ref)
    budget = error_budget(ref, baseline, dtype, factor)
    assert err <= budget, (
        f"{name}: max abs error {err:.3e} exceeds {factor}x plain PyTorch's {max_abs_err(baseline, ref):.3e} "
        f"+ floor (budget {budget:.3e}); dtype={dtype}"
    )


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 20 log10(||ref|| / ||ref - out||)."""
    ref64, out64 = ref.detach().double(), out.detach().double()
    noise = (ref64 - out64).norm().item()
    signal = ref64.norm().item()
    if noise == 0.0:
        return math.inf
    return 20.0 * math.log10(max(signal, 1e-300) / noise)


def assert_sqnr(ref: torch.Tensor, out: torch.Tensor, min_db: float, name: str = "output") -> float:
    s = sqnr(ref, out)
    assert s >= min_db, f"{name}: SQNR {s:.1f} dB below the floor of {min_db} dB"
    return s


def assert_exact(out: torch.Tensor, ref: torch.Tensor, name: str = "output") -> None:
    """Bit-exact equality (integer results, deterministic kernels)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (
        f"{name}: {tuple(out.shape)}/{out.dtype} vs {tuple(ref.shape)}/{ref.dtype}"
    )
    if not torch.equal(out, ref):
        diff = (out != ref).sum().item()
        raise AssertionError(f"{name}: {diff} of {out.numel()} elements differ from the reference")


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (a transposed copy, transposed back)."""
    if t.dim() < 2:
        return t.repeat_interleave(2)[::2]
    out = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not out.is_contiguous() or t.shape[-1] == 1 or t.shape[-2] == 1
    return out


def available_backends(op_name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, shape=()) -> list[str]:
    """Backends of `op_name` that can run on `device` when asked for by name (triton on CPU: interpreter)."""
    op = _dispatch.OPS[op_name]
    q = _dispatch.Query(device=device, dtype=dtype, shape=tuple(shape))
    return [n for n, b in op.backends.items() if b.reason(q, forced=True) is None]


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def seeded(seed: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def randn(*shape: int, dtype=torch.float32, device="cpu", seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=seeded(seed)) * scale).to(dtype=dtype, device=device)


def all_close_grads(
    outs: Sequence[Optional[torch.Tensor]],
    refs: Sequence[Optional[torch.Tensor]],
    baselines: Sequence[Optional[torch.Tensor]],
    names: Iterable[str],
    factor: float = 2.0,
) -> None:
    for o, r, b, n in zip(outs, refs, baselines, names):
        if r is None:
            assert o is None, f"{n}: expected no gradient"
            continue
        assert o is not None, f"{n}: gradient missing"
        assert_close_to_reference(o, r, b, factor=factor, name=n)


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now (for torchrun / gloo rendezvous in tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
