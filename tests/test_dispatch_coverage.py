"""Dispatch coverage on CUDA without a GPU: every op x dtype x (forward, backward) goes through the dispatcher's
own selection with the query's device set to "cuda", and every fmkernels op that the forward and the backward
then run must have a GPU implementation.

How, with no GPU and a CPU-only torch (fake CUDA tensors cannot run autograd there): the tensors are real CPU
tensors and `Op.select` is wrapped so that every query it sees says device "cuda"; whatever backend it picks is
then executed (Triton kernels under TRITON_INTERPRET=1, the "cuda" backends' ops on their CPU kernels). A
TorchDispatchMode records every `fmkernels::*` op that runs, forward and backward (descending into the
device-generic Python ops), and each must be either device-generic (a CompositeExplicitAutograd Python
implementation, as every Triton launcher op is) or registered for the CUDA key in csrc/cuda/*.cpp (read from
the sources, since the CUDA extension is not built here).

Two worlds are walked: "triton" (triton importable, no CUDA extension: this machine) and "cuda_ext" (the CUDA
extension loaded, triton missing). The third, both present, is what test_gpu_preference checks.
"""
import re
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fmkernels as fk
from fmkernels import _dispatch, _ext, ops
from fmkernels.nn import Int4Linear, Int8Linear
from fmkernels.nn.lora import LoRALinear
from fmkernels.ops import quant as Q

ROOT = Path(__file__).resolve().parent.parent
FLOATS = (torch.float32, torch.bfloat16, torch.float16)

pytestmark = pytest.mark.skipif(_dispatch.triton_import_error() is not None, reason="triton not importable")


def cuda_registered_ops() -> set[str]:
    """Op names given a CUDA kernel by TORCH_LIBRARY_IMPL(fmkernels, CUDA, m) blocks in csrc/cuda/*.cpp."""
    names = set()
    for cpp in (ROOT / "csrc" / "cuda").glob("*.cpp"):
        for block in re.findall(r"TORCH_LIBRARY_IMPL\(\s*fmkernels\s*,\s*CUDA\s*,\s*m\s*\)\s*\{(.*?)\n\}", cpp.read_text(), re.S):
            names.update(re.findall(r'm\.impl\(\s*"(\w+)"', block))
    return names


CUDA_OPS = cuda_registered_ops()


