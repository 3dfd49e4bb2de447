"""``L2DLoss``: the paper's whole training objective as one module (SPEC 4)."""

from __future__ import annotations

import torch
from torch import nn

from . import reference
from ._checks import check_targets, check_weight
from .api import fused_led, fused_mld
from .backends import BACKENDS


class L2DLoss(nn.Module):
    """``lambda_bce * BCE + lambda_mld * MLD + lambda_led * LED(lambda_cd, lambda_id)``.

    The defaults are the authors' MS-COCO configuration: ``BCE + 10 MLD + LED(100, 1000)``, where BCE
    is their summed, clamped binary cross entropy on the targets, MLD uses ``"batchmean"`` and LED
    sums its groups. ``forward(student_logits, teacher_logits, student_emb, teacher_emb, targets)``
    returns a scalar; with ``return_components=True`` also a dict of the detached parts
    (``bce``, ``mld``, ``led``, ``cd``, ``id``) for logging.
    """

    def __init__(
        self,
        lambda_bce: float = 1.0,
        lambda_mld: float = 10.0,
        lambda_led: float = 1.0,
        lambda_cd: float = 100.0,
        lambda_id: float = 1000.0,
        backend: str = "auto",
    ):
        super().__init__()
        for name, value in (("lambda_bce", lambda_bce), ("lambda_mld", lambda_mld), ("lambda_led", lambda_led),
                            ("lambda_cd", lambda_cd), ("lambda_id", lambda_id)):
            check_weight(name, value)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.lambda_bce, self.lambda_mld, self.lambda_led = lambda_bce, lambda_mld, lambda_led
        self.lambda_cd, self.lambda_id = lambda_cd, lambda_id
        self.backend = backend

    def forward(self, student_logits, teacher_logits, student_emb, teacher_emb, targets, return_components=False):
        # fused_mld and fused_led check their own inputs; what is left is that the targets fit the logits.
        check_targets(targets, student_logits.shape, "student_logits")
        mld = fused_mld(student_logits, teacher_logits, backend=self.backend)
        led, cd, id_ = fused_led(student_emb, teacher_emb, targets, lambda_cd=self.lambda_cd,
                                 lambda_id=self.lambda_id, backend=self.backend, return_components=True)
        bce = reference.bce(student_logits.to(mld.dtype), targets)
        # Two scaled adds (one kernel each, and in the backward a multiply only for a weight other than
        # 1): the fused losses are cheap enough that the five elementwise kernels and nodes of
        # ``l_bce * bce + l_mld * mld + l_led * led``, each a host round of launch and dispatch,
        # were a visible part of their cost in a host-bound training step.
        total = bce if self.lambda_bce == 1.0 else self.lambda_bce * bce
        total = torch.add(total, mld, alpha=self.lambda_mld)
        total = torch.add(total, led, alpha=self.lambda_led)
        if not return_components:
            return total
        parts = {"bce": bce, "mld": mld, "led": led, "cd": cd, "id": id_}
        return total, {k: v.detach() for k, v in parts.items()}

    def extra_repr(self) -> str:
        return (f"lambda_bce={self.lambda_bce}, lambda_mld={self.lambda_mld}, lambda_led={self.lambda_led}, "
                f"lambda_cd={self.lambda_cd}, lambda_id={self.lambda_id}, backend={self.backend!r}")
