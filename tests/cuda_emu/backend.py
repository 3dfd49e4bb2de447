"""The API tests' ``"cuda-emulated"`` backend: where no GPU is present, ``backend="cuda"`` runs the
CUDA extension's host code and kernels compiled for the CPU emulator (emu.h, build.py) on CPU
tensors, so that the API suite checks csrc/ on every CI run (with the test's tensors in guarded
memory). Only the backend lookup is redirected
(the ``"cuda"`` backend is allowed on CPU tensors and its launcher is the emulated operator); the
autograd function, input checks and everything else are the library's own.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil

PARAM = "cuda-emulated"


def wanted() -> bool:
    """Emulate where the real CUDA backend cannot run and the build tools exist (a C++ compiler and
    ninja, which the test extras install); L2D_TEST_EMULATED_CUDA=0 turns it off, =1 makes missing
    tools an error instead of a skip."""
    import torch
    from torch.utils import cpp_extension

    setting = os.environ.get("L2D_TEST_EMULATED_CUDA", "")
    if setting == "0" or torch.cuda.is_available():
        return False
    tools = shutil.which(os.environ.get("CXX", "c++")) is not None and cpp_extension.is_ninja_available()
    return setting == "1" or tools


@functools.lru_cache(maxsize=None)
def ops():
    from .build import build

    return build()


def install(monkeypatch, request) -> str:
    """Route ``backend="cuda"`` to the emulated operators for one test, with the tensors it makes in
    guarded memory (guard.cpp: an access outside a tensor stops the run); returns the name to pass."""
    from l2d_kernels import backends
    from l2d_kernels.ops import library

    emulated = ops()
    emulated.guard_memory(True)
    request.addfinalizer(lambda: emulated.guard_memory(False))
    real_problem, real_launcher = backends.backend_problem, library._launcher

    def backend_problem(name, device):
        return None if name == "cuda" and device.type == "cpu" else real_problem(name, device)

    def launcher(loss, backend):
        if backend == "cuda":
            return getattr(emulated, loss).default
        return real_launcher(loss, backend)

    monkeypatch.setattr(backends, "backend_problem", backend_problem)
    monkeypatch.setattr(library, "_launcher", launcher)
    return "cuda"


@contextlib.contextmanager
def interleaved(seed: int, resident: int = 512):
    """Within it, every emulated launch interleaves up to ``resident`` of its blocks (emu.h's
    set_blocks, seeded) instead of running them in turn."""
    emulated = ops()
    emulated.set_blocks(resident, seed)
    try:
        yield
    finally:
        emulated.set_blocks(0, 0)
