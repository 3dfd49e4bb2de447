"""Shared test set-up. Without a GPU, Triton kernels run in Triton's CPU interpreter, and the CUDA
backend's kernels run in the CPU emulator of tests/cuda_emu (the "cuda-emulated" backend)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first import of a Triton kernel module: triton.jit reads it when decorating.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cuda_emu import backend as emulated_cuda  # noqa: E402
from helpers import api_backends, fused_backends  # noqa: E402

_EMULATED = [emulated_cuda.PARAM] if emulated_cuda.wanted() else []


@pytest.fixture(params=api_backends() + _EMULATED)
def backend(request, monkeypatch):
    if request.param == emulated_cuda.PARAM:
        return emulated_cuda.install(monkeypatch, request)
    return request.param


@pytest.fixture(params=fused_backends() or [pytest.param(None, marks=pytest.mark.skip(reason="no fused backend here"))])
def fused_backend(request):
    return request.param
