"""Calls for Nsight Compute to look inside: one fused case, called twice (a warm-up, then the call to
profile), so that ``ncu --launch-skip`` can pass over the first call's launches.

    ncu -k 'regex:group_kernel|slice_kernel' --launch-skip 6 --launch-count 6 --section ... \\
        python benchmarks/ncu_driver.py led 64 80 768 cuda

Cases: ``led B C D BACKEND`` (forward and backward) and ``mld B C BACKEND``. Inputs as in the
benchmarks (harness.py: COCO label rows for LED).
"""

from __future__ import annotations

import sys

import torch

from harness import led_inputs, mld_inputs
from l2d_kernels import fused_led, fused_mld


def main(argv: list[str]) -> int:
    loss, *sizes, backend = argv
    if loss == "led":
        es, et, y = led_inputs(*map(int, sizes))
        call = lambda: torch.autograd.grad(fused_led(es, et, y, backend=backend), es)  # noqa: E731
    elif loss == "mld":
        zs, zt = mld_inputs(*map(int, sizes))
        call = lambda: torch.autograd.grad(fused_mld(zs, zt, backend=backend), zs)  # noqa: E731
    else:
        raise SystemExit(f"unknown loss {loss!r}: led or mld")
    for _ in range(2):
        call()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
