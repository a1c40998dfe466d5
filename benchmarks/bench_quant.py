"""Quantized GEMMs side by side with their PyTorch peers (N = K = 4096 unless stated):

- int8 GEMM (raw int32 out) vs torch._int_mm: M in {1, 16, 64, 1024} and 2048^3.
- Int8Linear (dynamic per-token quantization included) vs torch.ao quantize_dynamic Linear (fbgemm), torchao's
  Int8DynamicActivationInt8WeightConfig (when importable), fp32 / bf16 nn.Linear: batch 1 and 64.
- Int4Linear g128 vs torch.ops.aten._weight_int4pack_mm_for_cpu (bf16 activations) and fp32 nn.Linear:
  M in {1, 16, 64, 256}.
- Int8WeightOnlyLinear (per-channel) vs a bare read of its weight bytes (uint8 amax over the packed tensor: the
  memory bound), torch.ops.aten._weight_int8pack_mm (bf16 activations; torchao's int8 weight-only CPU path) and
  fp32 nn.Linear: M in {1, 2, 4, 16, 64, 256}. torch.amax of the uint8 tensor (ATen's AVX-512 reduction, all
  threads) is as fast as a hand-written AVX-512 vpsadbw sum over the same bytes with both threads (measured side by
  side on the Zen 4 VM: amax 0.92-1.0x of its time), so it is an honest bound. The 16 MB weight stays in the
  32 MB L3 between calls ("hot"); the "cold" M = 1 group cycles through 5 copies (80 MB) so every call reads its
  weight from DRAM, as decoding a model larger than L3 does.
- A training step of a small transformer (d512, ffn 2048, 2 layers, seq 128, batch 8) with Int8TrainingConfig vs
  fp32 (tokens/s in extra_info).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fmkernels as fk
from benchmarks.harness import QUICK, measure
from fmkernels.ops import quant as Q
from fmkernels.quantization import _toy

NK = 4096
HAS_CPU = fk._ext.has_cpu_ext()


def _rounds(flops):
    if flops > 2e10:
        return 3
    return 3 if QUICK else 10


# ---------------------------------------------------------------- int8 GEMM

GEMM_SHAPES = [(1, NK, NK), (16, NK, NK), (64, NK, NK), (1024, NK, NK), (2048, 2048, 2048)]
_ids = [f"{m}x{n}x{k}" for m, n, k in GEMM_SHAPES]


def _gemm_inputs(M, N, K):
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (M, K), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    return a, b


@pytest.mark.skipif(not HAS_CPU, reason="CPU extension not built")
@pytest.mark.parametrize("M,N,K", GEMM_SHAPES, ids=_ids)
def test_int8_mm_fmk(benchmark, M, N, K):
    a, b = _gemm_inputs(M, N, K)
    p, c = Q.int8_pack_weight(b)
    ones_m, ones_n = torch.ones(M), torch.ones(N)
    flops = 2.0 * M * N * K
    measure(benchmark, lambda: Q.int8_mm(a, ones_m, p, c, ones_n, out_dtype=torch.int32, backend="cpu"),
            group=f"int8 GEMM {M}x{N}x{K}", label="fmk-cpu", flops=flops, peak="int8_gops", rounds=_rounds(flops))


@pytest.mark.parametrize("M,N,K", GEMM_SHAPES, ids=_ids)
def test_int8_mm_torch(benchmark, M, N, K):
    a, b = _gemm_inputs(M, N, K)
    bt = b.t()
    flops = 2.0 * M * N * K
    measure(benchmark, lambda: torch._int_mm(a, bt), group=f"int8 GEMM {M}x{N}x{K}", label="torch._int_mm",
            flops=flops, peak="int8_gops", peer=True, rounds=_rounds(flops))


# ---------------------------------------------------------------- Int8Linear


def _linear(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(NK, NK)


def _int8_linear_impls():
    yield "fmk Int8Linear", False, lambda lin: fk.nn.Int8Linear.from_float(lin)
    yield "torch quantize_dynamic (fbgemm)", True, lambda lin: torch.ao.quantization.quantize_dynamic(
        nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)
    yield "torchao int8 dyn-act", False, "torchao"
    yield "torch fp32 nn.Linear", False, lambda lin: lin
    yield "torch bf16 nn.Linear", False, "bf16"


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("label,peer,make", list(_int8_linear_impls()), ids=lambda v: v if isinstance(v, str) else "")
def test_int8_linear(benchmark, batch, label, peer, make):
    if label.startswith("fmk") and not HAS_CPU:
        pytest.skip("CPU extension not built")
    lin = _linear()
    x = torch.randn(batch, NK)
    if make == "torchao":
        try:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
        except Exception as e:  # not installed / incompatible build
            pytest.skip(f"torchao not usable: {type(e).__name__}: {e}")
        mod = nn.Sequential(lin)
        quantize_(mod, Int8DynamicActivationInt8WeightConfig())
    elif make == "bf16":
        mod = lin.to(torch.bfloat16)
        x = x.to(torch.bfloat16)
    else:
        mod = make(lin)
    with torch.no_grad():
        mod(x)

        def fn():
            with torch.no_grad():
                mod(x)

        measure(benchmark, fn, group=f"Linear 4096x4096 int8 dynamic, batch {batch}", label=label,
                flops=2.0 * batch * NK * NK, peak="int8_gops", peer=peer)


# ---------------------------------------------------------------- Int4Linear


def _int4_impls():
    yield "fmk Int4Linear bf16 (A16, 2 terms)", False, ("fmk", torch.bfloat16, 2)
    yield "fmk Int4Linear fp32 (A16, 2 terms)", False, ("fmk", torch.float32, 2)
    yield "fmk Int4Linear bf16 (W4A8, 1 term)", False, ("fmk", torch.bfloat16, 1)
    yield "torch _weight_int4pack_mm_for_cpu bf16", True, ("torch", torch.bfloat16, 0)
    yield "torch fp32 nn.Linear", False, ("fp32", torch.float32, 0)


def _torch_int4(lin, group_size=128):
    """torch's CPU int4 path (what torchao's Int4WeightOnly uses on CPU): uint4 weights + (scale, zero) pairs."""
    w = lin.weight.detach().float()
    N, K = w.shape
    wg = w.reshape(N, K // group_size, group_size)
    mn, mx = wg.amin(-1), wg.amax(-1)
    scale = ((mx - mn) / 15).clamp(min=1e-6)
    zero_int = torch.round(-mn / scale).clamp(0, 15)
    q = torch.round(wg / scale[..., None] + zero_int[..., None]).clamp(0, 15).to(torch.int32).reshape(N, K)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    # torch's convention: w = (q - 8) * scale + zero_point  ->  zero_point = (8 - zero_int) * scale
    sz = torch.stack([scale, (8 - zero_int) * scale], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return packed, sz


@pytest.mark.parametrize("M", [1, 16, 64, 256])
@pytest.mark.parametrize("label,peer,spec", list(_int4_impls()), ids=lambda v: v if isinstance(v, str) else "")
def test_int4_linear(benchmark, M, label, peer, spec):
    kind, dtype, terms = spec
    if kind == "fmk" and not HAS_CPU:
        pytest.skip("CPU extension not built")
    lin = _linear()
    x = torch.randn(M, NK).to(dtype)
    if kind == "fmk":
        mod = fk.nn.Int4Linear.from_float(lin, group_size=128, act_terms=terms)
        fn = lambda: mod(x)  # noqa: E731
    elif kind == "torch":
        packed, sz = _torch_int4(lin)
        bias = lin.bias.detach().to(torch.bfloat16)
        fn = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 128, sz) + bias  # noqa: E731
    else:
        fn = lambda: lin(x)  # noqa: E731
    with torch.no_grad():
        fn()

        def run():
            with torch.no_grad():
                fn()

        measure(benchmark, run, group=f"Linear 4096x4096 int4 g128, M={M}", label=label,
                flops=2.0 * M * NK * NK, peer=peer, rounds=3 if M >= 256 else None)


# ---------------------------------------------------------------- Int8WeightOnlyLinear (W8A16)


def _wo8_impls():
    yield "fmk Int8WeightOnlyLinear fp32", False, "fmk"
    yield "bare read of the weight bytes", False, "read"
    yield "torch _weight_int8pack_mm bf16", True, "torch"
    yield "torch fp32 nn.Linear", False, "fp32"


@pytest.mark.parametrize("M", [1, 2, 4, 16, 64, 256])
@pytest.mark.parametrize("label,peer,kind", list(_wo8_impls()), ids=lambda v: v if isinstance(v, str) else "")
def test_int8_weight_only_linear(benchmark, M, label, peer, kind):
    if kind in ("fmk", "read") and not HAS_CPU:
        pytest.skip("CPU extension not built")
    lin = _linear()
    x = torch.randn(M, NK)
    mod = fk.nn.Int8WeightOnlyLinear.from_float(lin)
    if kind == "fmk":
        fn = lambda: mod(x)  # noqa: E731
    elif kind == "read":
        if M > 1:
            pytest.skip("the memory bound is measured once (M = 1 group)")
        w = mod.weight_packed
        fn = lambda: torch.amax(w)  # noqa: E731
    elif kind == "torch":
        q, s = Q.quantize_per_row(lin.weight.detach())
        xb = x.to(torch.bfloat16)
        sb = s.to(torch.bfloat16)
        fn = lambda: torch.ops.aten._weight_int8pack_mm(xb, q, sb)  # noqa: E731
    else:
        fn = lambda: lin(x)  # noqa: E731
    with torch.no_grad():
        fn()

        def run():
            with torch.no_grad():
                fn()

        measure(benchmark, run, group=f"Linear 4096x4096 int8 weight-only, M={M}", label=label,
                flops=2.0 * M * NK * NK, nbytes=float(NK * NK), peer=peer)


COLD_COPIES = 5  # 5 x 16 MB > the 32 MB L3 of the Zen 4 VM


@pytest.mark.parametrize("label,kind", [("fmk Int8WeightOnlyLinear fp32 (cold)", "fmk"),
                                        ("bare read of the weight bytes (cold)", "read")])
def test_int8_weight_only_linear_cold(benchmark, label, kind):
    """M = 1 with the weight read from DRAM: each call uses the next of COLD_COPIES layers (80 MB in all)."""
    if not HAS_CPU:
        pytest.skip("CPU extension not built")
    mods = [fk.nn.Int8WeightOnlyLinear.from_float(_linear(seed=i)) for i in range(COLD_COPIES)]
    x = torch.randn(1, NK)
    i = [0]
    if kind == "fmk":
        def fn():
            i[0] = (i[0] + 1) % COLD_COPIES
            return mods[i[0]](x)
    else:
        ws = [m.weight_packed for m in mods]

        def fn():
            i[0] = (i[0] + 1) % COLD_COPIES
            return torch.amax(ws[i[0]])
    with torch.no_grad():
        for _ in range(COLD_COPIES):
            fn()

        def run():
            with torch.no_grad():
                fn()

        measure(benchmark, run, group="Linear 4096x4096 int8 weight-only, M=1, cold (weights > L3)", label=label,
                flops=2.0 * NK * NK, nbytes=float(NK * NK), peer=kind == "read")


# ---------------------------------------------------------------- int8 training step

TRAIN = dict(vocab=256, d=512, heads=8, layers=2, ffn=2048, seq=128)
TRAIN_BATCH = 8


@pytest.mark.parametrize("mode", ["fp32", "int8_training"])
def test_train_step(benchmark, mode):
    if mode != "fp32" and not HAS_CPU:
        pytest.skip("CPU extension not built")
    torch.manual_seed(0)
    model = _toy.TinyTransformer(**TRAIN)
    if mode == "int8_training":
        model = copy.deepcopy(model)
        fk.quantize_(model, fk.Int8TrainingConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    (x, y), = _toy.token_batches(TRAIN["vocab"], TRAIN_BATCH, TRAIN["seq"], 1)

    def step():
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    r = measure(benchmark, step, group="train step tiny transformer d512 L2 seq128 b8", label=mode,
                peer=mode == "fp32", rounds=3 if QUICK else 5)
    benchmark.extra_info["tokens_per_s"] = TRAIN_BATCH * TRAIN["seq"] / benchmark.stats.stats.min
    return r
