"""Thin modules over fmkernels.ops, drop-in replacements for their torch.nn counterparts.

Every module in this package is imported and the names in its `__all__` re-exported: adding a module is
adding a file."""
import importlib as _importlib
import pkgutil as _pkgutil

__all__: list[str] = []
for _m in sorted(_pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _m.name.startswith("_"):
        continue
    _mod = _importlib.import_module(f"{__name__}.{_m.name}")
    for _name in getattr(_mod, "__all__", ()):
        globals()[_name] = getattr(_mod, _name)
        __all__.append(_name)
