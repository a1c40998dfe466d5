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


NONFINITE_RULE = """NaN / Inf semantics, one rule for every op and backend (issue 21): compare elementwise with the
PyTorch peer run on the same inputs (F.linear for the int8 / int4 / sparse layers, F.cross_entropy for the fused
loss, F.rms_norm, F.silu(a) * b, the fp32 reference for RoPE):
  - where the peer is NaN, the op is NaN;
  - where the peer is +Inf or -Inf, the op is the same Inf or NaN (a different summation order, or a quantized
    kernel's NaN scale, may turn an overflow into NaN; never into a finite number);
  - where the peer is finite, the op is finite (and within its tolerance: error_budget / SQNR floors).
For the sparse matmuls the peer multiplies the stored weights only (torch.sparse semantics: a pruned weight is
absent, not a zero, so an Inf in x facing only pruned weights does not reach the output).
A NaN or Inf that reaches an output therefore reaches it, and nothing non-finite appears from finite data.
Attention (flash_attention, flash_attention_varlen, the decoding path; every backend and ISA): the peer is
F.scaled_dot_product_attention's math in fp32 on the same inputs (attention_nonfinite_peer): a NaN in q, k or a
visible key's v, a +inf score, or an overflowing q k^T makes the row (or, for v, the column) NaN / Inf; a row
whose scores are all -inf gives zeros (SDPA's safe softmax; our documented behaviour for rows that see no key).
A key outside a row's mask may or may not reach it (SDPA's math backend multiplies its v by p = 0, its flash
backend and ours skip whole invisible blocks): the `may` peer, under which a non-finite output is not an error."""


def nonfinite_mismatch(out: torch.Tensor, peer: torch.Tensor, may: Optional[torch.Tensor] = None) -> Optional[str]:
    """Why `out` breaks NONFINITE_RULE against `peer` (None when it does not). may: where it is non-finite (and
    the peer finite), out may be either (attention's masked keys, see the rule)."""
    if out.shape != peer.shape:
        return f"shape {tuple(out.shape)} != peer {tuple(peer.shape)}"
    o, p = out.detach().float().cpu(), peer.detach().float().cpu()
    fin = torch.isfinite(p) if may is None else torch.isfinite(p) & torch.isfinite(may.detach().float().cpu())
    checks = (
        (torch.isnan(p) & ~torch.isnan(o), "peer is NaN but the op is not"),
        (torch.isinf(p) & ~(torch.isnan(o) | (o == p)), "peer is Inf but the op is neither the same Inf nor NaN"),
        (fin & ~torch.isfinite(o), "peer is finite but the op is not"),
    )
    for bad, what in checks:
        if bool(bad.any()):
            i = tuple(int(v) for v in bad.nonzero()[0])
            return f"{what} at {i} ({int(bad.sum())} elements): op {o[i].item()}, peer {p[i].item()}"
    return None


def assert_nonfinite_like(out: torch.Tensor, peer: torch.Tensor, name: str = "output",
                          may: Optional[torch.Tensor] = None) -> None:
    """Assert NONFINITE_RULE: out is NaN/Inf exactly where the PyTorch peer is (see the rule's text)."""
    why = nonfinite_mismatch(out, peer, may)
    assert why is None, f"{name}: {why}"


def attention_nonfinite_peer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
                             scale: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(peer, may) for attention under NONFINITE_RULE, SDPA's math in fp32 on q (B, Hq, Nq, D), k, v (B, Hkv, Nk, D)
    with `mask` (Nq, Nk) bool of visible pairs (None: all). peer: keys outside the mask absent; may: their v
    multiplied by p = 0 (SDPA's math backend). Small shapes only: forms (B, Hq, Nq, Nk, D)."""
    qf, kf, vf = q.float(), k.float(), v.float()
    if kf.shape[1] != qf.shape[1]:
        kf = kf.repeat_interleave(qf.shape[1] // kf.shape[1], 1)
        vf = vf.repeat_interleave(qf.shape[1] // vf.shape[1], 1)
    s = (qf @ kf.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    empty = (s == float("-inf")).all(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    may = p @ vf
    if mask is None:
        return may, may
    terms = p[..., None] * vf[:, :, None]  # (B, Hq, Nq, Nk, D)
    peer = terms.masked_fill(~mask[..., None], 0.0).sum(-2)
    return peer, may


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
