"""Sparse matmuls vs their dense peers, N = K = 4096, M in {1, 16, 64, 256, 2048} (2:4 float also 32, 512, 1024),
side by side in one run:

- 2:4 SparseLinear (the sparse kernel, forced, and the layer's automatic sparse/dense choice) vs dense
  nn.Linear, fp32 and bf16;
- 2:4 + int8 (`fmkernels.sparse24_int8_mm`) vs dense int8 `torch._int_mm`;
- block-sparse (block 32) at 50 / 80 / 90 % sparsity vs dense nn.Linear (fp32).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python -m pytest benchmarks/bench_sparse.py --benchmark-only   # harness
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_sparse.py [--out benchmarks/results/sparse_cpu.json]

The second form interleaves dense and sparse repetitions of each case (the cores are shared and noisy: an
interleaved median ratio is steadier than two separate runs), prints the ratio table and writes the JSON that
tests/test_sparse_dispatch.py checks the dispatch table in fmkernels/ops/sparse.py against.
By default a few minutes; FMK_BENCH_FULL=1 adds bf16/int8/BSR 50% and 90% at every M. Subsets, e.g. the
2:4 fp32 M <= 64 target at 1 and 2 threads:

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_sparse.py --kinds 2:4 --dtypes fp32 --ms 1,16,32,64 --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import fmkernels as fk  # noqa: E402
from fmkernels.nn import SparseLinear  # noqa: E402
from fmkernels.sparsity import pruning as P  # noqa: E402

N = K = 4096
MS = (1, 16, 64, 256, 2048)
# 2:4 float: the M values plus 32 (the M <= 64 target) and 512 / 1024 (where the sparse/dense crossover is)
MS_24 = (1, 16, 32, 64, 256, 512, 1024, 2048)
FULL = os.environ.get("FMK_BENCH_FULL", "0") == "1"
MS_SHORT = MS if FULL else (1, 16, 64, 256)
BSR_SPARSITY = (0.5, 0.8, 0.9) if FULL else (0.8,)


def _weight(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, K, generator=g) * 0.02).to(dtype)


def _cases():
    """(kind, dtype name, M, dense fn, sparse fn, auto fn or None, flops of the dense product)."""
    out = []
    for dname, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        w = _weight(dtype)
        lin = nn.Linear(K, N, bias=False, dtype=dtype)
        lin.weight.data = w
        sl = SparseLinear.from_dense(lin, prune=True)
        v, m = sl.values.detach(), sl.meta
        for M in MS_24:
            x = torch.randn(M, K).to(dtype)
            out.append(("2:4", dname, M, lambda x=x, w=w: F.linear(x, w),
                        lambda x=x, v=v, m=m: fk.sparse24_mm(x, v, m, backend="cpu"),
                        lambda x=x, sl=sl: sl(x), 2.0 * M * N * K))
    wi = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    vi, mi = fk.compress_24(wi, prune=True)
    wt = fk.decompress_24(vi, mi).t().contiguous()  # (K, N): the same pruned matrix, dense
    for M in MS_SHORT:
        x = torch.randint(-127, 128, (M, K), dtype=torch.int8)
        out.append(("2:4", "int8", M, lambda x=x: torch._int_mm(x, wt),
                    lambda x=x: fk.sparse24_int8_mm(x, vi, mi, backend="cpu"), None, 2.0 * M * N * K))
    w = _weight()
    lin = nn.Linear(K, N, bias=False)
    lin.weight.data = w
    for s in BSR_SPARSITY:
        mask = P.expand_block_mask(P.mask_blocks(w.abs(), 32, s), 32)
        sl = SparseLinear.from_dense(lin, format="bsr", block_size=32, mask=mask)
        blk, rp, ci = sl.blocks.detach(), sl.row_ptr, sl.col_idx
        for M in (MS if s == 0.8 else MS_SHORT):
            x = torch.randn(M, K)
            out.append((f"bsr32-{int(s * 100)}%", "fp32", M, lambda x=x: F.linear(x, w),
                        lambda x=x, blk=blk, rp=rp, ci=ci: fk.bsr_mm(x, blk, rp, ci, backend="cpu"),
                        lambda x=x, sl=sl: sl(x), 2.0 * M * N * K))
    return out


# ---------------------------------------------------------------- pytest-benchmark (harness) form

CASES = None


def _all_cases():
    global CASES
    if CASES is None:
        CASES = _cases()
    return CASES


def _ids():
    return [f"{k}-{d}-M{M}" for k, d, M, *_ in _cases_index()]


def _cases_index():
    idx = []
    for dname in ("fp32", "bf16"):
        for M in MS_24:
            idx.append(("2:4", dname, M))
    for M in MS_SHORT:
        idx.append(("2:4", "int8", M))
    for s in BSR_SPARSITY:
        for M in (MS if s == 0.8 else MS_SHORT):
            idx.append((f"bsr32-{int(s * 100)}%", "fp32", M))
    return idx


def _get(kind, dname, M):
    for c in _all_cases():
        if c[:3] == (kind, dname, M):
            return c
    raise KeyError((kind, dname, M))


@pytest.mark.parametrize("path", ["dense", "sparse", "auto"])
@pytest.mark.parametrize("case", _cases_index(), ids=lambda c: f"{c[0]}-{c[1]}-M{c[2]}")
def test_sparse(benchmark, case, path):
    from benchmarks.harness import measure

    kind, dname, M, dense, sparse, auto, flops = _get(*case)
    if path == "auto" and auto is None:
        pytest.skip("no module path for this case")
    fn = {"dense": dense, "sparse": sparse, "auto": auto}[path]
    label = {"dense": "torch " + ("_int_mm" if dname == "int8" else "nn.Linear"),
             "sparse": "fmk-cpu sparse kernel", "auto": "fmk SparseLinear (dispatch)"}[path]
    peak = "int8_gops" if dname == "int8" else ("bf16_gflops" if dname == "bf16" else "fp32_gflops")
    measure(benchmark, fn, group=f"{kind} {dname} M={M} N=K={N}", label=label, flops=flops, peak=peak,
            peer=path == "dense", rounds=3 if M >= 2048 else None)


# ---------------------------------------------------------------- interleaved ratio table (script form)


def _interleaved(dense, sparse, reps):
    dense(), sparse()  # warm up
    td, ts = [], []
    for _ in range(reps):
        for fn, acc in ((dense, td), (sparse, ts)):
            t = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t)
    return min(td), min(ts)  # min of interleaved reps: the least-disturbed run of each on shared cores


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--kinds", default="", help="comma-separated subset, e.g. bsr32-50%%,bsr32-90%%")
    ap.add_argument("--merge", action="store_true", help="add/replace these rows in an existing --out file")
    ap.add_argument("--dtypes", default="", help="comma-separated subset of fp32,bf16,int8")
    ap.add_argument("--ms", default="", help="comma-separated subset of the M values, e.g. 1,16,32,64")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    kinds = set(filter(None, a.kinds.split(",")))
    dtypes = set(filter(None, a.dtypes.split(",")))
    ms = {int(v) for v in a.ms.split(",") if v}
    rows = []
    print(f"{'case':<16}{'dtype':<6}{'M':>6}{'dense ms':>11}{'sparse ms':>11}{'speedup':>9}{'  auto path'}")
    for kind, dname, M, dense, sparse, auto, flops in _all_cases():
        if (kinds and kind not in kinds) or (dtypes and dname not in dtypes) or (ms and M not in ms):
            continue
        reps = max(3, a.reps // (3 if M >= 2048 else 1))
        td, ts = _interleaved(dense, sparse, reps)
        path = ""
        if auto is not None:
            auto()
            path = auto.__defaults__[-1].last_path
        rows.append({"kind": kind, "dtype": dname, "M": M, "N": N, "K": K, "dense_s": td, "sparse_s": ts,
                     "speedup": td / ts})
        print(f"{kind:<16}{dname:<6}{M:>6}{td * 1e3:>11.2f}{ts * 1e3:>11.2f}{td / ts:>8.2f}x  {path}", flush=True)
    if a.out and a.merge and os.path.exists(a.out):
        with open(a.out) as f:
            old = json.load(f)["rows"]
        keys = {(r["kind"], r["dtype"], r["M"]) for r in rows}
        rows = [r for r in old if (r["kind"], r["dtype"], r["M"]) not in keys] + rows
    if a.out:
        info = {"threads": torch.get_num_threads(), "torch": torch.__version__,
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        with open(a.out, "w") as f:
            json.dump({"machine": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
