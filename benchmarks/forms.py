"""What the benchmarks compare: each loss by every backend here, the authors' loops, the eager
vectorized form and torch.compile of it."""

from __future__ import annotations

import torch

from harness import GRAPHED
from l2d_kernels import L2DLoss, available_backends, fused_led, fused_mld, reference

FUSED = [b for b in ("cuda", "triton") if b in available_backends()]


def _with_graphed(forms: dict) -> dict:
    """On a GPU, each fused form again as "<form>+graph": captured in a CUDA graph and replayed
    (harness.run_case), its time without the host's share."""
    if torch.cuda.is_available():
        forms.update({f"{name}{GRAPHED}": fn for name, fn in list(forms.items()) if name.startswith("fused-")})
    return forms


def _vectorized_objective(zs, zt, es, et, y):
    return reference.bce(zs, y) + 10 * reference.mld(zs, zt) + reference.led_vectorized(es, et, y)


def led_forms() -> dict:
    forms = {f"fused-{b}": (lambda es, et, y, b=b: fused_led(es, et, y, backend=b)) for b in FUSED}
    forms["eager-vectorized"] = reference.led_vectorized
    forms["eager-loops"] = reference.led_loops
    forms["torch.compile"] = torch.compile(reference.led_vectorized, dynamic=False)
    return _with_graphed(forms)


def mld_forms() -> dict:
    forms = {f"fused-{b}": (lambda zs, zt, b=b: fused_mld(zs, zt, backend=b)) for b in FUSED}
    forms["eager-authors"] = reference.mld_authors
    forms["eager-stable"] = reference.mld
    forms["torch.compile"] = torch.compile(reference.mld, dynamic=False)
    return _with_graphed(forms)


def l2d_forms() -> dict:
    forms = {f"fused-{b}": L2DLoss(backend=b) for b in FUSED}
    forms["eager-authors"] = reference.l2d_authors
    forms["torch.compile"] = torch.compile(_vectorized_objective, dynamic=False)
    return forms  # graph replays of the losses are in the LED and MLD suites
