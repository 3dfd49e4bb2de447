"""Fill Triton's on-disk cache, ahead of time and without a GPU, with the kernels that the GPU
check's fused calls will launch.

    python benchmarks/triton_cache.py [--arch 90] [--jobs 2] [--cases gpu-check] [--verify] [--list]

Triton compiles a kernel the first time a process launches it with a new specialization (argument
types, pointer alignments, integers equal to 1 or divisible by 16, compile-time values, warps) and
keeps it in ``TRITON_CACHE_DIR`` (default ``~/.triton/cache``), under a key made of the Triton
build, the kernel's source, the specialization and the target; a later process with the same Triton
build finds it there instead of compiling. On the fourth H100 run most of a 10-minute GPU check went
to compiling (``PERF_NOTES.md``). This tool:

1. runs each case's fused Triton calls, forward and backward, on CPU tensors (left uninitialized:
   nothing is computed) with a stand-in Triton driver that reports ``--arch`` as the current
   target, and Triton's ``jit_cache_hook`` recording each launch's specialization and stopping it
   before it compiles or launches. The binder, the specialization and the options are Triton's own,
   so each record is what a launch of the same call on such a GPU compiles;
2. compiles each distinct record (``JITFunction.preload``) into the cache, in ``--jobs`` processes.

``--verify`` then runs the same calls through Triton's whole just-in-time path (the stand-in driver
again, the launch itself stopped) and fails unless every kernel comes from the cache: the keys match.
The cache serves a GPU only with the same Triton build (version, Python and ptxas alike); a process
with another one compiles as before. ``fix_paths`` makes a cache moved to another folder usable
(Triton's index files name their files by absolute path).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import json
import os
import pathlib
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from unittest import mock

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]  # kernel_profile, sanitizer_driver

# What Triton writes beside each kernel's binary and metadata (its intermediate forms), which a
# launch never reads: --binary-only removes them (a fifth of the size).
IR_SUFFIXES = (".ttir", ".ttgir", ".llir", ".ptx", ".source")


class _Stop(Exception):
    """Raised in place of a kernel launch: the record (or the compile) is all that was wanted."""


class _StandInDriver:
    """What Triton's just-in-time path asks of its driver before a launch, for a GPU that is not
    here: device 0, stream 0 and the target ``sm_<arch>``. Loading a compiled kernel is refused."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def __getattr__(self, name):  # utils.load_binary, launcher_cls, ...: a launch
        raise _Stop(name)


@contextlib.contextmanager
def _stand_in_driver(arch: int):
    from triton.runtime.driver import driver

    saved = driver._active
    driver.set_active(_StandInDriver(arch))
    try:
        yield
    finally:
        driver._active = saved


class TritonBinding:
    """Triton's own binding of a launch's arguments and the kernel key it looks up, for an sm_<arch>
    target, as ``JITFunction.run`` computes them before its lookup: ``(bound arguments, key)`` for
    ``fn``, positional ``args`` and keyword ``kwargs`` (options such as ``num_warps`` included)."""

    def __init__(self, arch: int = 90):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self._backend = make_backend(GPUTarget("cuda", arch, 32))
        self._binders: dict = {}

    def __call__(self, fn, args, kwargs):
        from triton.runtime import jit

        if fn not in self._binders:
            self._binders[fn] = (jit.create_function_from_signature(fn.signature, fn.params, self._backend), {})
        binder, key_cache = self._binders[fn]
        bound, specialization, options = binder(*args, **dict(kwargs, debug=False))
        return bound, jit.compute_cache_key(key_cache, specialization, options)


def stand_in_kernel(on_launch=None):
    """A compiled kernel without a binary (a ``CompiledKernel``, as the direct launches require): its
    launch calls ``on_launch`` with the launcher's arguments, or does nothing."""
    from triton.compiler.compiler import CompiledKernel

    class StandInKernel(CompiledKernel):
        def __init__(self):  # noqa: D107 (no binary to set up; no module for the destructor to unload)
            self.function, self.packed_metadata, self.module = 0, (), None

        def launch_metadata(self, grid, stream, *args):
            return None

        def run(self, *args):
            if on_launch is not None:
                on_launch(*args)

    return StandInKernel()


