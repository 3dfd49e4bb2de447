"""Pieces the Triton kernels share."""

from __future__ import annotations

import ast
import functools
import os
import warnings

import torch
import triton
import triton.language as tl

SUM_BLOCK = 1024


# Launch geometry in plain Python: in Triton 3.6, triton.cdiv and triton.next_power_of_2 are
# constexpr-function objects that cost several microseconds per host call, on every launch.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def on_input_device(launcher):
    """Run ``launcher(x, ...)`` with ``x``'s GPU as torch's current device.

    Triton launches on torch's current CUDA device, not on the device of the tensors it is given:
    a call on tensors of ``cuda:1`` while ``cuda:0`` is current would run there with pointers into
    another GPU's memory. The device is switched only when it differs (one lookup per call).
    """

    @functools.wraps(launcher)
    def launch(x: torch.Tensor, *args, **kwargs):
        if x.is_cuda and x.device.index != torch.cuda.current_device():
            with torch.cuda.device(x.device):
                return launcher(x, *args, **kwargs)
        return launcher(x, *args, **kwargs)

    return launch


# Launch compiled kernels directly on repeated calls of one shape (see LaunchCache). Read at each call.
DIRECT_LAUNCH = os.environ.get("L2D_TRITON_DIRECT_LAUNCH", "1") != "0"
# Direct launches hand the kernel's launcher each tensor as its data pointer, an integer: for a tensor
# Triton's launcher calls data_ptr() and the driver's cuPointerGetAttribute, an integer it takes as
# it is. Off until a GPU measures it (kernel_profile.py's launch-cost lines). Read at each launch.
INT_POINTERS = os.environ.get("L2D_TRITON_INT_POINTERS", "0") == "1"


class _JitLaunch:
    """Every launch through Triton's just-in-time path: ``fn[grid](*args, **kwargs)``."""

    __slots__ = ()

    def __call__(self, fn, grid, *args, **kwargs):
        return fn[grid](*args, **kwargs)

    def done(self) -> None:
        pass


JIT_LAUNCH = _JitLaunch()


class _Recording:
    """A call's launches through the just-in-time path, each compiled kernel kept for the next call of
    the same key (with the arguments Triton binds after the positional ones: compile-time values and
    defaults, fixed by the key)."""

    __slots__ = ("_cache", "_key", "_seq")

    def __init__(self, cache: dict, key):
        self._cache, self._key, self._seq = cache, key, []

    def __call__(self, fn, grid, *args, **kwargs):
        kernel = fn[grid](*args, **kwargs)
        seq = self._seq
        if seq is not None:
            # Only compile-time values may come by keyword: the rest of the call is replayed as recorded.
            if (isinstance(kernel, _COMPILED_KERNEL) and not fn.pre_run_hooks
                    and not any(not p.is_constexpr and p.name in kwargs for p in fn.params)):
                params = fn.signature.parameters
                bound = fn.signature.bind(*args, **{k: v for k, v in kwargs.items() if k in params})
                bound.apply_defaults()
                tensors = tuple(k for k, a in enumerate(args) if isinstance(a, torch.Tensor))
                seq.append((fn, kernel, tuple(bound.arguments.values())[len(args):], kwargs, tensors))
            else:  # the interpreter, a compile still running, a pre-run hook...: this key keeps Triton's path
                self._seq = None
        return kernel

    def done(self) -> None:
        cache = self._cache
        if len(cache) >= LaunchCache.MAX_KEYS:
            cache.clear()
        cache[self._key] = None if self._seq is None else tuple(self._seq)


