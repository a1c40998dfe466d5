"""Readable fp32 PyTorch implementations: the oracle every backend is tested against, and the last-resort
fallback. One function per op, written for clarity, not speed."""
from .._autoexport import alias_modules as _alias

# Modules renamed to their op's stem (issue 16): old name -> new; the old path stays importable.
_RENAMED = {"norm": "rms_norm"}
_alias(__name__, _RENAMED, globals())