def _fresh_binders():
    """Forget every kernel's binder and in-memory kernels (made for another driver's target)."""
    from triton.runtime.jit import JITFunction

    for module in ("l2d_kernels.ops.triton_led", "l2d_kernels.ops.triton_mld", "l2d_kernels.ops.triton_common"):
        for value in vars(importlib.import_module(module)).values():
            if isinstance(value, JITFunction):
                value.device_caches.clear()


@contextlib.contextmanager
def _recording(arch: int, records: dict, functions: dict | None = None):
    """Launches record ``{specialization data: (module, kernel name)}`` instead of compiling (and, in
    ``functions``, each record's kernel object)."""
    from triton import knobs

    def hook(*, fn, compile, **_):
        records.setdefault(compile["specialization_data"], (fn.module, fn.name))
        if functions is not None:
            functions.setdefault(compile["specialization_data"], fn.jit_function)
        return True  # handled: Triton neither compiles nor launches

    saved = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = hook
    try:
        with _stand_in_driver(arch):
            _fresh_binders()
            yield
    finally:
        knobs.runtime.jit_cache_hook = saved
        _fresh_binders()


def _led_case(B, C, D, dtype, teacher_dtype=None, settings=(), tiny_scratch=False, misaligned_teacher=False,
              with_grad=True):
    def call():
        from kernel_profile import _triton_led_settings
        from l2d_kernels.ops import library
        from sanitizer_driver import tiny_split_scratch

        es = torch.empty(B, C, D, dtype=dtype).requires_grad_()
        et = torch.empty(B * C * D + misaligned_teacher, dtype=teacher_dtype or dtype)[int(misaligned_teacher):]
        et = et.view(B, C, D)
        with _triton_led_settings(settings), tiny_split_scratch() if tiny_scratch else contextlib.nullcontext():
            with torch.set_grad_enabled(with_grad):
                total, _ = library.led("triton", es, et, torch.zeros(B, C, dtype=torch.bool), 100.0, 1000.0)
            if with_grad:
                total.backward()

    name = f"led {B}x{C}x{D} {str(dtype)[6:]}" + (f"/{str(teacher_dtype)[6:]}" if teacher_dtype else "")
    name += " misaligned teacher" if misaligned_teacher else ""
    name += "" if with_grad else " without gradient"
    return name + "".join(f" {k}={v}" for k, v in settings) + (" tiny scratch" if tiny_scratch else ""), call


def _mld_case(B, C, dtype, reduction="batchmean"):
    def call():
        from l2d_kernels.ops import library

        zs = torch.empty(B, C, dtype=dtype).requires_grad_()
        loss = library.mld("triton", zs, torch.empty(B, C, dtype=dtype), reduction, 1e-8, 1.0)
        loss.sum().backward()

    return f"mld {B}x{C} {str(dtype)[6:]} {reduction}", call


def _empty_kernel_case():
    def call():
        import kernel_profile

        kernel_profile.launch_costs("cpu", calls=1)
        kernel_profile.direct_launch_costs("cpu", calls=1)
        # The public API refuses the Triton backend on CPU tensors outside the interpreter: here the
        # launches are only recorded.
        with mock.patch("l2d_kernels.api.resolve_backend", lambda backend, device, dtypes: backend):
            kernel_profile.objective_costs(["triton"], "cpu", calls=1)

    return "the kernel profile's launch costs", call