class _Replay:
    """A call's launches from the kernels recorded for its key: what ``JITFunction.run`` does once it
    has found its kernel (launch metadata for a profiler's hook, then the kernel's launcher), without
    binding and specializing every argument again. Where Triton's launch hooks are empty chains (Triton
    3.6 and 3.8 keep a chain, never None), no metadata is built and no hook handed on: Triton would
    build a dictionary for each launch and call two chains that call nothing."""

    __slots__ = ("_cache", "_key", "_seq", "_i", "_stream")

    def __init__(self, cache: dict, key, seq: tuple, device: int):
        self._cache, self._key, self._seq, self._i = cache, key, seq, 0
        self._stream = _driver.active.get_current_stream(device)

    def __call__(self, fn, grid, *args, **kwargs):
        i = self._i
        seq = self._seq
        if seq is None or i >= len(seq) or seq[i][0] is not fn or seq[i][3] != kwargs:
            if seq is not None:
                self._mismatch(f"launch {i} is {fn.__name__}")
            return fn[grid](*args, **kwargs)
        self._i = i + 1
        _, kernel, tail, _, tensors = seq[i]
        full = args + tail
        enter, exit_ = _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook
        if not getattr(enter, "calls", True) and not getattr(exit_, "calls", True):
            # Triton's hook chains, both empty (no profiler): what Triton would build and call does nothing.
            enter = exit_ = metadata = None
        else:
            metadata = None if enter is None else kernel.launch_metadata(grid, self._stream, *full)
        if INT_POINTERS:
            # The positions that held tensors when the key was recorded (its layout: tensors there
            # again); anything else there (None has no data_ptr) hands the arguments on as they are.
            try:
                pointers = list(args)
                for k in tensors:
                    pointers[k] = pointers[k].data_ptr()
                full = (*pointers, *tail)
            except AttributeError:
                pass
        n = len(grid)
        kernel.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, self._stream, kernel.function,
                   kernel.packed_metadata, metadata, enter, exit_, *full)
        return kernel

    def _mismatch(self, what: str) -> None:
        """A launch other than the recorded ones: the key missed something that decides the launches (a
        bug of the caller's key). The rest of the call takes the just-in-time path, the key is dropped."""
        warnings.warn(f"l2d_kernels: the Triton launches recorded for this call's key do not match ({what}); "
                      "it takes Triton's just-in-time path", RuntimeWarning, stacklevel=3)
        LaunchCache.mismatches += 1
        self._cache.pop(self._key, None)
        self._seq = None

    def done(self) -> None:
        if self._seq is not None and self._i != len(self._seq):
            self._mismatch(f"{self._i} of {len(self._seq)} recorded launches made")


class LaunchCache:
    """Triton's launch path without its per-launch binding, for the calls of one launcher.

    Each ``fn[grid](...)`` launch costs Triton's binder: every argument specialized (type, 16-byte
    alignment, integers equal to 1 or divisible by 16), a cache key, a lookup. On a 2-core CPU that is
    5-7 us of a launch, and the LED call's width-split path makes six or more of them. Everything
    that decides which kernels a launcher's call launches, with which specializations, is a function
    of few things: the inputs' shapes, strides, dtypes, 16-byte alignment and device, and the module's
    settings; the caller names them as ``key``. The first call of a key goes through Triton's path and
    keeps each launch's compiled kernel; a later call of that key launches the kernels it kept, in
    order, with the kernel's own launcher (as ``JITFunction.run`` does after its lookup). Each launch's
    compile-time arguments (and options such as ``num_warps``) are checked against the recorded ones,
    and a call that launches another kernel, or another number of them, falls back to the
    just-in-time path with a warning and drops the key (``mismatches`` counts them; a test keeps it at
    zero). Triton's debug and instrumentation settings are part of every key. Only on the Triton
    releases of ``DIRECT_LAUNCH_TRITON``.

    Used as ``launch = cache.call(key, device)``, then ``launch(fn, grid, *args, **kwargs)`` for each
    launch and ``launch.done()`` at the end of the call (a call that raises records nothing)."""

    MAX_KEYS = 256  # distinct keys kept per launcher (cleared when full)
    mismatches = 0

    def __init__(self):
        self._calls: dict = {}

    def call(self, key, device: int):
        if not DIRECT_LAUNCH or _COMPILED_KERNEL is None:
            return JIT_LAUNCH
        key = (key, device, _knobs.runtime.debug, _knobs.compilation.instrumentation_mode,
               getattr(_knobs.runtime, "add_stages_inspection_hook", None))
        seq = self._calls.get(key, False)
        if seq is False:
            return _Recording(self._calls, key)
        if seq is None:
            return JIT_LAUNCH
        return _Replay(self._calls, key, seq, device)

    def clear(self) -> None:
        self._calls.clear()


