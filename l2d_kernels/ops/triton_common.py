"""Pieces the Triton kernels share."""

from __future__ import annotations

import ast
import functools

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
    def launch(x: torch.Tensor, *args):
        if x.is_cuda and x.device.index != torch.cuda.current_device():
            with torch.cuda.device(x.device):
                return launcher(x, *args)
        return launcher(x, *args)

    return launch


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
def sum_vector(ptr, n, BLOCK: tl.constexpr):
    """Sum of ``ptr[0:n]`` in float32, in a fixed order (one program)."""
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(ptr + offs, mask=offs < n, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _finalize_sum_kernel(partials_ptr, out_ptr, n, scale, BLOCK: tl.constexpr):
    tl.store(out_ptr, sum_vector(partials_ptr, n, BLOCK) * scale)


def finalize_sum(partials: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * partials.sum()`` as a 0-d float32 tensor, deterministic."""
    out = torch.empty((), dtype=torch.float32, device=partials.device)
    _finalize_sum_kernel[(1,)](partials, out, partials.numel(), scale, BLOCK=SUM_BLOCK)
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
