"""Backward once per op: `Backward` holds an op's setup_context and a backward factory, and attaches the same
backward to the forward of every backend (the compiled `fmkernels::<op>` schema and the Triton
`fmkernels::<op>_triton` custom op alike). Triton files hold kernels, launchers and fakes only; the op's file in
`fmkernels/ops/` owns its autograd.

    BWD = Backward(setup_context, make_backward)       # make_backward(kernels...) -> backward(ctx, *grads)
    BWD.attach("fmkernels::rms_norm_fwd", torch.ops.fmkernels.rms_norm_bwd)
    BWD.attach(tri.rms_norm_fwd_triton, tri.rms_norm_bwd_triton)   # lazily, when the Triton backend first runs

The backward factory receives the backend's own backward kernels (if any), so a backward computed by the same
formula runs on the device the forward ran on.
"""
from __future__ import annotations

from typing import Callable

import torch


def op_name(op) -> str:
    """'fmkernels::name' for a schema string, an OpOverload(Packet) or a torch.library CustomOpDef."""
    if isinstance(op, str):
        return op
    q = getattr(op, "_qualname", None)  # CustomOpDef
    if q is not None:
        return q
    return getattr(op, "_qualified_op_name", None) or str(op)


class Backward:
    def __init__(self, setup_context: Callable, make_backward: Callable[..., Callable]):
        self.setup_context, self.make_backward = setup_context, make_backward
        self.attached: dict[str, tuple] = {}  # forward op name -> the backward kernels it was given

    def attach(self, forward, *kernels):
        """Register the backward on `forward` once (idempotent); returns `forward`."""
        name = op_name(forward)
        if name not in self.attached:
            torch.library.register_autograd(forward, self.make_backward(*kernels), setup_context=self.setup_context)
            self.attached[name] = kernels
        return forward


BACKWARDS: dict[str, Backward] = {}  # public op name -> its Backward (fmk info --files, tests)


def backward(op: str, setup_context: Callable, make_backward: Callable[..., Callable]) -> Backward:
    """The one Backward of public op `op` (created on first use)."""
    if op not in BACKWARDS:
        BACKWARDS[op] = Backward(setup_context, make_backward)
    return BACKWARDS[op]
