#!/usr/bin/env bash
# pyinterp._C and pyinterp._C_cuda for the GPU machine (Python 3.12, torch 2.11), built on this CPU
# machine and checked here to load into that torch, so that benches/gpu_check.sh need not compile
# there; with them the test-only wheels that machine may lack (it has no network). Nothing here is
# committed: OUT_DIR is ignored by git and travels to the GPU machine as a carried path.
#
#   benches/gpu_prebuilt.sh OUT_DIR          (make gpu-prebuilt: OUT_DIR = out/gpu-prebuilt)
#
#   GPU_PREBUILT_PYTHON  the Python to build with (default: python3.12 on PATH, else pyenv's 3.12)
#   GPU_PREBUILT_TORCH   the torch to build against (default 2.11.0)
#   GPU_PREBUILT_VENV    a scratch venv for that torch, outside the repository: the PyPI wheel is a
#                        CUDA build of several GB (default ~/.cache/pyinterp/gpu-prebuilt-venv)
set -euo pipefail
out=$(realpath -m "${1:?usage: benches/gpu_prebuilt.sh OUT_DIR}")
repo=$(cd "$(dirname "$0")/.." && pwd)
torch_version=${GPU_PREBUILT_TORCH:-2.11.0}
venv=${GPU_PREBUILT_VENV:-$HOME/.cache/pyinterp/gpu-prebuilt-venv}
python=${GPU_PREBUILT_PYTHON:-$(command -v python3.12 || ls -d /root/.pyenv/versions/3.12*/bin/python3.12 2> /dev/null | tail -n 1)}
[[ -n $python ]] || { echo "no Python 3.12 found: set GPU_PREBUILT_PYTHON" >&2; exit 2; }
case $venv/ in "$repo"/*) echo "GPU_PREBUILT_VENV must lie outside the repository" >&2; exit 2 ;; esac

[[ -x $venv/bin/python ]] || "$python" -m venv "$venv"
vpy=$venv/bin/python
export PATH=$venv/bin:$PATH  # its cmake and ninja
"$vpy" -m pip install -q "torch==$torch_version" pybind11 ninja "cmake>=3.25" setuptools wheel numpy safetensors tqdm

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
echo "building the wheel with $("$vpy" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__)')"
PYINTERP_TARGET_DEVICE=cuda PYINTERP_BUILD_DIR=$repo/build/gpu-prebuilt \
  "$vpy" -m pip wheel -q --no-build-isolation --no-deps -w "$scratch/wheel" "$repo"
wheel=$(ls "$scratch"/wheel/*.whl)

# The load check: the wheel installed into that torch, imported from outside the checkout.
"$vpy" -m pip install -q --no-deps --force-reinstall "$wheel"
(cd "$scratch" && "$vpy" - << 'EOF'
import torch
import pyinterp
from pyinterp import _extension

assert _extension.cpu_extension() is not None, _extension.load_error("_C")
assert _extension.cuda_extension() is not None, _extension.load_error("_C_cuda")
for op in ("topk_encode_forward", "gather_sum", "gather_dot", "sparse_t_matmul", "ij_accumulate_",
           "resonator_bits"):
    table = torch._C._dispatch_dump(f"pyinterp::{op}")
    assert "\nCPU: registered at" in table and "\nCUDA: registered at" in table, (op, table)
print("load check ok:", pyinterp.__file__, "torch", torch.__version__)
EOF
)
"$vpy" -m pip uninstall -q -y pyinterp-kernels

rm -rf "$out"
mkdir -p "$out/wheels"
"$vpy" -m zipfile -e "$wheel" "$scratch/unpacked"
cp "$scratch"/unpacked/pyinterp/_C*.so "$out/"
# What the tests and the driver import beyond torch and triton, for a machine without them.
"$vpy" -m pip download -q --only-binary :all: -d "$out/wheels" pytest pytest-timeout hypothesis \
  expecttest numpy safetensors tqdm
{
  "$vpy" -c "import sys, torch; print(f'python_tag cp{sys.version_info[0]}{sys.version_info[1]}'); print('torch', torch.__version__.split('+')[0])"
  echo "torch_build $("$vpy" -c 'import torch; print(torch.__version__)')"
  echo "cuda_archs ${PYINTERP_CUDA_ARCHS:-90a}"
  echo "source $(git -C "$repo" rev-parse --short HEAD)$(git -C "$repo" diff --quiet HEAD -- csrc kernels CMakeLists.txt setup.py || echo '+changes')"
  echo "built $(date -u +%Y-%m-%dT%H:%MZ)"
  (cd "$out" && sha256sum _C*.so)
} > "$out/manifest.txt"
cat "$out/manifest.txt"
du -sh "$out" "$out/wheels"
