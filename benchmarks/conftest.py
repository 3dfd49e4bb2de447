"""Benchmark session set-up; the harness itself is in harness.py."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in the CPU interpreter there; set before any kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from harness import UNMEASURED, copy_bandwidth_tbps  # noqa: E402


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Cases that could not be timed (out of memory, too long) and the measured copy bandwidth."""
    output_json["l2d_unmeasured"] = UNMEASURED
    output_json["l2d_copy_tbps"] = copy_bandwidth_tbps()


_FINISHED: set[str] = set()  # node ids of the cases whose test body ran to its end


def pytest_runtest_logreport(report):
    if report.when == "call" and report.passed:
        _FINISHED.add(report.nodeid)


@pytest.hookimpl(tryfirst=True)
def pytest_benchmark_generate_json(config, benchmarks, include_data, machine_info, commit_info):
    """pytest-benchmark's JSON with the cases that finished: an interrupted run leaves one case part
    measured (or with no round at all, which pytest-benchmark cannot summarize)."""
    from pytest_benchmark.plugin import pytest_benchmark_generate_json as generate

    done = [bench for bench in benchmarks if bench and bench.fullname in _FINISHED]
    return generate(config, done, include_data, machine_info, commit_info)
