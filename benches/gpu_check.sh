#!/usr/bin/env bash
# The first GPU run in one command (issue 13 §3), on a machine with a GPU and a CUDA torch already
# installed (torch is never installed or replaced here): at most GPU_CHECK_BUDGET_S seconds (default
# 450, so that the whole run fits 8 minutes), leaving ONE file, OUT_DIR/gpu-check.tar.gz, with a log
# per stage, summary.txt, device.txt, pytest's junit files and the bench/training results. The
# archive is written however the stages end (failure, timeout, an interrupt).
#
#   benches/gpu_check.sh [--dry-run] OUT_DIR
#
# Stages, each under its own `timeout` (shortened to what is left of the budget):
#   device      GPU, driver, Python, torch, triton and compute-sanitizer versions (also device.txt)
#   install     the _C/_C_cuda of `make gpu-prebuilt` (PYINTERP_PREBUILT, default out/gpu-prebuilt:
#               carry it to the GPU machine) when built for this Python and torch, else a build here;
#               test-only packages this machine lacks are unpacked from the wheels found there
#   available   the cuda and triton backends are available on this CUDA host (tests/test_gpu_check.py)
#   gpu-tests   the kernel test files, -m "not slow", on the GPU (cuda and triton, forward, backward)
#   kernels     benches/gpu_check_driver.py sanitize --large: multi-tile, split merge, the general path,
#               k_aux = D/2, bf16 with a large b_dec, long decodes, each against the torch backend
#   memcheck, racecheck, synccheck, initcheck
#               compute-sanitizer over the driver's small cases (PYTORCH_NO_CUDA_MEMORY_CACHING=1)
#   bench       CUDA-event timing of the encode and of a training step at two paper shapes
#   train       300 TopKSAE steps on the cuda backend against the torch backend
#
# --dry-run runs the same stages on this CPU machine, so that the script itself is tested: what needs
# a GPU is skipped with its reason, and the driver's stages run on the CPU at tiny sizes (its small
# cases, which the sanitizers would run, as the stage sanitize-cases).
set -uo pipefail

dry_run=0
if [[ ${1:-} == --dry-run ]]; then
  dry_run=1
  shift
fi
out_dir=$(realpath -m "${1:?usage: benches/gpu_check.sh [--dry-run] OUT_DIR}")
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
budget=${GPU_CHECK_BUDGET_S:-450}
start=$(date +%s)
deadline=$((start + budget))
reserve=10  # seconds kept for the archive
prebuilt=$(realpath -m "${PYINTERP_PREBUILT:-out/gpu-prebuilt}")
if [[ -n ${PYTHON:-} ]]; then
  PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then
  PY=$repo/.venv/bin/python
else
  PY=python3
