"""Process settings the `fmk` command makes before torch loads (issue 15 item 8).

OMP_WAIT_POLICY=PASSIVE: with OpenMP's default spin-waiting, any other load on a 2-core VM made `fmk train` ~10x
slower (30 steps 11-16 s vs 1.2-1.4 s) and `fmk eval` 6x. libgomp reads the variable once, when torch loads it,
so it is set here, from fmkernels/__init__.py before its first torch import, and only when this process is the
`fmk` command (console script `.../bin/fmk`, or `python -m fmkernels.cli`) and the user has not set it.
Importing fmkernels as a library changes nothing.
"""
from __future__ import annotations

import os
import sys

DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def is_fmk_command(argv=None) -> bool:
    argv = list(getattr(sys, "orig_argv", sys.argv) if argv is None else argv)
    # console script: [python, /path/bin/fmk, ...] (or [/path/bin/fmk, ...] when exec'd directly)
    if any(os.path.basename(a) == "fmk" for a in argv[:2]):
        return True
    # python [-X opts] -m fmkernels.cli ...
    return any(a == "-m" and i + 1 < len(argv) and argv[i + 1] == "fmkernels.cli" for i, a in enumerate(argv))


def apply(argv=None) -> dict:
    """Set DEFAULTS the user left unset when this is the fmk command; returns what was set."""
    if not is_fmk_command(argv):
        return {}
    done = {}
    for k, v in DEFAULTS.items():
        if k not in os.environ:
            os.environ[k] = v
            done[k] = v
    return done
