"""Backward once per op: the op's file in fmkernels/ops/ attaches one backward to every backend's forward (the
compiled schema and the Triton custom op); Triton files hold kernels, launchers and fakes only."""
import ast
import importlib
from pathlib import Path

import pytest

from fmkernels import _autograd, _dispatch

TRITON_DIR = Path(__file__).resolve().parents[1] / "fmkernels" / "triton"
# public op -> (ops module, compiled forward, Triton forward)
OPS = {
    "rms_norm": ("fmkernels.ops.rms_norm", "fmkernels::rms_norm_fwd", "fmkernels::rms_norm_fwd_triton"),
    "swiglu": ("fmkernels.ops.swiglu", "fmkernels::swiglu_fwd", "fmkernels::swiglu_fwd_triton"),
    "rope": ("fmkernels.ops.rope", "fmkernels::rope", "fmkernels::rope_triton"),
    "flash_attention": ("fmkernels.ops.attention", "fmkernels::flash_attention_fwd",
                        "fmkernels::flash_attention_fwd_triton"),
}


@pytest.mark.parametrize("path", sorted(TRITON_DIR.glob("*.py")), ids=lambda p: p.name)
def test_triton_files_hold_no_autograd(path):
    src = path.read_text()
    tree = ast.parse(src)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            assert node.attr != "register_autograd", f"{path.name}: autograd belongs in fmkernels/ops/"
        if isinstance(node, ast.ClassDef):
            bases = [ast.unparse(b) for b in node.bases]
            assert not any("autograd.Function" in b for b in bases), f"{path.name}: {node.name} is an autograd.Function"
        if isinstance(node, ast.ImportFrom) and node.level == 2:
            assert node.module not in ("ops",) and not (node.module or "").startswith("ops"), \
                f"{path.name} imports fmkernels.ops (a kernel file sits below the ops layer)"


@pytest.mark.parametrize("op", sorted(OPS))
def test_one_backward_on_every_forward(op):
    mod_name, compiled, triton_name = OPS[op]
    mod = importlib.import_module(mod_name)
    bwd = _autograd.BACKWARDS[op]
    assert compiled in bwd.attached
    if _dispatch.triton_import_error() is None:
        mod.triton_module()
        assert triton_name in bwd.attached
        assert bwd.attached[triton_name] != bwd.attached[compiled]  # each backend's own backward kernels


def test_attach_is_idempotent():
    b = _autograd.BACKWARDS["rms_norm"]
    before = dict(b.attached)
    b.attach("fmkernels::rms_norm_fwd", None)  # already attached: nothing re-registered
    assert b.attached == before
