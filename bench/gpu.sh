#!/usr/bin/env bash
# One command on a GPU machine (torch and triton installed, no internet needed): build fastmask with its CUDA kernels,
# run the GPU tests, then the benches, then the whole suite, in that order of value, inside an optional time budget.
#
# Usage: bash bench/gpu.sh [STEP ...]     steps: build tests_cuda masked_act scoring conv_bn_act distributed tests_all
#        (default: all of them, in that order; `build` runs first whenever fastmask._C is not built here)
# Env:   GPU_BUDGET_S   seconds the whole script may use (default 540).
#                       A step starts only if its share fits what is left, and is cut off (SIGINT, so pytest still
#                       saves) at what is left; steps not run are listed at the end, for a second call to name.
#        OUT            where logs and JSON go (default bench/results/):
#                       everything is in gpu.log and build.log, plus one <bench>_bench.json per bench
#                       (pytest-benchmark format; GB/s, % of peak and the ratios vs each named baseline are in every
#                       benchmark's extra_info) and the conv bench's conv_bn_act.{md,json}: 7 files at most.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RESULTS=${OUT:-bench/results}
mkdir -p "$RESULTS"
export FASTMASK_BENCH_RESULTS=$RESULTS  # where benches that save their own tables write them
exec > >(tee "$RESULTS/gpu.log") 2>&1
START=$(date +%s)
BUDGET=${GPU_BUDGET_S:-540}
left() { echo $((BUDGET - ($(date +%s) - START))); }
# A step's timeout: what is left, less 20 s for pytest to write its JSON and tables after the SIGINT that ends it
# (SIGTERM would lose them). Never 0, which timeout reads as no limit.
cap() { local l; l=$(($(left) - 20)); echo $((l > 1 ? l : 1)); }
step() { echo; echo "=== [$(($(date +%s) - START))s, $(left)s left] $*"; }
FAILED=()
SKIPPED=()

# Seconds each step needs at least to be worth starting: first-call Triton compiles and autotuning included (the
# conv bench autotunes 18 problems and torch.compiles 18 more; scoring tunes each layer at two chunk sizes;
# distributed starts one process per GPU and skips with fewer than 2).
declare -A NEEDS=([build]=60 [tests_cuda]=150 [masked_act]=40 [scoring]=240 [conv_bn_act]=400 [distributed]=90
                  [tests_all]=150)
STEPS=("$@")
[[ ${#STEPS[@]} -gt 0 ]] || STEPS=(build tests_cuda masked_act scoring conv_bn_act distributed tests_all)
for s in "${STEPS[@]}"; do
  [[ -n ${NEEDS[$s]:-} ]] || { echo "unknown step '$s'; steps: ${!NEEDS[*]}"; exit 2; }
done

step "machine"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv || true
python -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
python -c "import triton; print('triton', triton.__version__)" || echo "triton not importable"
command -v nvcc && nvcc --version | tail -2

build() {
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  install() { timeout -s INT -k 20 "$(cap)" python -m pip install --disable-pip-version-check --no-build-isolation --no-deps -e . >>"$RESULTS/build.log" 2>&1; }
  if ! FASTMASK_BUILD_CUDA=1 install; then
    tail -60 "$RESULTS/build.log"
    FAILED+=("build with CUDA kernels (log: build.log)")
    step "retrying without requiring CUDA, so the Triton and reference paths still get measured"
    if ! FASTMASK_BUILD_CUDA=0 install; then
      tail -30 "$RESULTS/build.log"
      FASTMASK_BUILD_EXT=0 install || { echo "cannot install fastmask at all"; exit 1; }
    fi
  fi
  python -c "import fastmask; print(fastmask.backend())"
}

run_pytest() {  # step name, then pytest arguments; a non-zero exit (5 = nothing ran, 124 = cut off) is a failure
  local name=$1
  shift
  timeout -s INT -k 20 "$(cap)" python -m pytest "$@"
  local rc=$?
  [[ $rc -eq 0 ]] || FAILED+=("$name (exit $rc)")
}

run_bench() {
  run_pytest "$1" "bench/test_$1_bench.py" -q -p no:cacheprovider --benchmark-json="$RESULTS/$1_bench.json" \
    --benchmark-columns=median,iqr,rounds
}

# A later call may land on a fresh machine: without the compiled extension the ext benches would skip and pass.
if [[ " ${STEPS[*]} " != *" build "* ]] && ! python -c "import fastmask._C" 2>/dev/null; then
  STEPS=(build "${STEPS[@]}")
fi
for s in "${STEPS[@]}"; do
  if [[ $(left) -lt ${NEEDS[$s]} ]]; then
    SKIPPED+=("$s")
    continue
  fi
  step "$s"
  case $s in
    build) build ;;
    tests_cuda) run_pytest "$s" python_tests -q -p no:cacheprovider -m cuda ;;
    tests_all) run_pytest "$s" python_tests -q -p no:cacheprovider ;;
    *) run_bench "$s" ;;
  esac
done

step "done"
[[ ${#SKIPPED[@]} -eq 0 ]] || echo "NOT RUN (out of budget; run again naming them): bash bench/gpu.sh ${SKIPPED[*]}"
if [[ ${#FAILED[@]} -gt 0 ]]; then
  printf 'FAILED: %s\n' "${FAILED[@]}"
  exit 1
fi
[[ ${#SKIPPED[@]} -eq 0 ]] || exit 3
echo "all passed"
