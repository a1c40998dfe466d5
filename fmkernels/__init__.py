"""fmkernels: fused, sparse and low-bit kernels for training and fine-tuning transformers.

    import fmkernels as fk
    y = fk.rms_norm(x, weight)          # dispatches to the fastest backend for x's device and dtype
    fk.info()                           # what was built, the CPU ISA, and the backend each op uses

Every public op is also in `fmkernels.ops`; modules are in `fmkernels.nn`. Workflow entry points
(quantize_, sparsify_, patch, ...) load lazily on first use, so `import fmkernels` stays light and never
imports optional packages (transformers, peft).
"""
import importlib

from . import _cli_env

_cli_env.apply()  # the fmk command only: OMP_WAIT_POLICY=PASSIVE before torch loads (unless the user set it)

from . import _library  # noqa: F401,E402  (the fmkernels:: namespace)
from . import _ext
from ._dispatch import BackendError
from ._version import __version__

from . import ops  # noqa: E402  (defines every fmkernels:: schema, registers backends)

_ext.cpu_ext()  # registers the CPU kernels (warns once if missing)
_ext.cuda_ext()

from . import nn  # noqa: E402
from ._info import info  # noqa: E402
from .allocator import tune_cpu_allocator  # noqa: E402
from .ops import *  # noqa: E402,F401,F403

# Public names that live in workflow subpackages: name -> module, imported on first access.
_LAZY = {
    # quantization (issue: low-bit GEMMs)
    "quantize_": "fmkernels.quantization",
    "prepare_qat_": "fmkernels.quantization",
    "convert_": "fmkernels.quantization",
    "Int8DynamicConfig": "fmkernels.quantization",
    "Int4WeightOnlyConfig": "fmkernels.quantization",
    "Float8Config": "fmkernels.quantization",
    "Int8TrainingConfig": "fmkernels.quantization",
    # sparsity
    "sparsify_": "fmkernels.sparsity",
    "SemiStructuredConfig": "fmkernels.sparsity",
    "BlockSparseConfig": "fmkernels.sparsity",
    "UnstructuredConfig": "fmkernels.sparsity",
    # drop-in integration
    "patch": "fmkernels.integrations",
    "unpatch": "fmkernels.integrations",
    # models
    "models": "fmkernels.models",
}


def __getattr__(name):
    mod_name = _LAZY.get(name)
    if mod_name is None:
        raise AttributeError(f"module 'fmkernels' has no attribute {name!r}")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name == mod_name:
            raise AttributeError(f"fmkernels.{name} is not available yet ({mod_name} is not part of this build)") from e
        raise
    return mod if mod_name.endswith("." + name) else getattr(mod, name)


__all__ = ["__version__", "BackendError", "info", "nn", "ops", "tune_cpu_allocator", *ops.__all__]
