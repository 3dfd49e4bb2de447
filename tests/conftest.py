"""Shared test set-up. Without a GPU, Triton kernels run in Triton's CPU interpreter, and the CUDA
backend's kernels run in the CPU emulator of tests/cuda_emu (the "cuda-emulated" backend)."""

import os
import signal

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first import of a Triton kernel module: triton.jit reads it when decorating.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cuda_emu import backend as emulated_cuda  # noqa: E402
from helpers import api_backends, fused_backends  # noqa: E402


@pytest.fixture(autouse=True)
def _poisoned_empty_tensors():
    """Without a GPU, every ``torch.empty`` of a test is filled (NaN for floats, the largest value for
    integers), as PyTorch does in its deterministic mode: a kernel that leaves part of an output
    unwritten (a zero row of a gradient, say) then fails the test instead of passing on a fresh page's
    zeros. (On a GPU the caching allocator's reused blocks hold old values, and deterministic mode
    would also change which CUDA kernels PyTorch's own ops use.)"""
    if torch.cuda.is_available():
        yield
        return
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.utils.deterministic.fill_uninitialized_memory = fill


def _stop(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# A pytest run stopped by `timeout` (SIGTERM: the GPU check cuts each suite and benchmark file at its
# deadline) ends as an interrupted session: a suite still prints its summary and slowest tests, a
# benchmark file still writes --benchmark-json with the cases that finished. (Here and in the other
# directory's conftest: a conftest.py at the repository root would put the source tree ahead of an
# installed wheel on sys.path, which the CI's installed-extension check must not see.)
signal.signal(signal.SIGTERM, _stop)

_EMULATED = [emulated_cuda.PARAM] if emulated_cuda.wanted() else []
# The Triton backend with LED's groups split into 4-wide slices: the tests' widths are below the
# default slice width (64), so without it the API's LED tests would reach only the whole-group path.
# For the LED tests of test_api.py only (see pytest_collection_modifyitems).
TRITON_SPLIT = "triton-split"
_SPLIT = [TRITON_SPLIT] if "triton" in api_backends() else []
# The same for the CUDA kernels in the emulator: slices of 4 widths (the default is 128).
CUDA_SPLIT = emulated_cuda.PARAM + "-split"
_EMULATED_SPLIT = [CUDA_SPLIT] if _EMULATED else []
_SPLITS = (TRITON_SPLIT, CUDA_SPLIT)


@pytest.fixture(params=api_backends() + _SPLIT + _EMULATED + _EMULATED_SPLIT)
def backend(request, monkeypatch):
    if request.param == emulated_cuda.PARAM:
        return emulated_cuda.install(monkeypatch, request)
    if request.param == CUDA_SPLIT:
        monkeypatch.setenv("L2D_CUDA_LED_SLICE_WIDTH", "4")
        return emulated_cuda.install(monkeypatch, request)
    if request.param == TRITON_SPLIT:
        from l2d_kernels.ops import triton_led

        monkeypatch.setattr(triton_led, "SLICE_WIDTH", 4)
        return "triton"
    return request.param


def pytest_collection_modifyitems(config, items):
    """Leave out the split variants everywhere but test_api.py's LED tests (and the emulated CUDA one
    but for the random LED cases too)."""
    keep, drop = [], []
    for item in items:
        param = getattr(getattr(item, "callspec", None), "params", {}).get("backend")
        led_api = item.path.name == "test_api.py" and item.originalname.startswith("test_led")
        random_cuda = item.path.name == "test_random_targets.py" and param == CUDA_SPLIT
        (drop if param in _SPLITS and not (led_api or random_cuda) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(params=fused_backends() or [pytest.param(None, marks=pytest.mark.skip(reason="no fused backend here"))])
def fused_backend(request):
    return request.param
