# kvtool: the README's two commands are `make demo` and `make test`.
#
# Setup order matters (target `venv`): kvtool's core dependencies pin llama-cpp-python==0.3.36, and letting pip
# resolve that from PyPI would compile *stock* llama.cpp for ~9 minutes only to replace it. So:
#   1. kvtool itself without dependencies, plus the small core and build dependencies;
#   2. `kvtool build-runtime`: the patched llama-cpp-python (seconds when its wheel is cached in ~/.cache/kvtool);
#   3. torch==2.13.0 pinned on CPU-only Linux x86_64 (other machines let the `train` extra choose);
#   4. the `dev` and `train` extras, which now find llama-cpp-python==0.3.36 already satisfied.
# Steps 1 and 3-4 leave stamp files in .venv, so they rerun only when pyproject.toml changes. Step 2 runs every
# time: it compares the patch hash of patches/ + cpp/ with the installed build and returns at once when equal.
# Nothing here deletes ~/.cache/kvtool (sdist, build tree, runtime wheels, models).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip --disable-pip-version-check
KVTOOL := $(VENV)/bin/kvtool
CORE_STAMP := $(VENV)/.kvtool-core.stamp
EXTRAS_STAMP := $(VENV)/.kvtool-extras.stamp
# Extra arguments for `kvtool build-runtime`, e.g. make test RUNTIME_ARGS="--backend cuda"
RUNTIME_ARGS ?=
PYTEST_ARGS ?=
# Small dependencies installed before the runtime: kvtool's core deps minus llama-cpp-python, llama-cpp-python's
# own runtime deps, and what build-runtime needs to compile.
CORE_DEPS := "numpy>=1.24" "gguf>=0.10" "click>=8.1" "tqdm>=4.60" "diskcache>=5.6.1" "jinja2>=2.11.3" \
             "typing-extensions>=4.5.0" "scikit-build-core>=0.9.2" "cmake>=3.21" ninja
# CPU machines get the pinned CPU torch; with a GPU (nvidia-smi present) or elsewhere the train extra resolves it.
# Override with TORCH_PIN= (empty) to skip the pin, or e.g. TORCH_PIN=torch==2.13.0 to force it.
ifeq ($(origin TORCH_PIN),undefined)
TORCH_PIN := $(shell [ "$$(uname -s)" = Linux ] && [ "$$(uname -m)" = x86_64 ] && \
                     ! command -v nvidia-smi >/dev/null 2>&1 && echo "torch==2.13.0")
endif

.PHONY: demo lint test test-all fuzz venv runtime tools clean distclean vulkan-deps test-gpu test-gpu-all check-cuda

venv: $(EXTRAS_STAMP)

$(VPY):
	@echo "[make] creating $(VENV) with $(PYTHON)"
	$(PYTHON) -m venv $(VENV)

$(CORE_STAMP): pyproject.toml | $(VPY)
	@echo "[make] installing kvtool (no deps) and its small core/build dependencies"
	$(PIP) install -q $(CORE_DEPS)
	$(PIP) install -q --no-deps --no-warn-conflicts -e .
	@touch $@

runtime: $(CORE_STAMP)
	$(KVTOOL) build-runtime $(RUNTIME_ARGS)

# llama.cpp's own programs (llama-server, llama-bench, ...) from the same patched tree and backend, cached in
# ~/.cache/kvtool/tools by patch hash (docs/running.md). Returns at once when cached; `make test` needs them.
tools: venv
	$(KVTOOL) build-runtime --tools $(RUNTIME_ARGS)

# `| runtime`: built first, but a runtime check never forces the pip step below to rerun.
$(EXTRAS_STAMP): pyproject.toml $(CORE_STAMP) | runtime
ifneq ($(strip $(TORCH_PIN)),)
	@echo "[make] installing $(TORCH_PIN) (CPU machine)"
	$(PIP) install -q "$(TORCH_PIN)"
endif
	@echo "[make] installing the dev and train extras"
	$(PIP) install -q -e '.[dev,train]'
	@touch $@

