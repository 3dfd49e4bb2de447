"""The fused backends on a GPU, at realistic and large shapes (skipped without a GPU).

The float64 reference here is the eager loop form on the GPU (checked against the NumPy oracle in
test_reference.py). Every fused call runs under ``torch.cuda.set_sync_debug_mode("error")``: a
device-to-host synchronization inside forward or backward fails the test.
"""

import pytest
import torch

from helpers import ON_GPU, api_backends, fused_backends, half_tol, no_host_sync, rel_err
from l2d_kernels import fused_led, fused_mld, reference
from l2d_kernels.labels import sample_targets

pytestmark = pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
CUDA = torch.device("cuda")


@pytest.fixture(params=fused_backends() if ON_GPU else [None])
def gpu_backend(request):
    return request.param


def _embeddings(B, C, D, dtype=torch.float32, targets=None, seed=0):
    g = torch.Generator(device=CUDA).manual_seed(seed)
    es = torch.randn(B, C, D, generator=g, device=CUDA, dtype=torch.float64)
    et = torch.randn(B, C, D, generator=g, device=CUDA, dtype=torch.float64) * 2 + 0.3
    y = sample_targets(B, C, seed=seed, device=CUDA) if targets is None else targets.to(CUDA)
    return es.to(dtype), et.to(dtype), y


def _fused(es, et, y, backend):
    x = es.clone().requires_grad_()
    g_out = torch.tensor(0.75, device=CUDA)  # made outside: a copy from host memory synchronizes
    with no_host_sync():
        total, cd, id_ = fused_led(x, et, y, backend=backend, return_components=True)
        total.backward(g_out)
    return total.detach(), cd, id_, x.grad


def _exact(es, et, y):
    x = es.double().clone().requires_grad_()
    total, cd, id_ = reference.led_loops(x, et.double(), y, return_components=True)
    (total * 0.75).backward()
    return total.detach(), cd.detach(), id_.detach(), x.grad


LED_SHAPES = {"coco": (64, 80, 768), "coco-b1024": (1024, 80, 768), "c10000": (32, 10000, 256)}


@pytest.mark.parametrize("shape", list(LED_SHAPES))
def test_led_float32_at_scale(gpu_backend, shape):
    es, et, y = _embeddings(*LED_SHAPES[shape])
    got, want = _fused(es, et, y, gpu_backend), _exact(es, et, y)
    for g, w in zip(got, want):
        assert rel_err(g, w.cpu()) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_led_half_precision_at_coco_scale(gpu_backend, dtype):
    es, et, y = _embeddings(64, 80, 768, dtype=dtype)
    got = _fused(es, et, y, gpu_backend)
    want = _exact(es, et, y)
    x = es.clone().requires_grad_()
    eager = reference.led_vectorized(x, et, y)
    (eager * 0.75).backward()
    assert rel_err(got[0], want[0].cpu()) <= half_tol(rel_err(eager, want[0].cpu()), dtype)
    assert rel_err(got[3], want[3].cpu()) <= half_tol(rel_err(x.grad, want[3].cpu()), dtype)


def test_led_groups_of_every_size(gpu_backend):
    # A label positive in all 1024 images, one in 700, ragged ones, and an image with 500 positive labels.
    B, C = 1024, 600
    y = torch.zeros(B, C, dtype=torch.bool)
    y[:, 0] = True
    y[:700, 1] = True
    for c in range(2, 40):
        y[: (c * 37) % B, c] = True
    y[5, :500] = True
    es, et, y = _embeddings(B, C, 64, targets=y)
    got, want = _fused(es, et, y, gpu_backend), _exact(es, et, y)
    for g, w in zip(got, want):
        assert rel_err(g, w.cpu()) < 1e-4


def test_led_is_bitwise_reproducible_at_scale(gpu_backend):
    es, et, y = _embeddings(1024, 80, 768)
    first, second = _fused(es, et, y, gpu_backend), _fused(es, et, y, gpu_backend)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("shape", [(64, 80, 768), (32, 1000, 768)], ids=["coco", "c1000"])
