"""Pieces the Triton kernels share."""

from __future__ import annotations

import ast
import functools
import math
import os
import sys
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
# Direct launches launch by launch (a call not replayed whole, below) hand the kernel's launcher each
# tensor as its data pointer, an integer: for a tensor Triton's launcher calls data_ptr() and the
# driver's cuPointerGetAttribute, an integer it takes as it is. Off until a GPU measures it
# (kernel_profile.py's launch-cost lines); a whole call's replay hands integers always (it holds no
# tensor for most of its arguments). Read at each launch.
INT_POINTERS = os.environ.get("L2D_TRITON_INT_POINTERS", "0") == "1"
# A key's later calls replay the whole call, not only its launches (see LaunchCache.replay). Read at
# each call.
CALL_REPLAY = os.environ.get("L2D_TRITON_CALL_REPLAY", "1") != "0"
# Tests only: a list to which every buffer a launcher allocates is appended as (data pointer, bytes),
# in the order the launcher's code allocates them, whichever way the call runs; None: off.
ALLOC_LOG = None


def _empty(shape, dtype, device) -> torch.Tensor:
    """A launcher's buffer (outputs and scratch alike): through here, so that a recording can find it."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if ALLOC_LOG is not None:
        ALLOC_LOG.append((t.data_ptr(), t.numel() * t.element_size()))
    return t


class _JitLaunch:
    """Every launch through Triton's just-in-time path: ``fn[grid](*args, **kwargs)``."""

    __slots__ = ()

    empty = staticmethod(_empty)

    def __call__(self, fn, grid, *args, **kwargs):
        return fn[grid](*args, **kwargs)

    def done(self, outputs=()) -> None:
        pass


JIT_LAUNCH = _JitLaunch()


def _no_launch_hooks() -> bool:
    """Whether Triton's launch hook chains are both empty (no profiler has set one). Triton 3.6 and 3.8
    keep a chain, never None; anything else counts as a hook."""
    enter, exit_ = _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook
    return not getattr(enter, "calls", True) and not getattr(exit_, "calls", True)


class _Recording:
    """A call's launches through the just-in-time path, each compiled kernel kept for the next call of
    the same key (with the arguments Triton binds after the positional ones: compile-time values and
    defaults, fixed by the key).

    Given the call's input tensors, it also writes down where every tensor argument of every launch
    comes from, for a replay of the whole call (``_CallRecipe``): an input itself (the same object), or
    a byte offset into a buffer the call allocated (through ``empty``). Everything else a launch is
    given is taken as fixed by the key. A call with an argument of neither kind, or with one input
    object given twice (its places could not be told apart), keeps its launches only."""

    __slots__ = ("_owner", "_key", "_seq", "_roots", "_n_in", "_allocs", "_launches")

    def __init__(self, owner: "LaunchCache", key, inputs=None):
        self._owner, self._key, self._seq = owner, key, []
        distinct = inputs is not None and len({id(t) for t in inputs}) == len(inputs)
        self._roots = list(inputs) if distinct and CALL_REPLAY else None
        self._n_in = len(self._roots) if self._roots is not None else 0
        self._allocs: list = []
        self._launches: list = []

    def empty(self, shape, dtype, device) -> torch.Tensor:
        t = _empty(shape, dtype, device)
        if self._roots is not None:
            self._roots.append(t)
            self._allocs.append((tuple(t.shape), dtype, t.device))
        return t

    def _source(self, t: torch.Tensor):
        """(root, byte offset) of a tensor argument, or None."""
        roots = self._roots
        for i, root in enumerate(roots):
            if t is root:
                return i, 0
        p = t.data_ptr()
        for i in range(self._n_in, len(roots)):  # views of the call's own buffers (not of its inputs)
            root = roots[i]
            base = root.data_ptr()
            if base <= p < base + root.numel() * root.element_size():
                return i, p - base
        return None

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
                tail = tuple(bound.arguments.values())[len(args):]
                seq.append((fn, kernel, tail, kwargs, tensors))
                if self._roots is not None:
                    self._write_down(kernel, grid, args, tensors, tail)
            else:  # the interpreter, a compile still running, a pre-run hook...: this key keeps Triton's path
                self._seq = None
                self._roots = None
        return kernel

    def _write_down(self, kernel, grid, args, tensors, tail) -> None:
        template = list(args)
        slots = []
        for k in tensors:
            source = self._source(args[k])
            if source is None:
                self._roots = None
                return
            template[k] = None
            slots.append((k, *source))
        n = len(grid)
        self._launches.append((kernel, grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, template,
                               tuple(slots), tail))

    def done(self, outputs=()) -> None:
        """The end of the call; ``outputs``: the buffers the launcher returns, in order."""
        owner = self._owner
        if len(owner._calls) >= LaunchCache.MAX_KEYS:
            owner.clear()
        owner._calls[self._key] = None if self._seq is None else tuple(self._seq)
        roots = self._roots
        if self._seq is not None and roots is not None:
            returned = []
            for t in outputs:
                found = [i for i in range(self._n_in, len(roots)) if roots[i] is t]
                if not found:
                    return  # an output that is not one of the call's buffers: no replay of the whole call
                returned.append(found[0] - self._n_in)
            owner._recipes[self._key] = _CallRecipe(self._n_in, self._allocs, tuple(returned), self._launches)


