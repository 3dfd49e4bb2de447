"""The fused operators as torch.library ops: schemas, fake kernels, autograd, torch.compile."""

import pytest
import torch

from helpers import DEVICE, embeddings, logits
from l2d_kernels import fused_led, fused_mld
from l2d_kernels.ops import library


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_mld_op_passes_opcheck(fused_backend, reduction):
    zs, zt = logits(5, 7, device=DEVICE)
    args = (zs.requires_grad_(), zt, reduction, 1e-8, 1.0)
    torch.library.opcheck(library.mld_op(fused_backend), args, test_utils=("test_schema", "test_faketensor",
                                                                           "test_autograd_registration"))


def test_led_op_passes_opcheck(fused_backend):
    es, et, y = embeddings(6, 5, 8, device=DEVICE, density=0.5)
    args = (es.requires_grad_(), et, y, 100.0, 1000.0)
    torch.library.opcheck(library.led_op(fused_backend), args, test_utils=("test_schema", "test_faketensor",
                                                                           "test_autograd_registration"))


def test_compiles_without_graph_breaks(fused_backend):
    zs, zt = logits(5, 7, device=DEVICE)
    es, et, y = embeddings(6, 7, 8, device=DEVICE, density=0.5)
    y = y[:5]
    es, et = es[:5], et[:5]

    def step(zs, es):
        return fused_mld(zs, zt, backend=fused_backend) + fused_led(es, et, y, backend=fused_backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_z, eager_e = zs.clone().requires_grad_(), es.clone().requires_grad_()
    comp_z, comp_e = zs.clone().requires_grad_(), es.clone().requires_grad_()
    step(eager_z, eager_e).backward()
    out = compiled(comp_z, comp_e)
    out.backward()
    assert torch.equal(out.detach(), step(zs, es).detach())
    assert torch.equal(comp_z.grad, eager_z.grad) and torch.equal(comp_e.grad, eager_e.grad)


def test_backward_reuses_the_saved_gradient_and_refuses_a_second_pass(fused_backend):
    es, et, y = embeddings(6, 5, 8, device=DEVICE, density=0.6)
    x = es.clone().requires_grad_()
    loss = fused_led(x, et, y, backend=fused_backend)
    (grad,) = torch.autograd.grad(loss * 3.0, x, retain_graph=True)
    x2 = es.clone().requires_grad_()
    (plain,) = torch.autograd.grad(fused_led(x2, et, y, backend=fused_backend), x2)
    assert torch.allclose(grad, 3.0 * plain, rtol=1e-6, atol=0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, x)
