"""The whole objective (BCE + 10 MLD + LED): L2DLoss on the fused backends against the authors'
form and torch.compile of the eager vectorized form."""

import pytest
import torch

from harness import DEVICE, DTYPES, LED_SHAPES, floor_us, run_case, synced_timer
from forms import l2d_forms
from l2d_kernels.labels import sample_targets

FORMS = l2d_forms()


@pytest.mark.benchmark(group="l2d", timer=synced_timer)
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", LED_SHAPES[:3], ids=lambda s: s[0])
def test_l2d(benchmark, request, form, dtype, shape):
    name, B, C, D = shape
    g = torch.Generator(device=DEVICE).manual_seed(0)
    zs = (torch.randn(B, C, generator=g, device=DEVICE) * 3).to(dtype).requires_grad_()
    zt = (torch.randn(B, C, generator=g, device=DEVICE) * 3).to(dtype)
    es = torch.randn(B, C, D, generator=g, device=DEVICE).to(dtype).requires_grad_()
    et = torch.randn(B, C, D, generator=g, device=DEVICE).to(dtype)
    y = sample_targets(B, C, seed=0, device=DEVICE)
    loss_fn = FORMS[form]

    def fwd_bwd():
        return torch.autograd.grad(loss_fn(zs, zt, es, et, y), (zs, es))

    moved = 3 * B * C * (D + 1) * es.element_size()
    info = dict(loss="l2d", form=form, shape=name, B=B, C=C, D=D, dtype=str(dtype), pass_="fwd+bwd",
                floor_us=floor_us(moved), bytes=moved)
    run_case(benchmark, request, fwd_bwd, info)
