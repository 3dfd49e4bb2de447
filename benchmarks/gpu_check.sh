#!/usr/bin/env bash
# The GPU check, on a machine with a CUDA GPU and no network access: PHASE=all (the default) does
# everything in one 10-minute call; PHASE=check and PHASE=bench split it in two, with more time for
# each step.
#
#   Every phase first compiles the Triton kernels of its fixed-shape steps (benchmarks, profile, GPU
#   tests' large shapes, the sanitizer's small set) on every core (benchmarks/triton_cache.py), into
#   TRITON_CACHE_DIR; a cache compiled elsewhere for this card and Triton build and carried in as
#   build/triton-cache.tar.gz is unpacked there first, so that only what it lacks is compiled.
#
#   PHASE=all    install; build the extension in the background while the suite runs on the Triton
#                backend, then the suite on the CUDA backend, each with the preflight (below) and
#                compute-sanitizer (memcheck and racecheck; the driver's small set where the full one
#                takes too long), CMake + CTest and the training loop's --quick run (bf16 autocast)
#                beside it, and the benchmarks'
#                torch.compile forms compiled ahead (L2D_BENCH_WARM_ONLY=1); then the profile, Nsight
#                Compute of the CUDA LED members and slice kernels, the slice launches' per-item clocks
#                (benchmarks/item_clocks.py), `pytest benchmarks/`, the report,
#                Nsight Compute of the other kernels and the step profile, with nothing else on the GPU.
#
#   PHASE=check  install the project (no downloads); build the CUDA extension wheel for this card in
#                the background while the test suite runs on the Triton backend; then the suite on
#                the CUDA backend; compute-sanitizer (memcheck, racecheck) over the kernels of both;
#                the CMake build and its C++ test (CTest); the training loop's --quick run.
#   PHASE=bench  install (reusing a carried extension when L2D_PREBUILT_C names one, else building
#                it), the preflight of both fused backends, then a per-kernel profile of the fused
#                calls (benchmarks/kernel_profile.py) and
#                Nsight Compute of the CUDA LED members and slice kernels, then
#                `pytest benchmarks/` one file at a time and the report (markdown table,
#                PNG plot, merged JSON), then Nsight Compute over the other kernels furthest from their targets
#                (benchmarks/ncu_driver.py, into the log) and the step profile. Optional, in this order: L2D_RETEST="pytest args" (tests to
#                rerun first), L2D_PROBES="command" (diagnostics), L2D_SANITIZE_AFTER="cuda triton"
#                (compute-sanitizer after the benchmarks, with the time left).
#
#   OUT=/path/to/results bash benchmarks/gpu_check.sh                  (default OUT: ./gpu-out)
#   L2D_BENCH=full PHASE=bench ...                                     (every case; default: quick)
#   L2D_PROFILE_ARGS="--triton-led-warps 4,16 --triton-led-no-ahead --triton-led-slices 0,32" ...
#                                  (extra rows in the kernel profile: Triton LED at other warp counts,
#                                   with each width chunk loaded when used, at other slice widths;
#                                   default, at COCO: each backend's LED call without gradient, the
#                                   partial-Gram kernel in programs of 8 warps (the default before
#                                   run f) and 128-wide slices, for the comparison)
#   DEADLINE=300 ...               (seconds: steps are cut short so that the phase ends by then; the
#                                   report alone may run 30 s past it)
#   L2D_TRITON_TEST_LIMIT=300 ...  (seconds for the Triton suite in PHASE=all; default 240)
#   L2D_CACHE_JOBS=8 ...           (processes compiling Triton kernels ahead; default 16)
#
#   Preflight: before anything is timed, each fused backend's default paths are checked against the
#   reference, call after call and with LED's launches in order (benchmarks/preflight.py). Where they
#   disagree or fault, the same checks run again in a new process with the next configuration in
#   line (early launches off; then Triton's whole-call replay, or CUDA's item queue, off; then both),
#   and the timed steps (profile, Nsight Compute, item clocks, benchmarks, step profile) run with the
#   first configuration that agreed, which the summary names: a fault in a path no GPU has run yet
#   then costs its own measurements, not the whole run's. The test suites and sanitizers keep
#   testing the defaults, and report what failed there.
#
# Writes under $OUT: summary.txt (one line per step, failures named), log-<phase>.txt (every step's
# output; the --quick run's results.json too), gpu.txt, the built extension (_C*.so, to carry into the next phase), and for bench:
# profile-<card>.md, step-profile-<card>.md (benchmarks/step_profile.py: where a training step's time
# goes), bench-<card>.json / .md / .png. Exits non-zero if a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
PY=${PYTHON:-python3}
PHASE=${PHASE:-all}
export L2D_BENCH=${L2D_BENCH:-quick}
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1)}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/build/triton-cache}
mkdir -p "$OUT" build "$TRITON_CACHE_DIR"
LOG="$OUT/log-$PHASE.txt"
: > "$LOG"
failed=0
T0=$SECONDS
DEADLINE=${DEADLINE:-570}  # seconds: no step starts, or runs on, past this point of the phase

