#!/usr/bin/env bash
# `make package-check` (part of `make test`): the sdist and the wheel, each installed into a clean venv.
#
#  1. `python -m build --no-isolation --sdist --wheel` from the checkout: the wheel's build_ext reuses the objects
#     `make build` left in build/ (ninja: nothing recompiles), so this step takes seconds;
#  2. a clean venv (build/pkg-venv: python3 -m venv + torch + the runtime dependencies only; made once and
#     reused, torch comes from the pip cache / find-links) gets the wheel: `fmk info` must show the extension
#     loaded; a faked record of another torch must give one warning and the reference backends; wheel < 2 MB;
#  3. the same venv, fmkernels uninstalled, gets the sdist with `pip install --no-build-isolation` (the one full
#     compile this check adds: ~2.7 CPU-minutes) and `fmk info` runs again;
#  4. an isolated `pip install <sdist>` (no torch in pip's build env) must fail with the one-line fix.
set -euo pipefail
PY=${PY:-.venv/bin/python}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
OUT=${PKG_OUT:-build/package-check}
VENV=${PKG_VENV:-build/pkg-venv}
OUT=$(realpath -m "$OUT")
VENV=$(realpath -m "$VENV")
MAX_WHEEL_BYTES=$((2 * 1024 * 1024))
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} PIP_DISABLE_PIP_VERSION_CHECK=1
t0=$(date +%s)
step() { echo "package-check [$(( $(date +%s) - t0 )) s]: $*"; }
fail() { echo "package-check FAILED: $*" >&2; exit 1; }

rm -rf "$OUT" && mkdir -p "$OUT"
step "building the sdist and the wheel"
MAX_JOBS=${MAX_JOBS:-2} "$PY" -m build --no-isolation --sdist --wheel -o "$OUT" > "$OUT/build.log" 2>&1 \
    || { tail -40 "$OUT/build.log"; fail "python -m build --no-isolation"; }
SDIST=$(ls "$OUT"/fmkernels-*.tar.gz)
WHEEL=$(ls "$OUT"/fmkernels-*.whl)
case "$WHEEL" in *none-any*) fail "$WHEEL is a pure-Python wheel: the extension was not built";; esac
size=$(stat -c %s "$WHEEL")
step "wheel $(basename "$WHEEL"): $size bytes; sdist $(basename "$SDIST"): $(stat -c %s "$SDIST") bytes"
[ "$size" -lt "$MAX_WHEEL_BYTES" ] || fail "wheel is $size bytes (limit $MAX_WHEEL_BYTES): debug info?"
tar -tzf "$SDIST" > "$OUT/sdist-files.txt"
for f in csrc/cpu/vec.h csrc/cuda/common.cuh csrc/cuda/module.cpp LICENSE; do
    grep -q "/$f\$" "$OUT/sdist-files.txt" || fail "sdist lacks $f"
done

if [ ! -f "$VENV/.stamp" ]; then
    step "creating the clean venv $VENV (torch $TORCH_VERSION from the pip cache / find-links)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q "torch==$TORCH_VERSION" numpy tqdm pyyaml safetensors tokenizers
    touch "$VENV/.stamp"
fi
VPIP="$VENV/bin/pip"
"$VPIP" uninstall -q -y fmkernels 2>/dev/null || true

info_check() {  # $1: what was installed
    (cd "$OUT" && "$VENV/bin/fmk" info > "$OUT/info.txt" 2>&1) || { cat "$OUT/info.txt"; fail "fmk info ($1)"; }
    grep -q "CPU extension : loaded" "$OUT/info.txt" || { cat "$OUT/info.txt"; fail "extension not loaded ($1)"; }
    grep -q "built against torch $TORCH_VERSION" "$OUT/info.txt" || { cat "$OUT/info.txt"; fail "no build record ($1)"; }
}

step "installing the wheel into the clean venv"
"$VPIP" install -q "$WHEEL"
info_check wheel
echo '{"torch": "2.99.0", "torch_cuda": null, "debug": false, "extensions": ["fmkernels._C"]}' > "$OUT/other_torch.json"
(cd "$OUT" && FMK_BUILD_INFO="$OUT/other_torch.json" "$VENV/bin/fmk" info > "$OUT/mismatch.txt" 2>&1) \
    || { cat "$OUT/mismatch.txt"; fail "fmk info with a build record of another torch"; }
[ "$(grep -c 'built against torch 2.99.0' "$OUT/mismatch.txt")" -ge 1 ] && grep -q "^rms_norm  *reference" "$OUT/mismatch.txt" \
    || { cat "$OUT/mismatch.txt"; fail "another torch: expected one warning and the reference backends"; }
[ "$(grep -c 'RuntimeWarning' "$OUT/mismatch.txt")" -eq 1 ] || { cat "$OUT/mismatch.txt"; fail "expected exactly one warning"; }
"$VPIP" uninstall -q -y fmkernels

step "installing the sdist into the clean venv (pip install --no-build-isolation: compiles)"
MAX_JOBS=${MAX_JOBS:-2} "$VPIP" install -v --no-build-isolation --no-deps "$SDIST" > "$OUT/sdist-install.log" 2>&1 \
    || { tail -40 "$OUT/sdist-install.log"; fail "pip install --no-build-isolation <sdist>"; }
info_check sdist
# compiler warnings located outside our csrc/ (torch's or the compiler's own headers): there must be none
if grep -E "^[[:space:]]*[^ ]+\.(h|hpp|cuh):[0-9]+:[0-9]+: warning:" "$OUT/sdist-install.log" | grep -v "/csrc/" > "$OUT/header-warnings.txt"; then
    head -5 "$OUT/header-warnings.txt"; fail "$(wc -l < "$OUT/header-warnings.txt") warnings from system headers"
fi
step "compiler warnings in the sdist build: $(grep -c ': warning:' "$OUT/sdist-install.log" || true) (none from system headers)"
"$VPIP" uninstall -q -y fmkernels

step "an isolated build must refuse with the fix"
if "$VPIP" install --no-deps "$SDIST" > "$OUT/isolated.log" 2>&1; then
    "$VPIP" uninstall -q -y fmkernels; fail "an isolated pip install succeeded (a wheel without kernels?)"
fi
grep -q "pip install --no-build-isolation" "$OUT/isolated.log" || { tail -30 "$OUT/isolated.log"; fail "isolated build: no fix printed"; }
step "ok"
