"""Checks ``triton_common.LaunchCache`` without a GPU: the launches a fused call makes directly, from
the kernels kept for its key, are the launches Triton's just-in-time path would make.

    TRITON_INTERPRET=0 python tests/launch_replay.py

Triton's launch is replaced by its own binder (for an sm_90 target) and a stand-in compiled kernel
per specialization: nothing is compiled or run, the inputs are never read. Each case calls a
launcher on several inputs of one layout (fresh tensors, another storage offset of the same
alignment), each call made twice: directly (the LaunchCache) and through the just-in-time path
(``DIRECT_LAUNCH`` off). It fails unless

- every call after a key's first is replayed whole (``_CallRecipe``: every pointer an integer),
  none of its launches through the just-in-time path;
- each direct launch's kernel is the one Triton's binder picked for the same launch of the
  just-in-time call (the same specialization and options: types, 16-byte alignments, integers equal
  to 1 or divisible by 16, compile-time values);
- the direct launches have the grids and arguments of the just-in-time ones, in the same order,
  each pointer (a tensor or an integer) into the same input, or the same buffer of the call (by the
  order the launcher allocates them), at the same offset and 16-byte alignment;
- no key was dropped for a mismatch.

Then the same comparison with Triton's real launch path and real compiled kernels (``_mld_kernel``
and ``_finalize_sum_kernel`` compiled for sm_90, a few seconds; a stand-in driver; each kernel's
own launcher replaced by a log), four ways (the whole call replayed; with a profiler's launch hook;
launch by launch with tensors, and with integer pointers): the arguments Triton's
``JITFunction.run`` hands a kernel's launcher and those of the direct launches must be the same.

Prints one line per case and ``ok`` at the end; exits 1 with the first failure. ``--without-alignment``
leaves the pointers' alignment out of the launchers' keys, a key too coarse, which must fail.
"""

from __future__ import annotations

import contextlib
import os
import sys
from unittest import mock

assert os.environ.get("TRITON_INTERPRET", "0") == "0", "the compiled path's launch is checked: TRITON_INTERPRET=0"

import pathlib  # noqa: E402

import torch  # noqa: E402
from triton.compiler.compiler import CompiledKernel  # noqa: E402
from triton.runtime import jit  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))
from triton_cache import (TritonBinding, _fresh_binders, _stand_in_driver,  # noqa: E402
                          stand_in_kernel)

from l2d_kernels.ops import triton_common, triton_led, triton_mld  # noqa: E402

_bind = TritonBinding(90)
_kernels: dict = {}
LOG: list = []


def _grid3(grid):
    return tuple(grid) + (1,) * (3 - len(grid))


