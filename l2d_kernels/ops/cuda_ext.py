"""The compiled CUDA extension ``l2d_kernels._C``, when this install has one.

Importing it registers the ``l2d_kernels::*_cuda`` operators (csrc/). ``load_error`` says why it is
not usable: never built (a pure-Python install), built against another PyTorch, or built from
sources older than this package (an operator the Python side calls is missing).
"""

import importlib.util

# Every operator the Python side calls, with the numbers of its arguments and results: an extension
# that lacks one, or has it with other numbers, was built from other sources.
OPERATORS = {"mld_cuda": (6, 2), "led_cuda": (6, 3), "led_scale_cuda": (3, 0)}

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
    """The operators of ``expected`` (name: (number of arguments, number of results)) that no loaded
    library registered, or registered with other numbers of them."""
    import torch

    def matches(op, counts):
        if not hasattr(torch.ops.l2d_kernels, op):
            return False
        schema = getattr(torch.ops.l2d_kernels, op).default._schema
        return (len(schema.arguments), len(schema.returns)) == counts

    return [op for op, counts in expected.items() if not matches(op, counts)]


if _C is not None and missing_operators():
    load_error = (f"it was built from other sources (no {', '.join(missing_operators())} as this package calls it):"
                  " rebuild it")