def _device_generic(qualname: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CompositeExplicitAutograd")


class _Recorder(TorchDispatchMode):
    """Records fmkernels ops; runs device-generic fmkernels ops' Python bodies under the mode too, so the ops
    they call (the fused loss's chunk kernel, a launcher's helpers) are recorded as well."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name  # "fmkernels::x" / "aten::x"
        if name.startswith("fmkernels::"):
            self.ops.append(name)
            if _device_generic(name):
                with self:
                    return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        return func(*args, **kwargs)


@contextmanager
def as_cuda(monkeypatch, world: str):
    """Every dispatcher query says device "cuda"; `world` sets which GPU backends exist. Yields the list of
    (op, dtype, backend) choices made."""
    chosen = []
    real_select = _dispatch.Op.select

    def select(self, q, backend=None):
        q = _dispatch.Query("cuda", q.dtype, q.shape, q.extra)
        b = real_select(self, q, backend)
        chosen.append((self.name, q.dtype, b.name))
        return b

    monkeypatch.setattr(_dispatch.Op, "select", select)
    monkeypatch.delenv("FMK_BACKEND", raising=False)
    if world == "cuda_ext":
        monkeypatch.setattr(_ext, "has_cuda_ext", lambda: True)
        monkeypatch.setattr(_dispatch, "triton_import_error", lambda: "triton absent (simulated)")
    elif world == "triton":
        monkeypatch.setattr(_ext, "has_cuda_ext", lambda: False)
    elif world == "both":
        monkeypatch.setattr(_ext, "has_cuda_ext", lambda: True)
    Q._select_cached.cache_clear()
    try:
        yield chosen
    finally:
        Q._select_cached.cache_clear()


def _grads(*ts):
    return [t for t in ts if isinstance(t, torch.Tensor) and t.requires_grad]


def _f(shape, dtype, grad=True):
    return torch.randn(shape, dtype=torch.float32).to(dtype).requires_grad_(grad)


# Each case: (label, ops it must dispatch, dtypes, fn(dtype) -> (output, tensors needing a gradient)).
def _attention(dt):
    q, k, v = _f((1, 2, 5, 16), dt), _f((1, 1, 7, 16), dt), _f((1, 1, 7, 16), dt)
    return ops.flash_attention(q, k, v, causal=True), (q, k, v)


def _attention_varlen(dt):
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)  # lengths 3, 0, 4
    q, k, v = _f((7, 2, 16), dt), _f((7, 1, 16), dt), _f((7, 1, 16), dt)
    return ops.flash_attention_varlen(q, k, v, cu, cu, 4, 4, causal=True), (q, k, v)


def _attention_seqused(dt):
    q, k, v = _f((2, 2, 5, 16), dt), _f((2, 1, 5, 16), dt), _f((2, 1, 5, 16), dt)
    used = torch.tensor([5, 3], dtype=torch.int32)
    return ops.flash_attention(q, k, v, causal=True, seqused_k=used), (q, k, v)


def _rms(dt):
    x, w = _f((3, 32), dt), _f((32,), dt)
    return fk.rms_norm(x, w), (x, w)


def _rope(dt):
    from fmkernels.ops.rope import rope_cos_sin

    q, k = _f((1, 4, 2, 16), dt), _f((1, 4, 1, 16), dt)
    cos, sin = rope_cos_sin(4, 16)
    qo, ko = ops.rope(q, k, cos, sin)
    return qo.float().sum() + ko.float().sum(), (q, k)


def _swiglu(dt):
    a, b = _f((3, 16), dt), _f((3, 16), dt)
    return ops.swiglu(a, b), (a, b)


def _lce(dt):
    x, w = _f((6, 16), dt), _f((32, 16), dt)
    t = torch.randint(0, 32, (6,))
    return ops.linear_cross_entropy(x, w, t), (x, w)


def _linear(dt):
    x, w, b = _f((3, 16), dt), _f((8, 16), dt), _f((8,), dt)
    return ops.linear(x, w, b), (x, w, b)


def _sparse24(dt):
    w = torch.randn(16, 32)
    values, meta = ops.compress_24(w, prune=True)
    x, v = _f((5, 32), dt), values.to(dt).requires_grad_(True)
    return ops.sparse24_mm(x, v, meta), (x, v)


def _sparse24_int8(dt):
    w = torch.randint(-8, 8, (16, 32), dtype=torch.int8)
    values, meta = ops.compress_24(w, prune=True)
    return ops.sparse24_int8_mm(torch.randint(-8, 8, (5, 32), dtype=torch.int8), values, meta), ()


def _bsr(dt):
    blocks, row_ptr, col_idx = ops.compress_bsr(torch.randn(32, 32), 16)
    x, blk = _f((5, 32), dt), blocks.to(dt).requires_grad_(True)
    return ops.bsr_mm(x, blk, row_ptr, col_idx), (x, blk)


def _int8_mm(dt):
    a = torch.randint(-8, 8, (5, 32), dtype=torch.int8)
    packed, comp, s = ops.int8_quantize_weight(torch.randn(16, 32))
    return ops.int8_mm(a, torch.rand(5) + 0.5, packed, comp, s, None, out_dtype=dt), ()


def _int8_linear(dt):
    x = _f((5, 32), dt)
    packed, comp, s = ops.int8_quantize_weight(torch.randn(16, 32))
    return ops.int8_linear(x, packed, comp, s, None), (x,)


def _int4(dt):
    x = _f((5, 64), dt)
    packed, scale, zero = ops.int4_quantize_weight(torch.randn(16, 64), 32)
    return ops.int4_mm(x, packed, scale, zero, 32, 16, None), (x,)


def _int8_weight_only(dt):
    x = _f((5, 32), dt)
    packed, scale, G = ops.int8_weight_only_quantize(torch.randn(16, 32))
    return ops.int8_weight_only_mm(x, packed, scale, G, 16), (x,)


def _fp8(dt):
    a, sa = ops.fp8_quantize(torch.randn(5, 32))
    b, sb = ops.fp8_quantize(torch.randn(16, 32))
    return ops.fp8_mm(a, sa, b, sb, None, out_dtype=dt), ()


def _qpr(dt):
    return ops.quantize_per_row(_f((5, 32), dt, grad=False))[1], ()


def _lora(base_cls, **kw):
    def run(dt):
        base = base_cls.from_float(torch.nn.Linear(64, 16), **kw)
        m = LoRALinear(base, rank=4)  # the quantized base keeps its fp32 scales; the adapter takes dt
        for p in (m.lora_A, m.lora_B):
            p.data = p.data.to(dt)
        x = _f((3, 64), dt)
        return m(x), (x, m.lora_A, m.lora_B)

    return run


def _int8_training(dt):
    x, w = _f((5, 32), dt), _f((16, 32), dt)
    return ops.int8_training_linear(x, w), (x, w)


CASES = [
    ("flash_attention", ("flash_attention",), FLOATS, _attention),
    ("flash_attention_varlen", ("flash_attention_varlen",), FLOATS, _attention_varlen),
    ("flash_attention_seqused", ("flash_attention_seqused",), FLOATS, _attention_seqused),
    ("rms_norm", ("rms_norm",), FLOATS, _rms),
    ("rope", ("rope",), FLOATS, _rope),
    ("swiglu", ("swiglu",), FLOATS, _swiglu),
    ("linear_cross_entropy", ("linear_cross_entropy",), FLOATS, _lce),
    ("linear", ("linear",), FLOATS, _linear),
    ("sparse24_mm", ("sparse24_mm", "sparse24_values_grad"), FLOATS, _sparse24),
    ("sparse24_int8_mm", ("sparse24_int8_mm",), (torch.int8,), _sparse24_int8),
    ("bsr_mm", ("bsr_mm",), FLOATS, _bsr),
    ("int8_mm", ("int8_mm",), FLOATS + (torch.int32,), _int8_mm),
    ("int8_linear", ("int8_linear",), FLOATS, _int8_linear),
    ("int4_mm", ("int4_mm",), FLOATS, _int4),
    ("int8_weight_only_mm", ("int8_weight_only_mm",), FLOATS, _int8_weight_only),
    ("fp8_mm", ("fp8_mm",), FLOATS, _fp8),
    ("quantize_per_row", ("quantize_per_row",), FLOATS, _qpr),
    ("lora_int8", ("int8_linear",), FLOATS, _lora(Int8Linear)),
    ("lora_int4", ("int4_mm",), FLOATS, _lora(Int4Linear, group_size=32)),
    ("int8_training_linear", ("int8_linear",), FLOATS, _int8_training),
]
# On CUDA these ops' "reference" is PyTorch's own GPU kernel and the right choice: no fmkernels GPU backend is
# registered for them on purpose.
REFERENCE_IS_GPU = {
    "linear": "F.linear is cuBLAS on CUDA tensors (fmkernels adds only a CPU backend)",
    # no GPU kernel for key ranges yet: the reference builds the (B, 1, Nq, Nk) range mask and runs PyTorch's GPU
    # ops (correct; a padded batch on a GPU is better sent through flash_attention_varlen)
    "flash_attention_seqused": "the reference runs PyTorch's GPU ops over the key-range mask (no GPU kernel yet)",
}
# CPU-only fmkernels ops that the walked code calls only after checking the tensors' own device (which is CPU in
# this walk): each gate is checked below with meta tensors standing in for CUDA ones.
CPU_GATED = {
    "fmkernels::mm_tn_": "matmul_tn runs it only for CPU tensors (ops/linear.py _mm_tn_fits)",
    "fmkernels::int8_pack_weight": "weight packing runs it only for CPU tensors (ops/quant.py _use_cpu_ext)",
    "fmkernels::int4_pack_weight": "weight packing runs it only for CPU tensors (ops/quant.py _use_cpu_ext)",
}


def test_cpu_gates_refuse_other_devices():
    from fmkernels.ops.linear import _mm_tn_fits

    a = torch.empty(4, 4, device="meta")
    assert not _mm_tn_fits(a, a)
    assert not Q._use_cpu_ext(a)


def test_every_dispatched_op_is_walked():
    walked = set().union(*(set(c[1]) for c in CASES))
    assert set(_dispatch.OPS) <= walked, f"ops with no coverage case: {sorted(set(_dispatch.OPS) - walked)}"


def test_cuda_registrations_parsed():
    assert {"flash_attention_fwd", "flash_attention_bwd", "sparse24_mm", "int8_linear", "rms_norm_fwd"} <= CUDA_OPS


def _cuda_declares(op: str, dtype) -> bool:
    """The op has a "cuda" backend declared for this dtype (without triton, the others fall to the reference,
    which on CUDA tensors is PyTorch's GPU ops)."""
    b = _dispatch.OPS[op].backends.get("cuda")
    return b is not None and (b.dtypes is None or dtype in b.dtypes)


def _walk(monkeypatch, world, label, expect_ops, dtype, fn):
    with as_cuda(monkeypatch, world) as chosen:
        rec = _Recorder()
        with rec:
            out, need_grad = fn(dtype)
            if need_grad:
                grads = torch.autograd.grad(out.float().sum(), need_grad, allow_unused=True)
                assert all(g is not None for g in grads), f"{label}: a gradient is missing"
    picked = {(op, b) for op, _, b in chosen}
    # the ops a case names are all dispatched, unless the first resolved to the reference (plain autograd, whose
    # backward dispatches nothing)
    need = set(expect_ops) if any(b != "reference" for _, b in picked) else {expect_ops[0]}
    assert {op for op, _ in picked} >= need, f"{label}: dispatcher not consulted for {expect_ops}: {picked}"
    bad_choice = [(op, b) for op, b in picked if b not in ("cuda", "triton") and op not in REFERENCE_IS_GPU
                  and not (world == "cuda_ext" and not _cuda_declares(op, dtype))]
    assert not bad_choice, f"{label} {dtype} [{world}]: resolved to a backend without a GPU kernel: {bad_choice}"
    if world == "cuda_ext":
        missed = [(op, b) for op, b in picked if b != "cuda" and _cuda_declares(op, dtype)]
        assert not missed, f"{label} {dtype}: CUDA extension present but not chosen: {missed}"
    no_gpu = sorted({n for n in rec.ops if not _device_generic(n) and n.split("::")[1] not in CUDA_OPS
                     and n not in CPU_GATED})
    assert not no_gpu, (f"{label} {dtype} [{world}]: runs fmkernels ops with no CUDA kernel and no device-generic "
                        f"implementation: {no_gpu}")
    return picked, rec.ops


@pytest.mark.parametrize("world", ["triton", "cuda_ext"])
@pytest.mark.parametrize("label,expect_ops,dtypes,fn", CASES, ids=[c[0] for c in CASES])
def test_dispatch_on_cuda(monkeypatch, world, label, expect_ops, dtypes, fn):
    for dtype in dtypes:
        if world == "cuda_ext" and label == "sparse24_int8_mm":
            continue  # no CUDA kernel and (simulated) no triton: only the reference is left
        _walk(monkeypatch, world, label, expect_ops, dtype, fn)


def test_gpu_preference(monkeypatch):
    """With both the CUDA extension and triton: where fmkernels/gpu_build/cuda_sass.json says a CUDA kernel is
    SIMT while the Triton kernel of the same op reaches the tensor cores, dispatch picks Triton."""
    from fmkernels import _gpu_build

    prefer = _gpu_build.prefer_triton()
    assert prefer, "no SIMT-vs-tensor-core preference recorded (fmkernels/gpu_build/cuda_sass.json)"
    for op_name in prefer:
        op = _dispatch.OPS[op_name]
        with as_cuda(monkeypatch, "both"):
            dtype = next(d for d in FLOATS if op.backends["triton"].dtypes is None or d in op.backends["triton"].dtypes)
            assert op.select(_dispatch.Query("cuda", dtype)).name == "triton", op_name
