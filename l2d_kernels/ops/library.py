"""The fused losses as ``torch.library`` operators, with fake kernels and autograd, and the eager path.

Every fused operator returns ``(loss, grad)``: the forward kernel computes the gradient of the loss
with respect to the student input in the same pass, so backward only scales it by ``grad_output``
(on the device, never reading its value). It scales the saved buffer in place and hands it on, so
the gradient is never held twice (the peak memory of a step stays at one gradient). The buffer has
the student's dtype, except for a float16 student: float32 (``grad_dtype``), rounded to float16
after the scaling, so that a loss scale rescues what float16 cannot hold at a scale of 1; there
backward writes a float16 copy (scaling and rounding in one kernel, LED's zero rows included) and
holds it beside the float32 buffer, which it leaves as it was. Otherwise a second
backward through the same loss (``retain_graph=True``) is refused by autograd's check of saved
tensors, rather than silently reusing a scaled buffer. The fake kernels let ``torch.compile`` trace
the calls without a graph break.

Eager calls (everything outside ``torch.compile``) skip the operator's Python dispatch: ``mld`` and
``led`` below call the kernels' launcher under one ``torch.autograd.Function``. Its LED backward
scales only the gradient rows whose target is positive (the backend's ``led_scale``; every other row
is zero, and stays so under a finite ``grad_output``): at 16 x 9605 x 256 the H100 spent 126 us of a
278 us call multiplying the whole gradient, nearly all of it zeros. Under ``torch.compile`` the
backward is the plain in-place multiply. On a 2-core CPU, with the launchers stubbed out so that
only the host path is timed (``benchmarks/host_overhead.py``), a forward + ``autograd.grad`` of
``fused_mld`` took 97-108 us through the operator and 52-57 us this way, ``fused_led`` 132-140 us
and 72-87 us (its total no longer goes through an indexing node, whose backward launched two more
kernels).

    l2d_kernels::mld_<backend>(zs, zt, reduction, eps, temperature, with_grad=True) -> (loss, d loss / d zs)
    l2d_kernels::led_<backend>(es, et, targets, lambda_cd, lambda_id, with_grad=True)
        -> ([lambda_cd * CD + lambda_id * ID, CD, ID] as float32[3], d total / d es, the total as float32[])
    l2d_kernels::led_scale_cuda(Tensor(a!) grad, targets, grad_output) -> ()   (CUDA extension only)

Eager calls also have second derivatives. A backward with ``create_graph=True`` (a Hessian-vector
product, a gradient penalty) hands on the kernels' gradient, bitwise the same, made differentiable
with the derivative of the eager reference's gradient, which such a backward computes from the
inputs the node keeps (references: where the caller would otherwise free its inputs before backward,
they live until then). ``torch.compile`` refuses double backward altogether.

A call that needs no gradient (grad mode off, or a student input without ``requires_grad``: a
validation loss, say) passes ``with_grad=False``: the kernels compute the same losses, bitwise, and
neither write nor allocate the gradient (an empty tensor stands in the gradient's place), so the
call reads its inputs and writes nothing of their size; eagerly it also skips the autograd node.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import cuda_ext


def loss_dtype(t: Tensor) -> torch.dtype:
    """Losses are float32 for float32 and half inputs (the accumulation dtype)."""
    return torch.promote_types(t.dtype, torch.float32)


def grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the gradient the kernels write for a student input of ``dtype``: its own, except
    float16, whose gradient is kept in float32 until backward has applied ``grad_output`` and is then
    rounded once. Float16's exponent range is narrow: a gradient rounded to it before a loss scale
    (``torch.amp.GradScaler``) is applied would lose what underflows (MLD with ``reduction="mean"`` at
    256 x 1000: every element below float16's smallest normal) and turn an overflow into inf, which a
    ``grad_output`` of 0 makes NaN. Bfloat16 has float32's exponent range."""
    return torch.float32 if dtype == torch.float16 else dtype


def _grad_fake(x, with_grad):
    if not with_grad:
        return x.new_empty(0, dtype=grad_dtype(x.dtype))
    return torch.empty_like(x, dtype=grad_dtype(x.dtype), memory_format=torch.contiguous_format)


def _mld_fake(zs, zt, reduction, eps, temperature, with_grad=True):
    shape = zs.shape if reduction == "none" else ()
    return zs.new_empty(shape, dtype=loss_dtype(zs)), _grad_fake(zs, with_grad)


def _led_fake(es, et, targets, lambda_cd, lambda_id, with_grad=True):
    return es.new_empty(3, dtype=torch.float32), _grad_fake(es, with_grad), es.new_empty((), dtype=torch.float32)