# ALLOW_NO_TESTS=1 (used by .ci/run) treats pytest's exit code 5, "no tests collected", as success.
define run_pytest
	@rc=0; $(VPY) -m pytest -q $(1) $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ] && [ -n "$(ALLOW_NO_TESTS)" ]; then echo "[make] pytest collected no tests (exit 5): ok"; rc=0; fi; \
	exit $$rc
endef

test: venv tools
	$(call run_pytest,)

test-all: venv tools
	$(call run_pytest,-m '')

# ---- GPU backends (docs/gpu.md). Each has its own venv, so .venv keeps the CPU runtime everyone's tests use, and
# its own source/build tree and lock in ~/.cache/kvtool, so a GPU build can run beside a CPU one.
VK_VENV := .venv-vulkan
CUDA_VENV := .venv-cuda
# Debian packages for the Vulkan build (headers, glslc, SPIR-V headers) and Mesa's lavapipe device to run it on.
VK_DEBS := libvulkan-dev glslc spirv-headers mesa-vulkan-drivers

vulkan-deps:
	@missing=""; for p in $(VK_DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "[make] installing Debian packages:$$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

# The Vulkan tests (marker `vulkan`, outside `make test`) on the first Vulkan device; lavapipe is a CPU-type device,
# which ggml-vulkan skips unless GGML_VK_VISIBLE_DEVICES names it. `make test-gpu` (and CI) runs the fast ones;
# `make test-gpu-all` adds the slow ones: SmolLM2 F32 parity and ggml's test-backend-ops, which take tens of
# minutes on lavapipe (GET_ROWS alone took 16 min).
GPU_MARK ?= vulkan and not slow
test-gpu: vulkan-deps
	$(MAKE) venv VENV=$(VK_VENV) RUNTIME_ARGS="--backend vulkan $(RUNTIME_ARGS)"
	@$(VK_VENV)/bin/python -c "from toolchain.runtime.library import runtime_info as r; b = r()['backend']; \
		raise SystemExit(0 if b == 'vulkan' else f'[make] $(VK_VENV) has the {b} runtime, not vulkan')"
	GGML_VK_VISIBLE_DEVICES=$${GGML_VK_VISIBLE_DEVICES:-0} $(VK_VENV)/bin/python -m pytest -q -m "$(GPU_MARK)" \
		tests/test_gpu_vulkan.py $(PYTEST_ARGS)

test-gpu-all:
	$(MAKE) test-gpu GPU_MARK=vulkan

# Compiles the CUDA runtime (slow: see docs/gpu.md for the measured time) and checks that it imports and reports
# "no CUDA device" cleanly on a machine without a GPU. Core dependencies only: no torch in this venv.
check-cuda:
	$(MAKE) $(CUDA_VENV)/.kvtool-core.stamp VENV=$(CUDA_VENV)
	$(CUDA_VENV)/bin/kvtool build-runtime --backend cuda $(RUNTIME_ARGS)
	$(CUDA_VENV)/bin/python bench/check_cuda.py

# Open-ended fuzzing (hypothesis) of the GGUF header parser and the heads.json reader; not part of `make test`
# or CI. FUZZ_EXAMPLES=100000 runs longer. The fast generated catalogue is tests/test_fuzz_inputs.py (in the suite).
FUZZ_EXAMPLES ?= 2000
fuzz: venv
	$(PIP) install -q hypothesis
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(VPY) -m pytest -q -p no:cacheprovider tests/fuzz_parsers.py $(PYTEST_ARGS)

demo: venv
	$(KVTOOL) fetch smollm2
	$(VPY) examples/demo.py

# ruff (pyflakes, import order, bugbear; configured in pyproject.toml) comes with the dev extra.
lint: venv
	$(VENV)/bin/ruff check .

# Build outputs and stamps only. The shared .venv goes with `make distclean`; ~/.cache/kvtool is never touched.
clean:
	rm -rf build dist *.egg-info .pytest_cache out $(CORE_STAMP) $(EXTRAS_STAMP)
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -print0 | xargs -0 rm -rf

distclean: clean
	rm -rf $(VENV)
