"""Input checks shared by every loss (SPEC 6): each misuse raises before any kernel runs.

Only metadata is read here (shapes, dtypes, devices), so a check never synchronizes with the GPU.
"""

from __future__ import annotations

import torch

from .reference import REDUCTIONS

HALF_AND_SINGLE = (torch.float32, torch.bfloat16, torch.float16)


def _tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _floating(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _same_device(named: dict[str, torch.Tensor]) -> torch.device:
    (first, t0), *rest = named.items()
    for name, t in rest:
        if t.device != t0.device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {t0.device}: all inputs must share a device")
    return t0.device


def _nonempty(name: str, shape, dims: tuple[str, ...]) -> None:
    for size, dim in zip(shape, dims):
        if size == 0:
            raise ValueError(f"{name} has an empty {dim} dimension (shape {tuple(shape)}): need at least one")


def _fine(a, b, dims: int) -> bool:
    """The inputs' common case, in few operations (every call takes it): floating tensors of ``dims``
    dimensions, one non-empty shape, one device. Anything else goes through the checks that name it."""
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == dims and a.shape == b.shape
            and a.is_floating_point() and b.is_floating_point() and a.numel() > 0 and a.device == b.device)


def check_logits(student_logits, teacher_logits) -> torch.device:
    """Student and teacher logits: floating ``[B, C]`` tensors of one shape on one device."""
    if _fine(student_logits, teacher_logits, 2):
        return student_logits.device
    zs = _tensor("student_logits", student_logits)
    zt = _tensor("teacher_logits", teacher_logits)
    for name, t in (("student_logits", zs), ("teacher_logits", zt)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [batch, labels], got shape {tuple(t.shape)}")
        _floating(name, t)
    if zs.shape != zt.shape:
        raise ValueError(f"student_logits {tuple(zs.shape)} and teacher_logits {tuple(zt.shape)} must have the same shape")
    _nonempty("student_logits", zs.shape, ("batch", "label"))
    return _same_device({"student_logits": zs, "teacher_logits": zt})


def check_targets(targets, shape: torch.Size, against: str) -> None:
    """Targets: a bool, integer or floating ``[B, C]`` tensor matching ``shape``."""
    y = _tensor("targets", targets)
    if y.dtype.is_complex:
        raise TypeError(f"targets must be bool, integer or floating, got dtype {y.dtype}")
    if tuple(y.shape) != tuple(shape):
        raise ValueError(f"targets must have shape {tuple(shape)} to match {against}, got {tuple(y.shape)}")


def check_embeddings(student_emb, teacher_emb, targets) -> torch.device:
    """Student and teacher embeddings ``[B, C, D]`` of one shape, targets ``[B, C]``, one device."""
    if (_fine(student_emb, teacher_emb, 3) and isinstance(targets, torch.Tensor)
            and targets.shape == student_emb.shape[:2] and not targets.dtype.is_complex
            and targets.device == student_emb.device):
        return student_emb.device
    es = _tensor("student_emb", student_emb)
    et = _tensor("teacher_emb", teacher_emb)
    for name, t in (("student_emb", es), ("teacher_emb", et)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D [batch, labels, width], got shape {tuple(t.shape)}")
        _floating(name, t)
    if es.shape != et.shape:
        raise ValueError(f"student_emb {tuple(es.shape)} and teacher_emb {tuple(et.shape)} must have the same shape")
    _nonempty("student_emb", es.shape, ("batch", "label", "width"))
    check_targets(targets, es.shape[:2], "student_emb's [batch, labels]")
    return _same_device({"student_emb": es, "teacher_emb": et, "targets": targets})


def check_reduction(reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_positive(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def check_eps(eps) -> None:
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 0.5:
        raise ValueError(f"eps must be a number in (0, 0.5), got {eps!r}")


def check_weight(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        raise ValueError(f"{name} must be a real number, got {value!r}")
