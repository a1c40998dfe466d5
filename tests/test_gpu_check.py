"""make gpu-check is ready for a lent GPU: without one it exits 0 and prints its plan (the rehearsal), and the
GPU benchmark harness runs every case end to end on CPU (--smoke-cpu) so a GPU loan is not spent on its bugs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: make gpu-check runs for real")
def test_gpu_check_rehearsal_exits_0_and_says_what_it_would_run(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path))
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    for step in ("probe", "build", "tests", "bench", "pybench", "report"):
        assert f"  {step} " in r.stdout, r.stdout
    assert "would run" in r.stdout and "setup.py build_ext" in r.stdout
    assert json.loads((tmp_path / "report.json").read_text())["skipped"] == "no CUDA device"


def test_gpu_bench_harness_smoke_on_cpu(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_bench.py"), "--smoke-cpu", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "gpu_bench.json").read_text())
    groups = {g["group"].split(" ")[0] for g in rep["groups"]}
    assert {"attention", "int8", "int4", "2:4", "BSR", "RMSNorm", "SwiGLU", "fused"} <= groups, groups
    errors = [(g["group"], n, r["error"]) for g in rep["groups"] for n, r in g.get("results", {}).items() if "error" in r]
    assert not errors and all("error" not in g for g in rep["groups"]), errors or rep["groups"]
