"""The compiled CUDA extension ``l2d_kernels._C``, when this install has one.

Importing it registers the ``l2d_kernels::*_cuda`` operators (csrc/). ``load_error`` says why it is
not usable: never built (a pure-Python install), built against another PyTorch, or built from
sources older than this package (an operator the Python side calls is missing).
"""

import importlib.util

# Every operator the Python side calls: an extension that lacks one was built from other sources.
OPERATORS = ("mld_cuda", "led_cuda", "led_scale_cuda")

_C = None
load_error = None

if importlib.util.find_spec("l2d_kernels._C") is None:
    load_error = "this install has no compiled extension"
else:
    try:
        from .. import _C  # noqa: F401, F811 (imported to register the operators)
    except (ImportError, OSError) as err:
        load_error = f"it failed to load: {err}"


def missing_operators(names=OPERATORS) -> list:
    """The operators among ``names`` that no loaded library registered."""
    import torch

    return [op for op in names if not hasattr(torch.ops.l2d_kernels, op)]


if _C is not None and missing_operators():
    load_error = f"it was built from other sources (no {', '.join(missing_operators())}): rebuild it"
