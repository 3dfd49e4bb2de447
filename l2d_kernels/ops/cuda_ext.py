"""The compiled CUDA extension ``l2d_kernels._C``, when this install has one.

Importing it registers the ``l2d_kernels::*_cuda`` operators (csrc/). ``load_error`` says why it is
not usable: never built (a pure-Python install), or built against another PyTorch.
"""

import importlib.util

_C = None
load_error = None

if importlib.util.find_spec("l2d_kernels._C") is None:
    load_error = "this install has no compiled extension"
else:
    try:
        from .. import _C  # noqa: F401, F811 (imported to register the operators)
    except (ImportError, OSError) as err:
        load_error = f"it failed to load: {err}"
