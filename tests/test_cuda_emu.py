"""The CUDA kernels of csrc/ in the CPU emulator (tests/cuda_emu): the emulator itself, then every
path of the LED kernel (the one-tile sizes 16, 32 and 64, whole or split over width slices; pairs of
64-row tiles above 64 members, in one block or striped over blocks; both families, every dtype,
several groups per block) against SPEC's float64 formulas, and bitwise equal results under three
orders of running a block's threads, so that a shared-memory read that lacks its barrier shows, and
with a launch's blocks interleaved rather than run in turn, so that work one block hands another
(the plan's block polling for the group blocks, the slice launches' item queue, a launch's last
block summing the others' parts) shows where it depends on which block gets there first. Tensors
sit in guarded memory, so that an access outside one stops the run.

The API suite (test_api.py, test_nn.py) runs on the emulated CUDA backend too (its LED tests also
with 4-wide slices, the split path); this file covers what its small shapes do not reach. None of
it replaces the GPU check: the emulator runs the kernels' arithmetic and indexing, not the
hardware's memory model or speed.
"""

import pytest
import torch

import oracle
from cuda_emu import backend as emulated_cuda
from helpers import embeddings, half_tol, logits, rel_err, with_common_part
from l2d_kernels import reference
from l2d_kernels.ops.library import grad_dtype

pytestmark = pytest.mark.skipif(not emulated_cuda.wanted(), reason="a GPU is present (the real kernels are "
                                "tested), or no C++ compiler or ninja to build the emulator")

ORDERS = [(0, 0), (1, 0), (2, 7)]  # by thread index, reversed, a random permutation every round


@pytest.fixture(scope="module")
def ops():
    """The emulated operators, with every CPU tensor of this module's tests in a guarded mapping
    (tests/cuda_emu/guard.cpp): a kernel touching memory past a buffer's end stops the run."""
    emulated = emulated_cuda.ops()
    emulated.guard_memory(True)
    yield emulated
    emulated.guard_memory(False)
    emulated.set_order(0, 0)
    emulated.set_blocks(0, 0)


