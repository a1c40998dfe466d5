"""Fused attention, forward and forward+backward: every fmkernels CPU backend vs F.scaled_dot_product_attention
(its default CPU choice, the flash kernel), side by side in one run. B=4, H=8.

Default run (a few minutes on 2 cores): D=64, N in {512, 1024}, causal and not, fp32 and bf16, fwd and fwd+bwd,
backend cpu; plus peak memory of fwd+bwd at N=8192 (B=1, H=4, D=64, causal), ours vs SDPA.
FMK_BENCH_FULL=1: the issue's full grid, D in {64, 128}, N in {512, 1024, 2048, 4096}, plus the reference
backend at N <= 1024 (it materializes N x N in fp32).

Varlen (test_attention_varlen*, `-k varlen`): 8 sequences, lengths drawn in [64, 2048] with seed 3
([1555, 532, 1206, 836, 1919, 144, 1149, 964]: 45.9% padding when padded to the longest), H8 D64, fwd+bwd,
fp32 and bf16, causal and not: flash_attention_varlen on the packed rows vs F.scaled_dot_product_attention on the
padded batch with a boolean (B, 1, N, N) mask (key padding & causal), and fk.flash_attention(seqused_k=) on the
same padded batch. Equal lengths (8 x 1024): flash_attention_varlen vs our dense kernel on (8, 8, 1024, 64).
FLOPs count the real pairs only (sum over sequences), so GFLOP/s compare the useful work.

Decoding (test_attention_decode): forward only, Nq in {1, 4, 16}, Nk=4096, Hkv in {8, 2}, fp32 and bf16.

FLOPs: 4*B*H*Nq*Nk*D forward, halved for causal; backward 2.5x forward. Peak: fp32 FMA (bf16 runs are also
reported against the fp32 peak, since vdpbf16ps peak is 2x: halve the share for bf16 to get the dot-product
share).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python -m pytest benchmarks/bench_attention.py -q -o python_files='bench_*.py'
"""
import os

import pytest
import torch
import torch.nn.functional as F

import fmkernels as fk
from benchmarks.harness import measure, peak_memory
from fmkernels.testing import available_backends

FULL = os.environ.get("FMK_BENCH_FULL", "0") == "1"
B, H = 4, 8
HEAD_DIMS = [64, 128] if FULL else [64]
SEQ = [512, 1024, 2048, 4096] if FULL else [512, 1024]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BACKENDS = [b for b in available_backends("flash_attention", "cpu") if b != "triton"]  # interpreter: no benchmark
if not FULL:
    BACKENDS = [b for b in BACKENDS if b != "reference"]


def _flops(n, d, causal, backward):
    f = 4.0 * B * H * n * n * d * (0.5 if causal else 1.0)
    return f * 3.5 if backward else f


def _run(benchmark, impl, label, peer, dtype_name, n, d, causal, backward):
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, d, generator=g).to(dtype).requires_grad_(backward) for _ in range(3))
    do = torch.randn(B, H, n, d, generator=g).to(dtype)
    if backward:

        def fn():
            q.grad = k.grad = v.grad = None
            impl(q, k, v, causal).backward(do)

    else:

        def fn():
            with torch.no_grad():
                impl(q, k, v, causal)

    mode = "fwd+bwd" if backward else "fwd"
    measure(
        benchmark, fn, group=f"attention {mode} {dtype_name} B{B} H{H} N{n} D{d}{' causal' if causal else ''}",
        label=label, flops=_flops(n, d, causal, backward), peak="fp32_gflops", peer=peer, rounds=5 if n <= 1024 else 3,
        params={"n": n, "d": d, "causal": causal, "dtype": dtype_name, "mode": mode},
    )


def _sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


GRID = [
    pytest.param(dt, n, d, causal, bwd, id=f"{dt}-N{n}-D{d}-{'causal' if causal else 'full'}-{'fwdbwd' if bwd else 'fwd'}")
    for dt in DTYPES for d in HEAD_DIMS for n in SEQ for causal in (False, True) for bwd in (False, True)
]


# impl is the fastest-varying parameter, so each shape's backends and its SDPA peer run back to back (the
# machines are shared: consecutive runs see the same load).
@pytest.mark.parametrize("impl_name", [f"fmk-{b}" for b in BACKENDS] + ["torch SDPA"])
@pytest.mark.parametrize("dtype_name,n,d,causal,backward", GRID)
def test_attention(benchmark, impl_name, dtype_name, n, d, causal, backward):
    if impl_name == "fmk-reference" and n > 1024:
        pytest.skip("reference: N x N fp32 scores, only up to N=1024")
    if impl_name == "torch SDPA":
        _run(benchmark, _sdpa, impl_name, True, dtype_name, n, d, causal, backward)
        return
    backend = impl_name.removeprefix("fmk-")

    def impl(q, k, v, causal):
        return fk.flash_attention(q, k, v, causal=causal, backend=backend)

    _run(benchmark, impl, impl_name, False, dtype_name, n, d, causal, backward)