def _save_grad(ctx, inputs, output):
    ctx.without_grad = len(inputs) > 5 and not inputs[5]  # with_grad=False: no gradient to hand on
    ctx.student_dtype = inputs[0].dtype
    ctx.save_for_backward(output[1])
    # The outputs after the first (the gradient; LED's total apart, which traced code does not use)
    # are never differentiated through. Autograd would otherwise hand backward a zero-filled tensor
    # of the gradient's size as its "gradient": a second gradient-sized buffer at the peak of every
    # step (seen on an H100: backward's peak was two gradients).
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # so the loss output's gradient is the only one, never None here


def _refuse_without_grad(ctx):
    if ctx.without_grad:
        raise RuntimeError("l2d_kernels: backward through an operator called with with_grad=False, which "
                           "computed no gradient")


def _mld_backward(ctx, grad_loss, _):
    _refuse_without_grad(ctx)
    (grad,) = ctx.saved_tensors
    return grad.mul_(grad_loss).to(ctx.student_dtype), None, None, None, None, None


def _led_backward(ctx, grad_losses, *_):
    _refuse_without_grad(ctx)
    (grad,) = ctx.saved_tensors
    return grad.mul_(grad_losses[0]).to(ctx.student_dtype), None, None, None, None, None


def _register(name: str, fake, backward) -> None:
    torch.library.register_fake(name)(fake)
    torch.library.register_autograd(name, backward, setup_context=_save_grad)


@torch.library.custom_op("l2d_kernels::mld_triton", mutates_args=())
def mld_triton(zs: Tensor, zt: Tensor, reduction: str, eps: float, temperature: float, with_grad: bool = True
               ) -> tuple[Tensor, Tensor]:
    from .triton_mld import mld_forward

    return mld_forward(zs, zt, reduction, eps, temperature, with_grad)


@torch.library.custom_op("l2d_kernels::led_triton", mutates_args=())
def led_triton(es: Tensor, et: Tensor, targets: Tensor, lambda_cd: float, lambda_id: float, with_grad: bool = True
               ) -> tuple[Tensor, Tensor, Tensor]:
    from .triton_led import led_forward

    return led_forward(es, et, targets, lambda_cd, lambda_id, with_grad)


_register("l2d_kernels::mld_triton", _mld_fake, _mld_backward)
_register("l2d_kernels::led_triton", _led_fake, _led_backward)

if cuda_ext.load_error is None:
    _register("l2d_kernels::mld_cuda", _mld_fake, _mld_backward)
    _register("l2d_kernels::led_cuda", _led_fake, _led_backward)

    @torch.library.register_fake("l2d_kernels::led_scale_cuda")
    def _led_scale_fake(grad, targets, grad_output):  # in place: nothing new
        return None


def mld_op(backend: str):
    return getattr(torch.ops.l2d_kernels, f"mld_{backend}")


def led_op(backend: str):
    return getattr(torch.ops.l2d_kernels, f"led_{backend}")


@functools.lru_cache(maxsize=None)
def _launcher(loss: str, backend: str):
    """The function that launches a backend's kernels: for "mld" and "led", (student, *rest[, with_grad])
    -> (loss, d loss / d student), LED's with the total as a third output; for "led_scale", the LED
    backward's in-place scaling (grad, targets, grad_output). Looked up once per (name, backend): it is
    on every call's path."""
    if backend == "triton":
        from . import triton_led, triton_mld

        return {"mld": triton_mld.mld_forward, "led": triton_led.led_forward, "led_scale": triton_led.led_scale}[loss]
    return getattr(torch.ops.l2d_kernels, f"{loss}_{backend}").default


