"""The public losses: check the inputs, pick a backend, run it under autograd."""

from __future__ import annotations

import torch

from . import reference
from ._checks import (
    check_embeddings,
    check_eps,
    check_logits,
    check_positive,
    check_reduction,
    check_weight,
)
from .backends import resolve_backend
from .ops import library


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 for float32 and half inputs, float64 when any input is float64."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _free_cuda_bytes(device: torch.device) -> int:
    """Free device memory plus what PyTorch's caching allocator holds unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _eager_led_form(es: torch.Tensor):
    """The "torch" backend's LED form for these inputs.

    The grouped form reads group sizes on the host: free on a CPU, a synchronization on a GPU. So
    on a GPU (and under torch.compile, which cannot trace that read) the vectorized form, which
    needs none, unless its relation tensors would not fit in the device's free memory: then one
    synchronization per call rather than running out of memory.
    """
    if torch.compiler.is_compiling():
        return reference.led_vectorized
    if es.device.type == "cpu":
        return reference.led_grouped
    if es.device.type == "cuda":
        B, C = es.shape[:2]
        if reference.led_vectorized_bytes(B, C, es.dtype) > _free_cuda_bytes(es.device):
            return reference.led_grouped
    return reference.led_vectorized


def fused_mld(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    reduction: str = "batchmean",
    eps: float = 1e-8,
    temperature: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Multi-label logits distillation: the Bernoulli KL(teacher || student) of each label.

    ``student_logits`` and ``teacher_logits`` are ``[B, C]``. With ``p = clamp(sigmoid(z / T), eps, 1 - eps)``,
    each label contributes ``T^2 [pt log(pt / ps) + (1 - pt) log((1 - pt) / (1 - ps))]``, reduced by
    ``reduction``: ``"batchmean"`` (sum / B, the paper's), ``"sum"``, ``"mean"`` (sum / (B C)) or
    ``"none"`` (``[B, C]``). Computed in a stable log-sigmoid form: finite for any finite logit.
    The teacher receives no gradient. The loss is float32 (float64 for float64 inputs).
    """
    device = check_logits(student_logits, teacher_logits)
    check_reduction(reduction)
    check_eps(eps)
    check_positive("temperature", temperature)
    name = resolve_backend(backend, device, (student_logits.dtype, teacher_logits.dtype))
    teacher_logits = teacher_logits.detach()
    if name == "torch":
        # Contiguous copies, so that a strided input gives bitwise the same result as a packed one.
        dtype = _compute_dtype(student_logits, teacher_logits)
        zs, zt = (t.to(dtype).contiguous() for t in (student_logits, teacher_logits))
        return reference.mld(zs, zt, reduction, eps, temperature)
    return library.mld(name, student_logits, teacher_logits, reduction, float(eps), float(temperature))


def fused_led(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    targets: torch.Tensor,
    *,
    lambda_cd: float = 100.0,
    lambda_id: float = 1000.0,
    backend: str = "auto",
    return_components: bool = False,
):
    """Label-wise embedding distillation: ``lambda_cd * CD + lambda_id * ID``.

    ``student_emb`` and ``teacher_emb`` are ``[B, C, D]`` (one embedding per instance and label),
    ``targets`` is ``[B, C]`` (positive where ``> 0.5``). A CD group is a label's positive instances,
    an ID group an instance's positive labels; each group of ``P >= 2`` rows adds
    ``(1 / P) sum_{a != b} huber(d(a, b) / mean(d) - dt(a, b) / mean(dt))`` over its pairwise
    distances. The teacher receives no gradient.

    Returns the total, or ``(total, cd, id)`` with ``return_components=True``; the unweighted
    ``cd`` and ``id`` sums are for logging and carry no gradient.
    """
    device = check_embeddings(student_emb, teacher_emb, targets)
    check_weight("lambda_cd", lambda_cd)
    check_weight("lambda_id", lambda_id)
    name = resolve_backend(backend, device, (student_emb.dtype, teacher_emb.dtype))
    teacher_emb = teacher_emb.detach()
    if name == "torch":
        dtype = _compute_dtype(student_emb, teacher_emb)
        # Contiguous copies, so that a strided input gives bitwise the same result as a packed one.
        es, et = (t.to(dtype).contiguous() for t in (student_emb, teacher_emb))
        form = _eager_led_form(es)
        total, cd, id_ = form(es, et, targets.contiguous(), lambda_cd, lambda_id, return_components=True)
    else:
        total, losses = library.led(name, student_emb, teacher_emb, targets, float(lambda_cd), float(lambda_id))
        cd, id_ = losses[1], losses[2]
    return (total, cd.detach(), id_.detach()) if return_components else total