def _sanitizer_cases() -> list:
    """The Triton calls of ``tests/sanitizer_driver.py``'s small set (``L2D_SANITIZE_SET=small``)."""
    import sanitizer_driver as sd

    cases = []
    for dtype in sd.SMALL_DTYPES:
        for B, C, D in sd.SMALL_LED_SHAPES:
            cases.append(_led_case(B, C, D, dtype))
            if D > 64:  # the driver's "D > 64": the Triton split path, then with a tiny scratch
                cases.append(_led_case(B, C, D, dtype, tiny_scratch=True))
            if (B, C, D) in sd.SMALL_NO_GRAD_SHAPES:
                cases.append(_led_case(B, C, D, dtype, with_grad=False))
        cases += [_mld_case(B, C, dtype, reduction) for B, C in sd.SMALL_MLD_SHAPES for reduction in sd.MLD_REDUCTIONS]
    return cases


def gpu_check_cases() -> list:
    """(name, call) for what ``benchmarks/gpu_check.sh`` runs at fixed shapes: the benchmarks' and
    the kernel profile's shapes (``harness.py``), the GPU tests' large shapes (``tests/test_gpu.py``),
    the profile's default variant rows at COCO, the sanitizer driver's small set. The suites' small
    shapes are left to the GPU."""
    from harness import GPU_DTYPES, GPU_LED_SHAPES, GPU_MLD_SHAPES

    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    cases = [_led_case(B, C, D, dtype) for _, B, C, D in GPU_LED_SHAPES for dtype in GPU_DTYPES]
    # tests/test_gpu.py: the large shapes, half precision at COCO. Then a bfloat16 student with a
    # float32 teacher, one mix of dtypes that autocast can give (the step benchmark, the training loop).
    cases += [_led_case(32, 10000, 256, f32), _led_case(64, 9605, 768, f32), _led_case(64, 80, 768, f16),
              _led_case(64, 80, 768, bf16, f32), _led_case(64, 80, 768, f32, misaligned_teacher=True),
              _led_case(1024, 80, 768, f32, with_grad=False), _led_case(32, 10000, 256, f32, with_grad=False)]
    # The kernel profile's default variant rows (gpu_check.sh's bench_all).
    cases += [_led_case(64, 80, 768, f32, with_grad=False), _led_case(64, 80, 768, f32, settings=(("GRAM_WARPS", 8),)),
              _led_case(64, 80, 768, f32, settings=(("GRAM_WARPS", 1),)),
              _led_case(64, 80, 768, f32, settings=(("SLICE_WIDTH", 128),)),
              _led_case(64, 80, 768, f32, settings=(("GRAM_MAX_REGISTERS", 0),)),
              _led_case(64, 80, 768, f32, settings=(("GRAM_MAX_REGISTERS", 96),)),
              _led_case(64, 80, 768, f32, settings=(("EARLY_LAUNCH", 0),))]
    # tests/test_gpu.py's comparison of early launches with launches in order, at its other shapes,
    # and preflight.py's at each of its LED cases.
    import preflight

    in_order = [((1024, 80, 768), f32), ((16, 9605, 256), f32)]
    in_order += [(shape, dtype) for loss, shape, dtype in preflight.CASES if loss == "led"]
    cases += [_led_case(*shape, dtype, settings=(("EARLY_LAUNCH", 0),)) for shape, dtype in dict.fromkeys(in_order)
              if (shape, dtype) != ((64, 80, 768), f32)]  # COCO's, above
    # MLD at the MLD benchmark's shapes and at the L2D benchmark's (its first three LED shapes).
    mld_shapes = dict.fromkeys([(B, C) for _, B, C in GPU_MLD_SHAPES] + [(B, C) for _, B, C, _ in GPU_LED_SHAPES[:3]])
    cases += [_mld_case(B, C, dtype) for B, C in mld_shapes for dtype in GPU_DTYPES]
    cases += [_mld_case(64, 80, f32, "none"), _mld_case(4096, 1000, f32, "none")]
    cases.append(_empty_kernel_case())
    return cases + _sanitizer_cases()


def small_cases() -> list:
    """A few seconds of compiling: the tests' check of this tool."""
    return [_led_case(4, 20, 160, torch.float32), _mld_case(8, 20, torch.float32)]


CASES = {"gpu-check": gpu_check_cases, "small": small_cases}


