"""L2DLoss: the whole objective of SPEC 4 against float64 formulas, on every backend here."""

import torch

import oracle
from helpers import DEVICE, embeddings, logits, rel_err
from l2d_kernels import L2DLoss


def _inputs(dtype=torch.float32):
    zs, zt = logits(8, 10, dtype=dtype, device=DEVICE)
    es, et, y = embeddings(8, 10, 12, dtype=dtype, device=DEVICE, density=0.4)
    return zs, zt, es, et, y


def _expected(zs, zt, es, et, y, w_bce=1.0, w_mld=10.0, w_led=1.0, lcd=100.0, lid=1000.0):
    n = lambda t: t.detach().double().cpu().numpy()  # noqa: E731
    bce, g_bce = oracle.bce(n(zs), n(y))
    mld, g_mld = oracle.mld(n(zs), n(zt))
    led, _, _, g_led = oracle.led(n(es), n(et), n(y), lcd, lid)
    return w_bce * bce + w_mld * mld + w_led * led, w_bce * g_bce + w_mld * g_mld, w_led * g_led


def test_paper_defaults(backend):
    zs, zt, es, et, y = _inputs()
    zs.requires_grad_()
    es.requires_grad_()
    loss = L2DLoss(backend=backend)(zs, zt, es, et, y)
    loss.backward()
    want, g_logits, g_emb = _expected(zs, zt, es, et, y)
    assert rel_err(loss, want) < 1e-4
    assert rel_err(zs.grad, g_logits) < 1e-4
    assert rel_err(es.grad, g_emb) < 1e-4


def test_custom_weights_and_components(backend):
    zs, zt, es, et, y = _inputs()
    module = L2DLoss(lambda_bce=0.5, lambda_mld=2.0, lambda_led=3.0, lambda_cd=4.0, lambda_id=5.0, backend=backend)
    loss, parts = module(zs, zt, es, et, y, return_components=True)
    want, _, _ = _expected(zs, zt, es, et, y, 0.5, 2.0, 3.0, 4.0, 5.0)
    assert rel_err(loss, want) < 1e-4
    assert set(parts) == {"bce", "mld", "led", "cd", "id"}
    recombined = 0.5 * parts["bce"] + 2.0 * parts["mld"] + 3.0 * parts["led"]
    assert rel_err(recombined, loss.item()) < 1e-6
    assert rel_err(parts["led"], 4.0 * parts["cd"].item() + 5.0 * parts["id"].item()) < 1e-6
    assert not any(p.requires_grad for p in parts.values())


def test_teacher_gets_no_gradient(backend):
    zs, zt, es, et, y = _inputs()
    zt.requires_grad_()
    et.requires_grad_()
    L2DLoss(backend=backend)(zs.requires_grad_(), zt, es.requires_grad_(), et, y).backward()
    assert zt.grad is None and et.grad is None


def test_half_precision_student_under_autocast_style_inputs(backend):
    zs, zt, es, et, y = _inputs(torch.bfloat16)
    loss = L2DLoss(backend=backend)(zs.requires_grad_(), zt, es.requires_grad_(), et, y)
    loss.backward()
    assert loss.dtype == torch.float32
    assert zs.grad.dtype == torch.bfloat16 and es.grad.dtype == torch.bfloat16
    want, _, _ = _expected(zs, zt, es, et, y)
    assert rel_err(loss, want) < 1e-2


def test_repr_names_the_weights():
    text = repr(L2DLoss())
    assert "lambda_mld=10.0" in text and "lambda_id=1000.0" in text