def test_cuda_led_slice_items_from_the_queue_or_in_turn_bitwise(monkeypatch, shape):
    """The CUDA slice launches take their items from a queue (which block runs which item varies from
    run to run) or in turn (L2D_CUDA_LED_QUEUE=0): bitwise the same losses and gradient, and close
    to the float64 reference."""
    if "cuda" not in fused_backends():
        pytest.skip("the CUDA extension is not built")
    es, et, y = _embeddings(*shape)
    queued = [_fused(es, et, y, "cuda") for _ in range(3)]
    monkeypatch.setenv("L2D_CUDA_LED_QUEUE", "0")
    in_turn = _fused(es, et, y, "cuda")
    for other in queued[1:] + [in_turn]:
        assert all(torch.equal(a, b) for a, b in zip(queued[0], other))
    for g, w in zip(queued[0], _exact(es, et, y)):
        assert rel_err(g, w.cpu()) < 1e-4


@pytest.mark.parametrize("shape", [(64, 80, 768), (1024, 80, 768), (16, 9605, 256)],
                         ids=["coco", "b1024", "openimages"])
def test_led_early_launches_equal_launches_in_order_bitwise(gpu_backend, monkeypatch, shape):
    """On sm_90 and later each LED launch after a call's first may start before the previous one ends
    (programmatic dependent launch; its threads then wait for it): calls issued back to back, on
    other inputs each, give bitwise what launches that start only once the previous one has ended
    give (CUDA: L2D_CUDA_LED_EARLY_LAUNCH=0; Triton: ``triton_led.EARLY_LAUNCH`` off). The shapes take
    every launch sequence: the width split's (COCO, OpenImages) and the large groups' passes (1024
    images: CUDA's striped families, Triton's tiled passes)."""
    es_et_y = [_embeddings(*shape, seed=seed) for seed in (1, 2, 3)]
    early = [_fused(*args, gpu_backend) for args in es_et_y]  # no synchronization between the calls
    if gpu_backend == "cuda":
        monkeypatch.setenv("L2D_CUDA_LED_EARLY_LAUNCH", "0")
    else:
        from l2d_kernels.ops import triton_led

        monkeypatch.setattr(triton_led, "EARLY_LAUNCH", False)
    for args, got in zip(es_et_y, early):
        assert all(torch.equal(a, b) for a, b in zip(got, _fused(*args, gpu_backend)))


def test_led_memory_stays_near_the_gradient(gpu_backend):
    """32 x 1000 x 768: peak extra memory at most 1.25 times the gradient buffer."""
    es, et, y = _embeddings(32, 1000, 768)
    x = es.clone().requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = fused_led(x, et, y, backend=gpu_backend)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= 1.25 * es.numel() * es.element_size()


def test_led_runs_at_openimages_scale_within_inputs_gradient_and_scratch(gpu_backend):
    """64 x 9605 x 768 (eager forms run out of memory on an 80 GB card): the peak beyond the inputs
    is one gradient (the buffer the kernel writes, handed on to .grad) and a scratch of a few MiB."""
    es, et, y = _embeddings(64, 9605, 768, seed=3)
    x = es.requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with no_host_sync():
        loss = fused_led(x, et, y, backend=gpu_backend)
        loss.backward()
    torch.cuda.synchronize()
    grad_bytes = es.numel() * es.element_size()
    assert torch.isfinite(loss)
    assert torch.cuda.max_memory_allocated() - base <= grad_bytes + 64 * 2**20


