"""The `fmkernels::` op namespace: schemas are defined here once, in Python, so that they exist (with
their fake implementations, for torch.compile and opcheck) whether or not a compiled extension loaded.

C++ files only *implement* these schemas (`TORCH_LIBRARY_IMPL(fmkernels, CPU|CUDA, m)`); Triton launchers
and pure-Python kernels register through `torch.library.custom_op` under the same namespace.

Each op family defines its own schemas at the top of its `fmkernels/ops/<family>.py` with `define()`;
that module is the single place the schema is written.
"""
from __future__ import annotations

import torch

NAMESPACE = "fmkernels"

# One DEF library for the whole namespace; `define` adds schemas to it.
_LIB = torch.library.Library(NAMESPACE, "DEF")
_DEFINED: dict[str, str] = {}


def define(schema: str, *, tags=()) -> str:
    """Define `fmkernels::<schema>` once; returns the qualified name ("fmkernels::name")."""
    name = schema.split("(", 1)[0].strip()
    if name in _DEFINED:
        if _DEFINED[name] != schema:
            raise RuntimeError(f"fmkernels::{name} defined twice with different schemas")
        return f"{NAMESPACE}::{name}"
    _LIB.define(schema, tags=tags)
    _DEFINED[name] = schema
    return f"{NAMESPACE}::{name}"


def defined_ops() -> list[str]:
    return sorted(_DEFINED)
