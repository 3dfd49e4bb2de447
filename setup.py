"""Build script.

A plain ``pip install .`` compiles nothing: the package is pure Python (Triton and eager PyTorch
backends). With ``L2D_KERNELS_BUILD_CUDA=1`` (and ``--no-build-isolation``, so that the build sees
the installed torch) it also builds the CUDA extension ``l2d_kernels._C`` from csrc/ with nvcc:

    CUDA_HOME=/path/to/cuda L2D_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation -e .
    CUDA_HOME=/path/to/cuda L2D_KERNELS_BUILD_CUDA=1 pip wheel --no-build-isolation --no-deps -w dist .

It honours ``TORCH_CUDA_ARCH_LIST`` (default here: sm_80 and sm_90 machine code plus PTX) and
``MAX_JOBS`` (parallel nvcc jobs, through ninja).
"""

import glob
import os

from setuptools import setup


def _find_cuda_home() -> None:
    """Set CUDA_HOME to the first toolkit found (bin/nvcc and a libcudart), unless it is set already.

    torch guesses the toolkit from the nvcc on PATH, which is wrong where that nvcc is a wrapper
    script (the link then fails with "cannot find -lcudart").
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for root in ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True), "/opt/cuda"]:
        if os.path.isfile(os.path.join(root, "bin", "nvcc")) and glob.glob(os.path.join(root, "lib*", "libcudart.so*")):
            os.environ["CUDA_HOME"] = root
            return


ext_modules, cmdclass = [], {}
if os.environ.get("L2D_KERNELS_BUILD_CUDA", "0") == "1":
    _find_cuda_home()
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    ext_modules = [
        CUDAExtension(
            name="l2d_kernels._C",
            sources=sources,
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
        )
    ]
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
