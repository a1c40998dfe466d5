"""Readable fp32 PyTorch implementations: the oracle every backend is tested against, and the last-resort
fallback. One function per op, written for clarity, not speed."""
import importlib as _importlib
import sys as _sys

# Modules renamed to their op's stem (issue 16): the old path stays importable as the same module object.
_RENAMED = {"norm": "rms_norm"}
for _old, _new in _RENAMED.items():
    globals()[_old] = _sys.modules[f"{__name__}.{_old}"] = _importlib.import_module(f".{_new}", __name__)
