#!/usr/bin/env bash
# GPU check (make gpu-check): on a machine with an NVIDIA GPU and a CUDA build of torch, build the CUDA
# extension in place, run the gpu-marked tests and the GPU benchmarks, and write a JSON report.
# Designed to finish in under 10 minutes on one H200. Output: ${OUT:-gpu-report}/report.json (+ logs).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-gpu-report}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
start=$(date +%s)

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))" \
  2>&1 | tee "$OUT/env.log" || { echo "gpu-check: no usable CUDA device"; exit 2; }
"$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 | tee -a "$OUT/env.log"

# 1. build (CPU + CUDA extensions) in place
b0=$(date +%s)
FMK_FORCE_CUDA=1 FMK_CUDA_ARCHS="${FMK_CUDA_ARCHS:-90a}" MAX_JOBS=${MAX_JOBS:-16} \
  "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1
build_rc=$?
build_s=$(( $(date +%s) - b0 ))
tail -5 "$OUT/build.log"

# 2. gpu-marked tests (+ every test that can run on CUDA tensors)
t0=$(date +%s)
timeout 300 "$PY" -m pytest -q -m gpu tests --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
test_rc=$?
test_s=$(( $(date +%s) - t0 ))
tail -5 "$OUT/tests.log"

# 3. GPU benchmarks (files/tests marked gpu inside benchmarks/)
k0=$(date +%s)
timeout 240 "$PY" -m pytest -q -m gpu benchmarks -o python_files='bench_*.py' \
  --benchmark-json="$OUT/bench.json" > "$OUT/bench.log" 2>&1
bench_rc=$?
bench_s=$(( $(date +%s) - k0 ))
tail -5 "$OUT/bench.log"

"$PY" - "$OUT" "$build_rc" "$build_s" "$test_rc" "$test_s" "$bench_rc" "$bench_s" "$start" <<'PYEOF'
import json, sys, time
out, build_rc, build_s, test_rc, test_s, bench_rc, bench_s, start = sys.argv[1:]
rep = {"build": {"rc": int(build_rc), "seconds": int(build_s)},
       "tests": {"rc": int(test_rc), "seconds": int(test_s)},
       "bench": {"rc": int(bench_rc), "seconds": int(bench_s)},
       "total_seconds": int(time.time()) - int(start)}
try:
    import fmkernels
    rep["info"] = fmkernels.info()
except Exception as e:
    rep["info_error"] = repr(e)
try:
    from fmkernels.bench import _rows
    rep["bench_groups"] = _rows(json.load(open(f"{out}/bench.json")))
except Exception as e:
    rep["bench_error"] = repr(e)
json.dump(rep, open(f"{out}/report.json", "w"), indent=2, default=str)
print(json.dumps({k: v for k, v in rep.items() if k in ("build", "tests", "bench", "total_seconds")}))
PYEOF
[ "$build_rc" -eq 0 ] && [ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
