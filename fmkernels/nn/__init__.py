"""Thin modules over fmkernels.ops, drop-in replacements for their torch.nn counterparts.

Every module in this package is imported and the names in its `__all__` re-exported: adding a module is
adding a file."""
from .._autoexport import export_submodules as _export

__all__: list[str] = _export(__name__, __path__, globals())
