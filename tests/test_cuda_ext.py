"""The compiled extension l2d_kernels._C, checked where no GPU is needed: it imports, registers its
operators with CUDA kernels, and their fake kernels give the right shapes and dtypes (what
torch.compile traces). Its numerics run in the GPU tests (test_gpu.py, test_api.py on a GPU)."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from l2d_kernels.ops import cuda_ext
from l2d_kernels.ops.library import grad_dtype

pytestmark = pytest.mark.skipif(cuda_ext.load_error is not None, reason=f"extension not built: {cuda_ext.load_error}")


@pytest.mark.parametrize("op", ["mld_cuda", "led_cuda"])
def test_operators_are_registered_with_cuda_and_fake_kernels(op):
    name = f"l2d_kernels::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "Meta")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "Autograd")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")


def test_the_backward_scaling_is_registered_in_place_with_a_fake_kernel():
    name = "l2d_kernels::led_scale_cuda"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "Meta")
    schema = torch.ops.l2d_kernels.led_scale_cuda.default._schema
    assert [a.name for a in schema.arguments] == ["grad", "targets", "grad_output"]
    assert [bool(a.alias_info and a.alias_info.is_write) for a in schema.arguments] == [True, False, False]
    assert len(schema.returns) == 0
    with FakeTensorMode():
        grad = torch.empty(4, 3, 8, device="cuda")
        assert torch.ops.l2d_kernels.led_scale_cuda(grad, torch.empty(4, 3, device="cuda", dtype=torch.bool),
                                                    torch.empty((), device="cuda")) is None


def test_schemas():
    mld = torch.ops.l2d_kernels.mld_cuda.default._schema
    led = torch.ops.l2d_kernels.led_cuda.default._schema
    assert [a.name for a in mld.arguments] == ["zs", "zt", "reduction", "eps", "temperature", "with_grad"]
    assert [a.name for a in led.arguments] == ["es", "et", "targets", "lambda_cd", "lambda_id", "with_grad"]
    assert mld.arguments[-1].default_value is True and led.arguments[-1].default_value is True
    assert len(mld.returns) == 2 and len(led.returns) == 3
    assert not any(a.alias_info for a in list(mld.arguments) + list(led.arguments))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_mld_fake_kernel(dtype, reduction):
    with FakeTensorMode():
        zs = torch.empty(5, 7, device="cuda", dtype=dtype)
        loss, grad = torch.ops.l2d_kernels.mld_cuda(zs, zs, reduction, 1e-8, 1.0)
    assert loss.shape == ((5, 7) if reduction == "none" else ()) and loss.dtype == torch.float32
    assert grad.shape == (5, 7) and grad.dtype == grad_dtype(dtype) and grad.device.type == "cuda"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_led_fake_kernel(dtype):
    with FakeTensorMode():
        es = torch.empty(4, 3, 8, device="cuda", dtype=dtype)
        y = torch.empty(4, 3, device="cuda", dtype=torch.bool)
        losses, grad, total = torch.ops.l2d_kernels.led_cuda(es, es, y, 100.0, 1000.0)
    assert losses.shape == (3,) and losses.dtype == torch.float32
    assert total.shape == () and total.dtype == torch.float32 and total.device.type == "cuda"
    assert grad.shape == (4, 3, 8) and grad.dtype == grad_dtype(dtype) and grad.device.type == "cuda"


def test_an_extension_without_an_operator_the_package_calls_counts_as_another_build():
    assert cuda_ext.missing_operators() == []
    assert cuda_ext.missing_operators({"led_cuda": (6, 3), "led_from_the_future_cuda": (6, 2)}) == [
        "led_from_the_future_cuda"]
    # Operators of older builds: LED had two results before the total apart, and neither loss took
    # with_grad before the calls without gradient.
    assert cuda_ext.missing_operators({"led_cuda": (6, 2), "mld_cuda": (6, 2)}) == ["led_cuda"]
    assert cuda_ext.missing_operators({"led_cuda": (5, 3), "mld_cuda": (5, 2)}) == ["led_cuda", "mld_cuda"]


def test_led_fake_kernel_without_gradient():
    with FakeTensorMode():
        es = torch.empty(4, 3, 8, device="cuda")
        y = torch.empty(4, 3, device="cuda", dtype=torch.bool)
        losses, grad, total = torch.ops.l2d_kernels.led_cuda(es, es, y, 100.0, 1000.0, False)
        _, mld_grad = torch.ops.l2d_kernels.mld_cuda(es[:, :, 0], es[:, :, 0], "sum", 1e-8, 1.0, False)
    assert losses.shape == (3,) and total.shape == ()
    assert grad.shape == (0,) and mld_grad.shape == (0,)