def _arg(value):
    """An argument as logged: a tensor by its data pointer (labelled after the call, see ``_labelled``),
    a launch's metadata for the profiler hooks by its entries, anything else by type and value."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.data_ptr())
    if type(value).__name__ == "LazyDict":
        return ("LazyDict", tuple((k, repr(v)) for k, v in value.data.items()), len(value.extras))
    return (type(value).__name__, value)


def _where(p: int, inputs, allocs) -> tuple:
    """What a data pointer points into: one of the call's inputs, or one of the buffers the launcher
    allocated (``triton_common.ALLOC_LOG``: in the order its code allocates them), and where in it."""
    for k, t in enumerate(inputs):
        base = t.untyped_storage().data_ptr()
        if base <= p < base + t.untyped_storage().nbytes():
            return ("input", k, p - t.data_ptr())
    for j, (base, nbytes) in enumerate(allocs):
        if base <= p < base + nbytes or p == base:
            return ("buffer", j, p - base, p % 16 == 0)
    return ("unknown", p)


def _labelled(entries, inputs, allocs, pointers) -> list:
    """Log entries with every tensor, and every integer at a position in ``pointers`` (a set of (launch,
    position): where the other path handed a tensor), as what it points into."""
    out = []
    for i, entry in enumerate(entries):
        args = []
        for k, a in enumerate(entry[-1]):
            if a[0] == "tensor" or (a[0] == "int" and (i, k) in pointers):
                a = ("pointer",) + _where(a[1], inputs, allocs)
            args.append(a)
        out.append(entry[:-1] + (tuple(args),))
    return out


def _tensor_places(entries) -> set:
    return {(i, k) for i, entry in enumerate(entries) for k, a in enumerate(entry[-1]) if a[0] == "tensor"}


def _jit_run(self, *args, grid, warmup, **kwargs):
    """Triton's ``JITFunction.run`` up to its kernel lookup; the kernel is a stand-in per key, which
    logs each direct launch with its own key (the specialization Triton's binder gave the arguments
    of the launch that recorded it)."""
    bound, key = _bind(self, args, kwargs)
    if (self, key) not in _kernels:
        def direct(g0, g1, g2, stream, function, packed, metadata, enter, exit_, *full, fn=self, key=key):
            LOG.append(("direct", fn.__name__, (g0, g1, g2), key, tuple(map(_arg, full))))

        _kernels[(self, key)] = stand_in_kernel(direct)
    LOG.append(("jit", self.__name__, _grid3(grid), key, tuple(map(_arg, bound.values()))))
    return _kernels[(self, key)]


@contextlib.contextmanager
def _patched():
    with _stand_in_driver(90), mock.patch.object(jit.JITFunction, "run", _jit_run):
        yield


def _one_call(call, direct: bool, log: list = LOG):
    """What ``call`` launched (``log``'s entries, its tensors labelled by what they point into, with
    ``pointers``: see ``_labelled``), directly or through Triton's path; and its raw entries."""
    log.clear()
    allocs = []
    with mock.patch.object(triton_common, "DIRECT_LAUNCH", direct), \
            mock.patch.object(triton_common, "ALLOC_LOG", allocs):
        call()
    return list(log), allocs


def _compare(call, direct_run, jit_run):
    """Both runs of ``call`` labelled alike: the direct launches may hand an integer where Triton's
    path hands a tensor, and must then point into the same place."""
    (direct, direct_allocs), (jit, jit_allocs) = direct_run, jit_run
    places = _tensor_places(jit)
    return (_labelled(direct, call.inputs, direct_allocs, places),
            _labelled(jit, call.inputs, jit_allocs, places))


def check(name: str, calls, recorded: bool = False, first: int = 1) -> None:
    """``calls``: functions of one layout. The first call of the key records (unless ``recorded``: an
    earlier case did; its backward's scaling may share an earlier case's key); every later one must
    launch directly, as the just-in-time path would: the same kernels (each direct launch's kernel
    is the one Triton's binder picked for that launch of the just-in-time call), grids and
    arguments, in the same order, each pointer into the same input or the same buffer of the call
    (by the order the launcher allocates them) at the same offset and 16-byte alignment. A direct
    call replays the whole call (``_CallRecipe``): its pointers are integers. ``first``: the calls
    that are their key's first (keys alternating)."""
    for i, call in enumerate(calls):
        direct_run = _one_call(call, True)
        jit_run = _one_call(call, False)
        direct, through_jit = _compare(call, direct_run, jit_run)
        bad = [d[1] for d, j in zip(direct, through_jit) if d[0] == "direct" and d[1] == j[1] and d[3] != j[3]]
        if bad:
            raise AssertionError(f"{name}: call {i} launched {bad} with a kernel of another specialization")
        kinds = {entry[0] for entry in direct}
        new_key = i < first and not recorded
        if not new_key and kinds != {"direct"}:
            raise AssertionError(f"{name}: call {i} launched {sorted(kinds)}, not directly")
        if new_key and "jit" not in kinds:
            raise AssertionError(f"{name}: a new key's first call launched only directly")
        pointers = {direct_run[0][j][-1][k][0] for j, k in _tensor_places(jit_run[0])}
        if not new_key and pointers - {"int"}:
            raise AssertionError(f"{name}: call {i} handed {sorted(pointers)} as pointers: not the whole-call replay")
        strip = [entry[1:] for entry in direct]
        if strip != [entry[1:] for entry in through_jit]:
            raise AssertionError(f"{name}: call {i}'s direct launches differ from the just-in-time path's:\n"
                                 f"{strip}\n{[entry[1:] for entry in through_jit]}")
        unknown = [a for entry in direct for a in entry[-1] if a[:2] == ("pointer", "unknown")]
        if unknown:
            raise AssertionError(f"{name}: call {i} handed pointers into nothing the call has: {unknown}")
    print(f"{name}: {len(calls)} calls, {len(direct)} launches each")


