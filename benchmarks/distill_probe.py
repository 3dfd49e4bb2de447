"""Why a distilled student wins or loses: LED's pull against BCE's, and how closely it follows the teacher.

    python benchmarks/distill_probe.py --teacher RUN/teacher.pt --objective l2d [--student "[16, 'max', 24, 'max', 32]"]

Trains one student on the shapes data of ``python -m l2d_kernels.train`` (same data seed, same
held-out split) against a teacher checkpoint of that command, with one objective:

- ``bce``: BCE alone;  ``l2d``: BCE + 10 MLD + LED(100, 1000), the paper's (other weights with
  ``--lambda-mld/--lambda-cd/--lambda-id``);
- ``cd``: 100 CD alone (no BCE), to see whether the student can follow the teacher's class-aware
  distance structure at all.

It prints, at the first step of every epoch, the gradient norm over the student's parameters of
each part of the paper's objective (BCE, 10 MLD, 100 CD, 1000 ID), whatever the objective trained;
after every epoch the held-out CD, ID (per batch of 64, summed over groups) and MLD ("batchmean")
against the teacher; at the end the held-out mAP.
By default the teacher's outputs are computed once (no augmentation: both students of a comparison
see the same batches). ``--augment flip`` flips each image with probability 1/2, as the training
loop does; ``--augment flip+cutout`` also paints a square of ``--cutout`` pixels (default 16, half
the image side, the size of the L2D authors' Cutout) at a random centre in one random colour. With
augmentation the teacher runs on every augmented batch, so it sees the student's view.
``--json FILE`` appends the run's numbers as one JSON line.

    python benchmarks/distill_probe.py --teacher RUN/teacher.pt --agreement OTHER/teacher.pt

trains nothing: it prints the held-out CD and ID between two teachers' embeddings (OTHER in the
student's place) and those of an "equidistant" student whose rows in every group are equally far
apart (one-hot rows), the value of a student that knows nothing of the teacher's structure.
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


def augment(x: torch.Tensor, kind: str, cutout: int, generator: torch.Generator) -> torch.Tensor:
    """A batch of images ``[N, 3, H, W]`` in [-1, 1], flipped and (``flip+cutout``) with one square painted."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if kind == "flip+cutout":
        cy, cx = torch.randint(0, h, (n,), generator=generator), torch.randint(0, w, (n,), generator=generator)
        colour = torch.rand(n, 3, generator=generator) * 2 - 1
        rows = (torch.arange(h)[None, :] - cy[:, None]).abs() <= cutout // 2
        cols = (torch.arange(w)[None, :] - cx[:, None]).abs() <= cutout // 2
        square = rows[:, None, :, None] & cols[:, None, None, :]
        x = torch.where(square, colour[:, :, None, None], x)
    return x


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


def _append_json(path, record: dict) -> None:
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def _mean_over_batches(n_images: int, values) -> dict:
    """Mean over the held-out batches of 64 of each value that ``values(batch slice)`` returns."""
    n = n_images // EVAL_BATCH
    sums = {}
    for k in range(n):
        for name, value in values(slice(k * EVAL_BATCH, (k + 1) * EVAL_BATCH)).items():
            sums[name] = sums.get(name, 0.0) + float(value) / n
    return sums


@torch.no_grad()
def held_out_distances(student, x, y, et, zt) -> dict:
    """Mean over held-out batches of 64 of CD, ID (unweighted group sums) and MLD against the teacher."""
    es, zs = _outputs(student, x)

    def values(s):
        _, cd, id_ = fused_led(es[s], et[s], y[s], return_components=True)
        return {"cd": cd, "id": id_, "mld": fused_mld(zs[s], zt[s])}

    return _mean_over_batches(len(x), values)


def _load_teacher(path: str, labels: int) -> LabelWiseNet:
    checkpoint = torch.load(path, map_location="cpu")["model"]
    teacher = LabelWiseNet("cnn-teacher", labels, checkpoint["head.queries"].shape[1])
    teacher.load_state_dict(checkpoint)
    return teacher.eval()


