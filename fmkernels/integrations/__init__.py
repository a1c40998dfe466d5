"""Drop-in integration: `fmkernels.patch(model)` swaps fmkernels ops into an already-built Hugging Face or plain
PyTorch model, in place; `fmkernels.unpatch(model)` restores it exactly.

    import fmkernels as fk
    report = fk.patch(model)        # in place; report.model is model; print(report) lists what was replaced
    fk.unpatch(model)

transformers is imported only when the model is a transformers model (`pip install fmkernels[hf]`).
"""
from ._patch import KINDS, PatchReport, get_report, patch, unpatch

__all__ = ["patch", "unpatch", "get_report", "PatchReport", "KINDS"]
