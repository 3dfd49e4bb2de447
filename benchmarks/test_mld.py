"""MLD: fused kernels against the authors' eager form, the stable eager form and torch.compile."""

import pytest
import torch

from harness import DTYPES, MLD_SHAPES, floor_us, mld_inputs, run_case, synced_timer
from forms import mld_forms

FORMS = mld_forms()


@pytest.mark.benchmark(group="mld", timer=synced_timer)
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", MLD_SHAPES, ids=lambda s: s[0])
def test_mld(benchmark, request, form, dtype, shape):
    name, B, C = shape
    zs, zt = mld_inputs(B, C, dtype)
    loss_fn = FORMS[form]

    def fwd_bwd():
        return torch.autograd.grad(loss_fn(zs, zt), zs)

    moved = 3 * B * C * zs.element_size()
    info = dict(loss="mld", form=form, shape=name, B=B, C=C, D=0, dtype=str(dtype), pass_="fwd+bwd",
                floor_us=floor_us(moved), bytes=moved)
    run_case(benchmark, request, fwd_bwd, info)