def record(cases, arch: int, functions: dict | None = None) -> dict:
    """``{specialization data: (module, kernel name)}`` for every launch of the cases' calls; with
    ``functions``, also ``{specialization data: kernel}`` there (for kernels made inside a function,
    which a worker process cannot import)."""
    records: dict = {}
    with _recording(arch, records, functions):
        for _, call in cases:
            call()
    return records


def compile_record(data: str, kernel, arch: int):
    """One record compiled for sm_<arch> (``JITFunction.preload``), into the cache: the compiled kernel."""
    with _stand_in_driver(arch):
        return kernel.preload(data)


def _compile_one(item):
    """(kernel name, seconds, whether the cache already held it)."""
    from triton import knobs

    data, (module, name), arch = item
    hit = []
    saved = knobs.compilation.listener
    knobs.compilation.listener = lambda *, cache_hit, **_: hit.append(bool(cache_hit))
    start = time.perf_counter()
    try:
        compile_record(data, getattr(importlib.import_module(module), name), arch)
    finally:
        knobs.compilation.listener = saved
    return name, time.perf_counter() - start, all(hit)


def _importable(where) -> bool:
    """A kernel that a worker can find by module and name (not one made inside a function)."""
    return "<locals>" not in where[1]


def compile_all(records: dict, arch: int, jobs: int) -> list:
    """Compile every record into the cache (``JITFunction.preload``): [(kernel name, seconds, found in
    the cache)]."""
    items = [(data, where, arch) for data, where in records.items() if _importable(where)]
    if jobs <= 1:
        return [_compile_one(item) for item in items]
    # Workers started fresh (not forked from a process that has imported torch and Triton).
    import multiprocessing

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile_one, items))


def verify(cases, arch: int) -> tuple[int, list]:
    """Run the cases through Triton's just-in-time path (the launch stopped): (cache hits, the
    kernels compiled instead)."""
    from triton import knobs

    hits = collections.Counter()
    missed = []

    def listener(*, src, cache_hit, **_):
        if not _importable((None, src.fn.fn.__qualname__)):
            return  # not compiled ahead (see compile_all)
        hits[bool(cache_hit)] += 1
        if not cache_hit:
            missed.append(src.name)

    saved = knobs.compilation.listener
    knobs.compilation.listener = listener
    try:
        with _stand_in_driver(arch):
            _fresh_binders()
            for _, call in cases:
                with contextlib.suppress(_Stop):
                    _run_stopping_each_launch(call)
    finally:
        knobs.compilation.listener = saved
        _fresh_binders()
    return hits[True], missed


def _run_stopping_each_launch(call):
    """``call()`` with every Triton launch going as far as loading its kernel, then skipped."""
    from triton.runtime.jit import JITFunction

    original = JITFunction.run

    def run(self, *args, **kwargs):
        with contextlib.suppress(_Stop):
            return original(self, *args, **kwargs)

    JITFunction.run = run
    try:
        call()
    finally:
        JITFunction.run = original


def build_fingerprint(arch: int) -> dict:
    """What a cache entry's key takes from this machine: the Triton build (its sources and library:
    ``triton_key``), ptxas and the target. Two machines share cache entries only where these agree."""
    import hashlib
    import platform

    import triton
    from triton.backends.nvidia.compiler import get_ptxas_version
    from triton.runtime.cache import triton_key

    ptxas = get_ptxas_version(arch).strip().splitlines()[-1]
    return {"triton": triton.__version__, "triton_key": hashlib.sha256(triton_key().encode()).hexdigest()[:16],
            "ptxas": ptxas, "arch": arch, "python": platform.python_version()}


ORIGIN = "l2d-cache-origin.json"  # the fingerprint of the machine that filled a cache, at its root


