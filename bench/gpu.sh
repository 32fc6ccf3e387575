#!/usr/bin/env bash
# One call on the GPU machine (no internet; torch and triton preinstalled): build fastmask with its CUDA kernels,
# run the GPU tests and the whole suite, then every bench in bench/ with tables printed and JSON saved.
# Usage: bash bench/gpu.sh      Logs and JSON go to $OUT when set, else bench/results/.
# JSON: <bench module>.json per file of bench/ (pytest-benchmark's --benchmark-json format; GB/s, % of peak and the
# ratios vs each named baseline are in every benchmark's extra_info).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RESULTS=${OUT:-bench/results}
mkdir -p "$RESULTS"
exec > >(tee "$RESULTS/gpu.log") 2>&1
START=$(date +%s)
step() { echo; echo "=== [$(($(date +%s) - START))s] $*"; }
FAILED=()

step "machine"
nvidia-smi || true
python -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
python -c "import triton; print('triton', triton.__version__)" || echo "triton not importable"
command -v nvcc && nvcc --version | tail -2

step "build: pip install --no-build-isolation --no-deps -e ."
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
install() { python -m pip install --disable-pip-version-check --no-build-isolation --no-deps -e . >>"$RESULTS/build.log" 2>&1; }
if ! FASTMASK_BUILD_CUDA=1 install; then
  tail -60 "$RESULTS/build.log"
  FAILED+=("build with CUDA kernels (log: $RESULTS/build.log)")
  step "retrying without requiring CUDA, so the Triton and reference paths still get measured"
  if ! install; then
    tail -30 "$RESULTS/build.log"
    FASTMASK_BUILD_EXT=0 install || { echo "cannot install fastmask at all"; exit 1; }
  fi
fi
python -c "import fastmask; print(fastmask.backend())"

run_pytest() {  # log name, then pytest arguments; a non-zero exit (5 = nothing ran) is recorded as a failure
  local name=$1
  shift
  timeout 300 python -m pytest "$@" 2>&1 | tee "$RESULTS/$name.log"
  local rc=${PIPESTATUS[0]}
  [[ $rc -eq 0 ]] || FAILED+=("$name (exit $rc)")
}

step "GPU tests: pytest -m cuda"
run_pytest tests_cuda python_tests -q -m cuda

step "whole test suite"
run_pytest tests_all python_tests -q

for bench in bench/test_*.py; do
  name=$(basename "$bench" .py)
  step "bench $name"
  run_pytest "$name" "$bench" -q --benchmark-json="$RESULTS/$name.json" --benchmark-columns=median,iqr,rounds
done

step "done in $(($(date +%s) - START))s"
if [[ ${#FAILED[@]} -gt 0 ]]; then
  printf 'FAILED: %s\n' "${FAILED[@]}"
  exit 1
fi
echo "all passed"