# ------------------------------------------------------------------ decoding (few queries, long KV cache)

DEC_NK = 4096
DEC_GRID = [
    pytest.param(dt, nq, hkv, id=f"{dt}-Nq{nq}-Nk{DEC_NK}-Hkv{hkv}")
    for dt in DTYPES for nq in (1, 4, 16) for hkv in (H, 2)
]


# Forward only (inference), causal (bottom-right: every query sees the whole cache). Bytes: K and V read once.
@pytest.mark.parametrize("impl_name", [f"fmk-{b}" for b in BACKENDS] + ["torch SDPA"])
@pytest.mark.parametrize("dtype_name,nq,hkv", DEC_GRID)
def test_attention_decode(benchmark, impl_name, dtype_name, nq, hkv):
    dtype, d = DTYPES[dtype_name], 64
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, nq, d, generator=g).to(dtype)
    k, v = (torch.randn(B, hkv, DEC_NK, d, generator=g).to(dtype) for _ in range(2))
    # SDPA's is_causal is top-left aligned; bottom-right = a boolean mask (all True for Nq=1)
    mask = None if nq == 1 else torch.ones(nq, DEC_NK, dtype=torch.bool).tril(DEC_NK - nq)
    if impl_name == "torch SDPA":

        def fn():
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=hkv != H)

    else:
        backend = impl_name.removeprefix("fmk-")

        def fn():
            with torch.no_grad():
                fk.flash_attention(q, k, v, causal=True, backend=backend)

    measure(
        benchmark, fn, group=f"attention decode fwd {dtype_name} B{B} H{H} Hkv{hkv} Nq{nq} Nk{DEC_NK} D{d} causal",
        label=impl_name, flops=4.0 * B * H * nq * DEC_NK * d, nbytes=2 * k.numel() * k.element_size(),
        peer=impl_name == "torch SDPA", rounds=10,
        params={"nq": nq, "nk": DEC_NK, "hkv": hkv, "dtype": dtype_name, "mode": "decode"},
    )


# ------------------------------------------------------------------ varlen: packed vs padded sequences

VL_SEED, VL_B, VL_H, VL_D = 3, 8, 8, 64


def _varlen_lengths(equal: bool) -> list[int]:
    if equal:
        return [1024] * VL_B
    return torch.randint(64, 2049, (VL_B,), generator=torch.Generator().manual_seed(VL_SEED)).tolist()


def _varlen_case(benchmark, impl_name, dtype_name, causal, equal):
    dtype = DTYPES[dtype_name]
    lens = _varlen_lengths(equal)
    total, n = sum(lens), max(lens)
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(total, VL_H, VL_D, generator=g).to(dtype) for _ in range(4))
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    used = torch.tensor(lens, dtype=torch.int32)

    def padded(x):  # (total, H, D) -> (B, H, n, D), zeros past each length
        out = x.new_zeros(VL_B, n, VL_H, VL_D)
        for b, (s, ln) in enumerate(zip(cu[:-1].tolist(), lens)):
            out[b, :ln] = x[s:s + ln]
        return out.transpose(1, 2).contiguous()

    if impl_name == "fmk-varlen":
        args = [q, k, v]

        def run(a, b, c):
            return fk.flash_attention_varlen(a, b, c, cu, cu, n, n, causal=causal, backend="cpu"), do
    else:
        args = [padded(x) for x in (q, k, v)]
        dop = padded(do)
        if impl_name == "torch SDPA + mask":
            j = torch.arange(n)
            mask = (j[None, :] < used[:, None])[:, None, None, :]  # (B, 1, 1, n) key padding
            if causal:
                mask = mask & torch.ones(n, n, dtype=torch.bool).tril()
            mask = mask.expand(VL_B, 1, n, n).contiguous()  # what transformers builds from a 2-D mask

            def run(a, b, c):
                return F.scaled_dot_product_attention(a, b, c, attn_mask=mask), dop
        elif impl_name == "fmk-seqused_k":

            def run(a, b, c):
                return fk.flash_attention(a, b, c, causal=causal, seqused_k=used, backend="cpu"), dop
        else:  # fmk-dense: our dense kernel (equal lengths: the same problem, no padding)

            def run(a, b, c):
                return fk.flash_attention(a, b, c, causal=causal, backend="cpu"), dop
    for t in args:
        t.requires_grad_(True)

    def fn():
        for t in args:
            t.grad = None
        out, grad = run(*args)
        out.backward(grad)

    pairs = sum(ln * (ln + 1) / 2 if causal else ln * ln for ln in lens)
    what = "equal lengths 8x1024" if equal else "lengths " + "/".join(map(str, lens))
    measure(
        benchmark, fn, group=f"attention varlen fwd+bwd {dtype_name} H{VL_H} D{VL_D} {what}{' causal' if causal else ''}",
        label=impl_name, flops=4.0 * VL_H * VL_D * pairs * 3.5, peak="fp32_gflops",
        peer=impl_name in ("torch SDPA + mask", "fmk-dense"), rounds=3,
        params={"lens": lens, "causal": causal, "dtype": dtype_name, "mode": "varlen fwd+bwd"},
    )


