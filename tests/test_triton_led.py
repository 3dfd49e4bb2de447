"""The Triton LED kernels: the large-group (tiled) path, ragged groups, the width-split path and its
scratch plan, and differential tests against the eager reference on random shapes and target patterns.

Groups above SMALL_MAX members take three tiled passes; at the interpreter's small shapes the
limits are lowered so that those passes run here too. Groups of at most SMALL_MAX members are split
over width slices of SLICE_WIDTH (64) when the width is larger; the tests' widths are smaller, so
``slices`` runs them both whole and split into slices of 8.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oracle
from helpers import DEVICE, embeddings, fused_backends, half_tol, rel_err, with_common_part
from l2d_kernels import fused_led, reference

pytestmark = pytest.mark.skipif("triton" not in fused_backends(), reason="Triton backend not available here")


@pytest.fixture
def small_tiles(monkeypatch):
    """Route groups of more than 16 members through the tiled passes, with 16-row tiles."""
    from l2d_kernels.ops import triton_led

    monkeypatch.setattr(triton_led, "SMALL_MAX", 16)
    monkeypatch.setattr(triton_led, "TILE", 16)


@pytest.fixture(params=[0, 8], ids=["whole-groups", "width-split"])
def slices(request, monkeypatch):
    """Every group of at most SMALL_MAX members whole in one program, or split into 8-wide slices."""
    from l2d_kernels.ops import triton_led

    monkeypatch.setattr(triton_led, "SLICE_WIDTH", request.param)
    return request.param


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
def test_large_groups_take_the_tiled_path(small_tiles, slices, shape):
    es, et, y = embeddings(*shape, density=0.9, device=DEVICE, seed=4)
    _check(es, et, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_large_groups_of_rows_that_share_a_large_common_part(small_tiles, slices, dtype):
    """The tiled passes' norms and Gram tiles are taken less the group's first member too: groups of up
    to 40 members (three 16-row tiles) whose rows share a part 100 times their spread, within 1e-4
    of float64 with no allowance for eager's error (it was 3e-3 off); float16 rows (split into two
    parts on the tensor cores) within that plus float16's own rounding of the gradient."""
    es, et, y = embeddings(40, 3, 20, density=0.9, device=DEVICE, seed=4)
    es, et = (t.to(dtype) for t in with_common_part(es, et, 100.0, seed=5))
    x = es.clone().requires_grad_()
    total = fused_led(x, et, y, backend="triton")
    total.backward()
    n = lambda t: t.detach().double().cpu().numpy()  # noqa: E731
    w_total, _, _, w_grad = oracle.led(n(es), n(et), n(y), 100.0, 1000.0)
    rounding = rel_err(torch.from_numpy(w_grad).to(dtype), w_grad)
    assert rel_err(total, w_total) < 1e-4 and rel_err(x.grad, w_grad) < rounding + 1e-4


@pytest.mark.parametrize("ahead", [True, False], ids=["chunks-ahead", "chunk-at-a-time"])
def test_ragged_groups_mix_both_paths(small_tiles, slices, monkeypatch, ahead):
    # Group sizes from 0 to 36 in both families: single-program groups and tiled ones in one launch.
    from l2d_kernels.ops import triton_led

    monkeypatch.setattr(triton_led, "LOAD_AHEAD", ahead)
    B, C = 36, 9
    y = torch.arange(B)[:, None] < torch.tensor([0, 1, 2, 3, 15, 16, 17, 33, 36])[None, :]
    es, et, _ = embeddings(B, C, 12, device=DEVICE, seed=6)
    _check(es, et, y.to(DEVICE))


def test_without_gradient_every_path_gives_the_same_losses(small_tiles, slices):
    """with_grad=False (no_grad): ragged groups from 0 to 36 members, single-program and tiled, whole
    and split, give the losses of the call with gradient, bitwise, and no gradient tensor; the student
    embeddings, which stand in for the gradient's pointer, are not written."""
    from l2d_kernels.ops import triton_led

    B, C = 36, 9
    y = (torch.arange(B)[:, None] < torch.tensor([0, 1, 2, 3, 15, 16, 17, 33, 36])[None, :]).to(DEVICE)
    es, et, _ = embeddings(B, C, 20, device=DEVICE, seed=8)
    losses, grad, total = triton_led.led_forward(es, et, y, 100.0, 1000.0)
    before = es.clone()
    only, none, only_total = triton_led.led_forward(es, et, y, 100.0, 1000.0, with_grad=False)
    assert grad.shape == es.shape and none.numel() == 0 and torch.equal(es, before)
    assert torch.equal(only, losses) and torch.equal(only_total, total)


