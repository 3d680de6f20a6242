#!/usr/bin/env bash
# GPU validation on a machine with a GPU and a CUDA torch already installed (torch is never installed
# or replaced here). Builds pyinterp in place, runs the GPU tests, compute-sanitizer (memcheck and
# racecheck) over the CUDA-backend tests, and the paper-shape benchmarks; logs and results go to OUT_DIR.
#
#   benches/gpu_check.sh OUT_DIR [build] [tests] [sanitizer] [bench]     (default: all four, in order)
#
# Each stage fits one 10-minute command on an H100; run them as separate commands if needed.
# Python packages the machine lacks (pybind11, pytest-benchmark, hypothesis, ...) may be given as
# wheels in .whl/ at the repository root: they are installed into /tmp/site first.
set -uo pipefail
out_dir=$(realpath -m "${1:?usage: benches/gpu_check.sh OUT_DIR [build] [tests] [sanitizer] [bench]}")
shift
stages=${*:-build tests sanitizer bench}
cd "$(dirname "$0")/.."
mkdir -p "$out_dir"
PY=${PYTHON:-python3}
export PYINTERP_TARGET_DEVICE=cuda PYINTERP_CUDA_ARCHS=${PYINTERP_CUDA_ARCHS:-90a}
export MAX_JOBS=${MAX_JOBS:-16} NVCC_THREADS=${NVCC_THREADS:-2} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

status=0
stage() {  # stage NAME COMMAND...: run, log to OUT_DIR/NAME.log, keep going on failure
  local name=$1
  shift
  echo "== $name: $*"
  if "$@" > "$out_dir/$name.log" 2>&1; then echo "   ok"; else echo "   FAILED (exit $?)"; status=1; fi
  tail -n 4 "$out_dir/$name.log"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"
  date -u +%Y-%m-%dT%H:%MZ; git rev-parse --short HEAD; } > "$out_dir/device.txt" 2>&1
cat "$out_dir/device.txt"

for name in $stages; do
  case $name in
    build) stage build $PY -m pip install --no-build-isolation --no-deps -e . ;;
    tests) stage tests $PY -m pytest -q -m "not slow" -p no:cacheprovider tests ;;
    sanitizer)
      stage memcheck compute-sanitizer --tool memcheck --error-exitcode 1 \
        $PY -m pytest -q -x -p no:cacheprovider -k "cuda" tests
      stage racecheck compute-sanitizer --tool racecheck --error-exitcode 1 \
        $PY -m pytest -q -x -p no:cacheprovider -k "cuda and not hypothesis" tests/test_topk_encode.py tests/test_sparse_decode.py ;;
    bench)
      stage bench $PY -m pytest -q -p no:cacheprovider benches --shapes paper \
        --benchmark-json "$out_dir/benchmark.json"
      cp benches/results/*.jsonl "$out_dir/" 2>/dev/null ;;
    *) echo "unknown stage $name (build, tests, sanitizer, bench)"; status=2 ;;
  esac
done
exit $status
