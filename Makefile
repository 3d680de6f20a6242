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

.PHONY: setup build test test-all demo compile-check bench gpu-check gpu-prebuilt clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements-dev.txt constraints.txt requirements-peers.txt requirements-peers-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -r requirements-dev.txt
	$(PIP) install -q -c constraints.txt -r requirements-peers.txt
	$(PIP) install -q --no-deps -c constraints.txt -r requirements-peers-nodeps.txt
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

# Every kernels/cuda/*.cu executed on the CPU under ASan+UBSan and TSan (tests/cuda_emu), with the
# slow sweep that `make test` leaves out; no GPU, no nvcc.
cuda-emu: build
	$(PY) -m pytest -q -p no:cacheprovider tests/test_cuda_emu.py

# The full benchmark run (`pyinterp bench --shapes small`: a few minutes; --shapes demo: about one)
bench: build
	$(VENV)/bin/pyinterp bench

clean:
	rm -rf build *.egg-info pyinterp/_C*.so

# On a GPU machine with a CUDA torch already installed, in at most 8 minutes: GPU tests,
# compute-sanitizer, a smoke bench and a training run, into one archive OUT/gpu-check.tar.gz
# (benches/gpu_check.sh; --dry-run there runs the same stages on a CPU machine).
gpu-check:
	benches/gpu_check.sh $(or $(OUT),out/gpu-check)

# _C and _C_cuda for the GPU machine's Python 3.12 + torch 2.11, built and load-checked here, with the
# test-only wheels it may lack; gpu-check uses them when they match that machine's Python and torch.
# Needs a Python 3.12 and a scratch venv of several GB outside the repo (benches/gpu_prebuilt.sh).
gpu-prebuilt:
	benches/gpu_prebuilt.sh $(or $(OUT),out/gpu-prebuilt)
