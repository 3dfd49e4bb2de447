"""Benchmark harness: the cases, timing and memory.

Timing: pytest-benchmark drives the rounds; on a GPU its timer synchronizes the device before each
reading, so a round covers the launches and the GPU work they queue. A round runs the call back to
back as many times as fill ROUND_S (recorded as ``calls_per_round``), so one synchronization's
latency is spread over many calls (the first H100 run, one call per round, gave MLD at 64 x 80 a
longer median than at 4096 x 1000). Each case is warmed up first
(Triton and torch.compile compile there, never inside the timed rounds). Peak extra memory is the
device's peak allocation during one call, above what was allocated before it.

A case that runs out of memory, or would take longer than TOO_LONG_S per call, is not timed: it is
recorded with its reason (benchmark JSON key ``l2d_unmeasured``) and shown as such in the report.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
TOO_LONG_S = 5.0
# A form named "<form>+graph" is <form> captured in a CUDA graph and replayed: the time without the
# host (Python, autograd, launches), what a user gets by graphing the training step.
GRAPHED = "+graph"
ROUND_S = 0.02
UNMEASURED: list[dict] = []


def synced_timer() -> float:
    if ON_GPU:
        torch.cuda.synchronize()
    return time.perf_counter()


# (name, B, C, D): the shapes of the benchmark issue on a GPU, small stand-ins on a CPU.
GPU_LED_SHAPES = [("voc", 64, 20, 768), ("coco", 64, 80, 768), ("nus-wide", 64, 81, 768),
                  ("coco-b1024", 1024, 80, 768), ("c1000", 32, 1000, 768), ("openimages", 16, 9605, 256)]
GPU_MLD_SHAPES = [("coco", 64, 80), ("c1000", 32, 1000), ("b4096-c1000", 4096, 1000)]
GPU_DTYPES = [torch.float32, torch.bfloat16]
if ON_GPU:
    LED_SHAPES, MLD_SHAPES, DTYPES = GPU_LED_SHAPES, GPU_MLD_SHAPES, GPU_DTYPES
else:
    LED_SHAPES = [("tiny", 8, 20, 32), ("coco-small", 16, 80, 64)]
    MLD_SHAPES = [("coco", 64, 80), ("b256-c300", 256, 300)]
    DTYPES = [torch.float32]


def emit(text: str, out: str | None) -> None:
    """A diagnostic's report: printed, and written to ``out`` when one is given."""
    print(text, end="" if text.endswith("\n") else "\n")
    if out:
        with open(out, "w") as fh:
            fh.write(text)


def led_inputs(B: int, C: int, D: int, dtype: torch.dtype = torch.float32):
    """Student embeddings (requiring grad), teacher embeddings and COCO-row targets, seeded."""
    from l2d_kernels.labels import sample_targets

    g = torch.Generator(device=DEVICE).manual_seed(0)
    es = torch.randn(B, C, D, generator=g, device=DEVICE).to(dtype).requires_grad_()
    et = torch.randn(B, C, D, generator=g, device=DEVICE).to(dtype)
    return es, et, sample_targets(B, C, seed=0, device=DEVICE)


