"""Benchmark session set-up; the harness itself is in harness.py."""

import os
import signal

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in the CPU interpreter there; set before any kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from harness import UNMEASURED, copy_bandwidth_tbps  # noqa: E402


def _stop(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# A pytest run stopped by `timeout` (SIGTERM: the GPU check cuts each suite and benchmark file at its
# deadline) ends as an interrupted session: a suite still prints its summary and slowest tests, a
# benchmark file still writes --benchmark-json with the cases that finished. (Here and in the other
# directory's conftest: a conftest.py at the repository root would put the source tree ahead of an
# installed wheel on sys.path, which the CI's installed-extension check must not see.)
signal.signal(signal.SIGTERM, _stop)


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