class _CallRecipe:
    """A whole call of a launcher, replayed for a later call of its key: the call's buffers allocated
    (those it returns one by one, the rest as one block, each at the same offset modulo 256 bytes
    as any allocation), then its launches with their recorded arguments, each tensor argument handed to
    the kernel's launcher as its data pointer (an integer, which the launcher takes as it is: Triton's
    own path calls data_ptr() and the driver's cuPointerGetAttribute for each tensor). None of the
    launcher's Python runs: at COCO's LED forward (six launches, 80 tensor arguments) that Python
    (argument lists, views, launch geometry) was most of a direct call's host time.

    The replay is one generated function (``run(inputs, device)``, as Triton generates its launchers):
    each launch a single call with its arguments written out, integers, finite floats, booleans and
    None as literals, anything else by name. On a 2-core CPU the LED forward's replayed call at 64 x 80
    (width split, Triton 3.8) took 17.4 us with a loop over the recorded arguments, 13.1 with this."""

    __slots__ = ("run",)
    _ALIGN = 256

    def __init__(self, n_in: int, allocs: list, returned: tuple, launches: list):
        names = {"_torch_empty": torch.empty, "_uint8": torch.uint8, "_common": sys.modules[__name__]}
        lines = ["def run(inputs, device):", f"    ({''.join(f'i{k}, ' for k in range(n_in))}) = inputs"]
        lines += [f"    p{k} = i{k}.data_ptr()" for k in range(n_in)]
        sizes, scratch, block = [], [], 0
        for j, (shape, dtype, device) in enumerate(allocs):
            r = n_in + j
            nbytes = math.prod(shape) * dtype.itemsize
            sizes.append(f"(p{r}, {nbytes})")
            if j in returned:
                names[f"shape{r}"], names[f"dtype{r}"], names["dev"] = shape, dtype, device
                lines += [f"    t{r} = _torch_empty(shape{r}, dtype=dtype{r}, device=dev)",
                          f"    p{r} = t{r}.data_ptr()"]
            else:
                names["dev"] = device
                scratch.append(f"    p{r} = b + {block}")
                block += -(-nbytes // self._ALIGN) * self._ALIGN
        if block:  # held until the launches are made, as the recorded call held its buffers
            lines += [f"    scratch = _torch_empty({block}, dtype=_uint8, device=dev)", "    b = scratch.data_ptr()",
                      *scratch]
        logged = "".join(f"{size}, " for size in sizes)
        lines += ["    log = _common.ALLOC_LOG", "    if log is not None:", f"        log.extend(({logged}))",
                  "    stream = _common._driver.active.get_current_stream(device)"]
        for n, (kernel, g0, g1, g2, template, slots, tail) in enumerate(launches):
            names[f"K{n}"], names[f"T{n}"] = kernel, tail
            args = [self._literal(names, f"c{n}_{k}", a) for k, a in enumerate(template)]
            for k, root, offset in slots:
                args[k] = f"p{root} + {offset}" if offset else f"p{root}"
            lines.append(f"    K{n}.run({g0}, {g1}, {g2}, stream, K{n}.function, K{n}.packed_metadata, None, None, "
                         f"None, {''.join(f'{a}, ' for a in args)}*T{n})")
        lines.append(f"    return ({''.join(f't{n_in + j}, ' for j in returned)})")
        source = "\n".join(lines) + "\n"
        exec(compile(source, f"<l2d_kernels call replay {id(self):x}>", "exec"), names)  # noqa: S102
        self.run = names["run"]

    @staticmethod
    def _literal(names: dict, name: str, value) -> str:
        if value is None or type(value) in (bool, int) or (type(value) is float and math.isfinite(value)):
            return repr(value)
        names[name] = value
        return name


class _Replay:
    """A call's launches from the kernels recorded for its key: what ``JITFunction.run`` does once it
    has found its kernel (launch metadata for a profiler's hook, then the kernel's launcher), without
    binding and specializing every argument again. Where Triton's launch hooks are empty chains (Triton
    3.6 and 3.8 keep a chain, never None), no metadata is built and no hook handed on: Triton would
    build a dictionary for each launch and call two chains that call nothing."""

    __slots__ = ("_owner", "_key", "_seq", "_i", "_stream")

    def __init__(self, owner: "LaunchCache", key, seq: tuple, device: int):
        self._owner, self._key, self._seq, self._i = owner, key, seq, 0
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
        if _no_launch_hooks():  # what Triton would build and call does nothing
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

    empty = staticmethod(_empty)

    def _mismatch(self, what: str) -> None:
        """A launch other than the recorded ones: the key missed something that decides the launches (a
        bug of the caller's key). The rest of the call takes the just-in-time path, the key is dropped."""
        warnings.warn(f"l2d_kernels: the Triton launches recorded for this call's key do not match ({what}); "
                      "it takes Triton's just-in-time path", RuntimeWarning, stacklevel=3)
        LaunchCache.mismatches += 1
        self._owner._calls.pop(self._key, None)
        self._owner._recipes.pop(self._key, None)  # made from the same key: as wrong
        self._seq = None

    def done(self, outputs=()) -> None:
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

    A key's later calls replay the whole call where its first one could be written down (see
    ``_Recording``): ``replay`` allocates the call's buffers and makes its launches with the recorded
    arguments, without running the launcher's code at all. The key must then decide everything the
    launcher computes, its scalar arguments included (a launcher's float parameters are part of its
    keys). The replay is left to the launcher's code where a profiler's launch hook is set, or with
    ``CALL_REPLAY`` off; the per-launch checks above hold there.

    Used as ``outputs = cache.replay(key, device, inputs)``, and if that is None, ``launch =
    cache.call(key, device, inputs)``, then ``launch(fn, grid, *args, **kwargs)`` for each launch, the
    call's buffers from ``launch.empty(shape, dtype, device)``, and ``launch.done(outputs)`` at the end
    of the call (a call that raises records nothing)."""

    MAX_KEYS = 256  # distinct keys kept per launcher (cleared when full)
    mismatches = 0

    def __init__(self):
        self._calls: dict = {}
        self._recipes: dict = {}

    @staticmethod
    def _full_key(key, device: int):
        return (key, device, _knobs.runtime.debug, _knobs.compilation.instrumentation_mode,
                getattr(_knobs.runtime, "add_stages_inspection_hook", None))

    def replay(self, key, device: int, inputs):
        """The call's outputs (a tuple), replayed from its key's first call; None: make the call."""
        if not (CALL_REPLAY and DIRECT_LAUNCH and self._recipes) or _COMPILED_KERNEL is None:
            return None
        recipe = self._recipes.get(self._full_key(key, device))
        if recipe is None:
            return None
        if not _no_launch_hooks():
            return None  # a profiler's hook: the launcher's code, whose launches build its metadata
        return recipe.run(inputs, device)

    def call(self, key, device: int, inputs=None):
        if not DIRECT_LAUNCH or _COMPILED_KERNEL is None:
            return JIT_LAUNCH
        key = self._full_key(key, device)
        seq = self._calls.get(key, False)
        if seq is False:
            return _Recording(self, key, inputs)
        if seq is None:
            return JIT_LAUNCH
        return _Replay(self, key, seq, device)

    def clear(self) -> None:
        self._calls.clear()
        self._recipes.clear()


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
    out = launch.empty((), torch.float32, partials.device)
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
