"""Where a training step's time goes, per loss form: the step of benchmarks/test_step.py under
``torch.profiler``, on a GPU.

    python benchmarks/step_profile.py [--steps 3] [--rounds 15] [--forms bce-only,fused-triton,...] [--out FILE.md]

For each form: ``wall`` (median of timed steps, synchronized), ``device busy`` (the sum of the
step's kernel times; overlapping streams would count twice, this step has one), the gap between
the two (time the GPU waited on the host), and the kernels that take more device time per step
than in the BCE-only step (what the form's losses launch), largest first. Profiler ranges
(``Optimizer.step#...``) are not kernels and are left out.

Every form is timed before any is profiled, in interleaved rounds (one step of each form per
round), so that neither drift nor anything a profiling session leaves behind favours one form: an
earlier version timed each form right after profiling the one before, and on an H100 its walls
(BCE-only 36.8 ms, eager vectorized 46.8, fused Triton 68.7) disagreed with the benchmark's of the
same lease (34.1, 35.6, 42.3); which of the two causes it was, that run could not tell.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import test_step
from harness import emit


def _kernels_per_step(step, steps: int) -> dict:
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    per_kernel = collections.defaultdict(float)
    for event in prof.events():
        if event.device_type == DeviceType.CUDA and "#" not in event.name:  # "Optimizer.step#Adam.step": a range
            per_kernel[event.name] += event.device_time / steps
    return per_kernel


def _walls_ms(steps: dict, rounds: int) -> dict:
    """Median synchronized wall time of each step, the forms interleaved round by round."""
    times = {form: [] for form in steps}
    for _ in range(rounds):
        for form, step in steps.items():
            torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times[form].append(1e3 * (time.perf_counter() - start))
    return {form: statistics.median(t) for form, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per form")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (one step of each form)")
    parser.add_argument("--forms", default="bce-only,eager-vectorized,fused-triton,fused-cuda")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("step_profile: no GPU here", file=sys.stderr)
        return 1
    pair = test_step.make_pair()
    forms = [f for f in args.forms.split(",") if f in test_step.FORMS]
    steps = {form: test_step.make_step(pair, test_step.FORMS[form]) for form in forms}
    test_step.settle(pair, {form: test_step.FORMS[form] for form in forms})
    walls = _walls_ms(steps, args.rounds)
    kernels = {form: _kernels_per_step(steps[form], args.steps) for form in forms}
    rows = []
    for form in forms:
        busy = sum(kernels[form].values()) / 1e3
        rows.append(f"| {form} | {walls[form]:.2f} | {busy:.2f} | {walls[form] - busy:.2f} |")
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}", "",
             "| form | wall ms/step | device busy ms/step | GPU idle ms/step |", "|---|---|---|---|", *rows, ""]
    base = kernels.get("bce-only", {})
    for form in forms:
        if form == "bce-only":
            continue
        extra = sorted(((t - base.get(name, 0.0), name) for name, t in kernels[form].items()), reverse=True)
        shown = "; ".join(f"{name[:60]} +{dt:.1f} us" for dt, name in extra[:8] if dt > 1.0)
        total = sum(kernels[form].values()) - sum(base.values())
        lines.append(f"- {form}: device time over BCE-only {total / 1e3:.2f} ms/step; largest: {shown or '-'}")
    emit("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