VL_GRID = [pytest.param(dt, c, id=f"{dt}-{'causal' if c else 'full'}") for dt in DTYPES for c in (True, False)]


@pytest.mark.parametrize("impl_name", ["fmk-varlen", "fmk-seqused_k", "torch SDPA + mask"])
@pytest.mark.parametrize("dtype_name,causal", VL_GRID)
def test_attention_varlen_vs_padded(benchmark, impl_name, dtype_name, causal):
    if "cpu" not in available_backends("flash_attention_varlen", "cpu"):
        pytest.skip("CPU extension not built")
    _varlen_case(benchmark, impl_name, dtype_name, causal, equal=False)


@pytest.mark.parametrize("impl_name", ["fmk-varlen", "fmk-dense"])
@pytest.mark.parametrize("dtype_name,causal", VL_GRID)
def test_attention_varlen_equal_lengths(benchmark, impl_name, dtype_name, causal):
    if "cpu" not in available_backends("flash_attention_varlen", "cpu"):
        pytest.skip("CPU extension not built")
    _varlen_case(benchmark, impl_name, dtype_name, causal, equal=True)


# ------------------------------------------------------------------ peak memory, N = 8192

MEM_N, MEM_B, MEM_H, MEM_D = 8192, 1, 4, 64


@pytest.mark.parametrize("impl_name", ["fmk-cpu", "torch SDPA"])
def test_attention_peak_memory_n8192(benchmark, impl_name):
    if impl_name == "fmk-cpu" and "cpu" not in available_backends("flash_attention", "cpu"):
        pytest.skip("CPU extension not built")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(MEM_B, MEM_H, MEM_N, MEM_D, generator=g).requires_grad_(True) for _ in range(3))
    do = torch.randn(MEM_B, MEM_H, MEM_N, MEM_D, generator=g)

    def fn():
        q.grad = k.grad = v.grad = None
        if impl_name == "fmk-cpu":
            out = fk.flash_attention(q, k, v, causal=True, backend="cpu")
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.backward(do)

    peak = peak_memory(fn)
    nxn = MEM_B * MEM_H * MEM_N * MEM_N * 4
    measure(
        benchmark, fn, group=f"attention fwd+bwd fp32 peak memory B{MEM_B} H{MEM_H} N{MEM_N} D{MEM_D} causal",
        label=impl_name, flops=4.0 * MEM_B * MEM_H * MEM_N * MEM_N * MEM_D * 0.5 * 3.5, peer=impl_name == "torch SDPA",
        rounds=1, params={"peak_mem_bytes": peak, "nxn_fp32_bytes": nxn, "inputs_bytes": 3 * q.numel() * 4},
    )
    print(f"\n{impl_name}: peak extra memory {peak / 2**20:.1f} MiB at N={MEM_N} (one N x N fp32 score matrix "
          f"for all heads would be {nxn / 2**20:.0f} MiB; q, k, v are {3 * q.numel() * 4 / 2**20:.0f} MiB)")


# ------------------------------------------------------------------ GPU (make gpu-check)

GPU_SHAPES = [(4, 16, 2048, 128), (4, 16, 4096, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "B{}H{}N{}D{}".format(*s))
@pytest.mark.parametrize("impl_name", ["fmk-cuda", "fmk-triton", "torch SDPA"])
def test_attention_gpu_bf16_fwdbwd(benchmark, impl_name, shape, causal):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    b, h, n, d = shape
    backend = impl_name.removeprefix("fmk-")
    if impl_name != "torch SDPA" and backend not in available_backends("flash_attention", "cuda", torch.bfloat16):
        pytest.skip(f"{backend} not available")
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)

    def fn():
        q.grad = k.grad = v.grad = None
        if impl_name == "torch SDPA":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        else:
            out = fk.flash_attention(q, k, v, causal=causal, backend=backend)
        out.backward(do)
        torch.cuda.synchronize()

    flops = 4.0 * b * h * n * n * d * (0.5 if causal else 1.0) * 3.5
    measure(benchmark, fn, group=f"attention gpu fwd+bwd bf16 B{b} H{h} N{n} D{d}{' causal' if causal else ''}",
            label=impl_name, flops=flops, peak="gpu_bf16_gflops", peer=impl_name == "torch SDPA", rounds=5)
