#!/usr/bin/env bash
# The GPU check, in one command, on a machine with a CUDA GPU and no network access:
#   install the project (no downloads), build the CUDA extension when csrc/ has one, run the test
#   suite (the GPU tests included), run compute-sanitizer (memcheck, racecheck) over the kernels,
#   build the CMake project and run its C++ test, run the benchmarks and turn them into a report.
#   Every step together takes longer than one 10-minute device call: run it as two calls, e.g.
#   STEPS="install build tests sanitize" then STEPS="install build cmake bench".
#
#   OUT=/path/to/results bash benchmarks/gpu_check.sh        (default OUT: ./gpu-out)
#   STEPS="tests bench" bash benchmarks/gpu_check.sh          (a subset; default: every step)
#   L2D_BENCH=full ...                                        (every benchmark case; default: quick)
#
# Writes at most a handful of files under $OUT: summary.txt (one line per step), log.txt (every
# step's output), gpu.txt, and bench-<card>.json / .md / .png. Exits non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
PY=${PYTHON:-python3}
STEPS=${STEPS:-"install build tests sanitize cmake bench"}
export L2D_BENCH=${L2D_BENCH:-quick}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
: > "$OUT/summary.txt"
: > "$OUT/log.txt"
failed=0

card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9\n' '-' | tr -s '-')
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" >> "$OUT/gpu.txt" 2>&1

step() {  # step NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    echo "===== $name: $*" >> "$OUT/log.txt"
    local start=$SECONDS
    timeout "$limit" "$@" >> "$OUT/log.txt" 2>&1
    local rc=$?
    local line="$name: $([ $rc -eq 0 ] && echo ok || echo "FAILED (exit $rc)") in $((SECONDS - start)) s"
    echo "$line" | tee -a "$OUT/summary.txt"
    [ $rc -eq 0 ] || failed=1
}

step install 120 $PY -m pip install --no-deps --no-build-isolation --no-index -e .
if [ -d csrc ] && ls csrc/*.cu > /dev/null 2>&1; then
    step build 400 env L2D_KERNELS_BUILD_CUDA=1 MAX_JOBS=16 $PY -m pip install --no-deps --no-build-isolation --no-index -e .
fi
$PY -c "import l2d_kernels; print('backends here:', l2d_kernels.available_backends())" >> "$OUT/gpu.txt" 2>&1
step tests 420 $PY -m pytest tests -q -x -n 8 -p no:cacheprovider
step sanitize 240 compute-sanitizer --tool memcheck --error-exitcode 1 $PY tests/sanitizer_driver.py
step sanitize 240 compute-sanitizer --tool racecheck --error-exitcode 1 $PY tests/sanitizer_driver.py
step cmake 400 bash -c "cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH=\"\$($PY -c 'import torch; print(torch.utils.cmake_prefix_path)')\" > /dev/null && cmake --build build/cmake -j 16 > /dev/null && ctest --test-dir build/cmake --output-on-failure"
step bench 420 $PY -m pytest benchmarks -q -p no:cacheprovider --benchmark-json="$OUT/bench-$card.json"
step bench 60 $PY benchmarks/report.py "$OUT/bench-$card.json" --out "$OUT"
cat "$OUT/summary.txt"
exit $failed