# The Triton releases whose launch path (``JITFunction.run`` after its lookup) the direct launches
# repeat, checked by tests/launch_replay.py on 3.6 and 3.8; any other takes Triton's path throughout.
DIRECT_LAUNCH_TRITON = ((3, 6), (3, 7), (3, 8))


def _direct_launch_parts():
    version = tuple(int(part) for part in triton.__version__.split(".")[:2] if part.isdigit())
    if version not in DIRECT_LAUNCH_TRITON:
        return None, None, None
    from triton import knobs
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime.driver import driver

    return CompiledKernel, knobs, driver


_COMPILED_KERNEL, _knobs, _driver = _direct_launch_parts()


def alignment_key(*tensors: torch.Tensor) -> int:
    """One bit per tensor: whether its data pointer is 16-byte aligned (Triton specializes on it)."""
    bits = 0
    for t in tensors:
        bits = (bits << 1) | (t.data_ptr() & 15 == 0)
    return bits


@triton.jit
def clamp(x, lo, hi):
    """min(max(x, lo), hi) that keeps NaN (the hardware min/max would replace it by a bound)."""
    above = tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(above, hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def at_least(x, lo):
    """max(x, lo) that keeps NaN."""
    return tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def sum_vector(ptr, n, BLOCK: tl.constexpr, CACHE: tl.constexpr):
    """Sum of ``ptr[0:n]`` in float32, in a fixed order (one program); ``CACHE``: the loads' cache
    modifier (".cg" for values other programs of the same launch wrote)."""
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(ptr + offs, mask=offs < n, other=0.0, cache_modifier=CACHE)
    return tl.sum(acc, axis=0)


@triton.jit
def _finalize_sum_kernel(partials_ptr, out_ptr, n, scale, BLOCK: tl.constexpr):
    tl.store(out_ptr, sum_vector(partials_ptr, n, BLOCK, "") * scale)


def finalize_sum(partials: torch.Tensor, scale: float, launch=JIT_LAUNCH) -> torch.Tensor:
    """``scale * partials.sum()`` as a 0-d float32 tensor, deterministic."""
    out = torch.empty((), dtype=torch.float32, device=partials.device)
    launch(_finalize_sum_kernel, (1,), partials, out, partials.numel(), float(scale), BLOCK=SUM_BLOCK)
    return out


def settle_cache_keys(namespace: dict) -> None:
    """Take the cache key of every Triton function defined in ``namespace`` (a module's globals),
    each function's callees before it.

    Triton keeps compiled kernels on disk under a key that includes the kernel's source, its callees'
    keys and the global constexprs they read. Before 3.7 it merged a callee's globals into the
    caller's key before computing the callee's own (triton-lang/triton#10494), so the key of a
    kernel whose helpers read a global (``_split_kernel``: 182d32 when its helpers were hashed first,
    f5c5c9 when it came first, 948b70 after ``_gram_kernel``: Triton 3.6) depended on which kernels
    the process had launched before: a new process (a training restart, a DDP rank, a test worker)
    could miss the cache and compile again. Callees first gives every process the same, complete key:
    the one Triton 3.7 and later compute. Under the interpreter there is nothing to hash."""
    jit_function = triton.runtime.jit.JITFunction
    done = set()

    def settle(fn) -> None:
        if id(fn) in done:
            return
        done.add(id(fn))
        for node in ast.walk(fn.parse()):
            callee = fn.__globals__.get(node.id) if isinstance(node, ast.Name) else None
            if isinstance(callee, jit_function):
                settle(callee)
        fn.cache_key  # noqa: B018 (computed and kept by Triton)

    for value in list(namespace.values()):
        if isinstance(value, jit_function) and value.__module__ == namespace["__name__"]:
            settle(value)


settle_cache_keys(globals())
