"""Devices, backends, input makers and error measures shared by the test files.

``L2D_TEST_BACKENDS=triton,cuda`` (comma-separated) limits the backends the tests run on to those
named (the GPU check script tests one backend while the other is still being built).
"""

import contextlib
import math
import os
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from l2d_kernels import available_backends
from l2d_kernels.labels import sample_targets

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"


@contextlib.contextmanager
def no_host_sync():
    """On a GPU, CUDA's sync-debug "error" mode inside: a device-to-host synchronization fails the
    test. Without a GPU, nothing."""
    if not ON_GPU:
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def api_backends():
    chosen = os.environ.get("L2D_TEST_BACKENDS")
    backends = available_backends()
    return backends if not chosen else [b for b in backends if b in chosen.split(",")]


def fused_backends():
    return [b for b in api_backends() if b != "torch"]


# Where eager PyTorch fails outright at a half dtype (float16 on a GPU: the distance floor DIST_EPS =
# 1e-12 underflows to 0, so sqrt's infinite slope at the masked diagonal meets a zero and the eager
# gradient is NaN), "no worse than twice eager's error" (SPEC 5) holds for any finite result; the
# tests then ask for more: within a few units of the dtype's rounding of the inputs (2^-11 for float16,
# 2^-8 for bfloat16, each element), which float32 accumulation reaches.
HALF_FALLBACK_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def half_tol(eager_err: float, dtype: torch.dtype) -> float:
    """Tolerance of a half-precision fused result: twice eager's error at that dtype, or the
    dtype's rounding bound where eager's result is not finite."""
    if math.isfinite(eager_err):
        return 2 * eager_err + 1e-6
    return HALF_FALLBACK_TOL[dtype]


def rel_err(actual: torch.Tensor, expected) -> float:
    """||actual - expected|| / ||expected|| in float64 (expected may be a NumPy array or a number)."""
    expected = torch.as_tensor(expected, dtype=torch.float64).cpu()  # a GPU test's exact values may be on the GPU
    diff = actual.detach().double().cpu() - expected
    return (diff.norm() / expected.norm().clamp(min=1e-300)).item()


def logits(B, C, scale=3.0, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(B, C, generator=g, dtype=torch.float64) * scale
    zt = torch.randn(B, C, generator=g, dtype=torch.float64) * scale
    return zs.to(device=device, dtype=dtype), zt.to(device=device, dtype=dtype)


def embeddings(B, C, D, seed=0, dtype=torch.float32, device="cpu", density=None):
    """Student and teacher embeddings and targets: COCO label rows, or random ones of a given density."""
    g = torch.Generator().manual_seed(seed)
    es = torch.randn(B, C, D, generator=g, dtype=torch.float64)
    et = torch.randn(B, C, D, generator=g, dtype=torch.float64) * 2 + 0.5
    if density is None:
        y = sample_targets(B, C, seed=seed)
    else:
        y = torch.rand(B, C, generator=g) < density
    return es.to(device=device, dtype=dtype), et.to(device=device, dtype=dtype), y.to(device)


def with_common_part(es, et, k, seed=0):
    """``es`` and ``et`` plus one vector each, shared by every row, ``k`` times their rows' spread per
    width: rows whose pairwise cosines are about ``k^2 / (k^2 + 1)``, as features after a ReLU share a
    large mean. The loss is unchanged in exact arithmetic (a shift); its Gram form in float32 is not."""
    g = torch.Generator().manual_seed(seed)
    D = es.shape[-1]
    shift_s = k * torch.randn(D, generator=g, dtype=torch.float64)
    shift_t = 2 * k * torch.randn(D, generator=g, dtype=torch.float64)
    return ((es.double() + shift_s.to(es.device)).to(es.dtype), (et.double() + shift_t.to(et.device)).to(et.dtype))


class OpLog(TorchDispatchMode):
    """Every ATen op run inside it, forward and backward (below autograd): its name and the
    ``(numel, dtype, data_ptr)`` of each input and output tensor, in ``ops``."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))

        def tensors(tree):
            leaves = torch.utils._pytree.tree_leaves(tree)
            return [(t.numel(), t.dtype, t.data_ptr()) for t in leaves if isinstance(t, torch.Tensor)]

        self.ops.append(SimpleNamespace(name=func.overloadpacket.__name__, op=str(func),
                                        inputs=tensors((args, kwargs)), outputs=tensors(out)))
        return out

    def new_buffers(self, numel: int) -> list:
        """The ops whose output is a new buffer (no input's) of ``numel`` elements."""
        return [o.op for o in self.ops for n, _, ptr in o.outputs
                if n == numel and ptr not in {p for _, _, p in o.inputs}]

    def largest_output(self) -> int:
        return max((n for o in self.ops for n, _, _ in o.outputs), default=0)
