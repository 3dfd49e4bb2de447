"""LED with class-aware (CD) groups over the global batch under ``torch.distributed``.

With data parallelism each process holds a slice of the batch, but a CD group is one label's
positive images across the *whole* batch. ``global_fused_led`` gathers the embeddings and targets
of every process and computes LED once on the concatenated batch, so that its CD groups are the
global ones (an image's ID group is the same in either batch). The returned value is the LED of the
concatenated batch (the same on every process), and its gradient with respect to this process's
``student_emb`` is this process's slice of the single-process gradient on the concatenated batch:
only that slice of the gathered embeddings carries gradient.

Under DistributedDataParallel, which averages gradients over processes, multiply the loss by the
world size before ``backward()`` to get the single-process gradient of the global batch. All
processes must hold the same number of images (as DistributedSampler arranges).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._checks import check_embeddings
from .api import fused_led


def _gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def global_fused_led(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    targets: torch.Tensor,
    *,
    lambda_cd: float = 100.0,
    lambda_id: float = 1000.0,
    backend: str = "auto",
    group=None,
    return_components: bool = False,
):
    """``fused_led`` with CD over the global batch; see the module docstring."""
    check_embeddings(student_emb, teacher_emb, targets)
    rank = dist.get_rank(group)
    # One small gather and host read per call: unequal batches would otherwise corrupt all_gather.
    sizes = _gather(torch.tensor([student_emb.shape[0]], device=student_emb.device), group)
    if any(int(s) != student_emb.shape[0] for s in sizes):
        raise ValueError(f"student_emb: every process must hold the same batch size, got {[int(s) for s in sizes]}")
    everyone = _gather(student_emb.detach(), group)
    everyone[rank] = student_emb  # only this process's slice carries gradient
    es_all = torch.cat(everyone)
    et_all = torch.cat(_gather(teacher_emb.detach(), group))
    y_all = torch.cat(_gather(targets, group))

    # One call on the concatenated batch. Its CD groups are the global ones; its ID groups are the
    # images' own, so their gradient on this slice is the one of this process's ID groups, and their
    # sum is every process's ID (the same value on every process: the inputs are the same).
    return fused_led(es_all, et_all, y_all, lambda_cd=lambda_cd, lambda_id=lambda_id, backend=backend,
                     return_components=return_components)
