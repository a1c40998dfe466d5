"""Backend registry and dispatch: one `Op` per public op, each holding backends that declare what they can run.

A backend declares its devices, dtypes, what it needs (compiled extension, triton) and an optional shape
check. `Op.select(...)` picks the first backend, in the op's priority order for the input's device, whose
declarations fit, and returns its name. `backend="..."` (or the environment variable FMK_BACKEND) forces
one; a forced backend that cannot run raises `BackendError` naming every backend considered and why it was
rejected. Selection sees only plain Python values (device type, dtype, a shape key), so under
torch.compile it is evaluated once at trace time and the chosen kernel is what lands in the graph.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import _ext

BACKEND_NAMES = ("cuda", "triton", "cpu", "reference")
# Automatic order per device type. Triton runs CPU tensors only under TRITON_INTERPRET=1 and only when
# asked for by name (the interpreter is a test vehicle, never an automatic choice).
AUTO_ORDER = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}


class BackendError(RuntimeError):
    """No backend (or not the forced one) can run this call; the message lists every reason."""


@dataclass(frozen=True)
class Query:
    """What a backend's capability check may look at: plain values, no tensors."""

    device: str  # "cpu", "cuda", "meta", ...
    dtype: torch.dtype
    shape: tuple = ()  # op-specific key, e.g. (rows, hidden) or (D, causal)
    extra: tuple = ()  # op-specific flags as (name, value) pairs


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable
    devices: tuple[str, ...]
    dtypes: Optional[tuple[torch.dtype, ...]] = None  # None: any
    needs: tuple[str, ...] = ()  # "cpu_ext", "cuda_ext", "triton"
    check: Optional[Callable[[Query], Optional[str]]] = None  # extra constraint: reason or None
    # Automatic choice only: a reason to pass over this backend for a call that another backend runs faster
    # (measured); a forced backend ignores it.
    prefer_other: Optional[Callable[[Query], Optional[str]]] = None
    # Source files of this backend that its fn does not name itself (fmk info --files), relative to the checkout.
    files: tuple[str, ...] = ()

    def reason(self, q: Query, forced: bool) -> Optional[str]:
        """Why this backend cannot run `q` (None when it can)."""
        dev = q.device
        if dev == "meta":  # fake tensors / shape inference: any backend may be traced
            dev = "cpu"
        interpreted_triton = self.name == "triton" and dev == "cpu" and triton_interpret()
        if dev not in self.devices and not interpreted_triton:
            return f"runs on {'/'.join(self.devices)} tensors, got {q.device}"
        if interpreted_triton and not forced:
            return "CPU tensors run under TRITON_INTERPRET=1 only when backend='triton' is asked for"
        if self.dtypes is not None and q.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            return f"dtype {str(q.dtype).replace('torch.', '')} not supported (supports {names})"
        for need in self.needs:
            missing = _need_missing(need)
            if missing:
                return missing
        if self.check is not None:
            why = self.check(q)
            if why is not None:
                return why
        if not forced and self.prefer_other is not None:
            return self.prefer_other(q)
        return None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # not installed, or broken install
        return f"triton is not importable ({type(e).__name__}: {e})"
    return None


def _need_missing(need: str) -> Optional[str]:
    if need == "cpu_ext":
        return None if _ext.has_cpu_ext() else "the CPU extension fmkernels._C is not loaded (see `fmk info`)"
    if need == "cuda_ext":
        return None if _ext.has_cuda_ext() else "the CUDA extension fmkernels._C_cuda is not loaded"
    if need == "triton":
        return triton_import_error()
    raise ValueError(f"unknown backend requirement {need!r}")


@dataclass
class Op:
    """One public op with its backends, in priority order."""

    name: str
    backends: dict[str, Backend] = field(default_factory=dict)
    # Per-device automatic order overriding AUTO_ORDER, for ops whose measured ranking differs.
    auto_order: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def register(self, backend: Backend) -> Backend:
        if backend.name not in BACKEND_NAMES:
            raise ValueError(f"backend name must be one of {BACKEND_NAMES}, got {backend.name!r}")
        self.backends[backend.name] = backend
        return backend

    def select(self, q: Query, backend: Optional[str] = None) -> Backend:
        return self.backends[_select_name(self, q, backend, os.environ.get("FMK_BACKEND") or None)]

    def explain(self, q: Query) -> dict[str, Optional[str]]:
        """For every backend: None if it could run q automatically, else the reason."""
        return {n: b.reason(q, forced=False) for n, b in self.backends.items()}


def _select_name(op: Op, q: Query, explicit: Optional[str], env: Optional[str]) -> str:
    if explicit is not None:
        return _forced(op, q, explicit, source="backend=")
    if env is not None and env in op.backends:
        return _forced(op, q, env, source="FMK_BACKEND=")
    if env is not None and env not in BACKEND_NAMES:
        raise BackendError(f"FMK_BACKEND={env!r} is not a backend; expected one of {', '.join(BACKEND_NAMES)}")
    reasons = {}
    dev = "cpu" if q.device == "meta" else q.device
    order = op.auto_order.get(dev) or AUTO_ORDER.get(dev, BACKEND_NAMES)
    for name in order:
        b = op.backends.get(name)
        if b is None:
            continue
        why = b.reason(q, forced=False)
        if why is None:
            return name
        reasons[name] = why
    raise BackendError(f"fmkernels.{op.name}: no backend can run this call:\n" + _format(reasons, op, q))


def _forced(op: Op, q: Query, name: str, source: str) -> str:
    if name not in op.backends:
        raise BackendError(
            f"fmkernels.{op.name}: {source}{name!r} is not a backend of this op; "
            f"available: {', '.join(op.backends)}"
        )
    why = op.backends[name].reason(q, forced=True)
    if why is None:
        return name
    reasons = {n: b.reason(q, forced=True) for n, b in op.backends.items()}
    raise BackendError(
        f"fmkernels.{op.name}: {source}{name!r} cannot run this call ({why}). All backends:\n" + _format(reasons, op, q)
    )


def _format(reasons: dict, op: Op, q: Query) -> str:
    lines = [f"  - {n}: {'ok' if r is None else r}" for n, r in reasons.items()]
    lines.append(f"  (input: device={q.device}, dtype={str(q.dtype).replace('torch.', '')}, shape key={q.shape})")
    return "\n".join(lines)


OPS: dict[str, Op] = {}


def op(name: str, auto_order: Optional[dict[str, tuple[str, ...]]] = None) -> Op:
    """The registry entry for `name`, created on first use."""
    if name not in OPS:
        OPS[name] = Op(name)
    if auto_order:
        OPS[name].auto_order.update(auto_order)
    return OPS[name]
