"""Before the GPU check times anything: do a fused backend's default paths give the reference's
results on this GPU, call after call, and the same results with its launches in order?

    python benchmarks/preflight.py BACKEND

Each case (``CASES``: LED at COCO in float32 and bfloat16, at a batch of 1024, at 1,000 and at
9,605 labels; MLD at 64 x 80 and 4096 x 1000; without a GPU, ``CPU_CASES``) is called three times,
forward and backward:

- the first call's loss and gradient within the specification's tolerance of the eager reference,
  computed in float64 on the CPU from the same inputs (1e-4 relative in float32; in bfloat16 the
  tests' bound for a half-precision result where eager's own error is not at hand, 1.6e-2);
- the second and third calls bitwise equal to the first (on the Triton backend, a shape's later
  calls are replayed whole: README, "Backends");
- LED once more with its launches in order (no early launches: ``L2D_CUDA_LED_EARLY_LAUNCH=0``,
  ``triton_led.EARLY_LAUNCH`` off), bitwise equal to the first call.

Prints a line per case (``FAILED ...`` for one that fails) and exits 0 when every case agrees, 1 at
the first that does not or that raises: a kernel fault leaves the process's CUDA context unusable,
so the GPU check tries its next configuration (the same checks with early launches off, then the
whole-call replay off, ...) in a new process, and its timed steps take the first configuration that
agreed (``gpu_check.sh``, ``preflight``). The test suites keep testing the defaults, and report
what failed there.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys
import time
import traceback

import torch

from harness import DEVICE, ON_GPU, led_inputs, mld_inputs
from l2d_kernels import fused_led, fused_mld, reference
from l2d_kernels.ops import triton_led

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from helpers import HALF_FALLBACK_TOL, rel_err  # noqa: E402  (the tests' error measure and bound)

F32, BF16 = torch.float32, torch.bfloat16
# (loss, shape, dtype). Every LED shape is one of the benchmarks' (the Triton cache holds their
# kernels, and those of their launches in order: triton_cache.py).
CASES = [("led", (64, 80, 768), F32), ("led", (64, 80, 768), BF16), ("led", (1024, 80, 768), F32),
         ("led", (32, 1000, 768), F32), ("led", (16, 9605, 256), F32), ("mld", (64, 80), F32),
         ("mld", (4096, 1000), F32)]
# Without a GPU (the interpreter, the emulator): a width of one slice, and one split into three.
CPU_CASES = [("led", (8, 20, 32), F32), ("led", (8, 20, 160), F32), ("mld", (64, 80), F32)]
# Relative error allowed against the float64 reference: SPEC 5's in float32, the tests' bound in bfloat16.
TOLERANCE = {F32: 1e-4, BF16: HALF_FALLBACK_TOL[BF16]}
CUDA_EARLY_LAUNCH_ENV = "L2D_CUDA_LED_EARLY_LAUNCH"


@contextlib.contextmanager
def launches_in_order():
    """LED's launches each waiting for the previous one to end, on either fused backend."""
    saved_flag, saved_env = triton_led.EARLY_LAUNCH, os.environ.get(CUDA_EARLY_LAUNCH_ENV)
    triton_led.EARLY_LAUNCH = False
    os.environ[CUDA_EARLY_LAUNCH_ENV] = "0"  # read by the extension at every call
    try:
        yield
    finally:
        triton_led.EARLY_LAUNCH = saved_flag
        if saved_env is None:
            del os.environ[CUDA_EARLY_LAUNCH_ENV]
        else:
            os.environ[CUDA_EARLY_LAUNCH_ENV] = saved_env


def _inputs(loss: str, shape: tuple, dtype: torch.dtype) -> tuple:
    return led_inputs(*shape, dtype=dtype) if loss == "led" else mld_inputs(*shape, dtype=dtype)


def _value_and_grad(fn, inputs: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(fn(*inputs), its gradient with respect to the student, inputs[0]), both detached."""
    out = fn(*inputs)
    (grad,) = torch.autograd.grad(out, inputs[0])
    return out.detach(), grad


def _call(loss: str, backend: str, inputs: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    fused = fused_led if loss == "led" else fused_mld
    return _value_and_grad(lambda *x: fused(*x, backend=backend), inputs)


def _reference(loss: str, inputs: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager reference (the per-size-class form of LED) in float64 on the CPU, from the same
    (rounded) inputs and with the API's defaults."""
    student = inputs[0].detach().cpu().double().requires_grad_()
    rest = [x.detach().cpu().double() if x.is_floating_point() else x.cpu() for x in inputs[1:]]
    return _value_and_grad(reference.led_grouped if loss == "led" else reference.mld, (student, *rest))


def _same(a: tuple, b: tuple) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def check_case(loss: str, shape: tuple, dtype: torch.dtype, backend: str) -> tuple[bool, str]:
    """One case's checks: (all passed, a line saying what was found)."""
    inputs = _inputs(loss, shape, dtype)
    start = time.perf_counter()
    first = _call(loss, backend, inputs)
    repeats = [_call(loss, backend, inputs) for _ in range(2)]
    bitwise = {"repeated calls": all(_same(first, r) for r in repeats)}
    if loss == "led":
        with launches_in_order():
            bitwise["launches in order"] = _same(first, _call(loss, backend, inputs))
    seconds = time.perf_counter() - start
    expected = _reference(loss, inputs)
    loss_err, grad_err = rel_err(first[0], expected[0]), rel_err(first[1], expected[1])
    finite = all(bool(torch.isfinite(t).all()) for t in first)
    found = {"reference": finite and max(loss_err, grad_err) <= TOLERANCE[dtype], **bitwise}
    line = (f"{loss} {' x '.join(map(str, shape))} {str(dtype)[6:]}: loss {loss_err:.1e}, gradient "
            f"{grad_err:.1e} from the float64 reference (at most {TOLERANCE[dtype]:.0e}"
            f"{'' if finite else '; NOT FINITE'}); "
            + "; ".join(f"{what} {'bitwise equal' if ok else 'DIFFER'}" for what, ok in bitwise.items())
            + f"; {seconds:.2f} s")
    failed = [what for what, ok in found.items() if not ok]
    return not failed, line + ("" if not failed else f" -- FAILED: {', '.join(failed)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("backend", choices=["triton", "cuda", "torch"])
    args = parser.parse_args(argv)
    settings = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(("L2D_TRITON", "L2D_CUDA")))
    print(f"preflight of backend {args.backend!r} on {torch.cuda.get_device_name() if ON_GPU else DEVICE}"
          + (f" with {settings}" if settings else ""), flush=True)
    for loss, shape, dtype in CASES if ON_GPU else CPU_CASES:
        try:
            ok, line = check_case(loss, shape, dtype, args.backend)
        except Exception as error:  # a fault: nothing after it in this process can be trusted
            first_line = (str(error).strip().splitlines() or [""])[0]
            print(f"FAILED {loss} {' x '.join(map(str, shape))} {str(dtype)[6:]}: raised "
                  f"{type(error).__name__}: {first_line}", flush=True)
            traceback.print_exc()
            return 1
        # A failure's line starts with FAILED, as pytest's do: gpu_check.sh's summary quotes such lines.
        print(line if ok else f"FAILED {line}", flush=True)
        if not ok:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