def agreement(args) -> dict:
    """Held-out CD and ID between two teachers, and those of an equidistant student, per batch of 64."""
    _, _, xva, yva = _split(args)
    teacher, other = _load_teacher(args.teacher, yva.shape[1]), _load_teacher(args.agreement, yva.shape[1])
    et, _ = _outputs(teacher, xva)
    eo, _ = _outputs(other, xva)
    B, C, D = EVAL_BATCH, yva.shape[1], et.shape[2]
    # CD groups hold rows of different images, ID groups rows of different labels: rows one-hot by
    # image (for CD) and by label (for ID) make every group's rows equidistant.
    by_image = torch.eye(D)[:B, None, :].expand(B, C, D).contiguous() if B <= D else None
    by_label = torch.eye(D)[None, :C, :].expand(B, C, D).contiguous() if C <= D else None

    def values(s):
        _, cd, id_ = fused_led(eo[s], et[s], yva[s], return_components=True)
        out = {"teachers_cd": cd, "teachers_id": id_}
        if by_image is not None:
            out["equidistant_cd"] = fused_led(by_image, et[s], yva[s], lambda_cd=1.0, lambda_id=0.0)
        if by_label is not None:
            out["equidistant_id"] = fused_led(by_label, et[s], yva[s], lambda_cd=0.0, lambda_id=1.0)
        return out

    sums = _mean_over_batches(len(xva), values)
    for name in ("equidistant_cd", "equidistant_id"):
        sums.setdefault(name, float("nan"))
    record = dict(mode="agreement", teacher=args.teacher, other=args.agreement, **sums)
    print(", ".join(f"{k} {v:.4g}" for k, v in sums.items()))
    _append_json(args.json, record)
    return record


def run(args) -> dict:
    if args.agreement:
        return agreement(args)
    torch.manual_seed(args.seed)
    xtr, ytr, xva, yva = _split(args)
    teacher = _load_teacher(args.teacher, ytr.shape[1])
    dim = teacher.head.queries.shape[1]
    et_train, zt_train = _outputs(teacher, xtr) if args.augment == "none" else (None, None)
    et_val, zt_val = _outputs(teacher, xva)

    CNN_BACKBONES["probe-student"] = ast.literal_eval(args.student)
    torch.manual_seed(args.seed * 1000 + 2)
    student = LabelWiseNet("probe-student", ytr.shape[1], dim)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = len(xtr) // args.batch_size
    schedule = warmup_cosine(optimizer, args.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(args.seed)
    weights = {"bce": 1.0, "10 mld": args.lambda_mld / 10, "100 cd": args.lambda_cd / 100,
               "1000 id": args.lambda_id / 1000}
    record = dict(objective=args.objective, student=args.student, parameters=sum(p.numel() for p in params),
                  dim=dim, train_images=args.train_images, epochs=args.epochs, teacher=args.teacher,
                  augment=args.augment, seed=args.seed, grad_norms=[], held_out=[])
    if args.objective == "l2d":
        record.update(lambda_mld=args.lambda_mld, lambda_cd=args.lambda_cd, lambda_id=args.lambda_id)
    if args.augment == "flip+cutout":
        record["cutout"] = args.cutout
    started = time.perf_counter()
    for epoch in range(args.epochs):
        student.train()
        order = torch.randperm(len(xtr), generator=generator)
        for step in range(steps_per_epoch):
            idx = order[step * args.batch_size : (step + 1) * args.batch_size]
            if args.augment == "none":
                x, et, zt = xtr[idx], et_train[idx], zt_train[idx]
            else:
                x = augment(xtr[idx], args.augment, args.cutout, generator)
                with torch.no_grad():
                    et, zt = teacher(x)
            es, zs = student(x)
            parts = _parts(zs, zt, es, et, ytr[idx])
            if step == 0:
                record["grad_norms"].append(_grad_norms(parts, params))
                print(f"epoch {epoch + 1}, first step: gradient norms",
                      ", ".join(f"{k} {v:.3g}" for k, v in record["grad_norms"][-1].items()), flush=True)
            if args.objective == "bce":
                loss = parts["bce"]
            elif args.objective == "l2d":
                loss = sum(weights[name] * part for name, part in parts.items())
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
    _append_json(args.json, record)
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
    p.add_argument("--lambda-mld", type=float, default=10.0, help="objective l2d: weight of MLD")
    p.add_argument("--lambda-cd", type=float, default=100.0, help="objective l2d: weight of CD")
    p.add_argument("--lambda-id", type=float, default=1000.0, help="objective l2d: weight of ID")
    p.add_argument("--augment", choices=["none", "flip", "flip+cutout"], default="none",
                   help="training-image augmentation (the teacher then runs on every augmented batch)")
    p.add_argument("--cutout", type=int, default=16, help="side of the cutout square, pixels")
    p.add_argument("--agreement", metavar="OTHER_TEACHER",
                   help="train nothing: held-out CD and ID between --teacher and this teacher, and an equidistant student's")
    p.add_argument("--json", help="append the run's numbers to this file (one JSON line)")
    return p.parse_args(argv)


if __name__ == "__main__":
    run(parse_args())
    sys.exit(0)