@pytest.mark.parametrize("ahead,slice_width", [(True, 0), (False, 0), (True, 8)],
                         ids=["whole-ahead", "whole-one-at-a-time", "split-ahead"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transpose", [False, True], ids=["cd-groups", "id-groups"])
@pytest.mark.parametrize("members", [70, 64, 32], ids=lambda n: f"{n}-members")
def test_single_program_groups_of_every_size_class(monkeypatch, ahead, slice_width, dtype, transpose, members):
    """Groups of 0-2, 3-16, 17-32, 33-64 and 65-128 members, the single-program sizes (both families:
    the CD launch writes the gradient, the ID launch adds to it), whole with the width chunks loaded
    one ahead (the default) and one at a time, and split into 8-wide slices; a width of 40 leaves a
    partial last chunk. With at most 32 or 64 possible members the kernels are compiled without the
    larger sizes."""
    from l2d_kernels.ops import triton_led

    monkeypatch.setattr(triton_led, "LOAD_AHEAD", ahead)
    monkeypatch.setattr(triton_led, "SLICE_WIDTH", slice_width)
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


def test_tiled_path_is_bitwise_reproducible(small_tiles, slices):
    es, et, y = embeddings(34, 4, 10, density=0.8, device=DEVICE, seed=8)
    first = _check(es, et, y)
    assert torch.equal(first, _check(es, et, y))


def test_tiled_path_with_duplicate_rows_stays_finite(small_tiles, slices):
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


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 12), C=st.integers(1, 12), D=st.integers(1, 40), slice_width=st.sampled_from([4, 8, 16]),
    density=st.sampled_from([0.0, 0.2, 0.5, 0.8, 1.0]), seed=st.integers(0, 2**16),
)
def test_width_split_matches_the_formula_on_random_shapes_and_targets(B, C, D, slice_width, density, seed):
    from unittest import mock

    from l2d_kernels.ops import triton_led

    es, et, y = embeddings(B, C, D, density=density, seed=seed, device=DEVICE)
    with mock.patch.object(triton_led, "SLICE_WIDTH", slice_width):
        _check(es, et, y)


def _expected_plan(y, n_s, cap, small_max):
    """The plan's offsets by its definition: groups of 2..small_max members, CD then ID, each taking
    n_s * 2 * tile^2 floats in order; a group whose end passes cap gets -1 (and still counts)."""
    sizes = [int(n) for n in (y > 0.5).sum(0)] + [int(n) for n in (y > 0.5).sum(1)]
    offs, running = [], 0
    for p in sizes:
        if 2 <= p <= small_max:
            tile = 16 if p <= 16 else 32 if p <= 32 else 64 if p <= 64 else 128
            area = n_s * 2 * tile * tile
            offs.append(running if running + area <= cap else -1)
            running += area
        else:
            offs.append(-1)
    return offs


@pytest.mark.parametrize("shape,small_max", [((40, 9), 128), ((150, 6), 128), ((7, 140), 128), ((36, 20), 16)])
@pytest.mark.parametrize("room", ["all", "few"])
@pytest.mark.parametrize("plan_flags, column_major", [(256, False), (1024, False), (1024, True)],
                         ids=["blocks-of-16", "blocks-by-flags", "blocks-by-flags-column-major"])
