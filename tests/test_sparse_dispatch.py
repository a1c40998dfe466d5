"""Shape-aware dispatch: the sparse/dense plan never picks the path that the committed benchmark results
(benchmarks/results/sparse_cpu.json, written by `python benchmarks/bench_sparse.py --out ...`) show slower
(sparse only with a measured speedup >= SPARSE_MARGIN), and SparseLinear follows the plan."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import fmkernels as fk
from fmkernels.nn import SparseLinear
from fmkernels.ops import sparse as S

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "sparse_cpu.json"
DT = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _rows():
    return json.loads(RESULTS.read_text())["rows"]


def test_results_cover_the_benchmark_shapes():
    rows = _rows()
    seen = {(r["kind"], r["dtype"], r["M"]) for r in rows}
    for M in (1, 16, 64, 256, 2048):
        assert ("2:4", "fp32", M) in seen and ("bsr32-80%", "fp32", M) in seen
    for M in S.S24_M_BUCKETS:  # every 2:4 bucket edge is measured
        assert ("2:4", "fp32", M) in seen and ("2:4", "bf16", M) in seen


@pytest.mark.parametrize("row", [r for r in json.loads(RESULTS.read_text())["rows"] if r["dtype"] in DT],
                         ids=lambda r: f"{r['kind']}-{r['dtype']}-M{r['M']}")
def test_plan_never_picks_the_slower_path(row):
    M, N, K, dtype = row["M"], row["N"], row["K"], DT[row["dtype"]]
    if row["kind"] == "2:4":
        plan = S.sparse24_plan(M, N, K, dtype, "cpu")
    else:
        sparsity = int(row["kind"].split("-")[1].rstrip("%")) / 100
        plan = S.bsr_plan(M, N, K, 1.0 - sparsity, dtype, "cpu")
    speedup = row["dense_s"] / row["sparse_s"]
    # sparse only where it measured clearly faster (S.SPARSE_MARGIN); dense otherwise (never slower than dense)
    want = "sparse" if speedup >= S.SPARSE_MARGIN else "dense"
    assert plan == want, (f"{row['kind']} {row['dtype']} M={M}: plan picks {plan} but the benchmark measured "
                          f"dense {row['dense_s'] * 1e3:.2f} ms vs sparse {row['sparse_s'] * 1e3:.2f} ms "
                          f"({speedup:.2f}x; sparse needs >= {S.SPARSE_MARGIN}x)")


def test_bsr_plan_is_conservative_between_levels():
    # 70% sparse uses the 50% row (the next measured level at or below its sparsity)
    for M in (1, 16, 64, 256, 2048):
        assert S.bsr_plan(M, 4096, 4096, 0.3, torch.float32, "cpu") == S._CPU_BSR[0.5][S._bucket(M)]
    assert S.bsr_plan(64, 4096, 4096, 0.9, torch.float32, "cpu") == "dense"  # 10% sparse: never measured faster


def test_unmeasured_dtype_goes_dense_and_gpu_goes_sparse():
    assert S.sparse24_plan(1, 64, 64, torch.float16, "cpu") == "dense"
    assert S.sparse24_plan(4096, 64, 64, torch.bfloat16, "cuda") == "sparse"


@pytest.mark.parametrize("M", [1, 16, 64, 256, 300])
def test_sparse_linear_follows_the_plan(M, monkeypatch):
    monkeypatch.delenv("FMK_BACKEND", raising=False)
    sl = SparseLinear.from_dense(nn.Linear(64, 32), prune=True)
    sl(torch.randn(M, 64))
    want = S.sparse24_plan(M, 32, 64, torch.float32, "cpu")
    assert sl.last_path == ("dense" if want == "dense" else "sparse:" + S.S24.select(
        S._dispatch.Query(device="cpu", dtype=torch.float32, shape=(M, 32, 64))).name)
    assert "path=" in repr(sl)