def mld_inputs(B: int, C: int, dtype: torch.dtype = torch.float32):
    """Student logits (requiring grad) and teacher logits, seeded, spread over about +-9."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    zs = (torch.randn(B, C, generator=g, device=DEVICE) * 3).to(dtype).requires_grad_()
    zt = (torch.randn(B, C, generator=g, device=DEVICE) * 3).to(dtype)
    return zs, zt


# L2D_BENCH=quick (the GPU check script's set, sized for a short lease) keeps every fused case in
# float32 (graph replays: forward + backward only) and the baselines where the specification's
# anchors were measured; "full" runs all.
BENCH_SET = os.environ.get("L2D_BENCH", "full")
# L2D_BENCH_WARM_ONLY=1: each selected case makes its first call and ends, timing nothing: run
# beside the GPU check's test suites, it leaves torch.compile's and Triton's compiled kernels in
# their on-disk caches, where the timed benchmark files then find them.
WARM_ONLY = os.environ.get("L2D_BENCH_WARM_ONLY", "0") == "1"
_QUICK_BASELINE_SHAPES = {"coco", "c1000", "openimages", "b4096-c1000"}


def selected(form: str, shape: str, dtype: torch.dtype | None, pass_: str) -> bool:
    if BENCH_SET != "quick" or pass_ == "train step":
        return True
    if form.endswith(GRAPHED):
        return dtype == torch.float32 and pass_ == "fwd+bwd"
    if form.startswith("fused-"):
        return dtype == torch.float32 or shape in ("coco", "c1000")
    if dtype != torch.float32 or pass_ != "fwd+bwd":
        return False
    if form == "torch.compile":
        return shape in ("coco", "c1000", "openimages", "b4096-c1000")
    return shape in _QUICK_BASELINE_SHAPES


def copy_bandwidth_tbps() -> float | None:
    """Device-to-device copy bandwidth, bytes read plus written per second (TB/s), measured once."""
    if not ON_GPU:
        return None
    if not hasattr(copy_bandwidth_tbps, "value"):
        src = torch.empty(1 << 28, dtype=torch.float32, device=DEVICE)  # 1 GiB
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3 / 10
        copy_bandwidth_tbps.value = 2 * src.numel() * src.element_size() / seconds / 1e12
        del src, dst
    return copy_bandwidth_tbps.value


def floor_us(bytes_moved: int) -> float | None:
    bw = copy_bandwidth_tbps()
    return None if bw is None else bytes_moved / (bw * 1e12) * 1e6


def peak_extra_mib(fn) -> float | None:
    """Peak device memory allocated during one call of ``fn``, above what was allocated before."""
    if not ON_GPU:
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def cuda_graphed(fn):
    """``fn`` captured in a CUDA graph (warmed up on a side stream first); returns the graph's replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def run_case(benchmark, request, fn, info: dict, rounds: int = 20, setup=None):
    """Warm up, measure memory, then time ``fn``; record an out-of-memory or too-slow case instead.
    For a ``+graph`` form, memory is that of an eager call (the graph holds the same buffers) and the
    timed call is a replay. ``setup``, if given, runs untimed before every round (one call per round
    then): the training step uses it to time a baseline step right before each measured one."""
    if not selected(info["form"], info["shape"], _dtype(info["dtype"]), info["pass_"]):
        pytest.skip(f"not in the {BENCH_SET!r} benchmark set")
    if WARM_ONLY:
        fn()
        return
    benchmark.extra_info.update(info)
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if ON_GPU else "CPU", torch=torch.__version__)
    try:
        start = synced_timer()
        fn()
        first_s = synced_timer() - start
        start = synced_timer()
        fn()
        second_s = synced_timer() - start
        if second_s > TOO_LONG_S:
            return _unmeasured(request, info, f"too long: {second_s:.1f} s per call")
        benchmark.extra_info["peak_extra_mib"] = peak_extra_mib(fn)
        benchmark.extra_info["first_call_s"] = first_s
        if info["form"].endswith(GRAPHED):
            fn = cuda_graphed(fn)
            start = synced_timer()
            fn()
            second_s = synced_timer() - start
    except torch.cuda.OutOfMemoryError:
        return _unmeasured(request, info, "out of memory")
    per_call = max(second_s, 1e-6)
    # Calls back to back within a round, one device synchronization per round: a round lasts at least
    # ROUND_S, so the synchronization's own latency (hundreds of microseconds on a virtual machine's
    # GPU) does not enter a short call's median; pytest-benchmark reports time per call.
    iterations = 1 if setup else max(1, min(1000, int(ROUND_S / per_call)))
    benchmark.extra_info["calls_per_round"] = iterations
    if not setup:
        rounds = max(3, min(rounds, int(2.0 / (per_call * iterations))))
    benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=1, setup=setup)


def paired_losses_s(form_times: list[float], baseline_times: list[float]) -> tuple[float, float]:
    """(median over the pairs of form - baseline, median baseline) for rounds each preceded by one
    baseline step: the last len(form_times) baselines pair with the rounds (any earlier ones preceded
    warm-up rounds). A drift over minutes moves both members of a pair alike and cancels."""
    if not form_times or len(baseline_times) < len(form_times):
        raise ValueError(f"{len(form_times)} rounds need as many baselines, got {len(baseline_times)}")
    baseline = baseline_times[len(baseline_times) - len(form_times):]
    return (statistics.median(f - b for f, b in zip(form_times, baseline)), statistics.median(baseline))


def _dtype(name: str) -> torch.dtype | None:
    return getattr(torch, name.removeprefix("torch."), None)


def _unmeasured(request, info, reason):
    if ON_GPU:
        torch.cuda.empty_cache()
    UNMEASURED.append(dict(info, name=request.node.name, status=reason))
    pytest.skip(reason)
