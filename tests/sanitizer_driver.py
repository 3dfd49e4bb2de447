"""Calls every fused kernel at a few small shapes, for compute-sanitizer (memcheck, racecheck):

    compute-sanitizer --tool memcheck --error-exitcode 1 python tests/sanitizer_driver.py

Shapes cover ragged group sizes (0 to 200 members), groups that take the tiled large-group passes,
groups of 33 to 64 members (the CUDA kernel's 64-member tile: CD at a batch of 200, ID at 150
labels), the Triton kernel's 32-row tile for 17 to 32 members in launches compiled
for at most 32 members (32 x 20), widths that are not multiples of the block width, non-contiguous
inputs and every input dtype.
``L2D_SANITIZE_SET=small`` keeps one float and one half-precision dtype, contiguous inputs and the
shapes that reach every code path (small groups, the tiled large-group passes of both families): for
racecheck, whose hazards depend on the kernels' synchronization structure, not on strides or sizes.
Widths above the Triton LED slice width (64) take its width-split path (plan, partial Grams, split
gradient; the last slice ragged), once more with a scratch too small for every group, so that the
groups past it are done whole by their slice-0 programs; widths above the CUDA kernel's (128) its
split path (plan, slice kernels), likewise once more with a scratch for a few groups only, the
others left to the group kernel. Calls without gradient (no_grad: no gradient buffer, its stores
compiled out or behind a null pointer) at every shape of the full set, and in the small set at the
two shapes whose large groups take the tiled passes (one of them also split over its width).
"""

import os
from unittest import mock

import torch

from l2d_kernels import available_backends, fused_led, fused_mld


def targets(B, C, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(B, C, generator=g) < 0.3
    y[:, 0] = True  # a label positive in every image
    y[: B // 2, 1] = True
    y[0, :] = True  # an image positive for every label
    return y.cuda()


def tiny_split_scratch():
    """The Triton LED split path with room for a few groups' partial Grams only."""
    from l2d_kernels.ops import triton_led

    return mock.patch.multiple(triton_led, SCRATCH_MIN_BYTES=16 << 10, SCRATCH_MAX_BYTES=16 << 10)


def tiny_cuda_split_scratch():
    """The CUDA LED split path with room for a few groups' partial Grams only."""
    return mock.patch.dict(os.environ, {"L2D_CUDA_LED_SCRATCH_BYTES": str(16 << 10)})


# The small set's shapes and dtypes, then what the full set adds (benchmarks/triton_cache.py compiles
# the small set's Triton kernels ahead of the GPU check).
SMALL_DTYPES = (torch.float32, torch.bfloat16)
SMALL_LED_SHAPES = ((5, 7, 33), (32, 20, 40), (200, 6, 40), (3, 150, 24), (32, 20, 160), (3, 150, 72))
MORE_LED_SHAPES = ((64, 80, 64), (200, 6, 160), (64, 80, 200))
SMALL_MLD_SHAPES = ((1, 1), (70, 130))
MORE_MLD_SHAPES = ((300, 1000),)
MLD_REDUCTIONS = ("batchmean", "none")
SMALL_NO_GRAD_SHAPES = ((200, 6, 40), (3, 150, 72))


def main():
    chosen = os.environ.get("L2D_TEST_BACKENDS", "triton,cuda").split(",")
    backends = [b for b in available_backends() if b in ("triton", "cuda") and b in chosen]
    small = os.environ.get("L2D_SANITIZE_SET", "full") == "small"
    dtypes = SMALL_DTYPES if small else (*SMALL_DTYPES, torch.float16)
    led_shapes = SMALL_LED_SHAPES + (() if small else MORE_LED_SHAPES)
    for backend in backends:
        for dtype in dtypes:
            for B, C, D in led_shapes:
                es = torch.randn(B, C, D, device="cuda", dtype=dtype).requires_grad_()
                et = torch.randn(B, C, D, device="cuda", dtype=dtype)
                y = targets(B, C, seed=B * C)
                # Twice with Triton: a shape's later calls launch its kernels directly (LaunchCache).
                for _ in range(2 if backend == "triton" else 1):
                    fused_led(es, et, y, backend=backend).backward()
                if backend == "triton" and D > 64:
                    with tiny_split_scratch():
                        fused_led(es, et, y, backend=backend).backward()
                if backend == "cuda" and D > 128:
                    with tiny_cuda_split_scratch():
                        fused_led(es, et, y, backend=backend).backward()
                if not small or (B, C, D) in SMALL_NO_GRAD_SHAPES:
                    with torch.no_grad():
                        fused_led(es, et, y, backend=backend)
                if not small:
                    fused_led(es.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(), et,
                              y.t().contiguous().t(), backend=backend).backward()
            for B, C in SMALL_MLD_SHAPES + (() if small else MORE_MLD_SHAPES):
                zs = torch.randn(B, C, device="cuda", dtype=dtype).requires_grad_()
                zt = torch.randn(B, C, device="cuda", dtype=dtype)
                for reduction in MLD_REDUCTIONS * (2 if backend == "triton" else 1):
                    fused_mld(zs, zt, reduction=reduction, backend=backend).sum().backward()
                if not small:
                    with torch.no_grad():
                        fused_mld(zs, zt, backend=backend)
    torch.cuda.synchronize()
    if not backends:
        raise SystemExit(f"no fused backend to check among {chosen}: available {available_backends()}")
    print(f"sanitizer driver done: backends {backends}")


if __name__ == "__main__":
    main()
