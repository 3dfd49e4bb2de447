"""``python -m l2d_kernels.train``: train a teacher, a student alone and a student with L2D; compare.

By default on the embedded shapes data set (drawn at run time, no download); on MS-COCO 2014 or
Pascal VOC 2007 with ``--data coco|voc --data-root DIR``. Under ``torchrun --nproc_per_node N`` it
trains with DistributedDataParallel (nccl on GPUs, gloo on CPUs), LED's class-aware groups taken
over the global batch.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..nn import L2DLoss
from .data import DataError, load_datasets
from .loop import DistributedL2D, cache_teacher_outputs, predict, train_model
from .metrics import evaluate
from .models import LabelWiseNet, parameter_count

QUICK = dict(train_images=1200, val_images=400, teacher_epochs=2, student_epochs=2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m l2d_kernels.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", choices=["shapes", "coco", "voc"], default="shapes", help="data set")
    p.add_argument("--data-root", help="folder of MS-COCO 2014 (train_anno.json, train2014/, val_anno.json, "
                                       "val2014/) or of Pascal VOC 2007 (VOCtrainval2007/, VOCtest2007/)")
    p.add_argument("--out", default="runs/l2d", help="folder for results.json, log.jsonl and checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a short run: %s" % QUICK)
    p.add_argument("--teacher", default="cnn-teacher", help="teacher backbone (cnn-teacher, or resnet18/34/50/101)")
    p.add_argument("--student", default="cnn-student", help="student backbone (cnn-student, or resnet18/34/50/101)")
    p.add_argument("--dim", type=int, default=64, help="label-wise embedding width D (teacher and student)")
    p.add_argument("--teacher-epochs", type=int, default=6)
    p.add_argument("--student-epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--train-images", type=int, default=8000, help="shapes data set: training images")
    p.add_argument("--val-images", type=int, default=2000, help="shapes data set: held-out images")
    p.add_argument("--image-size", type=int, default=224, help="real data: images are resized to this square")
    p.add_argument("--workers", type=int, default=0, help="data loader processes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--loss-backend", default="auto", help="backend of the L2D losses")
    p.add_argument("--teacher-checkpoint", help="a teacher.pt of an earlier run (same data, backbone and D): "
                                                "skip training the teacher")
    p.add_argument("--lambda-mld", type=float, default=10.0, help="L2D student: weight of MLD")
    p.add_argument("--lambda-led", type=float, default=1.0, help="L2D student: weight of LED")
    p.add_argument("--lambda-cd", type=float, default=100.0, help="L2D student: weight of CD within LED")
    p.add_argument("--lambda-id", type=float, default=1000.0, help="L2D student: weight of ID within LED")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


def _distributed(device_arg: str):
    """(device, rank, world size), starting the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return torch.device(device_arg), 0, 1
    local = int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = device_arg.startswith("cuda")
    if on_gpu:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if on_gpu else "gloo")
    return torch.device(f"cuda:{local}" if on_gpu else "cpu"), dist.get_rank(), world


def _loaders(train_set, val_set, args, world, rank):
    generator = torch.Generator().manual_seed(args.seed)
    if world > 1:
        sampler = torch.utils.data.DistributedSampler(train_set, world, rank, shuffle=True, seed=args.seed,
                                                      drop_last=True)
        train = torch.utils.data.DataLoader(train_set, args.batch_size, sampler=sampler, num_workers=args.workers,
                                            drop_last=True)
    else:
        train = torch.utils.data.DataLoader(train_set, args.batch_size, shuffle=True, generator=generator,
                                            num_workers=args.workers, drop_last=True)
    val = torch.utils.data.DataLoader(val_set, 256, shuffle=False, num_workers=args.workers)
    return train, val


def run(args) -> dict:
    device, rank, world = _distributed(args.device)
    is_main = rank == 0
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = out / "log.jsonl"
    if is_main:
        log_file.write_text("")
    started = time.perf_counter()

    train_set, val_set, label_names = load_datasets(args.data, args.data_root, args.image_size, args.seed,
                                                    args.train_images, args.val_images)
    train_loader, val_loader = _loaders(train_set, val_set, args, world, rank)
    num_labels = len(label_names)
    if is_main:
        print(f"data: {args.data}, {len(train_set)} training and {len(val_set)} held-out images, {num_labels} labels; "
              f"device {device}, {world} process(es)", file=sys.stderr)

    def build(backbone, seed_offset):
        torch.manual_seed(args.seed * 1000 + seed_offset)
        model = LabelWiseNet(backbone, num_labels, args.dim).to(device)
        return DistributedDataParallel(model) if world > 1 else model

    common = dict(device=device, out_dir=out, log_file=log_file, is_main=is_main, seed=args.seed)
    criterion = L2DLoss(lambda_mld=args.lambda_mld, lambda_led=args.lambda_led, lambda_cd=args.lambda_cd,
                        lambda_id=args.lambda_id, backend=args.loss_backend)
    if world > 1:
        criterion = DistributedL2D(criterion, world)

    teacher = build(args.teacher, 1)
    if args.teacher_checkpoint:
        (teacher.module if world > 1 else teacher).load_state_dict(
            torch.load(args.teacher_checkpoint, map_location=device)["model"])
    else:
        train_model("teacher", teacher, train_loader, val_loader, epochs=args.teacher_epochs, lr=args.lr,
                    loss_scale=world, **common)
    teacher = teacher.module if world > 1 else teacher
    for p in teacher.parameters():
        p.requires_grad_(False)

    vanilla = build(args.student, 2)
    train_model("vanilla", vanilla, train_loader, val_loader, epochs=args.student_epochs, lr=args.lr,
                loss_scale=world, **common)
    cache_teacher_outputs(teacher, train_set, device)
    l2d = build(args.student, 2)  # the same initial weights as the vanilla student
    train_model("l2d", l2d, train_loader, val_loader, epochs=args.student_epochs, lr=args.lr, teacher=teacher,
                criterion=criterion, **common)

    rows = {}
    for name, model, backbone in (("teacher", teacher, args.teacher), ("vanilla", vanilla, args.student),
                                  ("l2d", l2d, args.student)):
        rows[name] = dict(backbone=backbone, parameters=parameter_count(model),
                          **evaluate(*predict(model, val_loader, device)))
    results = dict(teacher_map=rows["teacher"]["mAP"], vanilla_map=rows["vanilla"]["mAP"], l2d_map=rows["l2d"]["mAP"],
                   models=rows, seconds=time.perf_counter() - started, world_size=world,
                   precision="bfloat16 autocast" if device.type == "cuda" else "float32",
                   args={k: v for k, v in vars(args).items()})
    if is_main:
        tmp = out / ".results.json.tmp"
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, out / "results.json")
        print_table(rows, results["seconds"])
    if world > 1:
        dist.destroy_process_group()
    return results


def print_table(rows: dict, seconds: float) -> None:
    titles = {"teacher": "teacher", "vanilla": "student, BCE alone", "l2d": "student, BCE + L2D"}
    print(f"{'model':<20} {'backbone':<12} {'params':>9} {'mAP':>7} {'CF1':>7} {'OF1':>7}")
    for name, row in rows.items():
        print(f"{titles[name]:<20} {row['backbone']:<12} {row['parameters']:>9,} {100 * row['mAP']:>7.2f} "
              f"{100 * row['CF1']:>7.2f} {100 * row['OF1']:>7.2f}")
    print(f"(held-out split; CF1 and OF1 with top-k prediction, k = the image's number of labels; {seconds:.0f} s)")


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    except DataError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