def _offset(t: torch.Tensor, nbytes: int) -> torch.Tensor:
    """``t``'s values (same strides) in a storage that starts ``nbytes`` bytes (at least one element) earlier."""
    elements = max(1, nbytes // t.element_size())
    flat = torch.empty(t.untyped_storage().nbytes() // t.element_size() + elements, dtype=t.dtype)
    return flat.as_strided(t.shape, t.stride(), elements).copy_(t)


def _led_calls(B, C, D, dtype=torch.float32, teacher=None, targets_dtype=torch.bool, offset=0, transpose=False,
               with_grad=True, lambda_cd=100.0):
    """Three calls on fresh inputs and one on inputs 16 bytes further into their storage (the same
    alignment: the same key); ``offset`` (bytes) moves all of them; without ``with_grad``, the forward
    alone, without gradient."""
    def make(seed, extra=0):
        g = torch.Generator().manual_seed(seed)
        es = torch.randn(B, C, D, generator=g).to(dtype)
        et = torch.randn(B, C, D, generator=g).to(teacher or dtype)
        y = (torch.rand(B, C, generator=g) < 0.3).to(targets_dtype)
        if transpose:  # [C, B, D] storage seen as [B, C, D]
            es, et = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in (es, et))
        if offset + extra:
            es, et, y = (_offset(t, offset + extra) for t in (es, et, y))
        grad_output = torch.tensor(2.0)

        def call():
            _, grad, _ = triton_led.led_forward(es, et, y, lambda_cd, 1000.0, with_grad)
            if with_grad:
                triton_led.led_scale(grad, y, grad_output)

        call.inputs = (es, et, y, grad_output)
        return call

    return [make(0), make(1), make(2), make(3, extra=16)]


def _mld_calls(B, C, reduction, dtype=torch.float32, teacher=None, offset=0, with_grad=True):
    def make(seed):
        g = torch.Generator().manual_seed(seed)
        zs = torch.randn(B, C, generator=g).to(dtype)
        zt = torch.randn(B, C, generator=g).to(teacher or dtype)
        if offset:
            zs, zt = (_offset(t, offset) for t in (zs, zt))
        def call():
            triton_mld.mld_forward(zs, zt, reduction, 1e-8, 2.0, with_grad)

        call.inputs = (zs, zt)
        return call

    return [make(0), make(1), make(2)]


def _check_fallback() -> None:
    """A key that misses what decides the launches (here: the settings left out, then one changed),
    with the whole-call replay off (which, by design, runs none of the launcher's code on a known key,
    so that no check could run there): the call is warned about, falls back to the just-in-time path,
    and launches what it would have; the key's whole-call recipe, made by its first call, is dropped."""
    import warnings

    calls = _led_calls(12, 40, 96)
    recipes = triton_led._FORWARD_LAUNCHES._recipes
    with mock.patch.object(triton_led, "_settings", lambda: ()):
        _one_call(calls[0], True)  # recorded, its whole-call recipe too
        kept = len(recipes)
        with mock.patch.object(triton_led, "SMALL_WARPS", 0), warnings.catch_warnings(record=True) as caught, \
                mock.patch.object(triton_common, "CALL_REPLAY", False):
            warnings.simplefilter("always")
            direct_run = _one_call(calls[1], True)
            jit_run = _one_call(calls[1], False)
    if triton_common.LaunchCache.mismatches != 1 or not any("do not match" in str(w.message) for w in caught):
        raise AssertionError(f"a changed setting outside the key: {triton_common.LaunchCache.mismatches} "
                             f"mismatches, warnings {[str(w.message) for w in caught]}")
    if len(recipes) != kept - 1:
        raise AssertionError("the mismatching key's whole-call recipe was kept")
    direct, through_jit = _compare(calls[1], direct_run, jit_run)
    if [e[1:] for e in direct] != [e[1:] for e in through_jit]:
        raise AssertionError("the call that fell back did not launch what the just-in-time path launches")
    triton_common.LaunchCache.mismatches = 0
    print("a key missing a setting (whole-call replay off): warned, fell back to the just-in-time path")


def _check_compiled() -> None:
    """Triton's own ``JITFunction.run`` and compiled kernels (only their loading and launcher stood in):
    what it hands each kernel's launcher, and what the direct launches hand it, must agree."""
    launches: list = []

    def log(*args):
        """A launcher's arguments; metadata and hooks as what they call: (the metadata's entries and
        the hooks) where a hook is set, nothing where the chains are empty or None."""
        hooks = tuple(tuple(getattr(h, "calls", ())) if h is not None else () for h in args[7:9])
        called = (_arg(args[6]), hooks) if any(hooks) else "no hooks"
        launches.append((tuple(map(_arg, args[:6])), called, tuple(map(_arg, args[9:]))))

    def init_handles(self):  # in place of loading the binary: the launcher logs its arguments
        if self._run is None:
            self.function = 7  # no module: nothing for the destructor to unload
            self._run = log

    triton_mld._LAUNCHES.clear()
    with _stand_in_driver(90), mock.patch.object(CompiledKernel, "_init_handles", init_handles):
        _fresh_binders()
        try:
            from triton import knobs

            def profiler_hook(metadata):
                pass

            # The whole-call replay (integer pointers); with a launch hook set (as a profiler sets),
            # the per-launch replay with tensors; without the whole-call replay, the per-launch replay
            # with the tensors handed as they are, then as their data pointers (INT_POINTERS).
            for hooked, ints, whole in ((False, False, True), (True, False, True), (False, False, False),
                                        (False, True, False)):
                if hooked:
                    knobs.runtime.launch_enter_hook.add(profiler_hook)
                as_ints = ints or (whole and not hooked)
                for calls in (_mld_calls(64, 80, "batchmean"), _mld_calls(200, 300, "sum")):
                    triton_mld._LAUNCHES.clear()
                    for i, call in enumerate(calls):
                        jit_run = _one_call(call, False, launches)
                        with mock.patch.object(triton_common, "INT_POINTERS", ints), \
                                mock.patch.object(triton_common, "CALL_REPLAY", whole):
                            direct_run = _one_call(call, True, launches)
                        direct, through_triton = _compare(call, direct_run, jit_run)
                        if not through_triton or direct != through_triton:
                            raise AssertionError(f"compiled kernels, call {i}: the direct launches' arguments "
                                                 f"differ from Triton's:\n{direct}\n{through_triton}")
                        if hooked != (direct[0][1] != "no hooks"):
                            raise AssertionError(f"hook set {hooked}, launches {direct}")
                        raw = direct_run[0]
                        kinds = {raw[j][-1][k][0] for j, k in _tensor_places(jit_run[0])}
                        if i > 0 and kinds != ({"int"} if as_ints else {"tensor"}):
                            raise AssertionError(f"call {i}: pointers handed as {kinds}, integers expected: {as_ints}")
                    print(f"compiled mld kernels{', a launch hook set' if hooked else ''}"
                          f"{', integer pointers' if ints else ''}"
                          f"{', whole-call replay' if whole and not hooked else ', per-launch replay'}: "
                          f"{len(calls)} calls, {len(direct)} launches each, arguments as Triton's")
                if hooked:
                    knobs.runtime.launch_enter_hook.remove(profiler_hook)
        finally:
            _fresh_binders()
            triton_mld._LAUNCHES.clear()
    if triton_common.LaunchCache.mismatches:
        raise AssertionError(f"{triton_common.LaunchCache.mismatches} keys dropped for a mismatch")


def main() -> int:
    if triton_common._COMPILED_KERNEL is None:
        import triton

        print(f"skipped: no direct launches on Triton {triton.__version__} (DIRECT_LAUNCH_TRITON)")
        return 0
    if "--without-alignment" in sys.argv:
        for module in (triton_led, triton_mld):
            module.alignment_key = lambda *tensors: 0
    cases = {
        "led 8x20x32 (one slice)": _led_calls(8, 20, 32),
        "led 16x80x96 (width split)": _led_calls(16, 80, 96),
        "led 16x80x96 misaligned by 4 bytes": _led_calls(16, 80, 96, offset=4),
        "led 16x80x96 [C, B, D] storage": _led_calls(16, 80, 96, transpose=True),
        "led 16x80x96 bf16 / fp32 teacher, float targets": _led_calls(16, 80, 96, torch.bfloat16, torch.float32,
                                                                     torch.float32),
        "led 4x5x1 (width 1), int targets": _led_calls(4, 5, 1, targets_dtype=torch.int64),
        "led 1x1x80": _led_calls(1, 1, 80),
        "led 136x6x80 (large groups, member lists)": _led_calls(136, 6, 80),
        "led 136x6x80 without gradient": _led_calls(136, 6, 80, with_grad=False),
        "led 16x80x96 without gradient": _led_calls(16, 80, 96, with_grad=False),
        "mld 64x80 batchmean": _mld_calls(64, 80, "batchmean"),
        "mld 200x300 sum (partials)": _mld_calls(200, 300, "sum"),
        "mld 200x300 none": _mld_calls(200, 300, "none"),
        "mld 1x1 mean, misaligned": _mld_calls(1, 1, "mean", offset=4),
        "mld 64x80 fp16 / fp32 teacher": _mld_calls(64, 80, "batchmean", torch.float16, torch.float32),
        "mld 200x300 sum without gradient": _mld_calls(200, 300, "sum", with_grad=False),
    }
    with _patched():
        for name, calls in cases.items():
            check(name, calls)
        # Another misalignment, the same for Triton (which asks only whether a pointer is a multiple of 16).
        check("led 16x80x96 misaligned by 8 bytes", _led_calls(16, 80, 96, offset=8), recorded=True)
        # Settings are part of the key: another SMALL_WARPS launches otherwise, from the same inputs.
        with mock.patch.object(triton_led, "SMALL_WARPS", 0):
            check("led 16x80x96 SMALL_WARPS=0", _led_calls(16, 80, 96))
        # Alternating layouts of one shape: each call finds its own key's kernels.
        mixed = [c for pair in zip(_led_calls(16, 80, 96), _led_calls(16, 80, 96, offset=4)) for c in pair]
        check("led 16x80x96 aligned and misaligned alternating", mixed, recorded=True)
        # A launcher's scalar parameters are part of its keys (the whole-call replay runs none of its
        # code): two lambda_cd values alternating, each call replaying its own.
        mixed = [c for pair in zip(_led_calls(8, 20, 96, lambda_cd=3.0), _led_calls(8, 20, 96, lambda_cd=5.0))
                 for c in pair]
        check("led 8x20x96 lambda_cd 3 and 5 alternating", mixed, first=2)
        if triton_common.LaunchCache.mismatches:
            raise AssertionError(f"{triton_common.LaunchCache.mismatches} keys dropped for a mismatch")
        _check_fallback()
    if "--without-alignment" not in sys.argv:
        _check_compiled()
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