def fix_paths(cache_dir: str) -> int:
    """Point the cache's index files (``__grp__*.json``, which name their files by absolute path) at
    ``cache_dir``, where the cache now is, leaving out files that are not there. Returns how many
    kernels the cache holds."""
    root = pathlib.Path(cache_dir).resolve()
    kernels = 0
    for index in root.glob("*/__grp__*.json"):
        group = json.loads(index.read_text())
        paths = {name: index.parent / pathlib.Path(p).name for name, p in group.get("child_paths", {}).items()}
        group["child_paths"] = {name: str(path) for name, path in paths.items() if path.exists()}
        index.write_text(json.dumps(group))
        kernels += any(name.endswith(".cubin") for name in group["child_paths"])
    return kernels


def binary_only(cache_dir: str) -> int:
    """Remove the kernels' intermediate forms from the cache (see IR_SUFFIXES); returns bytes freed."""
    root = pathlib.Path(cache_dir)
    freed = 0
    for path in root.glob("*/*"):
        if path.suffix in IR_SUFFIXES and any(root.glob(f"{path.parent.name}/*.cubin")):
            freed += path.stat().st_size
            path.unlink()
    fix_paths(cache_dir)
    return freed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=0,
                        help="compute capability x 10 (default: the GPU's here, else 90)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cases", choices=sorted(CASES), default="gpu-check")
    parser.add_argument("--verify", action="store_true", help="then check that every launch finds its kernel")
    parser.add_argument("--list", action="store_true", help="print the kernels to compile, compile nothing")
    parser.add_argument("--binary-only", action="store_true",
                        help="then remove the intermediate forms, keeping what a launch reads (before --verify)")
    parser.add_argument("--fix-paths", metavar="DIR", help="only rewrite a moved cache's index files")
    args = parser.parse_args(argv)
    if args.fix_paths:
        print(f"{args.fix_paths}: {fix_paths(args.fix_paths)} kernels")
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run with TRITON_INTERPRET unset: the interpreter compiles nothing")
    arch = args.arch or (torch.cuda.get_device_capability()[0] * 10 + torch.cuda.get_device_capability()[1]
                         if torch.cuda.is_available() else 90)
    cases = CASES[args.cases]()
    start = time.perf_counter()
    records = record(cases, arch)
    kinds = collections.Counter(name for _, name in records.values())
    print(f"{len(cases)} cases, {len(records)} kernel specializations for sm_{arch} "
          f"({', '.join(f'{n} {k}' for k, n in kinds.most_common())}), recorded in {time.perf_counter() - start:.1f} s")
    local = sorted({name for where in records.values() if not _importable(where) for name in where[1:]})
    if local:
        print(f"left to compile at first launch (made inside a function): {', '.join(local)}")
    if args.list:
        return 0
    from triton import knobs

    held = fix_paths(knobs.cache.dir) if os.path.isdir(knobs.cache.dir) else 0
    here = build_fingerprint(arch)
    origin = pathlib.Path(knobs.cache.dir) / ORIGIN
    if origin.exists():
        there = json.loads(origin.read_text())
        same = all(there.get(k) == here[k] for k in ("triton_key", "ptxas", "arch"))
        print(f"the cache was filled on {there} ({'the same build' if same else 'another build'}); here: {here}")
    print(f"compiling into {knobs.cache.dir} (holding {held} kernels) with {args.jobs} processes")
    start = time.perf_counter()
    times = compile_all(records, arch, args.jobs)
    compiled = [(name, seconds) for name, seconds, hit in times if not hit]
    slowest = ", ".join(f"{n} {s:.1f} s" for n, s in sorted(compiled, key=lambda t: -t[1])[:3])
    print(f"{len(times) - len(compiled)} found in the cache, {len(compiled)} compiled, in "
          f"{time.perf_counter() - start:.1f} s" + (f" (slowest: {slowest})" if compiled else ""))
    if args.binary_only:
        print(f"removed {binary_only(knobs.cache.dir) / 2**20:.1f} MiB of intermediate forms")
    if not origin.exists():
        origin.write_text(json.dumps(here))
    if args.verify:
        hits, misses = verify(cases, arch)
        print(f"verify: {hits} launches found their kernel in the cache, {len(misses)} compiled"
              + (f": {', '.join(misses)}" if misses else ""))
        if misses or not hits:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
