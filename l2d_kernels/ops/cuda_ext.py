"""The compiled CUDA extension ``l2d_kernels._C``, when this install has one.

Importing it registers the ``l2d_kernels::*_cuda`` operators (csrc/). ``load_error`` says why it is
not usable: never built (a pure-Python install), built against another PyTorch, or built from
sources older than this package (an operator the Python side calls is missing).
"""

import importlib.util

# Every operator the Python side calls, with the number of its results: an extension that lacks one,
# or has it with another number of results, was built from other sources.
OPERATORS = {"mld_cuda": 2, "led_cuda": 3, "led_scale_cuda": 0}

_C = None
load_error = None

if importlib.util.find_spec("l2d_kernels._C") is None:
    load_error = "this install has no compiled extension"
else:
    try:
        from .. import _C  # noqa: F401, F811 (imported to register the operators)
    except (ImportError, OSError) as err:
        load_error = f"it failed to load: {err}"


def missing_operators(expected=OPERATORS) -> list:
    """The operators of ``expected`` (name: number of results) that no loaded library registered, or
    registered with another number of results."""
    import torch

    def matches(op, n_returns):
        return hasattr(torch.ops.l2d_kernels, op) and len(
            getattr(torch.ops.l2d_kernels, op).default._schema.returns) == n_returns

    return [op for op, n_returns in expected.items() if not matches(op, n_returns)]


if _C is not None and missing_operators():
    load_error = (f"it was built from other sources (no {', '.join(missing_operators())} as this package calls it):"
                  " rebuild it")
