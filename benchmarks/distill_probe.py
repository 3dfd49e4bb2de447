"""Why a distilled student wins or loses: LED's pull against BCE's, and how closely it follows the teacher.

    python benchmarks/distill_probe.py --teacher RUN/teacher.pt --objective l2d [--student "[16, 'max', 24, 'max', 32]"]

Trains one student on the shapes data of ``python -m l2d_kernels.train`` (same data seed, same
held-out split) against a teacher checkpoint of that command, with one objective:

- ``bce``: BCE alone;  ``l2d``: BCE + 10 MLD + LED(100, 1000), the paper's;
- ``cd``: 100 CD alone (no BCE), to see whether the student can follow the teacher's class-aware
  distance structure at all.

It prints, at the first step of every epoch, the gradient norm over the student's parameters of
each part of the paper's objective (BCE, 10 MLD, 100 CD, 1000 ID), whatever the objective trained;
after every epoch the held-out CD, ID (per batch of 64, summed over groups) and MLD ("batchmean")
against the teacher; at the end the held-out mAP.
The teacher's outputs are computed once (no flips: both students of a comparison see the same
batches). ``--json FILE`` appends the run's numbers as one JSON line.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import sys
import time

import torch

from l2d_kernels import fused_led, fused_mld, reference
from l2d_kernels.train.data import load_datasets, to_unit_range
from l2d_kernels.train.loop import warmup_cosine
from l2d_kernels.train.metrics import evaluate
from l2d_kernels.train.models import CNN_BACKBONES, LabelWiseNet

EVAL_BATCH = 64


def _split(args):
    """The shapes data of ``python -m l2d_kernels.train --seed DATA_SEED``, as whole tensors."""
    train, val, _ = load_datasets("shapes", None, 0, args.data_seed, args.train_images, args.val_images)
    return (to_unit_range(train.images), train.labels.float(), to_unit_range(val.images), val.labels.float())


@torch.no_grad()
def _outputs(model, x, batch=500):
    model.eval()
    parts = [model(x[i : i + batch]) for i in range(0, len(x), batch)]
    return torch.cat([e for e, _ in parts]), torch.cat([z for _, z in parts])


def _parts(zs, zt, es, et, y):
    """The paper's objective, part by part, each with its weight."""
    return {
        "bce": reference.bce(zs, y),
        "10 mld": 10 * fused_mld(zs, zt),
        "100 cd": fused_led(es, et, y, lambda_cd=100.0, lambda_id=0.0),
        "1000 id": fused_led(es, et, y, lambda_cd=0.0, lambda_id=1000.0),
    }


def _grad_norms(parts: dict, params) -> dict:
    norms = {}
    for name, loss in parts.items():
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        norms[name] = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads if g is not None))
    return norms


@torch.no_grad()
def held_out_distances(student, x, y, et, zt) -> dict:
    """Mean over held-out batches of 64 of CD, ID (unweighted group sums) and MLD against the teacher."""
    es, zs = _outputs(student, x)
    sums = {"cd": 0.0, "id": 0.0, "mld": 0.0}
    n = len(x) // EVAL_BATCH
    for k in range(n):
        s = slice(k * EVAL_BATCH, (k + 1) * EVAL_BATCH)
        _, cd, id_ = fused_led(es[s], et[s], y[s], return_components=True)
        sums["cd"] += float(cd) / n
        sums["id"] += float(id_) / n
        sums["mld"] += float(fused_mld(zs[s], zt[s])) / n
    return sums


def run(args) -> dict:
    torch.manual_seed(args.seed)
    xtr, ytr, xva, yva = _split(args)
    checkpoint = torch.load(args.teacher, map_location="cpu")["model"]
    dim = checkpoint["head.queries"].shape[1]
    teacher = LabelWiseNet("cnn-teacher", ytr.shape[1], dim)
    teacher.load_state_dict(checkpoint)
    et_train, zt_train = _outputs(teacher, xtr)
    et_val, zt_val = _outputs(teacher, xva)

    CNN_BACKBONES["probe-student"] = ast.literal_eval(args.student)
    torch.manual_seed(args.seed * 1000 + 2)
    student = LabelWiseNet("probe-student", ytr.shape[1], dim)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = len(xtr) // args.batch_size
    schedule = warmup_cosine(optimizer, args.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(args.seed)
    record = dict(objective=args.objective, student=args.student, parameters=sum(p.numel() for p in params),
                  dim=dim, train_images=args.train_images, epochs=args.epochs, teacher=args.teacher, grad_norms=[],
                  held_out=[])
    started = time.perf_counter()
    for epoch in range(args.epochs):
        student.train()
        order = torch.randperm(len(xtr), generator=generator)
        for step in range(steps_per_epoch):
            idx = order[step * args.batch_size : (step + 1) * args.batch_size]
            es, zs = student(xtr[idx])
            parts = _parts(zs, zt_train[idx], es, et_train[idx], ytr[idx])
            if step == 0:
                record["grad_norms"].append(_grad_norms(parts, params))
                print(f"epoch {epoch + 1}, first step: gradient norms",
                      ", ".join(f"{k} {v:.3g}" for k, v in record["grad_norms"][-1].items()), flush=True)
            if args.objective == "bce":
                loss = parts["bce"]
            elif args.objective == "l2d":
                loss = sum(parts.values())
            else:
                loss = parts["100 cd"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        held = held_out_distances(student, xva, yva, et_val, zt_val)
        record["held_out"].append(held)
        print(f"epoch {epoch + 1}: held-out CD {held['cd']:.3f}, ID {held['id']:.4f}, MLD {held['mld']:.3f}", flush=True)
    _, scores = _outputs(student, xva)
    record["mAP"] = evaluate(scores, yva > 0.5)["mAP"]
    record["seconds"] = time.perf_counter() - started
    print(f"{args.objective}: held-out mAP {100 * record['mAP']:.2f} ({record['seconds']:.0f} s)")
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(record) + "\n")
    return record


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="teacher.pt written by python -m l2d_kernels.train")
    p.add_argument("--objective", choices=["bce", "l2d", "cd"], default="l2d")
    p.add_argument("--student", default=repr(CNN_BACKBONES["cnn-student"]),
                   help="backbone stages: channels per conv layer, 'max' for a 2 x 2 max-pool")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-images", type=int, default=8000)
    p.add_argument("--val-images", type=int, default=2000)
    p.add_argument("--data-seed", type=int, default=0, help="the --seed of the run that trained the teacher")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--json", help="append the run's numbers to this file (one JSON line)")
    return p.parse_args(argv)


if __name__ == "__main__":
    run(parse_args())
    sys.exit(0)