card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9\n' '-' | tr -s '-')
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  echo "arch list: $TORCH_CUDA_ARCH_LIST"; } > "$OUT/gpu.txt" 2>&1

note() { echo "$*" | tee -a "$OUT/summary.txt"; }

step() {  # step NAME TIMEOUT_S COMMAND...   (output to $LOG; one summary line, with failed tests named)
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    local left=$((DEADLINE - (SECONDS - T0)))
    if [ $left -lt 15 ]; then
        note "$name: SKIPPED (the phase's deadline, DEADLINE=$DEADLINE s, is near)"
        failed=1
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "===== $name [t=$((SECONDS - T0)) s, limit $limit s]: $*" >> "$LOG"
    local tmp
    tmp=$(mktemp)
    timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG" > "$tmp"
    local rc=${PIPESTATUS[0]}
    note "$name: $([ $rc -eq 0 ] && echo ok || echo "FAILED (exit $rc)") in $((SECONDS - start)) s$(grep -E -m1 '[0-9]+ (passed|failed)|ERROR SUMMARY|found in the cache' "$tmp" | sed 's/^/ -- /')"
    grep -E '^(FAILED|ERROR) ' "$tmp" | head -15 | sed 's/^/    /' | tee -a "$OUT/summary.txt"
    rm -f "$tmp"
    [ $rc -eq 0 ] || failed=1
    return $rc
}

install_project() {
    step install 120 $PY -m pip install --no-deps --no-build-isolation --no-index -q -e .
}

triton_cache() {  # the Triton kernels of the fixed-shape steps, compiled ahead on every core
    # A cache compiled elsewhere for this card and Triton build (benchmarks/triton_cache.py) may come
    # packed with the tree: unpacked first, then only what it lacks is compiled here.
    if [ -f build/triton-cache.tar.gz ]; then
        tar -xzf build/triton-cache.tar.gz -C "$TRITON_CACHE_DIR" --strip-components=1 &&
            note "triton cache: unpacked build/triton-cache.tar.gz"
    fi
    step triton-cache 150 $PY benchmarks/triton_cache.py --jobs "${L2D_CACHE_JOBS:-16}"
}

place_extension() {  # place_extension SO: into the tree as a new file, never over one a process has loaded
    cp "$1" l2d_kernels/.C.tmp && mv -f l2d_kernels/.C.tmp "l2d_kernels/$(basename "$1")"
}

