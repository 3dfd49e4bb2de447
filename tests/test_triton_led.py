"""The Triton LED kernels: the large-group (tiled) path, ragged groups, and differential tests
against the eager reference on random shapes and target patterns.

Groups above SMALL_MAX members take three tiled passes; at the interpreter's small shapes the
limits are lowered so that those passes run here too.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oracle
from helpers import DEVICE, embeddings, fused_backends, half_tol, rel_err
from l2d_kernels import fused_led, reference

pytestmark = pytest.mark.skipif("triton" not in fused_backends(), reason="Triton backend not available here")


@pytest.fixture
def small_tiles(monkeypatch):
    """Route groups of more than 16 members through the tiled passes, with 16-row tiles."""
    from l2d_kernels.ops import triton_led

    monkeypatch.setattr(triton_led, "SMALL_MAX", 16)
    monkeypatch.setattr(triton_led, "TILE", 16)


def _eager_float32_error(es, et, y, lambda_cd, lambda_id, w_total, w_grad):
    x = es.float().clone().requires_grad_()
    total = reference.led_vectorized(x, et.float(), y, lambda_cd, lambda_id)
    total.backward()
    return rel_err(total, w_total), rel_err(x.grad, w_grad)


def _check(es, et, y, lambda_cd=100.0, lambda_id=1000.0, tol=1e-4):
    """Loss, components and gradient within ``tol`` of float64, or within twice eager float32's error
    where the inputs are so ill-conditioned (near-coincident rows in the Gram form) that eager float32
    itself misses ``tol``."""
    x = es.clone().requires_grad_()
    total, cd, id_ = fused_led(x, et, y, lambda_cd=lambda_cd, lambda_id=lambda_id, backend="triton",
                               return_components=True)
    total.backward()
    n = lambda t: t.detach().double().cpu().numpy()  # noqa: E731
    w_total, w_cd, w_id, w_grad = oracle.led(n(es), n(et), n(y), lambda_cd, lambda_id)
    if w_total == 0:
        assert total.item() == 0 and torch.count_nonzero(x.grad) == 0
        return x.grad
    eager_loss_err, eager_grad_err = _eager_float32_error(es, et, y, lambda_cd, lambda_id, w_total, w_grad)
    assert rel_err(total, w_total) < max(tol, 2 * eager_loss_err)
    assert abs(cd.item() - w_cd) <= tol * max(abs(w_cd), 1e-12) + 1e-12
    assert abs(id_.item() - w_id) <= tol * max(abs(w_id), 1e-12) + 1e-12
    assert rel_err(x.grad, w_grad) < max(tol, 2 * eager_grad_err)
    return x.grad


@pytest.mark.parametrize("shape", [(40, 3, 20), (3, 37, 18), (21, 21, 5)])
def test_large_groups_take_the_tiled_path(small_tiles, shape):
    es, et, y = embeddings(*shape, density=0.9, device=DEVICE, seed=4)
    _check(es, et, y)


@pytest.mark.parametrize("ahead", [True, False], ids=["chunks-ahead", "chunk-at-a-time"])
def test_ragged_groups_mix_both_paths(small_tiles, monkeypatch, ahead):
    # Group sizes from 0 to 36 in both families: single-program groups and tiled ones in one launch.
    from l2d_kernels.ops import triton_led

    monkeypatch.setattr(triton_led, "LOAD_AHEAD", ahead)
    B, C = 36, 9
    y = torch.arange(B)[:, None] < torch.tensor([0, 1, 2, 3, 15, 16, 17, 33, 36])[None, :]
    es, et, _ = embeddings(B, C, 12, device=DEVICE, seed=6)
    _check(es, et, y.to(DEVICE))


@pytest.mark.parametrize("ahead", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transpose", [False, True], ids=["cd-groups", "id-groups"])
@pytest.mark.parametrize("members", [70, 64, 32], ids=lambda n: f"{n}-members")
def test_single_program_groups_of_every_size_class(monkeypatch, ahead, dtype, transpose, members):
    """Groups of 0-2, 3-16, 17-32, 33-64 and 65-128 members, the single-program sizes (both families:
    the CD launch writes the gradient, the ID launch adds to it), with the width chunks loaded one
    ahead (the default) and one at a time; a width of 40 leaves a partial last chunk. With at most 32
    or 64 possible members the kernel is compiled without the larger sizes."""
    from l2d_kernels.ops import triton_led

    monkeypatch.setattr(triton_led, "LOAD_AHEAD", ahead)
    sizes = torch.tensor([s for s in (0, 1, 2, 9, 16, 17, 32, 40, 64, 66) if s <= members])
    y = torch.arange(members)[:, None] < sizes[None, :]
    if transpose:
        y = y.T.contiguous()
    es, et, _ = embeddings(*y.shape, 40, dtype=dtype, device=DEVICE, seed=13)
    if dtype == torch.float32:
        _check(es, et, y.to(DEVICE))
        return
    n = lambda t: t.detach().double().cpu().numpy()  # noqa: E731
    _, _, _, w_grad = oracle.led(n(es), n(et), n(y))
    x = es.clone().requires_grad_()
    fused_led(x, et, y.to(DEVICE), backend="triton").backward()
    eager_x = es.clone().requires_grad_()
    reference.led_vectorized(eager_x, et, y.to(DEVICE)).backward()
    assert rel_err(x.grad, w_grad) <= half_tol(rel_err(eager_x.grad, w_grad), dtype)


def test_tiled_path_is_bitwise_reproducible(small_tiles):
    es, et, y = embeddings(34, 4, 10, density=0.8, device=DEVICE, seed=8)
    first = _check(es, et, y)
    assert torch.equal(first, _check(es, et, y))


def test_tiled_path_with_duplicate_rows_stays_finite(small_tiles):
    es, et, y = embeddings(20, 2, 8, density=1.0, device=DEVICE, seed=9)
    es[5] = es[3]
    es[17] = es[3]
    et[9] = et[2]
    _check(es, et, y)


def test_zero_lambda_gives_zero_gradient_of_that_family():
    es, et, y = embeddings(8, 6, 8, density=0.6, device=DEVICE, seed=2)
    _check(es, et, y, lambda_cd=0.0, lambda_id=2.0)
    _check(es, et, y, lambda_cd=3.0, lambda_id=0.0)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 12), C=st.integers(1, 12), D=st.integers(1, 40),
    density=st.sampled_from([0.0, 0.2, 0.5, 0.8, 1.0]), seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-3, 1.0, 50.0]),
)
def test_matches_the_formula_on_random_shapes_and_targets(B, C, D, density, seed, scale):
    es, et, y = embeddings(B, C, D, density=density, seed=seed, device=DEVICE)
    _check(es * scale, et, y)


@pytest.mark.parametrize("ahead", [True, False], ids=["chunks-ahead", "chunk-at-a-time"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tiled_path_half_precision(small_tiles, monkeypatch, dtype, ahead):
    """The tiled gradient accumulates over column tiles in the gradient's dtype; each tile's part is in
    difference form, so the error stays within twice eager PyTorch's at the same dtype."""
    from l2d_kernels.ops import triton_led

    monkeypatch.setattr(triton_led, "LOAD_AHEAD", ahead)
    es, et, y = embeddings(40, 3, 24, density=1.0, dtype=dtype, device=DEVICE, seed=12)
    n = lambda t: t.detach().double().cpu().numpy()  # noqa: E731
    w_total, _, _, w_grad = oracle.led(n(es), n(et), n(y))
    x = es.clone().requires_grad_()
    fused_led(x, et, y, backend="triton").backward()
    eager_x = es.clone().requires_grad_()
    reference.led_vectorized(eager_x, et, y).backward()
    assert rel_err(x.grad, w_grad) <= half_tol(rel_err(eager_x.grad, w_grad), dtype)
