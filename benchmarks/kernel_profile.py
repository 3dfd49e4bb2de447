"""Where a fused call's time goes: device time per kernel, host time per call, and the gap between.

    python benchmarks/kernel_profile.py [--backends cuda,triton] [--calls 50] [--out FILE.md]

For each backend and case (LED and MLD, forward + backward, float32 at the issue's shapes; small
shapes on a machine without a GPU: the benchmark suite's), it runs ``--calls`` calls back to back under
``torch.profiler`` and reports, per call:

- ``wall``: elapsed time of the calls divided by their number (one synchronization at the end);
- ``host``: the time the Python thread spent issuing one call (launch overhead, input checks);
- ``device``: the sum of the device time of every kernel the call ran;
- ``busy``: the time during which at least one of them ran (the union of their intervals). It equals
  ``device`` when the kernels run one after another; it is less when a launch may start before the
  previous one ends (the CUDA LED's early launches: such a kernel's time includes its wait for the
  previous one, counted twice in ``device``);
- one row per kernel: its name, launches per call and mean device time (for a kernel launched
  several times per call, also the mean of each launch in order, e.g. Triton LED's CD and ID
  launches of one kernel).

``wall`` close to ``device`` means the kernels are the cost; ``wall`` close to ``host`` with
``device`` well below it means the launch path is. Targets from real COCO label rows.

``--triton-led-warps 4,16`` adds rows for the Triton LED kernels launched with those warp counts
(backend ``triton/wN``), to see whether the default (``triton_led.NUM_WARPS``) is the right one.
``--triton-led-no-ahead`` adds Triton LED rows with ``triton_led.LOAD_AHEAD`` off (backend
``triton/no-ahead``: each width chunk loaded when it is used, as in the first H100 runs).
``--triton-led-slices 0,32,128`` adds Triton LED rows with ``triton_led.SLICE_WIDTH`` set to each
(backend ``triton/sliceN``; 0 keeps every group whole in one program, as before the width split).
``--triton-led-set NAME=V1,V2`` (repeatable) adds Triton LED rows with the integer setting
``triton_led.NAME`` set to each value (backend ``triton/NAME=V``), e.g. ``GRAM_D=16,32``; several
assignments in one argument, space-separated (``"GRAM_D=16 GRAM_WARPS=4"``), make one variant with
all of them. ``--variant-shapes`` limits every variant's rows to the shapes named (each variant
compiles its own kernels: at every shape, a short run would end before the variants).
``--no-grad`` adds LED rows of each backend's call without gradient (backend ``NAME/no-grad``: the
forward under ``torch.no_grad()``, no gradient written), at the variant shapes. ``--bf16`` adds LED
rows of each backend with bfloat16 embeddings (backend ``NAME/bf16``), as a training step under
autocast gives them, at the variant shapes.
``--cuda-led-env NAME=V1,V2`` (repeatable) adds CUDA LED rows with the extension's environment
setting ``L2D_CUDA_LED_NAME`` set to each value (read at every call; backend ``cuda/NAME=V``), e.g.
``QUEUE=0`` (the slice launches' items dealt out in turn), ``EARLY_LAUNCH=0`` (no launch starts
before the previous one ends) or ``SLICE_WIDTH=64``; space-separated
assignments make one variant, as for ``--triton-led-set``. At the variant shapes.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import time
import typing
from unittest import mock

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from harness import DEVICE, LED_SHAPES, MLD_SHAPES, led_inputs, mld_inputs
from l2d_kernels import available_backends, fused_led, fused_mld

# The benchmark suite's shapes (the on a GPU, small stand-ins on a CPU), less VOC and
# NUS-WIDE, whose groups are COCO's sizes.
CASES = [("led", shape[1:]) for shape in LED_SHAPES if shape[0] not in ("voc", "nus-wide")] + [
    ("mld", shape[1:]) for shape in MLD_SHAPES]


def _case(loss: str, shape, backend: str, dtype: torch.dtype = torch.float32):
    if loss == "led":
        es, et, y = led_inputs(*shape, dtype=dtype)
        if not torch.is_grad_enabled():  # the --no-grad rows: the forward alone, without gradient
            return lambda: fused_led(es, et, y, backend=backend)
        return lambda: torch.autograd.grad(fused_led(es, et, y, backend=backend), es)
    zs, zt = mld_inputs(*shape)
    # As in the benchmarks, the gradient is returned, not accumulated into .grad (no extra add kernel).
    return lambda: torch.autograd.grad(fused_mld(zs, zt, backend=backend), zs)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def busy_time(intervals) -> float:
    """The length of the union of (start, end) intervals: the time during which at least one ran."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def profile_case(fn, device: str, calls: int) -> dict:
    for _ in range(3):  # compile, autotune, allocator warm-up
        fn()
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    host = 0.0
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            issued = time.perf_counter()
            fn()
            host += time.perf_counter() - issued
        _sync(device)
        wall = time.perf_counter() - start
    launches = collections.defaultdict(list)  # kernel name -> device time of each launch, in launch order
    events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    for event in sorted(events, key=lambda e: e.time_range.start):
        launches[event.name].append(event.device_time)
    rows = []
    for name, times in launches.items():
        per_call = len(times) // calls
        # A kernel launched k times per call (Triton's LED kernel: once per family) gets the mean of
        # each of its k launches, so that the CD and ID launches are told apart.
        slots = [sum(times[j::per_call]) / len(times[j::per_call]) for j in range(per_call)] if per_call > 1 else []
        rows.append((name, len(times) / calls, sum(times) / len(times), slots))
    rows.sort(key=lambda r: -r[1] * r[2])
    busy = busy_time((e.time_range.start, e.time_range.end) for e in events)
    return dict(wall_us=1e6 * wall / calls, host_us=1e6 * host / calls,
                device_us=sum(r[1] * r[2] for r in rows), busy_us=busy / calls, kernels=rows)