class _Fused(torch.autograd.Function):
    """One autograd node around a launcher; backward scales the forward's gradient in place (see the
    module docstring: the buffer is handed on, and a second backward is refused). LED scales through
    its backend's ``led_scale`` with the targets, which skips the rows that are zero whatever the
    inputs (those whose target is not positive); MLD's gradient is dense.

    A backward with ``create_graph=True`` (a Hessian-vector product, a gradient penalty) hands on the
    same gradient, bitwise, made differentiable: its derivative is that of the eager reference's
    gradient (``_differentiable_grad``), which only such a backward computes. For it the node keeps
    its tensor inputs (references, not copies)."""

    @staticmethod
    def forward(ctx, loss_name, launch, scale, x, *rest):
        outputs = launch(x, *rest)
        loss, grad = outputs[0], outputs[1]
        n_tensors = 1 if loss_name == "mld" else 2  # (zt) or (et, targets), then the numbers
        _save(ctx, grad, x, *rest[:n_tensors])
        ctx.loss_name, ctx.scale, ctx.numbers = loss_name, scale, rest[n_tensors:]
        if loss_name == "mld":  # the loss alone
            return loss
        # LED: the total as its own tensor, which the kernels write beside the three sums (not a view
        # of them, so that in-place use of it stays allowed, and no copy kernel to make one); the
        # three sums without gradient.
        ctx.mark_non_differentiable(loss)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for the sums
        return outputs[2], loss

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grad, x, *tensors = _saved(ctx)
        if grad.dtype != x.dtype:  # a float16 student's float32 gradient (grad_dtype): scaled and rounded
            grad = torch.mul(grad, grad_loss, out=torch.empty_like(grad, dtype=x.dtype))  # in one kernel
        elif ctx.scale is None:
            grad.mul_(grad_loss)
        else:
            ctx.scale(grad, tensors[1], grad_loss)
            torch.autograd.graph.increment_version(grad)  # a second backward through this node is refused
        if torch.is_grad_enabled():  # create_graph=True
            like = _differentiable_grad(ctx.loss_name, x, *tensors, *ctx.numbers) * grad_loss
            grad = _WithValue.apply(grad, like)
        return (None, None, None, grad) + (None,) * (len(tensors) + len(ctx.numbers))


def _save(ctx, *tensors: Tensor) -> None:
    """``ctx.save_for_backward``, except for inference tensors (a teacher run, or targets made, under
    ``torch.inference_mode()``), which autograd refuses to save: those are kept as plain references.
    They have no version counter to check, and cannot be modified outside inference mode."""
    if not any(t.is_inference() for t in tensors):
        ctx.kept = None
        ctx.save_for_backward(*tensors)
        return
    ctx.kept = [t if t.is_inference() else None for t in tensors]
    ctx.save_for_backward(*(None if t.is_inference() else t for t in tensors))


def _saved(ctx) -> list:
    if ctx.kept is None:
        return list(ctx.saved_tensors)
    return [saved if kept is None else kept for saved, kept in zip(ctx.saved_tensors, ctx.kept)]


class _WithValue(torch.autograd.Function):
    """``value``, differentiated as ``like`` (two tensors of one shape): the fused kernels' gradient,
    bitwise, with the derivative of the reference's."""

    @staticmethod
    def forward(ctx, value, like):
        return value

    @staticmethod
    def backward(ctx, grad):
        return None, grad


def _differentiable_grad(loss_name: str, x: Tensor, *rest) -> Tensor:
    """d loss / d x by the eager reference (the public API's ``"torch"`` backend), as a differentiable
    function of ``x`` (``create_graph=True``)."""
    from .. import api  # the public API imports this module

    if loss_name == "mld":
        zt, reduction, eps, temperature = rest
        loss = api.fused_mld(x, zt, reduction=reduction, eps=eps, temperature=temperature, backend="torch")
    else:
        et, targets, lambda_cd, lambda_id = rest
        loss = api.fused_led(x, et, targets, lambda_cd=lambda_cd, lambda_id=lambda_id, backend="torch")
    (grad,) = torch.autograd.grad(loss, x, torch.ones_like(loss), create_graph=True)
    return grad


def _needs_grad(x: Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def mld(backend: str, zs: Tensor, zt: Tensor, reduction: str, eps: float, temperature: float) -> Tensor:
    """The MLD loss on a fused backend, differentiable in ``zs``."""
    with_grad = _needs_grad(zs)
    if torch.compiler.is_compiling():
        return mld_op(backend)(zs, zt, reduction, eps, temperature, with_grad)[0]
    if not with_grad:
        return _launcher("mld", backend)(zs, zt, reduction, eps, temperature, False)[0]
    return _Fused.apply("mld", _launcher("mld", backend), None, zs, zt, reduction, eps, temperature)


def led(backend: str, es: Tensor, et: Tensor, targets: Tensor, lambda_cd: float, lambda_id: float):
    """(total, float32 [total, CD, ID] without gradient) on a fused backend, the total differentiable in ``es``."""
    with_grad = _needs_grad(es)
    if torch.compiler.is_compiling():
        losses = led_op(backend)(es, et, targets, lambda_cd, lambda_id, with_grad)[0]
        return losses[0], losses.detach()
    if not with_grad:
        losses, _, total = _launcher("led", backend)(es, et, targets, lambda_cd, lambda_id, False)
        return total, losses
    return _Fused.apply("led", _launcher("led", backend), _launcher("led_scale", backend), es, et, targets, lambda_cd,
                        lambda_id)
