"""One public function per op: input validation, backend dispatch, autograd. Modules in fmkernels.nn call
these; nothing here knows about modules.

Every module in this package is imported here (so its schemas and backends register), and the names in
its `__all__` are re-exported: adding an op is adding a file.
"""
from .._autoexport import export_submodules as _export

__all__: list[str] = _export(__name__, __path__, globals())

# GPU dispatch: Triton before CUDA where the CUDA kernels are SIMT and the Triton ones reach the tensor cores
# (fmkernels/gpu_build/cuda_sass.json, written by scripts/cuda_sass.py).
from .._gpu_build import apply_preferences as _apply_preferences  # noqa: E402

_apply_preferences()
