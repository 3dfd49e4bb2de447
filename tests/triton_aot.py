"""Compile every Triton kernel the launchers launch, for a GPU architecture, without a GPU.

    python tests/triton_aot.py [--arch 90] [--resources]

The launchers are run on CPU tensors with each launch recorded as Triton specializes it for the
architecture (``benchmarks/triton_cache.py``'s recorder: Triton's own argument types, alignments,
compile-time values and options); each record is then compiled ahead of time to a cubin. This
checks the compiled (not interpreted) path of every kernel on a machine with no GPU: type errors,
unsupported operations, layout failures. With ``--resources`` it prints each kernel's registers
and spill stack (needs Triton's cuobjdump).
Must run with TRITON_INTERPRET unset or 0.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import torch
import triton

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import triton_cache  # noqa: E402  (the launch recorder and compile, shared with the GPU check's cache)


def _launchers():
    from l2d_kernels.ops import triton_led, triton_mld

    def run():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            zs = torch.zeros(70, 130, dtype=dtype)
            for reduction in ("batchmean", "none"):
                triton_mld.mld_forward(zs, zs, reduction, 1e-8, 1.0)
            if dtype == torch.float32:  # a call without gradient: every store of it compiled out
                triton_mld.mld_forward(zs, zs, "batchmean", 1e-8, 1.0, with_grad=False)
            # 130 members > SMALL_MAX, so the large-group passes launch too; then launches whose groups
            # hold at most 64 and at most 32 members (the main kernel is compiled for the sizes a
            # launch can need: 130 / 3, 64 / 40 and 32 / 20 possible members).
            # Each at a width of one slice (every group whole in one program) and of three (the
            # width-split path: plan, partial Grams, split gradient; its float16 kernels are its
            # bfloat16 ones with another element type, left out for compile time).
            for B, C in ((130, 3), (64, 40), (32, 20)):
                for width in (40,) if dtype == torch.float16 else (40, 3 * triton_led.SLICE_WIDTH):
                    es = torch.zeros(B, C, width, dtype=dtype)
                    triton_led.led_forward(es, es, torch.zeros(B, C, dtype=torch.bool), 100.0, 1000.0)
                    if dtype == torch.float32:  # without gradient (ADD = NO_GRAD), float32 alone
                        triton_led.led_forward(es, es, torch.zeros(B, C, dtype=torch.bool), 100.0, 1000.0,
                                               with_grad=False)
            # The backward's scaling, with bool and float targets.
            for y in (torch.zeros(4, 3, dtype=torch.bool), torch.zeros(4, 3)):
                triton_led.led_scale(torch.zeros(4, 3, 40, dtype=dtype), y, torch.ones(()))
        # The kernel profile's empty kernel (benchmarks/kernel_profile.py), which measures a launch's
        # host cost on the GPU: only the compiled path resolves its annotations among the module's
        # globals, so a kernel that the interpreter runs can still fail there (it did, on an H100).
        sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))
        import kernel_profile

        kernel_profile.launch_costs("cpu", calls=1)

    return run


def resources(kernel) -> str:
    cuobjdump = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(kernel.asm["cubin"])
        fh.flush()
        out = subprocess.run([str(cuobjdump), "--dump-resource-usage", fh.name], capture_output=True, text=True)
    line = next((ln for ln in out.stdout.splitlines() if "REG:" in ln), "?")
    return " ".join(field for field in line.split() if field.split(":")[0] in ("REG", "STACK", "SHARED"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--resources", action="store_true")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run with TRITON_INTERPRET unset: the interpreter replaces the compiled kernels")
    functions: dict = {}
    records = triton_cache.record([("launchers", _launchers())], args.arch, functions)
    for data in records:
        kernel = triton_cache.compile_record(data, functions[data], args.arch)
        signature = json.loads(data)["signature"].values()
        dtypes = sorted({t[1:] for t in signature if isinstance(t, str) and t.startswith("*")})
        extra = f"  {resources(kernel)}" if args.resources else ""
        print(f"sm_{args.arch} {kernel.name:<24} {','.join(dtypes):<28}{extra}")
    print(f"compiled {len(records)} kernel variants for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