build_extension() {  # a wheel with nvcc (what users install), its _C copied into the tree for the tests
    rm -rf build/dist && L2D_KERNELS_BUILD_CUDA=1 MAX_JOBS=16 \
        $PY -m pip wheel --no-deps --no-build-isolation --no-index -w build/dist . &&
        $PY -m zipfile -l build/dist/*.whl | grep -q '_C' &&
        (cd build/dist && $PY -m zipfile -e ./*.whl unpacked) &&
        for so in build/dist/unpacked/l2d_kernels/_C*.so; do place_extension "$so"; done &&
        cp l2d_kernels/_C*.so "$OUT/"
}
export -f place_extension build_extension
export PY OUT

# The GPU-only tests at realistic and large shapes first: a suite cut by its limit (the fourth H100
# run's was, by Triton compiling) then leaves out the small-shape tests that CI also runs.
GPU_TESTS=${GPU_TESTS:-"tests/test_gpu.py tests/test_random_targets.py tests/test_api.py tests/test_nn.py
           tests/test_library.py tests/test_backends.py tests/test_triton_mld.py tests/test_triton_led.py
           tests/test_cuda_ext.py"}
pytest_gpu() {  # pytest_gpu BACKENDS NAME TIMEOUT   (--durations: where a suite's time went)
    step "$2" "$3" env L2D_TEST_BACKENDS="$1" $PY -m pytest $GPU_TESTS -q -rfE -p no:cacheprovider -n 6 \
        --timeout 150 -o addopts="" --durations=20
}

sanitize_one() {  # sanitize_one TOOL BACKENDS LIMIT [SET]
    step "sanitize-$1-$2" "$3" env L2D_TEST_BACKENDS="$2" L2D_SANITIZE_SET="${4:-full}" \
        compute-sanitizer --tool "$1" --error-exitcode 1 $PY tests/sanitizer_driver.py
}

sanitize() {  # sanitize BACKENDS
    # Limits from the first H100 run: memcheck of the CUDA kernels took 5-8 s; racecheck of them and
    # both tools over the Triton kernels did not finish in 60 s.
    for tool in memcheck racecheck; do
        sanitize_one $tool "$1" "${L2D_SANITIZE_LIMIT:-150}"
    done
}

beside() {  # beside NAME COMMAND...: in the background, its log apart until wait_beside appends it
    ( LOG="$OUT/beside-$1.txt"; : > "$LOG"; shift; "$@" ) > /dev/null &
    bg="$bg $!"
}

sanitize_beside() {  # sanitize_beside BACKENDS LIMIT MEMCHECK_SET: both tools at once, in the background
    beside "memcheck-$1" sanitize_one memcheck "$1" "$2" "$3"
    beside "racecheck-$1" sanitize_one racecheck "$1" "$2" small
}

wait_beside() {  # wait for the background steps; their logs join $LOG (few files may leave the machine)
    for pid in $bg; do wait "$pid" || failed=1; done
    bg=""
    for f in "$OUT"/beside-*.txt; do
        [ -f "$f" ] && { echo "===== (ran in the background) $(basename "$f" .txt)"; cat "$f"; rm -f "$f"; } >> "$LOG"
    done
}

cmake_build() {
    step cmake 240 bash -c "cmake -S . -B build/cmake -G Ninja -DCMAKE_PREFIX_PATH=\"\$($PY -c 'import torch; print(torch.utils.cmake_prefix_path)')\" && cmake --build build/cmake -j 8 && ctest --test-dir build/cmake --output-on-failure"
}

train_quick() {  # the training loop's short run on the GPU: bf16 autocast, the fused losses in training
    step train-quick "${1:-120}" bash -c "rm -rf build/train-quick && $PY -m l2d_kernels.train --quick --device cuda \
        --out build/train-quick && cat build/train-quick/results.json &&
        $PY -c \"import json, math; r = json.load(open('build/train-quick/results.json'));
assert r['precision'] == 'bfloat16 autocast', r['precision'];
assert all(math.isfinite(r[k]) for k in ('teacher_map', 'vanilla_map', 'l2d_map')), r\""
}

# What each backend's preflight tries after its defaults, in order (the variables of the kernels'
# switches: README, "Backends" and "The CUDA extension").
PREFLIGHT_TRITON=("L2D_TRITON_EARLY_LAUNCH=0" "L2D_TRITON_CALL_REPLAY=0" "L2D_TRITON_EARLY_LAUNCH=0 L2D_TRITON_CALL_REPLAY=0")
PREFLIGHT_CUDA=("L2D_CUDA_LED_EARLY_LAUNCH=0" "L2D_CUDA_LED_QUEUE=0" "L2D_CUDA_LED_EARLY_LAUNCH=0 L2D_CUDA_LED_QUEUE=0")
BENCH_ENV=build/bench-env  # the configurations the preflights chose for the timed steps, a line each
rm -f "$BENCH_ENV"

preflight() {  # preflight BACKEND CONFIG...: the defaults, then each CONFIG ("NAME=VALUE ...") in turn;
    local backend=$1 config  # fails where the defaults did, whatever agreed after them
    shift
    for config in "" "$@"; do
        if step "preflight-$backend${config:+ with $config}" 60 env $config $PY benchmarks/preflight.py "$backend"; then
            [ -n "$config" ] || return 0
            echo "$config" >> "$BENCH_ENV"
            return 1  # the defaults failed
        fi
    done
    note "preflight-$backend: no configuration agreed with the reference; the timed steps run its defaults"
    return 1
}

bench_env() {  # the preflights' choices, exported for the timed steps that follow
    [ -s "$BENCH_ENV" ] || return 0
    local line
    while read -r line; do
        export $line
        note "timed steps run with $line (the preflight's choice)"
    done < "$BENCH_ENV"
}

bench_all() {
    bench_env
    # Default extra rows, at COCO only (each variant compiles its own kernels): each backend's LED call
    # without gradient (the forward under no_grad, no gradient written); CUDA LED with the slice
    # launches' items dealt out in turn (QUEUE=0: run f's scheduling, over the new largest-first
    # order), and with every launch waiting for the previous one to end before it starts
    # (EARLY_LAUNCH=0, a row for either backend; read its busy time against the default's); Triton
    # LED with the partial-Gram kernel at 8 warps (run f's default: 46.5 us against 31.6-32.5 at 4)
    # and at 1 (its sm_90 PTX: 7.5k shared-memory loads a program for the FMA dot's operands, against
    # 19.6k at 4 warps, where run f's Nsight Compute found the kernel bound on shared memory; 2 warps,
    # 13.8k, measured 53.8 us), and with 128-wide slices (6 programs a group
    # instead of 12: run d's split kernel gained from fewer, its Gram kernel lost), beside the
    # default's, in the same run. And each backend's LED with bfloat16 embeddings, the training step's
    # (run f's benchmark: 428 and 739 us a call at COCO against 260 and 446 in float32; which share is
    # the kernels', only a profile says). And the Gram kernel's register cap, none and 96 beside the
    # default 128 (see GRAM_MAX_REGISTERS).
    step profile "${L2D_PROFILE_LIMIT:-120}" $PY benchmarks/kernel_profile.py \
        ${L2D_PROFILE_ARGS:---no-grad --bf16 --cuda-led-env QUEUE=0 --cuda-led-env EARLY_LAUNCH=0 --triton-led-set GRAM_WARPS=8,1 --triton-led-set GRAM_MAX_REGISTERS=0,96 --triton-led-set SLICE_WIDTH=128 --triton-led-set EARLY_LAUNCH=0 --variant-shapes 64x80x768} \
        --out "$OUT/profile-$card.md"
    # Nsight Compute's view of the CUDA LED members and slice kernels at COCO (one call: members, the
    # Grams' slices, CD's and ID's weights and gradient), before the benchmarks: 97 us of run e's 118
    # were the three slice launches, one 8-warp block per SM each, and no run has reached the ncu step
    # after the benchmarks (sections: see below; into the log). Run e's ncu of the Triton Gram kernel
    # is in its log.
    local sections="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis --section SchedulerStats"
    step ncu-cuda 60 bash -c "cd benchmarks && ncu -k 'regex:members_kernel|slice_kernel' --launch-skip 4 --launch-count 4 $sections $PY ncu_driver.py led 64 80 768 cuda"
    # Which items, on which SMs, set the CUDA slice launches' time (benchmarks/item_clocks.py): each
    # item's SM cycles and group size, at COCO and OpenImages (a debug mode of the extension that
    # synchronizes; nothing timed runs beside it). Cycles to us at the card's top clock. Then COCO
    # again with the items dealt out in turn (QUEUE=0), into a file of its own.
    local clocks="$OUT/item-clocks.txt" clocks_turn="$OUT/item-clocks-in-turn.txt"
    rm -f "$clocks" "$clocks_turn"
    step item-clocks 60 bash -c "cd benchmarks && L2D_CUDA_LED_ITEM_CLOCKS='$clocks' $PY ncu_driver.py led 64 80 768 cuda &&
        L2D_CUDA_LED_ITEM_CLOCKS='$clocks' $PY ncu_driver.py led 16 9605 256 cuda && $PY item_clocks.py '$clocks' --ghz 1.98 &&
        L2D_CUDA_LED_QUEUE=0 L2D_CUDA_LED_ITEM_CLOCKS='$clocks_turn' $PY ncu_driver.py led 64 80 768 cuda &&
        $PY item_clocks.py '$clocks_turn' --ghz 1.98"
    # One pytest run per file, each writing its JSON as it ends, so a deadline cuts one file, not all.
    rm -rf build/bench && mkdir -p build/bench
    jsons=()
    for part in ${L2D_BENCH_FILES:-led mld step l2d}; do
        step "bench-$part" 300 $PY -m pytest "benchmarks/test_$part.py" -q -rfE -p no:cacheprovider -o addopts="" \
            --benchmark-json="build/bench/$part.json"
        jsons+=("build/bench/$part.json")
    done
    # The report reads what the benchmarks wrote, so it gets 30 s past the deadline that cut them.
    DEADLINE=$((DEADLINE + 30)) step report 30 $PY benchmarks/report.py "${jsons[@]}" \
        --merged "$OUT/bench-$card.json" --out "$OUT"
    # Diagnostics, last: each runs only if the phase has time left. Nsight Compute's view of the
    # other kernels furthest from their targets (COCO's Triton LED Gram and split kernels, MLD at
    # 4096 x 1000), into the log; then where a training step's time goes.
    step ncu 100 bash -c "cd benchmarks && ncu -k 'regex:_gram_kernel|_split_kernel' --launch-skip 5 --launch-count 5 $sections $PY ncu_driver.py led 64 80 768 triton &&
        ncu -k regex:mld_kernel --launch-skip 1 --launch-count 1 $sections $PY ncu_driver.py mld 4096 1000 cuda"
    step step-profile 60 bash -c "cd benchmarks && $PY step_profile.py --out '$OUT/step-profile-$card.md'"
}

bg=""
if [ "$PHASE" = all ]; then
    install_project
    ( LOG="$OUT/beside-build.txt"; step build 300 bash -c build_extension ) > /dev/null &
    build_pid=$!
    triton_cache
    beside preflight-triton preflight triton "${PREFLIGHT_TRITON[@]}"
    # Sanitizers and the CMake build share the GPU with the tests (they time nothing); the benchmarks
    # start only once all of them have ended.
    # H100: memcheck over the full driver on the Triton kernels did not end in 150 s beside the tests
    # (the small set took under 115 s); the CUDA kernels' full memcheck takes about 8 s.
    sanitize_beside triton 150 small
    # torch.compile's forms compiled beside the tests into Inductor's on-disk caches (the timed files
    # then load them: on the CPU the MLD file's first call went from 11.2 to 0.9 s); not OpenImages,
    # whose compiled form needs 22 GiB of the tests' GPU. Four compile workers, not one per core: the
    # tests compile too (the worker count is not part of Inductor's cache key).
    beside warm-bench step warm-bench 240 env L2D_BENCH_WARM_ONLY=1 TORCHINDUCTOR_COMPILE_THREADS=4 \
        $PY -m pytest benchmarks/test_led.py \
        benchmarks/test_mld.py benchmarks/test_l2d.py -k "torch.compile and not openimages" -q -p no:cacheprovider -o addopts=""
    pytest_gpu torch,triton tests-triton "${L2D_TRITON_TEST_LIMIT:-240}"
    wait $build_pid || failed=1
    rm -f "$OUT"/_C*.so  # no later call to carry it to; the returned files are few
    if ls l2d_kernels/_C*.so > /dev/null 2>&1; then
        beside cmake cmake_build
        $PY -c "import l2d_kernels; print('backends here:', l2d_kernels.available_backends())" >> "$OUT/gpu.txt" 2>&1
        beside preflight-cuda preflight cuda "${PREFLIGHT_CUDA[@]}"
        sanitize_beside cuda 80 full
        beside train-quick train_quick 120
        pytest_gpu cuda tests-cuda 100
    fi
    wait_beside
    L2D_PROFILE_LIMIT=${L2D_PROFILE_LIMIT:-75} bench_all
elif [ "$PHASE" = check ]; then
    install_project
    # nvcc in the background (CPU) while the Triton backend is tested on the GPU.
    ( step build 300 bash -c build_extension ) &
    build_pid=$!
    triton_cache
    pytest_gpu torch,triton tests-triton 170
    sanitize triton
    wait $build_pid || failed=1
    if ls l2d_kernels/_C*.so > /dev/null 2>&1; then
        ( cmake_build ) > /dev/null &
        cmake_pid=$!
        $PY -c "import l2d_kernels; print('backends here:', l2d_kernels.available_backends())" >> "$OUT/gpu.txt" 2>&1
        pytest_gpu cuda tests-cuda 100
        sanitize cuda
        train_quick
        wait $cmake_pid || failed=1
    fi
elif [ "$PHASE" = bench ]; then
    install_project
    triton_cache
    if [ -n "${L2D_PREBUILT_C:-}" ] && [ -f "$L2D_PREBUILT_C" ]; then
        place_extension "$L2D_PREBUILT_C" && note "extension: carried in ($L2D_PREBUILT_C)"
    else
        step build 300 bash -c build_extension
    fi
    $PY -c "import l2d_kernels; print('backends here:', l2d_kernels.available_backends())" | tee -a "$OUT/gpu.txt"
    [ -n "${L2D_RETEST:-}" ] && step retest 150 $PY -m pytest $L2D_RETEST -q -rfE -p no:cacheprovider -n 8 -o addopts=""
    [ -n "${L2D_PROBES:-}" ] && step probes 60 bash -c "$L2D_PROBES"
    preflight triton "${PREFLIGHT_TRITON[@]}"
    ls l2d_kernels/_C*.so > /dev/null 2>&1 && preflight cuda "${PREFLIGHT_CUDA[@]}"
    bench_all
    [ -n "${L2D_SANITIZE_AFTER:-}" ] && for b in $L2D_SANITIZE_AFTER; do sanitize "$b"; done
else
    echo "PHASE must be all, check or bench, not $PHASE" >&2
    exit 2
fi
note "total: $((SECONDS - T0)) s"
exit $failed