def test_emulator_runs_block_level_code(ops):
    out = ops.selftest("sums")
    n = 256
    assert out[0].item() == n * (n - 1) / 2  # block_sum over the thread indices
    prefix = torch.arange(n).cumsum(0) - torch.arange(n)  # exclusive scan of the last block (index 1)
    assert torch.equal(out[1:n + 1], (prefix + n * (n - 1) // 2).float())


@pytest.mark.parametrize("name, message", [
    ("divergent_barrier", "__syncthreads reached by 128 threads while 128 had returned"),
    ("partial_shuffle", "a shuffle reached by only some of its lanes"),
])
def test_emulator_stops_where_a_gpu_would_hang(ops, name, message):
    with pytest.raises(RuntimeError, match=message):
        ops.selftest(name)


def test_emulator_stops_an_early_launch_that_does_not_wait(ops):
    """A launch that may start before the previous one ends (programmatic dependent launch) must wait
    for it in every thread: one thread that does not stops it. Launched in order, the same kernel runs."""
    assert torch.equal(ops.selftest("skipped_wait_in_order")[:256], torch.ones(256))
    with pytest.raises(RuntimeError, match="thread 7 of a launch that may start early returned without waiting"):
        ops.selftest("skipped_wait_early")


def test_guarded_memory_stops_a_write_past_the_end(ops):
    """In a fresh process (the fault ends it): a kernel writing 64 bytes past its output's end dies of
    a segmentation fault under guarded memory."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from cuda_emu.build import build; ops = build(); "
              "ops.guard_memory(True); ops.selftest('write_past_end')")
    run = subprocess.run([sys.executable, "-c", script, str(here)], capture_output=True, text=True, timeout=600)
    assert run.returncode == -signal.SIGSEGV, run.stderr[-2000:]


def test_emulator_orders_expose_a_missing_barrier(ops):
    results = []
    for order, seed in ORDERS:
        ops.set_order(order, seed)
        results.append(ops.selftest("missing_barrier"))
    ops.set_order(0, 0)
    assert not torch.equal(results[0], results[1]) and not torch.equal(results[0], results[2])


def test_emulator_interleaves_blocks(ops):
    """With blocks interleaved, the order in which 16 blocks reach an atomic is not their index order
    (in turn, it is), and differs between seeds."""
    in_turn = ops.selftest("tickets")[:16]
    assert torch.equal(in_turn, torch.arange(16.0))
    orders = []
    try:
        for resident, seed in [(4, 1), (4, 2), (16, 3)]:
            ops.set_blocks(resident, seed)
            tickets = ops.selftest("tickets")[:16]
            assert torch.equal(tickets.sort().values, torch.arange(16.0))
            assert ops.block_counts()[0] > 0
            orders.append(tickets)
    finally:
        ops.set_blocks(0, 0)
    assert all(not torch.equal(t, in_turn) for t in orders)
    assert not torch.equal(orders[0], orders[1])


def test_emulator_polling_block_waits_while_others_run(ops):
    """A block that polls, sleeping between polls, for the other seven blocks of its launch: run in
    turn it would wait forever, and its first sleep stops it; interleaved, it sees all seven once
    they have run (and for some seeds it does sleep); with one block resident at a time nothing else
    can run, and the emulator stops it as a hang."""
    with pytest.raises(RuntimeError, match="a block sleeps waiting for others"):
        ops.selftest("poll")
    sleeps = 0
    try:
        for resident, seed in [(2, 0), (2, 1), (8, 2), (8, 3)]:
            ops.set_blocks(resident, seed)
            assert ops.selftest("poll")[0].item() == 7
            sleeps += ops.block_counts()[1]
        ops.set_blocks(1, 0)
        with pytest.raises(RuntimeError, match="slept 100,000 times"):
            ops.selftest("poll")
    finally:
        ops.set_blocks(0, 0)
    assert sleeps > 0


def _led(ops, es, et, y, lambda_cd=100.0, lambda_id=1000.0):
    """(losses, grad) of the emulated operator, whose third output, the total apart, must be losses[0]."""
    losses, grad, total = ops.led(es, et, y, lambda_cd, lambda_id)
    assert total.shape == () and total.dtype == torch.float32
    assert torch.equal(total.view(torch.int32), losses[0].view(torch.int32))  # bitwise: NaN included
    return losses, grad


def _check_fp32(losses, grad, es, et, y, lambda_cd=100.0, lambda_id=1000.0, tol=1e-4):
    n = lambda t: t.detach().double().numpy()  # noqa: E731
    w_total, w_cd, w_id, w_grad = oracle.led(n(es), n(et), n(y), lambda_cd, lambda_id)
    assert rel_err(losses[0], w_total) < tol
    assert abs(losses[1].item() - w_cd) <= tol * abs(w_cd) + 1e-12
    assert abs(losses[2].item() - w_id) <= tol * abs(w_id) + 1e-12
    assert rel_err(grad, w_grad) < tol


def _checked_in_two_orders(ops, es, et, y, order):
    """The call's results against float64, and bitwise the same with a block's threads run in another
    order (``order``: the emulator's order and seed); returns them."""
    losses, grad = _led(ops, es, et, y)
    _check_fp32(losses, grad, es, et, y)
    ops.set_order(*order)
    try:
        other = _led(ops, es, et, y)
    finally:
        ops.set_order(0, 0)
    assert torch.equal(losses, other[0]) and torch.equal(grad, other[1])
    return losses, grad


def _ragged_targets(members: int, transpose: bool):
    """Groups of 0, 1, 2, 9, 16, 17, 31, 32, 33, 40, 64, 65 and 70 members (as far as ``members``
    allows): both sides of every size class, as CD groups (or ID groups when transposed)."""
    sizes = torch.tensor([s for s in (0, 1, 2, 9, 16, 17, 31, 32, 33, 40, 64, 65, 70) if s <= members])
    y = torch.arange(members)[:, None] < sizes[None, :]
    return y.T.contiguous() if transpose else y


@pytest.mark.parametrize("width", [40, 200])
@pytest.mark.parametrize("transpose", [False, True], ids=["cd-groups", "id-groups"])
def test_led_every_group_size_class(ops, transpose, width):
    """One-tile chunks are 128, 64 and 32 wide (tiles of 16, 32 and 64 members), the tiled path's 32:
    widths of 40 and 200 end every one of them in a partial chunk. The emulated device has 3 SMs, so
    each group block takes several groups in turn."""
    y = _ragged_targets(70, transpose)
    es, et, _ = embeddings(*y.shape, width, seed=13)
    es, et = es.float(), et.float()
    losses, grad = _led(ops, es, et, y)
    _check_fp32(losses, grad, es, et, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("members", [70, 150])
@pytest.mark.parametrize("transpose", [False, True], ids=["cd-groups", "id-groups"])
def test_led_rows_that_share_a_large_common_part(ops, transpose, members, dtype):
    """Every size class (up to 70 members: one tile of 16, 32 or 64 rows, and a pair of tiles) and
    striped groups of 150, whose rows share a part 100 times their spread: the Grams and norms are
    taken less the group's first member, in float32 for every dtype. Float32 within 1e-4 of float64
    (without the shift, 2e-3 to 6e-3 off); half-precision inputs, exact in float32, within 1e-4 of
    float64 plus the gradient dtype's own rounding (a float16 student's float32 gradient was 3.6e-3 off
    without the shift in float32)."""
    if members == 70:
        y = _ragged_targets(70, transpose)
    else:
        y = torch.arange(150)[:, None] < torch.tensor([150, 65, 3])[None, :]
        y = y.T.contiguous() if transpose else y
    es, et, _ = embeddings(*y.shape, 40, seed=14)
    es, et = (t.to(dtype) for t in with_common_part(es.float(), et.float(), 100.0, seed=15))
    losses, grad = _led(ops, es, et, y)
    if dtype == torch.float32:
        _check_fp32(losses, grad, es, et, y)
        return
    n = lambda t: t.detach().double().numpy()  # noqa: E731
    w_total, w_cd, w_id, w_grad = oracle.led(n(es), n(et), n(y))
    assert grad.dtype == grad_dtype(dtype)
    assert rel_err(losses[0], w_total) < 1e-4
    assert abs(losses[1].item() - w_cd) <= 1e-4 * abs(w_cd) and abs(losses[2].item() - w_id) <= 1e-4 * abs(w_id)
    # A bfloat16 gradient is rounded where CD writes it and again where ID adds its part (1.2-1.4 times
    # one rounding at any k); a float16 student's gradient stays float32 here (grad_dtype).
    rounding = rel_err(torch.from_numpy(w_grad).to(grad.dtype), w_grad)
    assert rel_err(grad, w_grad) < 2 * rounding + 1e-4


@pytest.mark.parametrize("transpose", [False, True], ids=["cd-groups", "id-groups"])
@pytest.mark.parametrize("order, seed", ORDERS[1:], ids=["reversed", "random"])
def test_led_results_do_not_depend_on_thread_order(ops, transpose, order, seed):
    y = _ragged_targets(70, transpose)
    es, et, _ = embeddings(*y.shape, 36, seed=3)
    es, et = es.float(), et.float()
    ops.set_order(0, 0)
    base = _led(ops, es, et, y)
    ops.set_order(order, seed)
    try:
        other = _led(ops, es, et, y)
    finally:
        ops.set_order(0, 0)
    assert torch.equal(base[0], other[0]) and torch.equal(base[1], other[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_led_half_precision_large_groups(ops, dtype):
    """Groups of 33-64 and above 64 members at half precision: the tiled path adds each column tile's
    part in the gradient's dtype (float32 for float16 students); the error stays within twice eager
    PyTorch's at the same dtype."""
    y = _ragged_targets(70, False)
    es, et, _ = embeddings(*y.shape, 24, dtype=dtype, seed=12)
    n = lambda t: t.detach().double().numpy()  # noqa: E731
    w_total, _, _, w_grad = oracle.led(n(es), n(et), n(y))
    losses, grad = _led(ops, es, et, y)
    eager_x = es.clone().requires_grad_()
    eager = reference.led_vectorized(eager_x, et, y)
    eager.backward()
    assert grad.dtype == grad_dtype(dtype)
    assert rel_err(losses[0], w_total) <= half_tol(rel_err(eager, w_total), dtype)
    assert rel_err(grad, w_grad) <= half_tol(rel_err(eager_x.grad, w_grad), dtype)


def test_led_duplicate_rows_in_large_groups_stay_finite(ops):
    """Identical rows in the same 64-row tile and in different tiles of a 150-member group (three
    tiles a side), and in a 40-member one-tile group: their distance is exactly 0 (the norms are the
    Gram's own fmaf chains), so the gradient stays finite."""
    es, et, y = embeddings(150, 2, 16, density=1.0, seed=9)
    es, et = es.float(), et.float()
    y[40:, 1] = False  # a 150-member and a 40-member group
    es[5] = es[3]
    es[17] = es[3]
    es[140] = es[3]
    et[9] = et[2]
    et[100] = et[2]
    losses, grad = _led(ops, es, et, y)
    assert torch.isfinite(losses).all() and torch.isfinite(grad).all()
    _check_fp32(losses, grad, es, et, y)


@pytest.mark.parametrize("transpose", [False, True], ids=["cd-groups", "id-groups"])
@pytest.mark.parametrize("members", [128, 150])
def test_led_groups_of_several_tiles(ops, transpose, members):
    """Groups of 65 to 150 members: with at most 128 possible members a group's tile pairs stay in one
    block; with more, every row tile is a work item of its own over three launches (striped). Full
    and ragged last tiles; a width of 72 ends in a partial 32-wide chunk. The striped sums must not
    depend on the order of a block's threads either."""
    sizes = torch.tensor([s for s in (150, 129, 128, 65, 3) if s <= members])
    y = torch.arange(members)[:, None] < sizes[None, :]
    if transpose:
        y = y.T.contiguous()
    es, et, _ = embeddings(*y.shape, 72, seed=21)
    _checked_in_two_orders(ops, es.float(), et.float(), y, (2, 11))


@pytest.mark.parametrize("members", [9, 33, 70], ids=lambda n: f"{n}-members")
def test_led_nan_reaches_only_its_groups(ops, members):
    """A NaN in one row of a CD group of 9 (16-member tile), 33 (64-member tile) or 70 members (tiled
    path) reaches exactly that group's rows and its image's ID group, nothing else."""
    y = _ragged_targets(70, False)
    label = int((y.sum(0) == members).nonzero()[0])
    es, et, _ = embeddings(*y.shape, 12, seed=2)
    es, et = es.float(), et.float()
    es[3, label, 5] = float("nan")
    losses, grad = _led(ops, es, et, y)
    reached = torch.zeros_like(y)
    reached[:, label] = y[:, label]
    reached[3] = y[3]
    assert torch.isnan(losses[0])
    assert torch.isnan(grad[reached]).all() and torch.isfinite(grad[~reached]).all()


@pytest.mark.parametrize("transpose", [False, True], ids=["cd-groups", "id-groups"])
def test_led_width_split_every_size_class(ops, monkeypatch, transpose):
    """A width of 300 is three 128-wide slices (the last one partial) on the width-split path: every
    one-tile size class (2 to 64 members) takes its Grams slice by slice from the scratch, larger
    groups stay whole; within the formula's tolerance, bitwise the same under another thread order,
    and not bitwise the same as with every group whole (so the split path did run)."""
    y = _ragged_targets(70, transpose)
    es, et, _ = embeddings(*y.shape, 300, seed=31)
    es, et = es.float(), et.float()
    losses, grad = _checked_in_two_orders(ops, es, et, y, (2, 5))
    monkeypatch.setenv("L2D_CUDA_LED_SCRATCH_BYTES", "0")
    whole = _led(ops, es, et, y)
    _check_fp32(*whole, es, et, y)
    assert not torch.equal(grad, whole[1])


def test_led_width_split_past_the_scratch(ops, monkeypatch):
    """A scratch with room for the first few groups only: they are split, the others (in group order)
    run whole in the group kernel, in one call, both families adding into the same rows."""
    y = _ragged_targets(70, False)
    es, et, _ = embeddings(*y.shape, 260, seed=32)
    es, et = es.float(), et.float()
    # Three slices: CD's groups of 2, 9 and 16 members (16-row tiles, 3 x 2 x 256 floats each) fit,
    # the group of 17 (a 32-row tile) and every later one does not.
    monkeypatch.setenv("L2D_CUDA_LED_SCRATCH_BYTES", str(4 * 3 * 3 * 2 * 256 + 4 * 100))
    losses, grad = _led(ops, es, et, y)
    _check_fp32(losses, grad, es, et, y)
    monkeypatch.setenv("L2D_CUDA_LED_SCRATCH_BYTES", "0")
    whole = _led(ops, es, et, y)
    # Per label, whether any of its gradient rows differs from the all-whole call: the split groups
    # of 9 and 16 members (their Grams summed slice by slice: other rounding) do; the groups past the
    # scratch and the rows outside CD groups do not (every ID group is past it, in both calls whole).
    # The 2-member group is left out: its CD gradient is exactly 0 either way.
    differs = (grad != whole[1]).any(dim=0).any(dim=-1)
    sizes = y.sum(0)
    assert differs[(sizes == 9) | (sizes == 16)].all()
    assert not differs[(sizes > 16) | (sizes < 2)].any()


def test_led_width_split_plan_over_several_steps(ops, monkeypatch):
    """The plan takes 1,024 groups a step (4 a thread): at 2,500 labels and 4 images its scan runs
    over three steps, and the scratch ends inside the third. The 26 labels of 4 members (every 97th)
    are each one unit; the scratch holds 23 of them, so labels 0 .. 2134 are split, the three after
    them and the 26-member ID groups run whole; each split label's rows differ from an all-whole
    call's and no other row does. The slice launches take the active groups' items only (26 + 4 of
    2,504 groups)."""
    B, C = 4, 2500
    y = torch.zeros(B, C, dtype=torch.bool)
    y[:, ::97] = True
    es, et, _ = embeddings(B, C, 300, seed=35)
    es, et = es.float(), et.float()
    monkeypatch.setenv("L2D_CUDA_LED_SCRATCH_BYTES", str(4 * 23 * 3 * 2 * 256 + 4 * 100))
    losses, grad = _checked_in_two_orders(ops, es, et, y, (1, 0))
    monkeypatch.setenv("L2D_CUDA_LED_SCRATCH_BYTES", "0")
    whole = _led(ops, es, et, y)
    differs = (grad != whole[1]).any(dim=0).any(dim=-1)
    labels = torch.arange(C)
    split = (labels % 97 == 0) & (labels <= 2134)
    assert differs[split].all() and not differs[~split].any()


def test_led_item_clocks_list_every_slice_item(ops, monkeypatch, tmp_path):
    """L2D_CUDA_LED_ITEM_CLOCKS (profiling): one line per work item of each slice launch, items 0 .. n - 1
    for n = (groups of 2 to 64 members) x (slices), with its group's size: both families' in the Gram
    launch, each family's in its own (the emulator has no clocks or SMs: zeros there). Items come
    largest tile first (64-row, 32, 16), a group's slices in turn. Results as without it."""
    y = _ragged_targets(70, False)
    es, et, _ = embeddings(*y.shape, 300, seed=36)
    es, et = es.float(), et.float()
    plain = _led(ops, es, et, y)
    path = tmp_path / "clocks.txt"
    monkeypatch.setenv("L2D_CUDA_LED_ITEM_CLOCKS", str(path))
    timed = _led(ops, es, et, y)
    assert torch.equal(plain[0], timed[0]) and torch.equal(plain[1], timed[1])
    lines = path.read_text().splitlines()
    assert lines[0] == f"# {y.shape[0]} {y.shape[1]} 300 3"
    rows = [tuple(map(int, line.split())) for line in lines[1:]]
    cd, id_ = y.sum(0), y.sum(1)
    cd, id_ = [p for p in cd.tolist() if 2 <= p <= 64], [p for p in id_.tolist() if 2 <= p <= 64]
    assert cd and id_ and max(cd) > 32  # every tile class has items
    tile = [64 if p > 32 else 32 if p > 16 else 16 for p in range(65)]
    for launch, sizes in enumerate((cd + id_, cd, id_)):
        mine = sorted(r for r in rows if r[0] == launch)
        assert [r[1] for r in mine] == list(range(3 * len(sizes)))
        assert sorted(r[5] for r in mine) == sorted(3 * sizes)
        tiles = [tile[r[5]] for r in mine]
        assert tiles == sorted(tiles, reverse=True)
        assert all(mine[k][5] == mine[k + 1][5] == mine[k + 2][5] for k in range(0, len(mine), 3))
    assert all(r[2:5] == (0, 0, 0) for r in rows)


def test_led_slice_items_from_the_queue_or_in_turn(ops, monkeypatch):
    """The slice launches' items from the queue (the default: in the emulator, whose blocks run one
    after another, the first block takes them all) or dealt out in turn (L2D_CUDA_LED_QUEUE=0: every
    block takes some): bitwise the same losses and gradient, with and without gradient."""
    y = _ragged_targets(70, True)
    es, et, _ = embeddings(*y.shape, 300, seed=37)
    es, et = es.float(), et.float()
    queued = _led(ops, es, et, y)
    _check_fp32(*queued, es, et, y)
    queued_only = ops.led(es, et, y, 100.0, 1000.0, False)
    monkeypatch.setenv("L2D_CUDA_LED_QUEUE", "0")
    in_turn = _led(ops, es, et, y)
    in_turn_only = ops.led(es, et, y, 100.0, 1000.0, False)
    assert torch.equal(queued[0], in_turn[0]) and torch.equal(queued[1], in_turn[1])
    assert torch.equal(queued_only[0], in_turn_only[0]) and torch.equal(queued_only[0], queued[0])


@pytest.mark.parametrize("members, width", [(70, 300), (150, 72)], ids=["split", "striped"])
def test_led_launches_early_or_in_order(ops, monkeypatch, members, width):
    """The emulated device reports compute capability 9.0, so every launch after the first is an early
    one (each checked to wait in every thread); L2D_CUDA_LED_EARLY_LAUNCH=0 launches them in order:
    bitwise the same losses and gradient, on the width split's launches and the striped families'."""
    sizes = torch.tensor([s for s in (150, 129, 128, 70, 65, 64, 33, 17, 16, 9, 2, 1, 0) if s <= members])
    y = (torch.arange(members)[:, None] < sizes[None, :]).T.contiguous()
    es, et, _ = embeddings(*y.shape, width, seed=41)
    es, et = es.float(), et.float()
    early = _led(ops, es, et, y)
    _check_fp32(*early, es, et, y)
    monkeypatch.setenv("L2D_CUDA_LED_EARLY_LAUNCH", "0")
    in_order = _led(ops, es, et, y)
    assert torch.equal(early[0], in_order[0]) and torch.equal(early[1], in_order[1])


def test_led_launches_in_order_where_the_kernels_cannot_wait(ops):
    """An extension built for targets before 9.0 (TORCH_CUDA_ARCH_LIST=8.0+PTX) runs on a 9.0 device
    from PTX the driver compiles there, without griddepcontrol.wait: the emulator's PTX version 80,
    where the wait does nothing and an early launch stops the run. The extension reads its kernels'
    PTX version and launches them in order there: the same losses and gradient, bitwise."""
    sizes = torch.tensor([150, 70, 64, 33, 17, 9, 2, 1, 0])
    y = (torch.arange(150)[:, None] < sizes[None, :]).T.contiguous()
    es, et, _ = embeddings(*y.shape, 300, seed=42)
    es, et = es.float(), et.float()
    early = _led(ops, es, et, y)
    ops.set_ptx_version(80)
    try:
        in_order = _led(ops, es, et, y)
    finally:
        ops.set_ptx_version(90)
    assert torch.equal(early[0], in_order[0]) and torch.equal(early[1], in_order[1])


@pytest.mark.parametrize("case", ["split-id-groups", "split-cd-groups", "split-tile-pairs", "striped"])
def test_led_results_do_not_depend_on_how_blocks_interleave(ops, case):
    """Every launch's blocks interleaved (2 or all of them resident at a time; 5 without gradient),
    against the same call with blocks run in turn: bitwise the same losses and gradient, with and
    without gradient, so that nothing depends on which block takes an item from the queue, which
    block of a launch is the last to arrive, or when the plan's block finds the group blocks counted.
    Three cases take the width split (widths of 260 and 300; groups of 2 to 70 members, and of up to
    128, whose tile pairs stay in one block), one the striped families (groups of up to 150 members).
    On the width split, the plan's block, dispatched while group blocks still run, sleeps waiting
    for them in some of these runs (asserted, so that its wait is exercised, not skipped). Counting
    a group block before it has written its size is caught here (two of the three split cases fail
    with it), not by any test that runs blocks in turn."""
    if case == "split-cd-groups":
        y, width = _ragged_targets(70, False), 300
    else:
        members, width = {"split-id-groups": (70, 300), "split-tile-pairs": (128, 260), "striped": (150, 72)}[case]
        sizes = torch.tensor([s for s in (150, 129, 128, 70, 65, 64, 33, 17, 16, 9, 2, 1, 0) if s <= members])
        y = (torch.arange(members)[:, None] < sizes[None, :]).T.contiguous()
        if case == "split-tile-pairs":
            y = y.T.contiguous()
    es, et, _ = embeddings(*y.shape, width, seed=43)
    es, et = es.float(), et.float()
    base = _led(ops, es, et, y)
    _check_fp32(*base, es, et, y)
    base_only = ops.led(es, et, y, 100.0, 1000.0, False)[0]
    sleeps = 0
    try:
        for resident, seed in [(2, 1), (10 ** 6, 3)]:
            ops.set_blocks(resident, seed)
            other = _led(ops, es, et, y)
            assert torch.equal(base[0], other[0]) and torch.equal(base[1], other[1]), (resident, seed)
            sleeps += ops.block_counts()[1]
        ops.set_blocks(5, 4)
        assert torch.equal(ops.led(es, et, y, 100.0, 1000.0, False)[0], base_only)
        sleeps += ops.block_counts()[1]
    finally:
        ops.set_blocks(0, 0)
    if case.startswith("split"):
        assert sleeps > 0


def test_led_width_split_wider_slices(ops):
    """Past 16 slices of 128 the slices widen (2,100 widths: 9 slices of 256, the last partial)."""
    y = _ragged_targets(40, False)[:, :6]
    es, et, _ = embeddings(*y.shape, 2100, seed=33)
    es, et = es.float(), et.float()
    losses, grad = _led(ops, es, et, y)
    _check_fp32(losses, grad, es, et, y)


@pytest.mark.parametrize("members, width, split", [(70, 300, True), (150, 72, False), (128, 260, True)],
                         ids=["one-tile-sizes-split", "striped", "tile-pairs-in-one-block-split"])
@pytest.mark.parametrize("transpose", [False, True], ids=["cd-groups", "id-groups"])
def test_led_without_gradient_gives_the_same_losses(ops, monkeypatch, members, width, split, transpose):
    """with_grad=False on every path (one-tile sizes whole and split, a large group's tile pairs in one
    block, striped over blocks): the same losses, bitwise, and no gradient returned (the kernels get a
    null gradient pointer: a write through it would stop the run)."""
    sizes = torch.tensor([s for s in (150, 129, 128, 70, 65, 64, 33, 17, 16, 9, 2, 1, 0) if s <= members])
    y = torch.arange(members)[:, None] < sizes[None, :]
    if transpose:
        y = y.T.contiguous()
    es, et, _ = embeddings(*y.shape, width, seed=34)
    es, et = es.float(), et.float()
    if not split:
        monkeypatch.setenv("L2D_CUDA_LED_SCRATCH_BYTES", "0")
    losses, grad = _led(ops, es, et, y)
    _check_fp32(losses, grad, es, et, y)
    only, none, total = ops.led(es, et, y, 100.0, 1000.0, False)
    assert torch.equal(only, losses) and torch.equal(total, losses[0]) and none.numel() == 0


def test_mld_grid_stride_loop_over_more_than_1024_blocks(ops):
    """At more than 1024 x 256 labels each thread of the capped grid takes several labels, and the
    per-block partial sums are added by one block."""
    zs, zt = logits(1031, 256, seed=4)
    zs, zt = zs.float(), zt.float()
    loss, grad = ops.mld(zs, zt, "batchmean", 1e-8, 1.0)
    w_loss, w_grad = oracle.mld(zs.double().numpy(), zt.double().numpy(), "batchmean")
    assert rel_err(loss, w_loss) < 1e-5 and rel_err(grad, w_grad) < 1e-5
    loss_only, none = ops.mld(zs, zt, "batchmean", 1e-8, 1.0, False)
    assert torch.equal(loss_only, loss) and none.numel() == 0
