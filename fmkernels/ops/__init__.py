"""One public function per op: input validation, backend dispatch, autograd. Modules in fmkernels.nn call
these; nothing here knows about modules.

Every module in this package is imported here (so its schemas and backends register), and the names in
its `__all__` are re-exported: adding an op is adding a file.
"""
from .._autoexport import export_submodules as _export

__all__: list[str] = _export(__name__, __path__, globals())
