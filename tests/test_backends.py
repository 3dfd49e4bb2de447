"""Backend choice: what is available, what "auto" picks, and what an unavailable backend says."""

import pytest
import torch

from helpers import DEVICE, ON_GPU, embeddings, logits
from l2d_kernels import BackendUnavailableError, available_backends, fused_led, fused_mld
from l2d_kernels.backends import resolve_backend
from l2d_kernels.ops import cuda_ext

CPU = torch.device("cpu")
F32 = (torch.float32, torch.float32)


def test_torch_is_always_available():
    assert "torch" in available_backends()
    assert set(available_backends()) <= {"torch", "triton", "cuda"}


def test_auto_runs_the_eager_reference_off_the_gpu():
    assert resolve_backend("auto", CPU, F32) == "torch"


def test_auto_prefers_fused_kernels_on_the_gpu():
    cuda = torch.device("cuda")
    expected = "cuda" if cuda_ext.load_error is None else "triton"
    assert resolve_backend("auto", cuda, F32) == expected
    assert resolve_backend("auto", cuda, (torch.float64, torch.float32)) == "torch"


def test_auto_takes_cuda_before_triton_at_every_batch(monkeypatch):
    """With both fused backends present, "auto" takes the CUDA extension whatever the shape (no batch
    threshold since the H100 run of 2026-11-27, where it won at a batch of 1024 too), Triton when
    the extension is absent; a named backend is kept."""
    from l2d_kernels import backends

    monkeypatch.setattr(backends, "backend_problem", lambda name, device: None)
    cuda = torch.device("cuda")
    assert resolve_backend("auto", cuda, F32) == "cuda"
    assert resolve_backend("triton", cuda, F32) == "triton"
    monkeypatch.setattr(backends, "backend_problem", lambda name, device: "absent" if name == "cuda" else None)
    assert resolve_backend("auto", cuda, F32) == "triton"


def test_triton_is_refused_on_rocm_and_auto_passes_it_over(monkeypatch):
    """The Triton kernels hold PTX (MLD's exponentials): on a ROCm build of PyTorch, whose GPUs are
    also "cuda" devices, the backend says so instead of failing to compile."""
    from l2d_kernels import backends

    monkeypatch.setattr(torch.version, "hip", "6.2.0", raising=False)
    cuda = torch.device("cuda")
    if backends._INSTALL_PROBLEMS["triton"] is None:
        assert "NVIDIA" in backends.backend_problem("triton", cuda)
    assert resolve_backend("auto", cuda, F32) != "triton"
    with pytest.raises(BackendUnavailableError):
        resolve_backend("triton", cuda, F32)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("tensorrt", CPU, F32)


def test_cuda_backend_on_cpu_tensors_says_why():
    with pytest.raises(BackendUnavailableError, match="CUDA tensors"):
        fused_mld(*logits(2, 3), backend="cuda")


@pytest.mark.skipif(cuda_ext.load_error is None, reason="the CUDA extension is built here")
def test_missing_extension_says_how_to_build_it():
    with pytest.raises(BackendUnavailableError, match="L2D_KERNELS_BUILD_CUDA=1"):
        resolve_backend("cuda", torch.device("cuda"), F32)


@pytest.mark.skipif(ON_GPU, reason="on a GPU the Triton backend runs without the interpreter")
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "triton" not in available_backends()
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        fused_led(*embeddings(3, 2, 4), backend="triton")


def test_fused_backends_refuse_float64_and_auto_falls_back(monkeypatch):
    zs, zt = logits(3, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="backend='torch' computes in float64"):
        resolve_backend("triton", DEVICE, (zs.dtype, zt.dtype))
    assert fused_mld(zs, zt).dtype == torch.float64
    # The same refusal where the backend is not installed: the inputs are checked first.
    from l2d_kernels import backends

    monkeypatch.setattr(backends, "backend_problem", lambda name, device: f"{name} is not installed")
    for name in ("triton", "cuda"):
        with pytest.raises(TypeError, match="backend='torch' computes in float64"):
            resolve_backend(name, torch.device("cuda"), (torch.float64, torch.float32))
        with pytest.raises(BackendUnavailableError, match="not installed"):
            resolve_backend(name, torch.device("cuda"), F32)


def test_triton_interpreter_with_a_numpy_it_cannot_use_is_refused_with_the_fix():
    from l2d_kernels.backends import interpreter_problem

    assert "numpy<2.4" in interpreter_problem("3.6.0", "2.4.6")
    assert interpreter_problem("3.6.0", "2.3.5") is None
    assert interpreter_problem("3.8.0", "2.4.6") is None
    assert interpreter_problem("3.10.1", "2.10.0") is None


class _OnGpu:
    """Stands in for a tensor on a given GPU (this test runs without one)."""

    is_cuda = True

    def __init__(self, index):
        self.device = torch.device("cuda", index)


@pytest.mark.parametrize("current, index, switched", [(0, 1, True), (1, 1, False)])
def test_triton_launches_on_the_inputs_gpu(monkeypatch, current, index, switched):
    # Triton launches on torch's current device; the launchers make it the inputs' device first.
    from l2d_kernels.ops import triton_common

    entered = []

    class Device:
        def __init__(self, device):
            self.index = device.index

        def __enter__(self):
            entered.append(self.index)

        def __exit__(self, *exc):
            entered.append(None)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "device", Device)
    seen = []
    launch = triton_common.on_input_device(lambda x, *rest: seen.append((list(entered), rest)) or "done")
    assert launch(_OnGpu(index), 2, 3) == "done"
    assert seen == [([index] if switched else [], (2, 3))]
    assert entered == ([index, None] if switched else [])
    assert launch(torch.zeros(1), 4) == "done"  # CPU tensors (the interpreter) are left alone
    assert seen[-1] == ([index, None] if switched else [], (4,))
