"""Compile every Triton kernel the launchers launch, for a GPU architecture, without a GPU.

    python tests/triton_aot.py [--arch 90] [--resources]

The launchers are run on CPU tensors with Triton's launch replaced by a recorder; each recorded
launch is then compiled ahead of time to a cubin for the architecture, with the exact signature,
constexprs and warp count the launcher used. This checks the compiled (not interpreted) path of
every kernel on a machine with no GPU: type errors, unsupported operations, layout failures. With
``--resources`` it prints each kernel's registers and spill stack (needs Triton's cuobjdump).
Must run with TRITON_INTERPRET unset or 0.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

TYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
              torch.bool: "i1", torch.uint8: "u8", torch.int64: "i64", torch.float64: "fp64"}


def record_launches(run_launchers) -> list:
    """Run ``run_launchers()`` with every Triton launch recorded instead of executed."""
    launches = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = record
    try:
        run_launchers()
    finally:
        JITFunction.run = original
    return launches


def _type_of(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TYPE_NAMES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i64" if not -(2**31) <= value < 2**31 else "i32"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {value!r}")


def compile_launch(fn: JITFunction, args, kwargs, arch: int):
    names = [p.name for p in fn.params]
    constexprs = {n: kwargs[n] for n in names if n in kwargs}
    signature = {}
    for name, value in zip([n for n in names if n not in constexprs], args):
        signature[name] = _type_of(value)
    for name in constexprs:
        signature[name] = "constexpr"
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(n),): v for n, v in constexprs.items()})
    options = {"num_warps": kwargs.get("num_warps", 4)}
    if kwargs.get("maxnreg") is not None:
        options["maxnreg"] = kwargs["maxnreg"]
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _launchers():
    from l2d_kernels.ops import triton_led, triton_mld

    def run():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            zs = torch.zeros(70, 130, dtype=dtype)
            for reduction in ("batchmean", "none"):
                triton_mld.mld_forward(zs, zs, reduction, 1e-8, 1.0)
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
    seen = set()
    for fn, call_args, kwargs in record_launches(_launchers()):
        key = (fn.__name__, tuple(_type_of(a) for a in call_args), tuple(sorted(kwargs.items())))
        if key in seen:
            continue
        seen.add(key)
        kernel = compile_launch(fn, call_args, kwargs, args.arch)
        dtypes = sorted({_type_of(a) for a in call_args if isinstance(a, torch.Tensor)})
        extra = f"  {resources(kernel)}" if args.resources else ""
        print(f"sm_{args.arch} {fn.__name__:<24} {','.join(dtypes):<28}{extra}")
    print(f"compiled {len(seen)} kernel variants for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
