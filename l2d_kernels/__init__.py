"""Fused, exact kernels for the losses of multi-label knowledge distillation (L2D, Yang et al., ICCV 2023).

    from l2d_kernels import fused_mld, fused_led, L2DLoss
"""

from .api import fused_led, fused_mld
from .backends import BackendUnavailableError, available_backends
from .nn import L2DLoss

__version__ = "0.1.0"

__all__ = ["fused_mld", "fused_led", "L2DLoss", "available_backends", "BackendUnavailableError", "__version__"]
