"""Shared test set-up. Without a GPU, Triton kernels run in Triton's CPU interpreter."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first import of a Triton kernel module: triton.jit reads it when decorating.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import api_backends, fused_backends  # noqa: E402


@pytest.fixture(params=api_backends())
def backend(request):
    return request.param


@pytest.fixture(params=fused_backends() or [pytest.param(None, marks=pytest.mark.skip(reason="no fused backend here"))])
def fused_backend(request):
    return request.param