def test_torch_backend_runs_where_the_vectorized_form_cannot_fit():
    """The "torch" backend at 32 x 9605 x 256, where the vectorized form's relation tensors would
    need about 154 GiB (more than an H200 holds): it takes the grouped form (one host read of the
    group sizes), gives the CPU's grouped result, and stays within a few times the inputs."""
    if "torch" not in api_backends():
        pytest.skip("the torch backend is not among the backends tested in this run")
    es, et, y = _embeddings(32, 9605, 256, seed=5)
    assert reference.led_vectorized_bytes(32, 9605) > 150 * 2**30
    x = es.clone().requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    total, cd, id_ = fused_led(x, et, y, backend="torch", return_components=True)
    total.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    x_cpu = es.cpu().requires_grad_()
    want = reference.led_grouped(x_cpu, et.cpu(), y.cpu(), return_components=True)
    want[0].backward()
    for got, w in zip((total, cd, id_), want):
        assert rel_err(got, w.item()) < 1e-5
    assert rel_err(x.grad, x_cpu.grad) < 1e-5
    assert extra <= 5 * es.numel() * es.element_size()


@pytest.mark.parametrize("shape", ["coco-b1024", "c10000"])
def test_led_without_gradient_at_scale(gpu_backend, shape):
    """Under no_grad (a validation loss): the losses of the call with gradient, bitwise, and a peak
    beyond the inputs of a scratch only, no gradient (252 MB at 1024 x 80 x 768)."""
    es, et, y = _embeddings(*LED_SHAPES[shape])
    want = _fused(es, et, y, gpu_backend)[:3]
    x = es.requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with no_host_sync(), torch.no_grad():
        got = fused_led(x, et, y, backend=gpu_backend, return_components=True)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base <= 64 * 2**20
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("shape", [(64, 80), (4096, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mld_at_scale(gpu_backend, shape, dtype):
    g = torch.Generator(device=CUDA).manual_seed(0)
    zs = (torch.randn(*shape, generator=g, device=CUDA) * 4).to(dtype)
    zt = (torch.randn(*shape, generator=g, device=CUDA) * 4).to(dtype)
    x = zs.clone().requires_grad_()
    with no_host_sync():
        loss = fused_mld(x, zt, backend=gpu_backend)
        loss.backward()
    ref_x = zs.double().clone().requires_grad_()
    want = reference.mld(ref_x, zt.double())
    want.backward()
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert rel_err(loss, want.cpu()) < tol and rel_err(x.grad, ref_x.grad.cpu()) < tol


def _hvp(loss_fn, x0, v):
    """The Hessian of ``loss_fn`` at ``x0`` times ``v``: a backward with create_graph=True, then another."""
    x = x0.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss_fn(x), x, create_graph=True)
    return torch.autograd.grad((grad * v.to(x.dtype)).sum(), x)[0]


def test_second_derivatives_at_coco_scale(gpu_backend):
    """create_graph=True through the fused calls: Hessian-vector products of both losses at 64 x 80 (x 768)
    against the float64 eager forms."""
    es, et, y = _embeddings(64, 80, 768)
    v = torch.randn(es.shape, generator=torch.Generator(device=CUDA).manual_seed(1), device=CUDA)
    got = _hvp(lambda x: fused_led(x, et, y, backend=gpu_backend), es, v)
    want = _hvp(lambda x: reference.led_loops(x, et.double(), y), es.double(), v)
    assert rel_err(got, want.cpu()) < 1e-4
    zs, zt = es[:, :, 0] * 4, et[:, :, 0] * 4
    got = _hvp(lambda x: fused_mld(x, zt, backend=gpu_backend), zs, v[:, :, 0])
    want = _hvp(lambda x: reference.mld(x, zt.double()), zs.double(), v[:, :, 0])
    assert rel_err(got, want.cpu()) < 1e-4


def test_compiled_training_step_has_no_graph_break(gpu_backend):
    es, et, y = _embeddings(64, 80, 768)
    zs = torch.randn(64, 80, device=CUDA)

    def objective(zs, es):
        return fused_mld(zs, zs.detach() * 0.5, backend=gpu_backend) + fused_led(es, et, y, backend=gpu_backend)

    compiled = torch.compile(objective, fullgraph=True)
    a, b = zs.clone().requires_grad_(), es.clone().requires_grad_()
    compiled(a, b).backward()
    c, d = zs.clone().requires_grad_(), es.clone().requires_grad_()
    objective(c, d).backward()
    assert torch.equal(a.grad, c.grad) and torch.equal(b.grad, d.grad)


def test_losses_and_gradients_replay_in_a_cuda_graph(gpu_backend):
    """Forward and backward of both losses captured in one CUDA graph: replays give, bitwise, what
    eager calls give, also after the inputs are overwritten in place with new embeddings and new
    targets. So no launch depends on a value read back to the host (the groups come from the
    targets on the device), which is what lets a training step be graphed to remove host time."""
    B, C, D = 64, 80, 768
    es, et, y = _embeddings(B, C, D, seed=1)
    zs, zt = torch.randn(B, C, device=CUDA), torch.randn(B, C, device=CUDA)
    es.requires_grad_()
    zs.requires_grad_()

    def step():
        loss = fused_mld(zs, zt, backend=gpu_backend) + fused_led(es, et, y, backend=gpu_backend)
        return (loss.detach(), *torch.autograd.grad(loss, (zs, es)))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()

    for seed in (1, 2):
        if seed == 2:  # new data in the same buffers: other embeddings, other group memberships
            new_es, new_et, new_y = _embeddings(B, C, D, seed=2)
            with torch.no_grad():
                es.copy_(new_es)
                et.copy_(new_et)
                y.copy_(new_y)
                zs.copy_(torch.randn(B, C, device=CUDA))
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        assert all(torch.equal(c, e) for c, e in zip(captured, eager)), f"replay differs from eager (data {seed})"


_FIRST_CALL_CAPTURED = """
import torch
from l2d_kernels import fused_led
from l2d_kernels.labels import sample_targets

g = torch.Generator(device="cuda").manual_seed(3)
es, et = (torch.randn(64, 80, 768, generator=g, device="cuda") for _ in range(2))
y = sample_targets(64, 80, seed=3, device="cuda")
es.requires_grad_()
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    captured = fused_led(es, et, y, backend="cuda").detach()
graph.replay()
torch.cuda.synchronize()
assert torch.equal(captured, fused_led(es, et, y, backend="cuda").detach()), "replay differs from eager"
print("ok")
"""


@pytest.mark.skipif(not ON_GPU or "cuda" not in fused_backends(), reason="needs the CUDA extension")
def test_cuda_first_call_of_a_process_can_be_captured():
    """A process whose first LED call is inside a CUDA graph capture (no warm-up): that call asks the
    runtime, once per device, whether its kernels can start early (their PTX version), which must not
    invalidate the capture; its replay gives what an eager call gives. In a fresh process, since any
    earlier call of this one has already asked."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _FIRST_CALL_CAPTURED], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr


def test_compiled_with_cuda_graphs_equals_eager_bitwise(gpu_backend):
    """``torch.compile(mode="reduce-overhead")``, the way a user removes a step's host time without
    capturing a graph by hand: Inductor's CUDA graph trees run the first call, record the second and
    replay the rest, copying each call's new inputs into the recorded buffers, for forward and
    backward alike. Every call, on new data each time (other group memberships), gives bitwise what
    eager calls give, and Inductor skips no graph (it would run the code eagerly instead, for a CPU
    tensor, say: the test would pass without graphs). The outputs live in the graphs' memory pool
    until the next replay, so each is copied before the next call."""
    from torch._dynamo.utils import counters

    B, C, D = 64, 80, 768
    skips = counters["inductor"]["cudagraph_skips"]

    def objective(zs, zt, es, et, y):
        return fused_mld(zs, zt, backend=gpu_backend) + fused_led(es, et, y, backend=gpu_backend)

    compiled = torch.compile(objective, mode="reduce-overhead", fullgraph=True)
    for seed in range(4):
        es, et, y = _embeddings(B, C, D, seed=seed)
        g = torch.Generator(device=CUDA).manual_seed(seed)
        zs, zt = (torch.randn(B, C, generator=g, device=CUDA) * 3 for _ in range(2))
        results = []
        for fn in (compiled, objective):
            if fn is compiled:
                torch.compiler.cudagraph_mark_step_begin()
            a, b = zs.clone().requires_grad_(), es.clone().requires_grad_()
            loss = fn(a, zt, b, et, y)
            loss.backward()
            results.append([t.clone() for t in (loss.detach(), a.grad, b.grad)])
        for name, c, e in zip(("loss", "MLD gradient", "LED gradient"), *results):
            assert torch.equal(c, e), f"call {seed}: compiled {name} differs from eager"
    assert counters["inductor"]["cudagraph_skips"] == skips, "Inductor ran a graph without CUDA graphs"


@pytest.mark.skipif(not ON_GPU or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_losses_on_a_gpu_that_is_not_the_current_one(gpu_backend):
    """Tensors on cuda:1 while cuda:0 is current: the kernels run where the tensors are (Triton would
    otherwise launch on the current device with pointers into another GPU's memory)."""
    other = torch.device("cuda", 1)
    es, et, y = (t.to(other) for t in _embeddings(16, 20, 64, seed=3))
    zs, zt = torch.randn(16, 20, device=other), torch.randn(16, 20, device=other)
    with torch.cuda.device(0):
        x = es.clone().requires_grad_()
        total = fused_led(x, et, y, backend=gpu_backend)
        total.backward()
        m = zs.clone().requires_grad_()
        mld = fused_mld(m, zt, backend=gpu_backend)
        mld.backward()
    exact, _, _, exact_grad = _exact(es, et, y)  # the gradient of 0.75 * total
    assert rel_err(total.double(), exact) < 1e-4 and rel_err(x.grad.double(), exact_grad / 0.75) < 1e-4
    m_ref = zs.double().clone().requires_grad_()
    reference.mld(m_ref, zt.double()).backward()
    assert rel_err(mld.double(), reference.mld(zs.double(), zt.double())) < 1e-4
    assert rel_err(m.grad.double(), m_ref.grad) < 1e-4


def test_triton_direct_launches_equal_triton_launches_bitwise():
    """The Triton launchers' direct launches (``triton_common.LaunchCache``: a shape's later calls)
    give bitwise what launches through Triton's own path give, at COCO (the width-split path, with
    misaligned inputs too) and for MLD with partial sums: the whole-call replay (the default), and the
    per-launch replay with the tensors handed to the launchers as they are and as integers
    (``INT_POINTERS``); and they are taken."""
    from l2d_kernels.ops import triton_common, triton_led

    if "triton" not in fused_backends():
        pytest.skip("no Triton backend")
    es, et, y = _embeddings(64, 80, 768)
    # A teacher 4 bytes off a 16-byte boundary (the student is cloned, hence aligned, in _fused).
    shifted = torch.empty(et.numel() + 1, device=CUDA)[1:].view(et.shape).copy_(et)
    zs, zt = (torch.randn(4096, 1000, device=CUDA) * 3 for _ in range(2))

    def calls():
        x = zs.clone().requires_grad_()
        loss = fused_mld(x, zt, backend="triton")
        loss.backward()
        return [*_fused(es, et, y, "triton"), *_fused(es, shifted, y, "triton"), loss.detach(), x.grad]

    mismatches = triton_common.LaunchCache.mismatches
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(triton_common, "DIRECT_LAUNCH", False)
        through_triton = calls()
    calls()  # each key's first call: recorded
    whole = calls()
    per_launch = {}
    for ints in (False, True):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(triton_common, "CALL_REPLAY", False)
            mp.setattr(triton_common, "INT_POINTERS", ints)
            per_launch[ints] = calls()
    assert triton_common.LaunchCache.mismatches == mismatches
    for a, b, c, d in zip(whole, through_triton, per_launch[False], per_launch[True]):
        assert torch.equal(a, b) and torch.equal(c, b) and torch.equal(d, b)
    assert triton_led._FORWARD_LAUNCHES._recipes, "no key kept a whole call"
    assert any(seq for seq in triton_led._FORWARD_LAUNCHES._calls.values()), "no key kept its kernels"