fi
device=cuda
((dry_run)) && device=cpu
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
mkdir -p "$out_dir" "$work/logs" "$work/site"
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2> /dev/null || true)
driver="benches/gpu_check_driver.py --device $device"
# Test-only packages unpacked from the prebuilt wheels go first; the checkout itself is importable
# even where no editable install could be made.
export PYTHONPATH=$work/site:$repo${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export MAX_JOBS=${MAX_JOBS:-16} NVCC_THREADS=${NVCC_THREADS:-2} PYINTERP_CUDA_ARCHS=${PYINTERP_CUDA_ARCHS:-90a}
export dry_run prebuilt PY work sanitizer driver
status=0
stage_number=0

archive() {
  trap - EXIT INT TERM
  {
    echo "finished $(date -u +%Y-%m-%dT%H:%M:%SZ) after $(($(date +%s) - start)) s of a ${budget} s budget"
    echo "exit status $status"
  } >> "$work/summary.txt"
  echo "---- summary"
  cat "$work/summary.txt"
  tar -czf "$out_dir/gpu-check.tar.gz" -C "$work" --exclude ./site . && rm -rf "$work"
  echo "archive: $out_dir/gpu-check.tar.gz"
  exit "$status"
}
trap archive EXIT
trap 'status=130; exit 130' INT TERM

record() {  # record NAME RESULT SECONDS
  printf '%-15s %-50s %4s s\n' "$1" "$2" "$3" >> "$work/summary.txt"
}

next_log() {  # next_log NAME: sets log to the next stage's log file
  stage_number=$((stage_number + 1))
  log=$(printf '%s/logs/%02d-%s.log' "$work" "$stage_number" "$1")
}

skip() {  # skip NAME REASON
  local log
  next_log "$1"
  echo "skipped: $2" > "$log"
  echo "== $1: skipped ($2)"
  record "$1" "skipped: $2" 0
}

# stage NAME CAP_SECONDS COMMAND...: run COMMAND (a program or a function of this script) under
# `timeout`, shortened to what is left of the budget; log it; keep going whatever it returns.
stage() {
  local name=$1 cap=$2 log rc t0 left limit result
  shift 2
  left=$((deadline - $(date +%s) - reserve))
  if ((left < 5)); then
    skip "$name" "no time left in the ${budget} s budget"
    status=1
    return
  fi
  ((dry_run)) && cap=$((cap * 3))  # a shared CPU machine is slower than the GPU one
  limit=$((cap < left ? cap : left))
  next_log "$name"
  echo "== $name (timeout ${limit} s): $*" | tee "$log"
  t0=$(date +%s)
  if declare -F "$1" > /dev/null; then
    timeout --kill-after=5 "$limit" bash -c '"$@"' _ "$@" >> "$log" 2>&1
  else
    timeout --kill-after=5 "$limit" "$@" >> "$log" 2>&1
  fi
  rc=$?
  case $rc in
    0) result=ok ;;
    124 | 137) result="TIMED OUT after ${limit} s"; status=1 ;;
    *) result="FAILED (exit $rc)"; status=1 ;;
  esac
  echo "   $result" | tee -a "$log"
  tail -n 4 "$log" | head -n 3
  record "$name" "$result" $(($(date +%s) - t0))
}

device_info() {
  if ((dry_run)); then
    echo "dry run on $(hostname): no GPU used"
  else
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  fi
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  "$PY" -c "import triton; print('triton', triton.__version__)" || echo "triton: not importable"
  if [[ -n $sanitizer ]]; then "$sanitizer" --version | tail -n 1; else echo "compute-sanitizer: not found"; fi
  date -u +%Y-%m-%dT%H:%MZ
  git rev-parse --short HEAD 2> /dev/null || echo "(not a git checkout)"
}

