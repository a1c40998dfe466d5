#!/usr/bin/env bash
# GPU check (make gpu-check), sized for the 15 minutes of a lent GPU machine: every step has its own time limit
# (timeout), the whole run stays under 8 minutes, one JSON report: ${OUT:-gpu-report}/report.json (+ logs).
#
#   step     limit  what
#   probe     15 s  python/torch/triton versions, the GPU, nvcc
#   build    190 s  CPU + CUDA extensions in place (FMK_FORCE_CUDA=1, sm_90a by default; FMK_CUDA_ARCHS to change);
#                   a failed build is reported and the run goes on with the Triton backends
#   tests    120 s  pytest -m gpu tests (gpu-marked tests: every GPU backend against the reference)
#   bench    100 s  scripts/gpu_bench.py: fmkernels vs SDPA, cuBLAS, torch._int_mm, torch._scaled_mm,
#                   to_sparse_semi_structured (budget 85 s inside, skips the rest when spent)
#   pybench   45 s  pytest -m gpu benchmarks (pytest-benchmark GPU cases: attention, RMSNorm)
#   report    10 s  report.json: each step's rc / seconds / timed_out, fmkernels.info(), the benchmark rows
#   total   <= 480 s of limits (8 min worst case, every step at its limit; typically well under)
#
# Uses whatever python3 holds a CUDA torch (the lent machines: torch 2.11, triton 3.6). Without a CUDA device it
# prints this plan and exits 0 (the rehearsal); GPU_CHECK_DRY=1 forces that.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-gpu-report}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
unset TRITON_INTERPRET
start=$(date +%s)
STEPS=()

# run_step NAME LIMIT_S CMD...: runs CMD under `timeout`, output to $OUT/NAME.log, records rc and seconds
run_step() {
  local name=$1 limit=$2; shift 2
  local t0 rc
  t0=$(date +%s)
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  local s=$(( $(date +%s) - t0 ))
  tail -4 "$OUT/$name.log" | sed 's/^/   /'
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && echo "   $name: TIMED OUT after ${limit}s"
  STEPS+=("$name:$rc:$s:$limit")
}

plan() {
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
}

if [ "${GPU_CHECK_DRY:-0}" = 1 ] || ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu-check: no CUDA device visible to $PY (torch.cuda.is_available() is False); nothing run. The plan:"
  plan
  echo "gpu-check: would run: FMK_FORCE_CUDA=1 FMK_CUDA_ARCHS=${FMK_CUDA_ARCHS:-90a} $PY setup.py build_ext --inplace;"
  echo "  $PY -m pytest -q -m gpu tests; $PY scripts/gpu_bench.py --out $OUT --budget 85;"
  echo "  $PY -m pytest -q -m gpu benchmarks -o python_files='bench_*.py' --benchmark-json=$OUT/bench.json"
  echo "{\"skipped\": \"no CUDA device\", \"python\": \"$("$PY" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null)\"}" > "$OUT/report.json"
  exit 0
fi

run_step probe 15 "$PY" -c "
import shutil, torch
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_capability())
try:
    import triton; print('triton', triton.__version__)
except Exception as e: print('triton missing:', e)
print('nvcc', shutil.which('nvcc'))"
cat "$OUT/probe.log"

run_step build 190 env FMK_FORCE_CUDA=1 FMK_CUDA_ARCHS="${FMK_CUDA_ARCHS:-90a}" MAX_JOBS="${MAX_JOBS:-16}" \
  "$PY" setup.py build_ext --inplace
run_step tests 120 "$PY" -m pytest -q -rs -m gpu tests -p no:cacheprovider --junitxml="$OUT/tests.xml"
run_step bench 100 "$PY" scripts/gpu_bench.py --out "$OUT" --budget 85
run_step pybench 45 "$PY" -m pytest -q -m gpu benchmarks -o python_files='bench_*.py' -p no:cacheprovider \
  --benchmark-json="$OUT/bench.json"

timeout 10 "$PY" - "$OUT" "$start" "${STEPS[@]}" <<'PYEOF'
import json, sys, time
out, start, *steps = sys.argv[1:]
rep = {"steps": {}, "total_seconds": int(time.time()) - int(start)}
for s in steps:
    name, rc, secs, limit = s.split(":")
    rep["steps"][name] = {"rc": int(rc), "seconds": int(secs), "limit": int(limit), "timed_out": rc in ("124", "137")}
for key, fn in (("info", lambda: __import__("fmkernels").info()),
                ("gpu_bench", lambda: json.load(open(f"{out}/gpu_bench.json"))),
                ("pytest_bench", lambda: __import__("fmkernels.bench", fromlist=["_rows"])._rows(json.load(open(f"{out}/bench.json"))))):
    try:
        rep[key] = fn()
    except Exception as e:
        rep[key + "_error"] = repr(e)
json.dump(rep, open(f"{out}/report.json", "w"), indent=2, default=str)
print(json.dumps({"steps": rep["steps"], "total_seconds": rep["total_seconds"]}))
PYEOF
for s in "${STEPS[@]}"; do
  rc=$(echo "$s" | cut -d: -f2)
  [ "$rc" -eq 0 ] || { echo "gpu-check: step ${s%%:*} failed (rc $rc); see $OUT/"; exit 1; }
done
echo "gpu-check: all steps passed in $(( $(date +%s) - start )) s; report: $OUT/report.json"
