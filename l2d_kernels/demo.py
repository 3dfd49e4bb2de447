"""``python -m l2d_kernels.demo``: the L2D losses on a COCO-shaped batch, on every backend here.

Targets are real MS-COCO label rows; embeddings and logits are random. For each backend the demo
prints the losses, their agreement with the eager reference, and the median time of forward plus
backward.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from . import reference
from .api import fused_led, fused_mld
from .backends import available_backends, triton_interpreted
from .labels import sample_targets


def _time_ms(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: compilation, allocation
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _forms(backends):
    """(name, LED function, MLD function) per row of the table."""
    rows = [(f"fused_* backend={b!r}",
             lambda es, et, y, b=b: fused_led(es, et, y, backend=b, return_components=True),
             lambda zs, zt, b=b: fused_mld(zs, zt, backend=b)) for b in backends]
    rows.append(("authors' loops (eager)",
                 lambda es, et, y: reference.led_loops(es, et.detach(), y, return_components=True),
                 lambda zs, zt: reference.mld_authors(zs, zt)))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m l2d_kernels.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--labels", type=int, default=80)
    parser.add_argument("--width", type=int, default=768, help="label-wise embedding width D")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    g = torch.Generator().manual_seed(0)
    B, C, D = args.batch, args.labels, args.width
    zs, zt = (torch.randn(B, C, generator=g) * 3).to(device), (torch.randn(B, C, generator=g) * 3).to(device)
    es, et = torch.randn(B, C, D, generator=g).to(device), torch.randn(B, C, D, generator=g).to(device)
    y = sample_targets(B, C, seed=0, device=device)

    backends = available_backends()
    if device.type != "cuda":
        backends = [b for b in backends if b == "torch"]
    print(f"L2D losses on a {B} x {C} x {D} float32 batch on {device}"
          f" ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"targets from MS-COCO 2014 val: {y.sum().item() / B:.2f} positive labels per image")
    if device.type != "cuda" and triton_interpreted():
        print("(Triton's CPU interpreter is left out: it checks correctness, it is not meant to be timed)")

    ref_x = es.clone().requires_grad_()
    reference.led_vectorized(ref_x, et, y).backward()
    header = f"{'form':<26} {'LED':>12} {'CD':>9} {'ID':>9} {'MLD':>9} {'grad err':>9} {'LED ms':>9} {'MLD ms':>9}"
    print(header)
    print("-" * len(header))
    for name, led_fn, mld_fn in _forms(backends):
        x = es.clone().requires_grad_()
        total, cd, id_ = led_fn(x, et, y)
        total.backward()
        err = ((x.grad - ref_x.grad).norm() / ref_x.grad.norm()).item()
        mld = mld_fn(zs, zt)
        zs_x = zs.clone().requires_grad_()
        led_ms = _time_ms(lambda f=led_fn: f(es.clone().requires_grad_(), et, y)[0].backward(), device, args.repeats)
        mld_ms = _time_ms(lambda f=mld_fn, z=zs_x: f(z, zt).backward(), device, args.repeats)
        print(f"{name:<26} {total.item():>12.4f} {cd.item():>9.5f} {id_.item():>9.5f} {mld.item():>9.4f}"
              f" {err:>9.1e} {led_ms:>9.3f} {mld_ms:>9.3f}")
    print("grad err: |grad - grad of the eager vectorized form| / |that|; times: median of forward + backward")


if __name__ == "__main__":
    main()