# Test-only packages this machine lacks, unpacked from the wheels `make gpu-prebuilt` downloaded
# (unpacking needs no pip and no network).
unpack_missing_wheels() {
  [[ -d $prebuilt/wheels ]] || { echo "no $prebuilt/wheels: using the packages installed here"; return 0; }
  local wheel module
  for wheel in "$prebuilt"/wheels/*.whl; do
    module=$(basename "$wheel" | cut -d- -f1 | tr '[:upper:]' '[:lower:]')
    [[ $module == attrs ]] && module=attr
    if ! "$PY" -c "import $module" 2> /dev/null; then
      echo "unpacking $(basename "$wheel")"
      "$PY" -m zipfile -e "$wheel" "$work/site" || return 1
    fi
  done
}

prebuilt_matches() {  # the manifest names this Python's tag and this torch's version
  [[ -f $prebuilt/manifest.txt ]] || { echo "no $prebuilt/manifest.txt (make gpu-prebuilt makes it)"; return 1; }
  local want have
  want=$(grep -E '^(python_tag|torch) ' "$prebuilt/manifest.txt" | sort | tr '\n' ' ')
  have=$("$PY" -c "import sys, torch; print(f'python_tag cp{sys.version_info[0]}{sys.version_info[1]}'); print('torch', torch.__version__.split('+')[0])" | sort | tr '\n' ' ')
  [[ $want == "$have" ]] || { echo "the prebuilt modules are for '$want', this machine has '$have'"; return 1; }
}

install_extension() {
  unpack_missing_wheels || return 1
  if ((dry_run)); then
    prebuilt_matches && echo "(they match)"
    echo "dry run: this checkout's own build is used, nothing is installed or built"
  elif prebuilt_matches; then
    cp -v "$prebuilt"/_C*.so pyinterp/ || return 1
    # pyinterp._kernels is kernels/ (setup.py's package_dir); an editable install maps it, and
    # where pip cannot make one the link does the same.
    PYINTERP_TARGET_DEVICE=none "$PY" -m pip install -q --no-build-isolation --no-deps -e . \
      || ln -sfn ../kernels pyinterp/_kernels
  else
    echo "building _C and _C_cuda here"
    PYINTERP_TARGET_DEVICE=cuda PYINTERP_BUILD_DIR=build/gpu-check \
      "$PY" -m pip install --no-build-isolation --no-deps -e . || return 1
  fi
  "$PY" -c "import pyinterp, pyinterp._extension as e; print('_C:', e.cpu_extension()); print('_C_cuda:', e.cuda_extension() or e.load_error('_C_cuda'))"
}

sanitize() {  # sanitize TOOL BACKENDS [SANITIZER OPTIONS...]
  local tool=$1 backends=$2
  shift 2
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$tool" --error-exitcode 1 "$@" \
    "$PY" $driver sanitize --backends "$backends"
}
export -f device_info unpack_missing_wheels prebuilt_matches install_extension sanitize

stage device 30 device_info
cp "$(ls "$work"/logs/*-device.log)" "$work/device.txt"
stage install 200 install_extension

pytest=("$PY" -m pytest -q -p no:cacheprovider -rs)
stage available 60 "${pytest[@]}" tests/test_gpu_check.py -k available --junitxml "$work/available.xml"
if ((dry_run)); then
  skip gpu-tests "needs a GPU (make test runs these files on the CPU)"
  stage kernels 60 "$PY" $driver sanitize --large --backends cpu
else
  stage gpu-tests 150 "${pytest[@]}" -m "not slow" --durations=15 --junitxml "$work/gpu-tests.xml" \
    tests/test_topk_encode.py tests/test_sparse_decode.py tests/test_prefix_decode.py tests/test_ij_accumulate.py \
    tests/test_resonator.py
  stage kernels 60 "$PY" $driver sanitize --large --backends cuda,triton
fi

if ((dry_run)); then
  for tool in memcheck racecheck synccheck initcheck; do skip "$tool" "needs a GPU"; done
  stage sanitize-cases 60 "$PY" $driver sanitize --backends cpu
elif [[ -z $sanitizer ]]; then
  for tool in memcheck racecheck synccheck initcheck; do skip "$tool" "compute-sanitizer not found"; done
else
  # racecheck, synccheck and initcheck instrument pyinterp's kernels only: torch's are not ours to
  # fix, and instrumenting them would take most of the budget.
  stage memcheck 70 sanitize memcheck cuda,triton --leak-check full --report-api-errors no --print-limit 20
  stage racecheck 50 sanitize racecheck cuda --kernel-name kns=pyinterp --print-limit 20
  stage synccheck 30 sanitize synccheck cuda --kernel-name kns=pyinterp --print-limit 20
  stage initcheck 40 sanitize initcheck cuda --kernel-name kns=pyinterp --print-limit 20
fi

if ((dry_run)); then
  stage bench 60 "$PY" $driver bench --backends cpu,torch --repeats 2 --out "$work/bench.jsonl"
  stage train 60 "$PY" $driver train --backends cpu --steps 30
else
  stage bench 60 "$PY" $driver bench --backends cuda,triton,torch --repeats 10 --out "$work/bench.jsonl"
  stage train 60 "$PY" $driver train --backends cuda --steps 300
fi
