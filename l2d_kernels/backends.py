"""Which backend computes a loss: what is available here, and what ``"auto"`` picks.

- ``"torch"``: the eager forms of :mod:`l2d_kernels.reference` (any device, float32 accumulation).
- ``"triton"``: the fused Triton kernels; CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1``
  was set before the first Triton call (Triton's interpreter, slow, for tests).
- ``"cuda"``: the fused CUDA C++ kernels of the compiled extension ``l2d_kernels._C``.

``"auto"`` picks ``"cuda"``, then ``"triton"``, then ``"torch"`` for CUDA tensors, and ``"torch"``
for any other device.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")

_TRITON_HOWTO = "install Triton (it comes with PyTorch's CUDA wheels on Linux: pip install torch)"
_CUDA_HOWTO = (
    "build the extension from a source checkout with CUDA_HOME set to the CUDA toolkit: "
    "L2D_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation -e ."
)


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name and cannot run here; the message says how to get it."""


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's CPU interpreter cannot run these kernels, or None. Triton before 3.8 turns a
    kernel's scalar arguments (one-element arrays there) into Python ints with ``int()``, which
    NumPy 2.4 refuses; a kernel looping up to a runtime bound then fails."""
    if _version(triton_version) < (3, 8) and _version(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s CPU interpreter does not run with NumPy {numpy_version}: "
                "pip install 'numpy<2.4', or Triton 3.8 or later (compiled GPU kernels are not affected)")
    return None


def _find_problems() -> dict[str, str | None]:
    problems = {"triton": None, "triton-interpreter": None, "cuda": None}
    try:
        import numpy
        import triton
    except ImportError as err:
        problems["triton"] = f"Triton cannot be imported ({err}); {_TRITON_HOWTO}"
    else:
        problems["triton-interpreter"] = interpreter_problem(triton.__version__, numpy.__version__)
    from .ops import cuda_ext

    if cuda_ext.load_error is not None:
        problems["cuda"] = f"the CUDA extension l2d_kernels._C is not usable ({cuda_ext.load_error}); {_CUDA_HOWTO}"
    return problems


# What is installed does not change while the process runs: looked up once, at import.
_INSTALL_PROBLEMS = _find_problems()


def backend_problem(name: str, device: torch.device) -> str | None:
    """Why ``name`` cannot run on ``device``, or None when it can."""
    if name == "torch":
        return None
    if name == "triton":
        problem = _INSTALL_PROBLEMS["triton"]
        if problem is None and device.type != "cuda" and not triton_interpreted():
            problem = (
                f"backend 'triton' runs on CUDA tensors, got tensors on {device}; for Triton's CPU "
                "interpreter set TRITON_INTERPRET=1 before the first call"
            )
        if problem is None and device.type != "cuda":
            problem = _INSTALL_PROBLEMS["triton-interpreter"]
        if problem is None and device.type == "cuda" and getattr(torch.version, "hip", None):
            problem = ("backend 'triton' is written for NVIDIA GPUs (the MLD kernel's exponentials are PTX "
                       f"instructions); this PyTorch is built for ROCm {torch.version.hip}")
        return problem
    if name == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' runs on CUDA tensors, got tensors on {device}"
        return _INSTALL_PROBLEMS["cuda"]
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def available_backends() -> list[str]:
    """The backends that run on this machine (on its GPU where one is present)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return [name for name in BACKENDS[1:] if backend_problem(name, device) is None]


# "auto" on CUDA tensors, every loss and shape. Measured on an H100 (third run, 2026-11-27, fp32,
# forward + backward): the CUDA extension beat Triton in every LED case, 64 x 20 to 1024 x 80
# (5.70 against 8.43 ms at a batch of 1024, where the second run's one-block-per-group CUDA kernel
# had taken 77.9 ms and "auto" preferred Triton above a batch of 128). MLD: CUDA's eager calls were
# as fast or faster (a cheaper launch), although Triton's MLD kernel itself is faster (33 against
# 50 us at 4096 x 1000), which shows in a CUDA graph (49.6 against 67.7 us per replay).
AUTO_ORDER = ("cuda", "triton", "torch")


def resolve_backend(backend, device: torch.device, dtypes) -> str:
    """The concrete backend for a call; raises ValueError or BackendUnavailableError."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    fused_ok = all(dt in (torch.float32, torch.bfloat16, torch.float16) for dt in dtypes)
    if backend == "auto":
        if device.type != "cuda" or not fused_ok:
            return "torch"
        return next(name for name in AUTO_ORDER if backend_problem(name, device) is None)
    # The inputs' dtypes first: that refusal is the same on every machine, whatever is installed.
    if backend != "torch" and not fused_ok:
        raise TypeError(
            f"backend {backend!r} takes float32, bfloat16 or float16 inputs, got {sorted(map(str, set(dtypes)))}; "
            "backend='torch' computes in float64"
        )
    problem = backend_problem(backend, device)
    if problem is not None:
        raise BackendUnavailableError(problem)
    return backend
