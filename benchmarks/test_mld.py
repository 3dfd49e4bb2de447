"""MLD: fused kernels against the authors' eager form, the stable eager form and torch.compile."""

import pytest
import torch

from harness import DEVICE, DTYPES, MLD_SHAPES, floor_us, run_case, synced_timer
from forms import mld_forms

FORMS = mld_forms()


@pytest.mark.benchmark(group="mld", timer=synced_timer)
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", MLD_SHAPES, ids=lambda s: s[0])
def test_mld(benchmark, request, form, dtype, shape):
    name, B, C = shape
    g = torch.Generator(device=DEVICE).manual_seed(0)
    zs = (torch.randn(B, C, generator=g, device=DEVICE) * 3).to(dtype).requires_grad_()
    zt = (torch.randn(B, C, generator=g, device=DEVICE) * 3).to(dtype)
    loss_fn = FORMS[form]

    def fwd_bwd():
        return torch.autograd.grad(loss_fn(zs, zt), zs)

    moved = 3 * B * C * zs.element_size()
    info = dict(loss="mld", form=form, shape=name, B=B, C=C, D=0, dtype=str(dtype), pass_="fwd+bwd",
                floor_us=floor_us(moved), bytes=moved)
    run_case(benchmark, request, fwd_bwd, info)
