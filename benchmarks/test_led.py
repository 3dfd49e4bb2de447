"""LED: fused kernels against the authors' loops, the eager vectorized form and torch.compile."""

import pytest
import torch

from harness import DTYPES, LED_SHAPES, floor_us, led_inputs, run_case, synced_timer
from forms import led_forms

FORMS = led_forms()


@pytest.mark.benchmark(group="led", timer=synced_timer)
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", LED_SHAPES, ids=lambda s: s[0])
@pytest.mark.parametrize("pass_", ["fwd+bwd", "fwd"])
def test_led(benchmark, request, form, dtype, shape, pass_):
    name, B, C, D = shape
    es, et, y = led_inputs(B, C, D, dtype)
    loss_fn = FORMS[form]

    def fwd():
        return loss_fn(es, et, y)

    def fwd_bwd():
        return torch.autograd.grad(loss_fn(es, et, y), es)

    item = es.element_size()
    moved = (3 if pass_ == "fwd+bwd" else 2) * B * C * D * item + y.numel() * y.element_size()
    info = dict(loss="led", form=form, shape=name, B=B, C=C, D=D, dtype=str(dtype), pass_=pass_,
                floor_us=floor_us(moved), bytes=moved)
    run_case(benchmark, request, fwd_bwd if pass_ == "fwd+bwd" else fwd, info)
