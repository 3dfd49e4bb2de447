"""Benchmark session set-up; the harness itself is in harness.py."""

import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run in the CPU interpreter there; set before any kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from harness import UNMEASURED, copy_bandwidth_tbps  # noqa: E402


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Cases that could not be timed (out of memory, too long) and the measured copy bandwidth."""
    output_json["l2d_unmeasured"] = UNMEASURED
    output_json["l2d_copy_tbps"] = copy_bandwidth_tbps()
