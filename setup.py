"""Build script. A plain ``pip install .`` compiles nothing: the package is pure Python (Triton and
eager PyTorch backends). ``L2D_KERNELS_BUILD_CUDA=1`` is reserved for building the CUDA extension
``l2d_kernels._C`` from csrc/ with nvcc, against the installed torch (``--no-build-isolation``).
"""

import os

from setuptools import setup

if os.environ.get("L2D_KERNELS_BUILD_CUDA", "0") == "1":
    raise SystemExit("L2D_KERNELS_BUILD_CUDA=1: the CUDA extension is not part of this version yet")

setup()
