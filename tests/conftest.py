"""Shared test set-up. Without a GPU, Triton kernels run in Triton's CPU interpreter."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first import of a Triton kernel module: triton.jit reads it when decorating.
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"


def fused_backends():
    from l2d_kernels import available_backends

    return [b for b in available_backends() if b != "torch"]


def api_backends():
    from l2d_kernels import available_backends

    return available_backends()


@pytest.fixture(params=api_backends())
def backend(request):
    return request.param


@pytest.fixture(params=fused_backends() or [pytest.param(None, marks=pytest.mark.skip(reason="no fused backend here"))])
def fused_backend(request):
    return request.param


def rel_err(actual: torch.Tensor, expected) -> float:
    """||actual - expected|| / ||expected|| in float64 (expected may be a NumPy array or a number)."""
    expected = torch.as_tensor(expected, dtype=torch.float64)
    diff = actual.detach().double().cpu() - expected
    return (diff.norm() / expected.norm().clamp(min=1e-300)).item()