def _per_call_us(fn, device: str, calls: int) -> float:
    for _ in range(max(1, calls // 20)):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return 1e6 * (time.perf_counter() - start) / calls


def _empty_kernel():
    """A Triton kernel that does nothing. Triton resolves the names in a kernel's annotations (``tl``)
    among its module's globals, so the kernel and that import live at module level, not in a function."""
    global tl
    import triton
    import triton.language as tl

    @triton.jit
    def _empty(p0, p1, p2, p3, p4, p5, i0, i1, i2, i3, i4, i5, i6, i7, i8, i9, i10, i11, f0,
               A: tl.constexpr, B: tl.constexpr):
        pass

    return _empty


def launch_costs(device: str = "cuda", calls: int = 2000) -> str:
    """What one launch costs the host, against which the fused calls' host time reads: a Triton
    kernel that does nothing, with as many arguments as the LED kernel takes, and one PyTorch
    elementwise op; and the floor of any loss called with autograd as the benchmarks call it: one
    PyTorch op's forward and ``autograd.grad`` (on a GPU its backward runs on autograd's device
    thread, a hand-off each way). Back to back with one synchronization, so each is max(host,
    device) per call."""
    _empty = _empty_kernel()
    x = torch.zeros(64, device=device)
    ints = list(range(1, 13))
    empty = _per_call_us(lambda: _empty[(1,)](x, x, x, x, x, x, *ints, 0.5, A=True, B=False), device, calls)
    torch_op = _per_call_us(lambda: x.mul_(1.0), device, calls)
    w = torch.zeros(64, 80, device=device, requires_grad=True)
    autograd_op = _per_call_us(lambda: torch.autograd.grad(w.mul(2.0).sum(), w), device, calls)
    line = (f"Host cost of one launch: an empty Triton kernel with 19 arguments {empty:.1f} us; "
            f"one PyTorch elementwise op {torch_op:.1f} us; an autograd call of one (forward of two ops "
            f"and autograd.grad) {autograd_op:.1f} us.")
    if device == "cuda":
        try:  # a measurement run only on a GPU: its failure must not cost the profile
            line += " " + _launcher_pointer_costs(_empty, x, ints, calls)
        except Exception as error:  # noqa: BLE001
            line += f" (The direct launch with integer pointers failed: {error!r}.)"
    return line + "\n"


def _launcher_pointer_costs(kernel, x, ints, calls: int) -> str:
    """The empty kernel launched directly (``triton_common.LaunchCache``: the kernel's own launcher,
    no binding) with its six pointers as tensors, then handed on as integers (``INT_POINTERS``). For
    each tensor Triton's launcher calls ``data_ptr()`` and the driver's ``cuPointerGetAttribute``; an
    integer it takes as it is."""
    from l2d_kernels.ops import triton_common

    cache = triton_common.LaunchCache()

    def launch():
        run = cache.call("empty", x.device.index)
        run(kernel, (1,), x, x, x, x, x, x, *ints, 0.5, A=True, B=False)
        run.done()

    launch()  # records the key: the later calls launch directly
    times = {}
    for as_ints in (False, True):
        with mock.patch.object(triton_common, "INT_POINTERS", as_ints):
            times[as_ints] = _per_call_us(launch, "cuda", calls)
    return (f"Launched directly, its six pointers as tensors {times[False]:.1f} us, as integers {times[True]:.1f} us "
            f"(the launcher's data_ptr() and cuPointerGetAttribute per tensor).")


def direct_launch_costs(device: str = "cuda", calls: int = 500, shape=(64, 80, 128)) -> str:
    """The Triton launchers' host time per call: through Triton's launch; launched directly
    (``triton_common.LaunchCache``) launch by launch, with the tensors handed to the launchers as they
    are and as integers (``INT_POINTERS``); and the whole call replayed (``CALL_REPLAY``, the
    default). The LED forward at COCO's batch and labels on a narrow width (the width-split path's six
    launches, little device time), and MLD at 64 x 80. Back to back with one synchronization, as
    ``launch_costs``."""
    from l2d_kernels.labels import sample_targets
    from l2d_kernels.ops import triton_common, triton_led, triton_mld

    B, C, D = shape
    es, et = (torch.randn(B, C, D, device=device) for _ in range(2))
    y = sample_targets(B, C, seed=0, device=device)
    zs, zt = (torch.randn(64, 80, device=device) for _ in range(2))
    cases = {f"LED forward {B} x {C} x {D}": lambda: triton_led.led_forward(es, et, y, 100.0, 1000.0),
             "MLD forward 64 x 80": lambda: triton_mld.mld_forward(zs, zt, "batchmean", 1e-8, 1.0)}
    ways = {"through Triton's launch": (False, False, False),
            "launched directly launch by launch": (True, False, False),
            "with integer pointers": (True, True, False), "the whole call replayed": (True, False, True)}
    parts = []
    for name, fn in cases.items():
        times = []
        for way, (direct, ints, whole) in ways.items():
            with mock.patch.object(triton_common, "DIRECT_LAUNCH", direct), \
                    mock.patch.object(triton_common, "INT_POINTERS", ints), \
                    mock.patch.object(triton_common, "CALL_REPLAY", whole):
                times.append(f"{_per_call_us(fn, device, calls):.1f} us {way}")
        parts.append(f"{name} " + ", ".join(times))
    return "Triton launchers' host time per call: " + "; ".join(parts) + ".\n"


def objective_costs(backends, device: str = "cuda", calls: int = 200, shape=(64, 80, 768)) -> str:
    """``L2DLoss`` (the paper's weights) forward and backward per fused backend, with the training
    step's inputs (bfloat16 logits and embeddings, as autocast gives them; COCO's label rows), calls
    back to back with one synchronization: what the losses cost a host-bound training step, without
    the step's round-to-round drift (its benchmark reads the losses as a difference of two steps of
    about 46 ms). The student's leaves are fresh each call, as a step's are."""
    from l2d_kernels import L2DLoss
    from l2d_kernels.labels import sample_targets

    B, C, D = shape
    g = torch.Generator(device=device).manual_seed(0)
    zs, zt = (torch.randn(B, C, generator=g, device=device).bfloat16() for _ in range(2))
    es, et = (torch.randn(B, C, D, generator=g, device=device).bfloat16() for _ in range(2))
    y = sample_targets(B, C, seed=0, device=device)
    parts = []
    for backend in backends:
        loss = L2DLoss(backend=backend)

        def call(loss=loss):
            z, e = zs.detach().requires_grad_(), es.detach().requires_grad_()
            loss(z, zt, e, et, y).backward()

        parts.append(f"{backend} {_per_call_us(call, device, calls):.1f} us")
    return (f"L2DLoss forward + backward at {B} x {C} x {D}, bfloat16 inputs as in the training step, per call: "
            + ", ".join(parts) + ".\n")


def _triton_led_setting(name: str, value):
    """The Triton LED kernels with one of their module settings changed (NUM_WARPS, LOAD_AHEAD,
    SLICE_WIDTH, GRAM_D, ...: each is read at every launch), restored on exit; a name the module does
    not have is refused (AttributeError), not silently added."""
    from l2d_kernels.ops import triton_led

    return mock.patch.object(triton_led, name, value)


def _variants(setting: str) -> list:
    """``NAME=V1,V2`` -> one variant per value; ``"A=1 B=2"`` -> one variant with both settings."""
    parts = setting.split()
    if len(parts) > 1:
        return [[(name, int(v)) for name, v in (p.split("=", 1) for p in parts)]]
    name, values = setting.split("=", 1)
    return [[(name, int(v))] for v in values.split(",") if v]


@contextlib.contextmanager
def _triton_led_settings(assignments):
    with contextlib.ExitStack() as stack:
        for name, value in assignments:
            stack.enter_context(_triton_led_setting(name, value))
        yield


def _cuda_led_env(assignments):
    """The CUDA extension's LED settings ``L2D_CUDA_LED_<NAME>`` set in the environment (the operator
    reads them at every call), restored on exit."""
    return mock.patch.dict(os.environ, {f"L2D_CUDA_LED_{name}": str(value) for name, value in assignments})


def _kernel_cell(name: str, n: float, mean_us: float, slots=()) -> str:
    cell = f"{name[:48]} {n:g}x{mean_us:.1f}"
    return cell + (f" ({' + '.join(f'{t:.1f}' for t in slots)})" if slots else "")


def report(results: list) -> str:
    lines = ["| backend | loss | shape | wall us/call | host us/call | device us/call | busy us/call "
             "| kernels (launches/call x mean us, each launch in parentheses) |",
             "|---|---|---|---|---|---|---|---|"]
    for backend, loss, shape, r in results:
        detail = "; ".join(_kernel_cell(*row) for row in r["kernels"]) or "-"
        lines.append(f"| {backend} | {loss} | {' x '.join(map(str, shape))} | {r['wall_us']:.1f} | {r['host_us']:.1f} | "
                     f"{r['device_us']:.1f} | {r['busy_us']:.1f} | {detail} |")
    return "\n".join(lines) + "\n"


class _Run(typing.NamedTuple):
    """Rows of the profile: their label, backend, cases, the context they run in (a variant's
    settings) and the LED inputs' dtype."""

    label: str
    backend: str
    cases: list
    variant: typing.Callable
    dtype: torch.dtype = torch.float32


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", help="comma-separated (default: the fused backends here, else torch)")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--out", help="also write the markdown table to this file")
    parser.add_argument("--triton-led-warps", default="",
                        help="comma-separated warp counts: extra Triton LED rows launched with each")
    parser.add_argument("--triton-led-no-ahead", action="store_true",
                        help="extra Triton LED rows with each width chunk loaded when it is used (LOAD_AHEAD off)")
    parser.add_argument("--triton-led-slices", default="",
                        help="comma-separated slice widths: extra Triton LED rows with each (0: whole groups)")
    parser.add_argument("--triton-led-set", action="append", default=[], metavar="NAME=V1,V2",
                        help="extra Triton LED rows with the integer setting triton_led.NAME at each value")
    parser.add_argument("--variant-shapes", default="",
                        help="comma-separated shapes (BxCxD) for the variant rows only (default: as --shapes)")
    parser.add_argument("--cuda-led-env", action="append", default=[], metavar="NAME=V1,V2",
                        help="extra CUDA LED rows with the environment setting L2D_CUDA_LED_NAME at each value")
    parser.add_argument("--no-grad", action="store_true",
                        help="extra LED rows of each backend's call without gradient (under torch.no_grad)")
    parser.add_argument("--bf16", action="store_true",
                        help="extra LED rows of each backend with bfloat16 embeddings (the training step's)")
    parser.add_argument("--losses", default="led,mld", help="comma-separated: which losses' cases to profile")
    parser.add_argument("--shapes", default="",
                        help="comma-separated shapes to keep, as BxC or BxCxD (default: every case)")
    args = parser.parse_args(argv)
    device = DEVICE.type
    shapes = {tuple(map(int, s.split("x"))) for s in args.shapes.split(",") if s}
    cases = [(loss, shape) for loss, shape in CASES
             if loss in args.losses.split(",") and (not shapes or tuple(shape) in shapes)]
    if args.backends:
        backends = args.backends.split(",")
    else:
        backends = [b for b in ("cuda", "triton") if device == "cuda" and b in available_backends()] or ["torch"]
    led_cases = [c for c in cases if c[0] == "led"]
    variant_shapes = {tuple(map(int, s.split("x"))) for s in args.variant_shapes.split(",") if s}
    if variant_shapes:
        led_cases = [c for c in led_cases if tuple(c[1]) in variant_shapes]
    runs = []
    for backend in backends:  # each backend's variants right after it: a run cut short keeps the pairs
        runs.append(_Run(backend, backend, cases, contextlib.nullcontext))
        if args.no_grad:
            runs.append(_Run(f"{backend}/no-grad", backend, led_cases, torch.no_grad))
        if args.bf16:
            runs.append(_Run(f"{backend}/bf16", backend, led_cases, contextlib.nullcontext, torch.bfloat16))
        if backend == "cuda":
            for setting in args.cuda_led_env:
                for assignments in _variants(setting):
                    label = "cuda/" + " ".join(f"{name}={v}" for name, v in assignments)
                    runs.append(_Run(label, "cuda", led_cases, lambda a=assignments: _cuda_led_env(a)))
        if backend == "triton" and args.triton_led_no_ahead:
            runs.append(_Run("triton/no-ahead", "triton", led_cases, lambda: _triton_led_setting("LOAD_AHEAD", False)))
        if backend == "triton":
            runs += [_Run(f"triton/slice{w}", "triton", led_cases,
                          lambda w=int(w): _triton_led_setting("SLICE_WIDTH", w))
                     for w in args.triton_led_slices.split(",") if w]
            runs += [_Run(f"triton/w{w}", "triton", led_cases, lambda w=int(w): _triton_led_setting("NUM_WARPS", w))
                     for w in args.triton_led_warps.split(",") if w]
            for setting in args.triton_led_set:
                for assignments in _variants(setting):
                    label = "triton/" + " ".join(f"{name}={v}" for name, v in assignments)
                    runs.append(_Run(label, "triton", led_cases, lambda a=assignments: _triton_led_settings(a)))
    title = f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n\n" if device == "cuda" else ""
    if device == "cuda" and "triton" in backends:
        title += launch_costs(device) + direct_launch_costs(device)
    if device == "cuda":
        try:  # a measurement beside the profile: its failure must not cost the rest
            title += objective_costs([b for b in backends if b in ("cuda", "triton")], device) + "\n"
        except Exception as error:  # noqa: BLE001
            title += f"(L2DLoss costs failed: {error!r}.)\n\n"
    results = []
    for label, backend, cases, variant, dtype in runs:
        with variant():
            for loss, shape in cases:
                try:
                    fn = _case(loss, shape, backend, dtype)
                    results.append((label, loss, shape, profile_case(fn, device, args.calls)))
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    print(f"{label} {loss} {shape}: out of memory", file=sys.stderr)
                if args.out:  # after every case, so that a run cut short keeps what it measured
                    with open(args.out, "w") as fh:
                        fh.write(title + report(results))
    print(title + report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