def test_plan_places_groups_in_order_while_they_fit(monkeypatch, shape, small_max, room, plan_flags, column_major):
    """Both families, with and without member lists (150 or 140 possible members), several blocks of
    groups and of members: the offsets are those of the definition, with scratch for every group or
    for the first three only (later groups, even smaller ones, get none); each family's list of groups
    of more than 16 members, in group order.
    Steps of 16 groups (PLAN_BLOCK), or of up to PLAN_FLAGS / members a step: 64 for the 140 labels
    of 7 images and the 150 images of 6 labels, three steps each. Targets row-major (CD's groups are
    the contiguous axis: read as [members, groups]) or column-major (ID's are)."""
    from l2d_kernels.ops import triton_led

    monkeypatch.setattr(triton_led, "SMALL_MAX", small_max)
    monkeypatch.setattr(triton_led, "PLAN_BLOCK", 16)
    monkeypatch.setattr(triton_led, "PLAN_FLAGS", plan_flags)
    B, C = shape
    g = torch.Generator().manual_seed(B * C)
    # Group sizes from 0 to all: each label's density differs.
    y = torch.rand(B, C, generator=g) < torch.linspace(0.0, 1.0, C)[None, :]
    if column_major:
        y = y.T.contiguous().T
    n_s = 3
    placed = [o for o in _expected_plan(y, n_s, 2**40, small_max) if o >= 0]
    assert len(placed) > 3
    cap = 2**40 if room == "all" else placed[3]  # the fourth group's start: room for three
    cd_cnt = (y > 0.5).sum(0).to(torch.int32).to(DEVICE)
    id_cnt = (y > 0.5).sum(1).to(torch.int32).to(DEVICE)
    offs, done, big, n_big = (t.cpu().tolist() for t in triton_led._plan(y.to(DEVICE), cd_cnt, id_cnt, n_s, cap))
    assert done == [0]  # the call's last launch counts its programs from zero
    assert offs == _expected_plan(y, n_s, cap, small_max)
    # Each family's groups of more than 16 members, in group order (the big-group split launch's work).
    want = [[g for g, p in enumerate(c.cpu().tolist()) if p > 16] for c in (cd_cnt, id_cnt)]
    assert n_big == [len(want[0]), len(want[1])]
    assert big[: n_big[0]] == want[0] and big[C : C + n_big[1]] == want[1]
    assert sum(o >= 0 for o in offs) == (len(placed) if room == "all" else 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_groups_past_the_scratch_are_done_whole(monkeypatch, dtype):
    """With scratch for only a few groups, the plan splits those and the rest (of CD, and all of ID) run
    whole in their slice-0 programs, in one call: results within the formula's tolerance, bitwise
    reproducible."""
    from l2d_kernels.ops import triton_led

    monkeypatch.setattr(triton_led, "SLICE_WIDTH", 8)
    B, C, D = 36, 9, 24
    y = (torch.arange(B)[:, None] < torch.tensor([0, 1, 2, 3, 15, 16, 17, 33, 36])[None, :]).to(DEVICE)
    es, et, _ = embeddings(B, C, D, dtype=dtype, device=DEVICE, seed=16)
    n_s, _ = triton_led._split_slices(D)
    cap = 4 * n_s * 2 * 32 * 32  # bytes: a few groups' partial Grams
    monkeypatch.setattr(triton_led, "SCRATCH_MIN_BYTES", cap)
    monkeypatch.setattr(triton_led, "SCRATCH_GRAD_FRACTION", 10**9)
    # The plan (checked against its definition above): CD's groups of 2, 3, 15 and 16 members fill the
    # scratch; CD's larger groups and every ID group (2 to 8 members) are past it.
    expected = _expected_plan(y.cpu(), n_s, cap // 4, triton_led.SMALL_MAX)
    assert [o >= 0 for o in expected[:C]] == [False, False, True, True, True, True, False, False, False]
    assert all(o < 0 for o in expected[C:])
    x = es.clone().requires_grad_()
    total = fused_led(x, et, y, backend="triton")
    total.backward()
    again = es.clone().requires_grad_()
    total_again = fused_led(again, et, y, backend="triton")
    total_again.backward()
    assert torch.equal(total, total_again) and torch.equal(x.grad, again.grad)
    if dtype == torch.float32:
        _check(es, et, y)
    else:
        n = lambda t: t.detach().double().cpu().numpy()  # noqa: E731
        _, _, _, w_grad = oracle.led(n(es), n(et), n(y))
        eager_x = es.clone().requires_grad_()
        reference.led_vectorized(eager_x, et, y).backward()
        assert rel_err(x.grad, w_grad) <= half_tol(rel_err(eager_x.grad, w_grad), dtype)


@pytest.mark.parametrize("transpose", [False, True], ids=["cd-groups", "id-groups"])
def test_no_room_in_the_scratch_runs_every_tile_size_whole(monkeypatch, transpose):
    """A scratch with room for no group: on the split path every group (66, 40, 20 and 5 members: the
    128-, 64-, 32- and 16-row tiles) is done whole by its slice-0 program, the weights and gradient
    code it shares with the placed groups reading its Grams from the whole width."""
    from l2d_kernels.ops import triton_led

    monkeypatch.setattr(triton_led, "SLICE_WIDTH", 8)
    monkeypatch.setattr(triton_led, "SCRATCH_MIN_BYTES", 4)
    monkeypatch.setattr(triton_led, "SCRATCH_MAX_BYTES", 4)
    y = torch.arange(70)[:, None] < torch.tensor([66, 40, 20, 5])[None, :]
    if transpose:
        y = y.T.contiguous()
    es, et, _ = embeddings(*y.shape, 20, device=DEVICE, seed=17)
    y = y.to(DEVICE)
    n_s, _ = triton_led._split_slices(20)
    assert n_s == 3 and all(o < 0 for o in _expected_plan(y.cpu(), n_s, 1, triton_led.SMALL_MAX))
    _check(es, et, y)


def test_slices_widen_past_max_slices(monkeypatch):
    from l2d_kernels.ops import triton_led

    assert triton_led._split_slices(768) == (12, 64)  # the default at D = 768
    assert triton_led._split_slices(64) == (1, 64)
    assert triton_led._split_slices(2048) == (16, 128)
    assert triton_led._split_slices(2049) == (11, 192)
    monkeypatch.setattr(triton_led, "SLICE_WIDTH", 0)
    assert triton_led._split_slices(2048) == (1, 2048)


def test_widened_slices_match_the_formula(monkeypatch):
    """Slices of a multiple of SLICE_WIDTH (4 x 4 = 16 widths, three slices of a width of 40)."""
    from l2d_kernels.ops import triton_led

    monkeypatch.setattr(triton_led, "SLICE_WIDTH", 4)
    monkeypatch.setattr(triton_led, "MAX_SLICES", 3)
    assert triton_led._split_slices(40) == (3, 16)
    B, C = 36, 9
    y = torch.arange(B)[:, None] < torch.tensor([0, 1, 2, 3, 15, 16, 17, 33, 36])[None, :]
    es, et, _ = embeddings(B, C, 40, device=DEVICE, seed=17)
    _check(es, et, y.to(DEVICE))


@pytest.mark.parametrize("shape", [(3, 7, 5), (5, 13, 300), (1, 1, 2)], ids=["one-block", "ragged", "single-row"])
@pytest.mark.parametrize("grad_output", [-1.75, float("inf")])
def test_backward_scaling_by_blocks_of_rows(shape, grad_output):
    """``led_scale`` (SCALE_ROWS rows a program, SCALE_BLOCK widths a step): rows with a positive
    target times grad_output, the others untouched, here made of sentinels that a stray write would
    change; every row for an infinite grad_output. Row counts past a whole block and widths past one
    step (5 x 13 rows of 300 widths against blocks of 16 rows and 256 widths), float targets."""
    from l2d_kernels.ops import triton_led

    B, C, D = shape
    g = torch.Generator().manual_seed(B * C * D)
    grad = torch.randn(B, C, D, generator=g).to(DEVICE)
    targets = (torch.rand(B, C, generator=g) < 0.4).float().to(DEVICE) * 0.9
    targets.view(-1)[0] = 0.9  # at least one positive row
    out = grad.clone()
    triton_led.led_scale(out, targets, torch.tensor(grad_output, device=DEVICE))
    chosen = (targets > 0.5) | (not torch.isfinite(torch.tensor(grad_output)))
    want = torch.where(chosen[..., None], grad * grad_output, grad)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("small_warps", [0, 4], ids=["one-split-launch", "two-split-launches"])
@pytest.mark.parametrize("shape", [(12, 6, 24), (6, 20, 24), (20, 6, 24)], ids=["small", "large-id", "large-cd"])
def test_the_split_path_adds_the_losses_in_its_last_launch(monkeypatch, small_warps, shape):
    """On the width-split path the call's last launch adds the group losses (its last program to finish)
    and no finalize kernel runs, unless ID's large groups' passes come last: then _finalize_kernel does.
    The sums are the same either way."""
    from l2d_kernels.ops import triton_common, triton_led

    monkeypatch.setattr(triton_led, "SLICE_WIDTH", 8)
    monkeypatch.setattr(triton_led, "SMALL_MAX", 16)
    monkeypatch.setattr(triton_led, "TILE", 16)
    monkeypatch.setattr(triton_led, "SMALL_WARPS", small_warps)
    monkeypatch.setattr(triton_common, "DIRECT_LAUNCH", False)
    launched = []

    class Logged(type(triton_common.JIT_LAUNCH)):
        def __call__(self, fn, grid, *args, **kwargs):
            launched.append((fn.__name__, kwargs.get("FINAL")))
            return super().__call__(fn, grid, *args, **kwargs)

    monkeypatch.setattr(triton_common, "JIT_LAUNCH", Logged())
    es, et, y = embeddings(*shape, device=DEVICE, density=0.8)
    _check(es, et, y, lambda_cd=3.0, lambda_id=5.0)
    names = [name for name, _ in launched]
    large_id = shape[1] > 16
    assert names[0] in ("_members_kernel", "_plan_kernel") and "_gram_kernel" in names
    assert [final for name, final in launched if name == "_split_kernel"][-1] is (not large_id)
    assert sum(final is True for _, final in launched) == (not large_id)
    assert ("_finalize_kernel" in names) is large_id
    # The forward's last launch, then the backward's.
    assert names[-2:] == ["_finalize_kernel" if large_id else "_split_kernel", "_scale_kernel"]
