"""The fused operators as torch.library ops: schemas, fake kernels, autograd, torch.compile."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from helpers import DEVICE, OpLog, embeddings, logits
from l2d_kernels import fused_led, fused_mld
from l2d_kernels.ops import library


# Float16 students get a float32 gradient from the operators (library.grad_dtype): the fake kernels
# must say so.
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])


@DTYPES
@pytest.mark.parametrize("with_grad", [True, False])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_mld_op_passes_opcheck(fused_backend, reduction, with_grad, dtype):
    zs, zt = logits(5, 7, device=DEVICE, dtype=dtype)
    args = (zs.requires_grad_(), zt, reduction, 1e-8, 1.0, with_grad)
    torch.library.opcheck(library.mld_op(fused_backend), args, test_utils=("test_schema", "test_faketensor",
                                                                           "test_autograd_registration"))


@DTYPES
@pytest.mark.parametrize("with_grad", [True, False])
def test_led_op_passes_opcheck(fused_backend, with_grad, dtype):
    es, et, y = embeddings(6, 5, 8, device=DEVICE, density=0.5, dtype=dtype)
    args = (es.requires_grad_(), et, y, 100.0, 1000.0, with_grad)
    torch.library.opcheck(library.led_op(fused_backend), args, test_utils=("test_schema", "test_faketensor",
                                                                           "test_autograd_registration"))


def test_led_scale_op_passes_opcheck(fused_backend):
    """The CUDA backend's in-place backward scaling is an operator too (its schema declares the
    mutation of grad); Triton's is a launcher called from the autograd function."""
    if fused_backend != "cuda":
        pytest.skip("only the CUDA extension registers the scaling as an operator")
    _, _, y = embeddings(6, 5, 8, device=DEVICE, density=0.5)
    grad = torch.randn(6, 5, 8, device=DEVICE)
    torch.library.opcheck(torch.ops.l2d_kernels.led_scale_cuda.default, (grad, y, torch.tensor(2.0, device=DEVICE)),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("loss", ["mld", "led"])
def test_backward_through_an_operator_called_without_gradient_is_refused(fused_backend, loss):
    """The operators called directly with with_grad=False on an input that requires grad: the loss is
    there, and backward says why it has no gradient to give."""
    if loss == "mld":
        zs, zt = logits(5, 7, device=DEVICE)
        x = zs.requires_grad_()
        out = library.mld_op(fused_backend)(x, zt, "sum", 1e-8, 1.0, False)[0]
    else:
        es, et, y = embeddings(6, 5, 8, device=DEVICE, density=0.5)
        x = es.requires_grad_()
        out = library.led_op(fused_backend)(x, et, y, 100.0, 1000.0, False)[0][0]
    assert torch.isfinite(out)
    with pytest.raises(RuntimeError, match="with_grad=False"):
        out.backward()


@pytest.mark.parametrize("dtype,loss_scale", [(torch.float32, 1.0), (torch.float16, 1000.0)],
                         ids=["float32", "float16-loss-scale"])
def test_compiles_without_graph_breaks(fused_backend, dtype, loss_scale):
    """The compiled step's loss and gradients are the eager call's, bitwise; for a float16 student
    under a loss scale too (the compiled backward scales the float32 gradient, then rounds it)."""
    zs, zt = logits(5, 7, device=DEVICE, dtype=dtype)
    es, et, y = embeddings(6, 7, 8, device=DEVICE, density=0.5, dtype=dtype)
    y = y[:5]
    es, et = es[:5], et[:5]

    def step(zs, es):
        return fused_mld(zs, zt, backend=fused_backend) + fused_led(es, et, y, backend=fused_backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_z, eager_e = zs.clone().requires_grad_(), es.clone().requires_grad_()
    comp_z, comp_e = zs.clone().requires_grad_(), es.clone().requires_grad_()
    (step(eager_z, eager_e) * loss_scale).backward()
    out = compiled(comp_z, comp_e)
    (out * loss_scale).backward()
    assert comp_z.grad.dtype == comp_e.grad.dtype == dtype
    assert torch.isfinite(comp_z.grad).all() and torch.isfinite(comp_e.grad).all()
    assert torch.equal(out.detach(), step(zs, es).detach())
    assert torch.equal(comp_z.grad, eager_z.grad) and torch.equal(comp_e.grad, eager_e.grad)


def test_compiles_without_gradient_into_the_forward_only_kernels(fused_backend):
    """Traced under no_grad (an evaluation step), the operators are called with with_grad=False and
    give the eager call's losses, bitwise."""
    zs, zt = logits(5, 7, device=DEVICE)
    es, et, y = embeddings(5, 7, 8, device=DEVICE, density=0.5)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def evaluate(zs, es):
        return fused_mld(zs, zt, backend=fused_backend) + fused_led(es, et, y, backend=fused_backend)

    compiled = torch.compile(evaluate, fullgraph=True, backend=record)
    zs.requires_grad_()
    es.requires_grad_()
    with torch.no_grad():
        assert torch.equal(compiled(zs, es), evaluate(zs, es))
    calls = [n for n in graphs[0].graph.nodes if n.op == "call_function" and "l2d_kernels" in str(n.target)]
    assert len(calls) == 2 and all(n.args[-1] is False for n in calls)


def test_compiles_once_for_every_batch_size_with_dynamic_shapes(fused_backend):
    """A training loop's last batch is smaller: with dynamic=True one graph serves every batch size
    (the fake kernels take symbolic shapes), and each size gives the eager call's loss and gradients.
    The first call may compile twice: Dynamo traces the float arguments symbolically, then restarts
    once to specialize them, as for any custom operator with a float argument."""
    counter = CompileCounterWithBackend("aot_eager")

    def step(zs, zt, es, et, y):
        return fused_mld(zs, zt, backend=fused_backend) + fused_led(es, et, y, backend=fused_backend)

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend=counter)
    first = None
    for batch in (6, 4, 9):
        zs, zt = logits(batch, 7, device=DEVICE)
        es, et, y = embeddings(batch, 7, 8, device=DEVICE, density=0.5)
        eager = [zs.clone().requires_grad_(), es.clone().requires_grad_()]
        comp = [zs.clone().requires_grad_(), es.clone().requires_grad_()]
        expected = step(eager[0], zt, eager[1], et, y)
        expected.backward()
        out = compiled(comp[0], zt, comp[1], et, y)
        out.backward()
        assert torch.equal(out.detach(), expected.detach())
        assert torch.equal(comp[0].grad, eager[0].grad) and torch.equal(comp[1].grad, eager[1].grad)
        first = first or counter.frame_count
    assert counter.frame_count == first


def test_backward_reuses_the_saved_gradient_and_refuses_a_second_pass(fused_backend):
    es, et, y = embeddings(6, 5, 8, device=DEVICE, density=0.6)
    x = es.clone().requires_grad_()
    loss = fused_led(x, et, y, backend=fused_backend)
    (grad,) = torch.autograd.grad(loss * 3.0, x, retain_graph=True)
    x2 = es.clone().requires_grad_()
    (plain,) = torch.autograd.grad(fused_led(x2, et, y, backend=fused_backend), x2)
    assert torch.allclose(grad, 3.0 * plain, rtol=1e-6, atol=0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, x)


@pytest.mark.parametrize("loss", ["mld", "led"])
def test_float16_backward_leaves_the_float32_gradient_for_a_second_pass(fused_backend, loss):
    """A float16 student's backward scales and rounds into a new float16 tensor in one op, leaving the
    saved float32 gradient as it was: a second backward (retain_graph=True) gives its own scaling of
    it, bitwise what a fresh call gives."""
    if loss == "mld":
        a, b = logits(7, 9, device=DEVICE, dtype=torch.float16)
        call = lambda x: fused_mld(x, b, backend=fused_backend)  # noqa: E731
    else:
        a, b, y = embeddings(6, 5, 8, device=DEVICE, density=0.6, dtype=torch.float16)
        call = lambda x: fused_led(x, b, y, backend=fused_backend)  # noqa: E731
    x = a.clone().requires_grad_()
    out = call(x)
    (first,) = torch.autograd.grad(out * 3.0, x, retain_graph=True)
    (second,) = torch.autograd.grad(out * 0.5, x)
    fresh = []
    for g_out in (3.0, 0.5):
        x2 = a.clone().requires_grad_()
        fresh += torch.autograd.grad(call(x2) * g_out, x2)
    assert first.dtype == second.dtype == torch.float16
    assert torch.equal(first, fresh[0]) and torch.equal(second, fresh[1])


def _fused_call(loss, backend, x=None):
    if loss == "mld":
        zs, zt = logits(7, 9, device=DEVICE)
        x = zs.requires_grad_() if x is None else x
        return x, fused_mld(x, zt, backend=backend)
    es, et, y = embeddings(6, 5, 8, device=DEVICE, density=0.6)
    x = es.clone().requires_grad_() if x is None else x
    return x, fused_led(x, et, y, backend=backend)


@pytest.mark.parametrize("loss", ["mld", "led"])
def test_backward_allocates_no_second_gradient(fused_backend, loss):
    """Backward scales the forward's gradient buffer and hands it on: no op in it makes a tensor of
    the gradient's size (autograd's zero-filled gradient for the op's gradient output included),
    and a leaf's .grad is that very buffer."""
    x, out = _fused_call(loss, fused_backend)
    buffer_ptr = out.grad_fn.saved_tensors[0].data_ptr()
    with OpLog() as log:
        (out * 0.5).backward()
    assert log.new_buffers(x.numel()) == []
    assert x.grad.data_ptr() == buffer_ptr


def test_a_call_without_gradient_makes_no_gradient_buffer(fused_backend):
    """Under no_grad the kernels write no gradient, and no tensor of its size is made; with gradient
    the same check sees the buffer."""
    zs, zt = logits(7, 9, device=DEVICE)
    es, et, y = embeddings(6, 5, 8, device=DEVICE, density=0.6)
    zs.requires_grad_()
    es.requires_grad_()
    calls = {zs.numel(): lambda: fused_mld(zs, zt, backend=fused_backend),
             es.numel(): lambda: fused_led(es, et, y, backend=fused_backend)}
    for numel, call in calls.items():
        with torch.no_grad(), OpLog() as log:
            call()
        assert log.new_buffers(numel) == []
        with OpLog() as log:
            call()
        assert log.new_buffers(numel)


@pytest.mark.parametrize("loss", ["mld", "led"])
def test_an_eager_call_is_one_autograd_node(fused_backend, loss):
    """Outside torch.compile the loss hangs directly off the student input: no operator wrapper,
    no indexing node between the loss and the kernels' node."""
    x, out = _fused_call(loss, fused_backend)
    assert [type(f).__name__ for f, _ in out.grad_fn.next_functions if f is not None] == ["AccumulateGrad"]
    assert any(f is not None and f.variable is x for f, _ in out.grad_fn.next_functions)


@pytest.mark.parametrize("loss", ["mld", "led"])
def test_the_returned_loss_can_be_modified_in_place(fused_backend, loss):
    x, out = _fused_call(loss, fused_backend)
    out *= 3.0
    out.backward()
    x2, plain = _fused_call(loss, fused_backend, x.detach().clone().requires_grad_())
    plain.backward()
    assert torch.allclose(x.grad, 3.0 * x2.grad, rtol=1e-6, atol=0)
