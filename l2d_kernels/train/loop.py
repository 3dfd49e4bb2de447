"""Training and evaluation: one function per stage, shared by the teacher and both students."""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import sys
import time

import torch
from torch import nn

from .. import reference
from ..api import fused_mld
from ..distributed import global_fused_led
from ..nn import L2DLoss
from .data import TensorImages
from .metrics import evaluate


class Progress:
    """A one-line progress bar on a terminal; a line every 25% elsewhere (logs, CI)."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label, self.enabled = total, label, enabled
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()
        self.last_quarter = -1

    def update(self, done: int, loss: float) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        text = f"{self.label} {done}/{self.total} loss {loss:.4g} {elapsed:.0f}s"
        if self.tty:
            filled = int(24 * done / self.total)
            print(f"\r[{'#' * filled}{'.' * (24 - filled)}] {text}", end="" if done < self.total else "\n",
                  file=sys.stderr, flush=True)
        elif (quarter := 4 * done // self.total) > self.last_quarter:
            self.last_quarter = quarter
            print(text, file=sys.stderr, flush=True)


def atomic_save(obj, path: pathlib.Path) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves a partial file at ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class DistributedL2D(nn.Module):
    """The L2D objective of the global batch, as the part whose gradient reaches this process's inputs.

    BCE is a sum, so the local sum is its part; MLD ("batchmean") is the local sum over the global
    batch size; LED takes CD over the global batch (``global_fused_led``). Multiplied by the world
    size (DistributedDataParallel averages gradients), backward gives the single-process gradient.
    """

    def __init__(self, criterion: L2DLoss, world: int):
        super().__init__()
        self.c, self.world = criterion, world

    def forward(self, zs, zt, es, et, y):
        c = self.c
        bce = reference.bce(zs.float(), y)
        mld = fused_mld(zs, zt, reduction="sum", backend=c.backend) / (zs.shape[0] * self.world)
        led = global_fused_led(es, et, y, lambda_cd=c.lambda_cd, lambda_id=c.lambda_id, backend=c.backend)
        return self.world * (c.lambda_bce * bce + c.lambda_mld * mld + c.lambda_led * led)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def warmup_cosine(optimizer, steps: int):
    """The learning rate of every model here: linear warm-up over the first 5% of ``steps``, then a
    cosine decay to 0 at the last step."""
    steps = max(1, steps)
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


@torch.no_grad()
def cache_teacher_outputs(teacher: nn.Module, dataset, device: torch.device, batch: int = 256) -> None:
    """Give an in-memory data set (``TensorImages``) the frozen teacher's outputs for every image, as
    it is and flipped, so that a distilled student's steps read them instead of running the teacher.
    Other data sets are left as they are (the teacher then runs at every step)."""
    if not isinstance(dataset, TensorImages):
        return
    teacher.eval()
    embeddings, logits = [], []
    for start in range(0, len(dataset), batch):
        images = dataset.normalized(start, start + batch).to(device)
        with _autocast(device):
            pair = [teacher(images), teacher(images.flip(-1))]
        embeddings.append(torch.stack([e for e, _ in pair], 1).cpu())
        logits.append(torch.stack([z for _, z in pair], 1).cpu())
    dataset.teacher_outputs = (torch.cat(embeddings), torch.cat(logits))


@torch.no_grad()
def predict(model: nn.Module, loader, device: torch.device):
    """Scores and bool targets of a whole data set."""
    model.eval()
    scores, targets = [], []
    for images, y, *_ in loader:
        with _autocast(device):
            _, logits = model(images.to(device, non_blocking=True))
        scores.append(logits.float().cpu())
        targets.append(y > 0.5)
    return torch.cat(scores), torch.cat(targets)


def train_model(name, model, loader, val_loader, *, epochs, lr, device, out_dir, log_file, teacher=None,
                criterion=None, is_main=True, loss_scale=1.0, seed=0):
    """Train ``model`` (a teacher or student); with ``teacher``, distill with ``criterion``.

    Each epoch ends with an evaluation on the held-out split, a line in ``log_file`` (JSON) and a
    checkpoint ``out_dir/<name>.pt`` written atomically. ``loss_scale`` multiplies the BCE of a
    model trained alone (the world size under DDP, as ``DistributedL2D`` does for the L2D objective).
    The data order and augmentations restart from ``seed``, so models trained one after the other
    (the two students) see the same batches whatever ran before them.
    """
    torch.manual_seed(seed)
    generator = getattr(getattr(loader, "sampler", None), "generator", None)
    if generator is not None:
        generator.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = warmup_cosine(optimizer, epochs * len(loader))
    if teacher is not None:
        teacher.eval()
    metrics = {}
    for epoch in range(1, epochs + 1):
        model.train()
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        progress = Progress(len(loader), f"{name:>8} epoch {epoch}/{epochs}", is_main)
        total, start = 0.0, time.perf_counter()
        for step, (images, y, *cached) in enumerate(loader, 1):
            images, y = images.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with _autocast(device):
                emb, logits = model(images)
                if teacher is None:
                    loss = loss_scale * reference.bce(logits.float(), y)
                else:
                    if cached:  # the teacher's outputs for these images, computed once (cache_teacher_outputs)
                        t_emb, t_logits = (t.to(device, non_blocking=True) for t in cached)
                    else:
                        with torch.no_grad():
                            t_emb, t_logits = teacher(images)
                    loss = criterion(logits, t_logits, emb, t_emb, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
            progress.update(step, total / step)
        scores, targets = predict(model, val_loader, device)
        metrics = evaluate(scores, targets)
        if is_main:
            record = dict(model=name, epoch=epoch, train_loss=total / len(loader), seconds=time.perf_counter() - start,
                          lr=schedule.get_last_lr()[0], **{f"val_{k}": v for k, v in metrics.items()})
            with open(log_file, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            state = (model.module if hasattr(model, "module") else model).state_dict()
            atomic_save(dict(model=state, epoch=epoch, metrics=metrics), out_dir / f"{name}.pt")
    return metrics
