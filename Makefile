# Fresh machine:  make demo   (sets up .venv, builds, runs `pyinterp demo`)
#                 make test   (sets up .venv, builds, runs the test suite)
# CPU machines get the CPU build of torch==2.13.0; pip never pulls a CUDA torch here because torch
# is installed first, pinned, and everything else is installed against constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export MAX_JOBS ?= 2
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1

.PHONY: setup build test test-all demo compile-check bench gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements-dev.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -r requirements-dev.txt
	touch $@

build: setup
	$(PIP) install -q --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest -q -m "not slow" -p no:cacheprovider tests

test-all: build
	$(PY) -m pytest -q tests

demo: build
	$(VENV)/bin/pyinterp demo

# Every kernels/cuda/*.cu to an sm_90a cubin with ptxas' register/spill report; needs nvcc, no GPU.
compile-check:
	cmake -S . -B build/compile-check -G Ninja -DPYINTERP_BUILD_CPU=OFF -DPYINTERP_BUILD_CUDA=ON
	cmake --build build/compile-check --target cuda_compile_check -j $(MAX_JOBS)

# The full benchmark run (`pyinterp bench --shapes small`: a few minutes; --shapes demo: about one)
bench: build
	$(VENV)/bin/pyinterp bench

clean:
	rm -rf build *.egg-info pyinterp/_C*.so

# On a GPU machine with a CUDA torch already installed: build, GPU tests, compute-sanitizer, benchmarks.
gpu-check:
	benches/gpu_check.sh $(or $(OUT),out/gpu-check)
