"""Undoable primitives of patch(): every change to a model is recorded with its undo in a `_State`, so unpatch()
restores the model exactly. Shared by _patch.py and hf.py."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn


class _State:
    def __init__(self, report: PatchReport):
        self.report = report
        self.undo: list[Callable[[], None]] = []


_SUBCLASSES: dict = {}


def swapped_class(orig: type, tag: str, namespace: dict) -> type:
    """The cached subclass `orig` + overrides (one per (orig, tag))."""
    key = (orig, tag)
    if key not in _SUBCLASSES:
        ns = dict(namespace)
        ns.setdefault("__module__", orig.__module__)
        ns["_fmkernels_orig_class"] = orig
        _SUBCLASSES[key] = type(orig.__name__, (orig,), ns)
    return _SUBCLASSES[key]


def swap_class(state: _State, module: nn.Module, new_cls: type) -> None:
    old = module.__class__
    module.__class__ = new_cls
    state.undo.append(lambda: setattr(module, "__class__", old))


def set_child(state: _State, parent: nn.Module, name: str, new: nn.Module) -> None:
    old = getattr(parent, name)
    setattr(parent, name, new)
    state.undo.append(lambda: setattr(parent, name, old))


def set_attr(state: _State, obj: Any, name: str, value: Any) -> None:
    had = name in obj.__dict__
    old = obj.__dict__.get(name)
    obj.__dict__[name] = value

    def undo():
        if had:
            obj.__dict__[name] = old
        else:
            obj.__dict__.pop(name, None)

    state.undo.append(undo)
