"""The fused LED kernels against the float64 reference on many seeded random cases: shapes, target
patterns that make groups of every size class (a label positive in nearly every image, an image
with nearly every label, sparse and dense rows, no positives), misaligned and non-contiguous
inputs; and each case's second call bitwise equal to its first.

On a GPU this is where the CUDA kernels' block-to-block ordering is exercised over varied work
lists (the slice items' queue, the plan's own block, the early launches: one block reading what
another has not yet written shows as a wrong or a varying result, which the fixed shapes of
test_gpu.py could miss). The Triton kernels compile once per shape class, so on a GPU they take
random targets at two fixed shapes (the benchmarks', whose kernels the GPU check's Triton cache
holds). Without a GPU the same cases run, fewer and smaller, on the CUDA emulator (also with 4-wide
slices, so that its small widths take the width split) and the Triton interpreter; there each
case's second call runs with every launch's blocks interleaved (tests/cuda_emu/emu.h), not in turn,
so that it must give the first call's bits with the work handed between blocks in another order.
Every case is seeded: a failure names the seed that reproduces it.
"""

import contextlib

import pytest
import torch

from cuda_emu import backend as emulated_cuda
from helpers import DEVICE, ON_GPU, no_host_sync, rel_err
from l2d_kernels import fused_led, reference

# The CUDA backend's random shapes: (cases, largest B and C, largest D).
CASES, MAX_BC, MAX_D = (160, 300, 300) if ON_GPU else (16, 24, 40)
# The Triton backend's shapes: every case one of these, contiguous, with random targets and the
# default weights (benchmarks/test_triton_cache.py checks that the GPU ones are in the cache's list).
GPU_TRITON_SHAPES = [(64, 80, 768), (32, 1000, 768)]
TRITON_SHAPES = GPU_TRITON_SHAPES if ON_GPU else [(9, 7, 20)]
TRITON_CASES = 24 if ON_GPU else 2
PATTERNS = ("uniform", "labels-skewed", "images-skewed", "all", "sparse", "none")


def _targets(B: int, C: int, pattern: str, g: torch.Generator) -> torch.Tensor:
    """[B, C] bool targets. The skewed patterns draw each label's (or image's) density as u^3, so
    that a few groups are nearly full and most are small."""
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    if pattern == "uniform":
        return u(B, C) < u(1).item()
    if pattern == "labels-skewed":
        return u(B, C) < u(1, C) ** 3
    if pattern == "images-skewed":
        return u(B, C) < u(B, 1) ** 3
    if pattern == "all":
        return torch.ones(B, C, dtype=torch.bool)
    if pattern == "sparse":
        return u(B, C) < 0.03
    return torch.zeros(B, C, dtype=torch.bool)


def _layout(t: torch.Tensor, kind: int) -> torch.Tensor:
    """The same values as ``t`` in one of four layouts: contiguous; rows 4 bytes off 16-byte
    alignment (a view one element into a larger buffer); labels-major (B and C strides swapped);
    every other element of the embedding axis."""
    if kind == 1:
        flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        out = flat[1:].view(t.shape)
    elif kind == 2:
        out = torch.empty(t.shape[1], t.shape[0], *t.shape[2:], dtype=t.dtype, device=t.device).transpose(0, 1)
    elif kind == 3:
        out = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)[..., ::2]
    else:
        return t.clone()
    out.copy_(t)
    return out


def _case(backend: str, seed: int):
    """Seeded inputs of one case: (es, et, y, lambdas, layout), the embeddings contiguous."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda n: int(torch.randint(n, (1,), generator=g))  # noqa: E731
    if backend == "triton":
        (B, C, D), layout = TRITON_SHAPES[pick(len(TRITON_SHAPES))], 0
    else:
        B, C, D, layout = 1 + pick(MAX_BC), 1 + pick(MAX_BC), 1 + pick(MAX_D), pick(4)
    y = _targets(B, C, PATTERNS[pick(len(PATTERNS))], g)
    es = torch.randn(B, C, D, generator=g)
    et = torch.randn(B, C, D, generator=g) * 2 + 0.5
    lambdas = [(100.0, 1000.0), (1.0, 0.0), (0.0, 3.0)][0 if backend == "triton" else pick(3)]
    return es.to(DEVICE), et.to(DEVICE), y.to(DEVICE), lambdas, layout


def _fused(es, et, y, lambdas, layout, backend):
    x, teacher = _layout(es, layout).requires_grad_(), _layout(et, layout)
    g_out = torch.full((), 0.75, device=es.device)
    with no_host_sync():
        total, cd, id_ = fused_led(x, teacher, y, lambda_cd=lambdas[0], lambda_id=lambdas[1], backend=backend,
                                   return_components=True)
        total.backward(g_out)
    return total.detach(), cd, id_, x.grad


def _exact(es, et, y, lambdas):
    x = es.double().requires_grad_()
    total, cd, id_ = reference.led_grouped(x, et.double(), y, *lambdas, return_components=True)
    (total * 0.75).backward()
    return total.detach(), cd.detach(), id_.detach(), x.grad


@pytest.mark.parametrize("block", range(2))
def test_led_random_cases_match_the_reference_and_repeat_bitwise(backend, block, request):
    if backend == "torch":
        pytest.skip("the reference itself")
    emulated = request.node.callspec.params["backend"].startswith(emulated_cuda.PARAM)
    cases = TRITON_CASES if backend == "triton" else CASES
    for seed in range(block * cases // 2, (block + 1) * cases // 2):
        es, et, y, lambdas, layout = _case(backend, seed)
        got = _fused(es, et, y, lambdas, layout, backend)
        with emulated_cuda.interleaved(seed) if emulated else contextlib.nullcontext():
            again = _fused(es, et, y, lambdas, layout, backend)
        want = _exact(es, et, y, lambdas)
        where = f"seed {seed}: {tuple(es.shape)}, layout {layout}, {int(y.sum())} positives, lambdas {lambdas}"
        for name, g, a, w in zip(("total", "cd", "id", "grad"), got, again, want):
            assert torch.equal(g, a), f"{where}: {name} differs between two calls"
            err = rel_err(g, w)
            assert err < 1e-4, f"{where}: {name} off the reference by {err:.2e}"
