"""The host cost of a fused call, without its kernels: what the Python path adds to every call.

    python benchmarks/host_overhead.py [--calls 1000] [--out FILE] [--launchers]

Runs on the CPU: the Triton backend is selected through its interpreter switch, and its launchers
(``mld_forward``, ``led_forward``) are replaced by stubs that only allocate the outputs, so what is
timed is everything else a call does: input checks, backend choice, autograd and dispatch, the
backward (the calls without gradient, under ``torch.no_grad()``, have neither of the last two). On
a GPU the same path runs before every launch; where kernels take a few microseconds (MLD at 64 x
80) it is the call's cost. Prints microseconds per call, the fastest of five batches of calls. The
last case, ``L2DLoss`` forward and backward, also computes its BCE and the weighted sum on the CPU:
it compares versions of the module, not a host path alone.

With ``--launchers`` it times the Triton launchers themselves at COCO's 64 x 80 (a narrow width: the
host path does not depend on it; the LED width-split path, which realistic widths take, with
narrower slices): everything they do on the host, Triton's per-launch argument
binding and kernel lookup included, with Triton's launch replaced just before the driver call.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from unittest import mock

# The stubbed calls select the Triton backend on CPU tensors through the interpreter; --launchers
# needs Triton's compiled launch path (which it replaces before the driver call).
os.environ.setdefault("TRITON_INTERPRET", "0" if "--launchers" in sys.argv else "1")

import torch  # noqa: E402

from harness import emit  # noqa: E402
from l2d_kernels import L2DLoss, fused_led, fused_mld  # noqa: E402
from l2d_kernels.ops import library, triton_common, triton_led, triton_mld  # noqa: E402


def _grad_stub(x, with_grad):  # what the launchers allocate (library.grad_dtype: float32 for float16)
    dtype = library.grad_dtype(x.dtype)
    return torch.empty_like(x, dtype=dtype) if with_grad else x.new_empty(0, dtype=dtype)


def _stub_launchers() -> None:
    triton_mld.mld_forward = lambda zs, zt, reduction, eps, t, with_grad=True: (
        zs.new_zeros((), dtype=torch.float32), _grad_stub(zs, with_grad))
    triton_led.led_forward = lambda es, et, y, lambda_cd, lambda_id, with_grad=True: (
        es.new_zeros(3, dtype=torch.float32), _grad_stub(es, with_grad), es.new_zeros((), dtype=torch.float32))
    triton_led.led_scale = lambda grad, targets, grad_output: None  # the backward's launcher


def _bind_only_launches() -> None:
    """Replace Triton's launch by what its Python side does before the driver call: bind and
    specialize the arguments and look up the compiled kernel by its cache key (for an sm_90 target),
    which is a stand-in whose launch does nothing. What is timed is then the launchers' own host path
    plus Triton's per-launch Python work; with the launchers' direct launches (``LaunchCache``), a
    key's later calls skip the binding and call the stand-in's launch."""
    from triton.runtime import jit
    from triton.runtime.driver import driver

    from triton_cache import TritonBinding, _StandInDriver, stand_in_kernel

    bind = TritonBinding(90)
    kernels = {}

    def run(self, *args, grid, warmup, **kwargs):
        _, key = bind(self, args, kwargs)
        kernel = kernels.get((self, key))
        return kernel if kernel is not None else kernels.setdefault((self, key), stand_in_kernel())

    jit.JITFunction.run = run
    driver.set_active(_StandInDriver(90))  # the current device and stream, as the direct launches ask


def _us_per_call(fn, calls: int, repeats: int = 5) -> float:
    """The fastest of ``repeats`` batches of ``calls`` (noise on a shared machine only adds time)."""
    for _ in range(calls // 10):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return 1e6 * best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="calls per batch (the fastest of 5 batches counts)")
    parser.add_argument("--out")
    parser.add_argument("--launchers", action="store_true",
                        help="time the Triton launchers themselves, with Triton's argument binding but no driver call")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.launchers:
        return _launchers(args)
    _stub_launchers()
    zs, zt = torch.randn(64, 80, requires_grad=True), torch.randn(64, 80)
    es, et = torch.randn(64, 80, 8, requires_grad=True), torch.randn(64, 80, 8)
    y = torch.rand(64, 80) < 0.1
    loss_module = L2DLoss(backend="triton")
    cases = {
        "fused_mld forward + autograd.grad": lambda: torch.autograd.grad(fused_mld(zs, zt, backend="triton"), zs),
        "fused_mld forward": lambda: fused_mld(zs, zt, backend="triton"),
        "fused_led forward + autograd.grad": lambda: torch.autograd.grad(fused_led(es, et, y, backend="triton"), es),
        "fused_mld forward under no_grad": lambda: _no_grad(fused_mld, zs, zt, backend="triton"),
        "fused_led forward under no_grad": lambda: _no_grad(fused_led, es, et, y, backend="triton"),
        "L2DLoss forward + backward (paper defaults)": lambda: _l2d_step(loss_module, zs, zt, es, et, y),
    }
    lines = [f"{name}: {_us_per_call(fn, args.calls):.1f} us" for name, fn in cases.items()]
    text = f"host path per call, launchers stubbed (torch {torch.__version__}, one CPU thread)\n" + "\n".join(lines) + "\n"
    emit(text, args.out)
    return 0


def _l2d_step(loss_module, zs, zt, es, et, y):
    """The whole objective's forward and backward, as a training step runs it (BCE on the CPU here)."""
    loss_module(zs, zt, es, et, y).backward()


def _no_grad(fn, *args, **kwargs):
    with torch.no_grad():
        return fn(*args, **kwargs)


def _split(led_forward, es, et, y):
    """``led_forward`` on the width-split path (plan, Grams, the split launches, the last of them adding
    the losses), as at realistic widths, on the narrow test width: slices of 4 widths."""
    with mock.patch.object(triton_led, "SLICE_WIDTH", 4):
        return led_forward(es, et, y, 100.0, 1000.0)


def _launchers(args) -> int:
    import triton

    _bind_only_launches()
    zs, zt = torch.randn(64, 80), torch.randn(64, 80)
    es, et = torch.randn(64, 80, 8), torch.randn(64, 80, 8)
    y = torch.rand(64, 80) < 0.1
    g_out = torch.ones(())
    cases = {
        "mld_forward 64 x 80": lambda: triton_mld.mld_forward(zs, zt, "batchmean", 1e-8, 1.0),
        "led_forward 64 x 80 (x 8)": lambda: triton_led.led_forward(es, et, y, 100.0, 1000.0),
        "led_forward 64 x 80 (x 8), width split (2 slices)": lambda: _split(triton_led.led_forward, es, et, y),
        "led_scale 64 x 80 (x 8)": lambda: triton_led.led_scale(es, y, g_out),
    }
    lines = []
    for name, fn in cases.items():
        times = {}
        for direct in (False, True):
            with mock.patch.object(triton_common, "DIRECT_LAUNCH", direct):
                times[direct] = _us_per_call(fn, args.calls)
        lines.append(f"{name}: {times[False]:.1f} us through Triton's launch, {times[True]:.1f} us launched directly")
    text = (f"Triton launchers per call, argument binding but no driver call (torch {torch.__version__}, "
            f"Triton {triton.__version__}, one CPU thread)\n" + "\n".join(lines) + "\n")
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
