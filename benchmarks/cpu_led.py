"""LED's eager forms on the CPU: what the "torch" backend costs where there is no GPU.

    python benchmarks/cpu_led.py [--shapes 64x80x768,...] [--forms grouped,vectorized] [--repeats 5] [--out FILE]

Times forward + backward (``torch.autograd.grad``) of ``reference.led_grouped`` (the "torch"
backend's form on CPU tensors) and ``reference.led_vectorized`` (its form on GPUs where it fits, and the
benchmarks' eager baseline) at the benchmark shapes, float32, with the benchmarks' inputs
(``harness.led_inputs``: COCO label rows). Each form and shape runs in a process of its own, so that
its peak resident memory is its own: "peak extra" is that peak less the resident memory once the
inputs exist. A form whose relation tensors would not fit in the machine's available memory
(``reference.led_vectorized_bytes``: 56 bytes per element of its ``C x B x B`` and ``B x C x C``
tensors in float32) is reported as skipped, with the estimate. Prints a Markdown table: the median of
``--repeats`` calls after one warm-up call, and the loss (the forms agree to float32 rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

DEFAULT_SHAPES = "64x20x768,64x80x768,256x80x768,1024x80x768,32x1000x768,16x9605x256"
FORMS = ("grouped", "vectorized")


def _available_bytes() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def measure(form: str, B: int, C: int, D: int, repeats: int) -> dict:
    """One form at one shape, in this process: median seconds, peak extra MiB, loss."""
    import torch

    from harness import led_inputs
    from l2d_kernels import reference

    fn = reference.led_grouped if form == "grouped" else reference.led_vectorized
    es, et, y = led_inputs(B, C, D)
    base = _rss_kib()
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        loss = fn(es, et, y)
        torch.autograd.grad(loss, es)
        if i:
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return dict(seconds=statistics.median(times), peak_extra_mib=max(0, peak - base) / 1024, loss=loss.item(),
                threads=torch.get_num_threads())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES)
    parser.add_argument("--forms", default=",".join(FORMS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # form:BxCxD, run in this process (the child)
    args = parser.parse_args(argv)
    if args.one:
        form, shape = args.one.split(":")
        print(json.dumps(measure(form, *map(int, shape.split("x")), args.repeats)))
        return 0

    import torch

    from harness import emit
    from l2d_kernels import reference

    rows, threads = [], None
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.path.dirname(here), os.environ.get("PYTHONPATH", "")]))
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, also on a machine with a GPU
    for shape in args.shapes.split(","):
        B, C, _ = map(int, shape.split("x"))
        for form in args.forms.split(","):
            if form not in FORMS:
                parser.error(f"--forms: unknown form {form!r} (known: {', '.join(FORMS)})")
            need = reference.led_vectorized_bytes(B, C) if form == "vectorized" else 0
            if need > 0.8 * _available_bytes():
                rows.append(f"| {shape} | {form} | skipped: about {need / 2**30:.0f} GiB of relation tensors, "
                            f"{_available_bytes() / 2**30:.0f} GiB available | | |")
                continue
            child = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", f"{form}:{shape}",
                                    "--repeats", str(args.repeats)], env=env, capture_output=True, text=True)
            if child.returncode != 0:
                rows.append(f"| {shape} | {form} | failed: {child.stderr.strip().splitlines()[-1:]} | | |")
                continue
            r = json.loads(child.stdout.strip().splitlines()[-1])
            threads = r["threads"]
            ms, mib = r["seconds"] * 1e3, r["peak_extra_mib"]
            rows.append(f"| {shape} | {form} | {ms:.1f} | {mib:.0f} | {r['loss']:.7g} |")
    head = [f"LED forward + backward on the CPU, float32, median of {args.repeats} calls "
            f"(torch {torch.__version__}, {threads} threads, {os.cpu_count()} CPUs)", "",
            "| shape (B x C x D) | form | ms | peak extra MiB | loss |", "|---|---|---|---|---|"]
    emit("\n".join(head + rows) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
