"""SPEC 6: every misuse raises, naming the argument, before any computation starts."""

import pytest
import torch

from helpers import embeddings, logits
from l2d_kernels import L2DLoss, fused_led, fused_mld, reference
from l2d_kernels.ops import library


@pytest.fixture(autouse=True)
def no_computation(monkeypatch):
    """Any computation reached by a bad call fails the test with this error instead."""

    def ran(*args, **kwargs):
        raise AssertionError("a loss was computed before the bad input was caught")

    for name in ("mld", "led_vectorized", "bce"):
        monkeypatch.setattr(reference, name, ran)
    for name in ("mld", "led"):  # every fused call (eager or compiled) goes through these
        monkeypatch.setattr(library, name, ran)


ZS, ZT = logits(4, 5)
ES, ET, Y = embeddings(4, 5, 6, density=0.5)

MLD_CASES = [
    ("student_logits", TypeError, dict(student_logits=ZS.numpy())),
    ("student_logits", ValueError, dict(student_logits=ZS[0])),
    ("teacher_logits", ValueError, dict(teacher_logits=ZT[None])),
    ("student_logits", TypeError, dict(student_logits=ZS.long())),
    ("teacher_logits", TypeError, dict(teacher_logits=ZT.bool())),
    ("same shape", ValueError, dict(teacher_logits=ZT[:, :4])),
    ("empty batch", ValueError, dict(student_logits=ZS[:0], teacher_logits=ZT[:0])),
    ("empty label", ValueError, dict(student_logits=ZS[:, :0], teacher_logits=ZT[:, :0])),
    ("teacher_logits is on meta", ValueError, dict(teacher_logits=ZT.to("meta"))),
    ("reduction", ValueError, dict(reduction="average")),
    ("eps", ValueError, dict(eps=0.0)),
    ("eps", ValueError, dict(eps=0.7)),
    ("temperature", ValueError, dict(temperature=0.0)),
    ("temperature", ValueError, dict(temperature=float("nan"))),
    ("backend", ValueError, dict(backend="jax")),
]


@pytest.mark.parametrize("needle,error,override", MLD_CASES, ids=[c[0] + "-" + "-".join(c[2]) for c in MLD_CASES])
def test_fused_mld_rejects(needle, error, override):
    kwargs = dict(student_logits=ZS, teacher_logits=ZT) | override
    zs, zt = kwargs.pop("student_logits"), kwargs.pop("teacher_logits")
    with pytest.raises(error, match=needle):
        fused_mld(zs, zt, **kwargs)


LED_CASES = [
    ("student_emb", TypeError, dict(student_emb=[[1.0]])),
    ("student_emb", ValueError, dict(student_emb=ES[0])),
    ("teacher_emb", ValueError, dict(teacher_emb=ET[None])),
    ("student_emb", TypeError, dict(student_emb=ES.int())),
    ("teacher_emb", TypeError, dict(teacher_emb=ET.to(torch.complex64))),
    ("same shape", ValueError, dict(teacher_emb=ET[:, :, :3])),
    ("targets must have shape", ValueError, dict(targets=Y[:, :4])),
    ("targets must have shape", ValueError, dict(targets=Y[None])),
    ("targets must be", TypeError, dict(targets=Y.to(torch.complex64))),
    ("targets", TypeError, dict(targets=Y.tolist())),
    ("empty batch", ValueError, dict(student_emb=ES[:0], teacher_emb=ET[:0], targets=Y[:0])),
    ("empty label", ValueError, dict(student_emb=ES[:, :0], teacher_emb=ET[:, :0], targets=Y[:, :0])),
    ("empty width", ValueError, dict(student_emb=ES[..., :0], teacher_emb=ET[..., :0])),
    ("targets is on meta", ValueError, dict(targets=Y.to("meta"))),
    ("teacher_emb is on meta", ValueError, dict(teacher_emb=ET.to("meta"))),
    ("lambda_cd", ValueError, dict(lambda_cd="100")),
    ("lambda_id", ValueError, dict(lambda_id=float("nan"))),
    ("backend", ValueError, dict(backend="cuda-graphs")),
]


@pytest.mark.parametrize("needle,error,override", LED_CASES, ids=[c[0] + "-" + "-".join(c[2]) for c in LED_CASES])
def test_fused_led_rejects(needle, error, override):
    kwargs = dict(student_emb=ES, teacher_emb=ET, targets=Y) | override
    es, et, y = kwargs.pop("student_emb"), kwargs.pop("teacher_emb"), kwargs.pop("targets")
    with pytest.raises(error, match=needle):
        fused_led(es, et, y, **kwargs)


def test_l2d_loss_rejects_targets_that_do_not_match_the_logits():
    zs, zt = logits(4, 6)
    with pytest.raises(ValueError, match="targets must have shape"):
        L2DLoss()(zs, zt, ES, ET, Y)


@pytest.mark.parametrize("kwargs,needle", [(dict(lambda_mld="10"), "lambda_mld"), (dict(backend="tpu"), "backend")])
def test_l2d_loss_rejects_bad_settings(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        L2DLoss(**kwargs)


def test_non_contiguous_inputs_are_accepted(monkeypatch):
    monkeypatch.undo()
    zs = ZS.t().contiguous().t()
    assert torch.isfinite(fused_mld(zs, ZT, backend="torch"))
