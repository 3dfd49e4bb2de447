"""LED in Triton: every group's distances, normalization, loss and gradient, without a relation tensor.

Both families run through one kernel set, with the embeddings seen as ``[groups, members, width]``:
CD is ``(label, instance, width)``, ID is ``(instance, label, width)``, a swap of strides only.

For a group of ``P`` member rows ``s_a`` (teacher ``t_a``), ``mu`` the mean of ``d`` over the
``N = P (P - 1)`` ordered pairs, ``x = d / mu_s - dt / mu_t`` and ``h' = clamp(x, -1, 1)``::

    loss     = (1 / P) sum huber(x)
    K        = sum h'(x) d
    w(a, b)  = (1 / P) [h'(x) / mu_s - K / (mu_s^2 N)] / d(a, b)     (0 where |s_a - s_b|^2 <= 1e-12)
    grad s_a = 2 lambda [(sum_b w(a, b)) s_a - sum_b w(a, b) s_b]

Grams are taken of a group's rows less its first member's row, the difference in float32 (distances
are shift-invariant; rows that share a large common part would otherwise lose digits to the Gram
form's cancellation: ``reference.shifted``), so below, ``s_a`` in a Gram or norm stands for that
difference; half-precision rows' differences go to the tensor cores in two parts (``_dot_less``).
The squared norms ``|s_a|^2`` are read off the diagonal of the same Gram products as the ``s_a.s_b``,
so two identical rows get a squared distance of exactly 0 (separately summed norms would leave a
rounding residue of about ``1e-7 |s|^2``, a spurious distance of ``3e-4 |s|`` in float32).

Launches, all on the device, none waiting for the host:

1. only for a family that can hold groups of more than ``SMALL_MAX`` members: ``_members_kernel``
   compacts each group's members (targets > 0.5) into an index list for the tiled passes. Otherwise
   each program finds its group's members in the targets itself (a prefix sum over at most
   ``SMALL_MAX`` flags); with neither family needing lists, the call has one launch fewer.
2. Groups of 2 to ``SMALL_MAX`` members, where the width is more than one slice (``SLICE_WIDTH``):
   ``_plan_kernel`` (one program) places each such group's partial Grams in a scratch;
   ``_gram_kernel`` over ``(group, slice)``, both families in one launch, computes each placed
   group's Grams over one width slice, in blocks of ``GRAM_ROWS`` rows; per family,
   ``_split_kernel`` over ``(group, slice)`` sums a group's slices in order, takes its loss and pair
   weights, and writes its gradient at that slice's widths, in two launches where the family can
   hold groups of more than 16 members (``SMALL_WARPS``: one for the groups of at most 16, one for
   the others, whose programs take the plan's list of such groups in turn: ``_big_programs``). A
   group the scratch had no room for is done whole by its slice-0 program: its Grams over the whole
   width in registers, then the same weights and gradient code as a placed group's.
2'. Where the width is one slice (or ``SLICE_WIDTH`` is 0), per family, ``_main_kernel`` over
   ``(group, row tile)``: a group of at most ``SMALL_MAX`` members is done entirely by one program
   (one Gram per side, on chip).
   In both, a whole group takes a tile of 16, 32, 64 or 128 rows (up to 64 members, each width chunk
   is loaded while the previous one is multiplied, ``LOAD_AHEAD``), and a larger group gets its row
   tiles' squared norms. Each launch compiles only the tile sizes its groups can need (``MAX_P``,
   from the number of possible members), so that the registers of the largest do not limit how
   many programs of a launch of small groups share an SM. The CD launch also writes the zero
   gradient of every row outside a group, so the gradient buffer needs no separate fill.
3. only when a family can hold groups larger than ``SMALL_MAX``, three passes over ``(group, row
   tile, column tile)`` that recompute their Gram tiles instead of storing them: ``_means_kernel``
   (distance sums), ``_stats_kernel`` (Huber and ``K`` sums), ``_grad_kernel`` (the gradient).
4. ``_finalize_kernel``: CD and ID sums and the weighted total. On the width-split path where ID's
   groups cannot be large, the last program of ID's last ``_split_kernel`` launch does this instead
   (one launch fewer; ``_plan_kernel`` zeroes the counter it takes).

CD runs before ID because both add into the same rows: CD writes, ID adds. Every sum is taken in a
fixed order and no float atomics are used, so two runs give bitwise equal results. A call that
needs no gradient (``with_grad=False``: no grad mode, or a student without ``requires_grad``) makes
the same launches with every gradient store compiled out (``ADD`` = ``NO_GRAD``) and no gradient
buffer: the same losses, bitwise, with no write of the inputs' size.
"""

from __future__ import annotations

import functools
import operator
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ..backends import triton_interpreted
from .library import grad_dtype
from .triton_common import (JIT_LAUNCH, SUM_BLOCK, LaunchCache, alignment_key, at_least, cdiv, clamp, next_power_of_2,
                            on_input_device, settle_cache_keys, sum_vector)

SMALL_MAX = 128
TILE = 64
TILE_BLOCK_D = 32
NUM_WARPS = 8
MEMBERS_BLOCK = 1024
# Width-split path: every group of 2 to SMALL_MAX members is spread over cdiv(width, SLICE_WIDTH)
# programs, one per slice of SLICE_WIDTH widths; each computes its slice's partial Grams
# (``_gram_kernel``), then each sums all slices' partials in order and writes its slice of the
# gradient (``_split_kernel``). A group then costs a few width chunks per program instead of the
# whole width in one. Partial Grams live in a scratch of a SCRATCH_GRAD_FRACTION of the gradient,
# within SCRATCH_MIN_BYTES..SCRATCH_MAX_BYTES, placed by ``_plan_kernel`` in group order; a group
# past it is done whole (the real-label benchmark shapes need 0.2-2.8 MiB; a batch of 1024 needs
# more than it gets). Widths above MAX_SLICES slices take slices of a multiple of SLICE_WIDTH.
# SLICE_WIDTH 0 (or a width of at most SLICE_WIDTH) keeps every
# group whole, one program each, with two launches fewer. Read at each launch.
SLICE_WIDTH = 64
MAX_SLICES = 16
SCRATCH_MIN_BYTES = 4 << 20
SCRATCH_MAX_BYTES = 32 << 20
SCRATCH_GRAD_FRACTION = 16
# ``_gram_kernel`` takes every group in blocks of GRAM_ROWS member rows, block pair by block pair, so
# that it compiles one small tile whatever the group sizes (with a tile per size class, as
# ``_split_kernel`` has, the 128-row tile gave it 255 registers, one program per SM), GRAM_D widths
# a step, in programs of GRAM_WARPS warps. Programs per SM count more than the steps of one: on an
# H100 at COCO (Triton 3.6, sm_90), 64 widths a step at 8 warps (128 registers, two programs per SM)
# took 75.0 us; 16 widths at 8 warps (108 registers, two) 46.5; 16 at 4 warps (92 registers, five)
# 31.6-32.5; 32 at 4 warps 44.8; 16 at 2 warps (206 registers) 53.8.
GRAM_ROWS = 16
GRAM_D = 16
GRAM_WARPS = 4
# The register cap of ``_gram_kernel`` (0: none). Taking each chunk less the group's first row (float32)
# took Triton 3.6's sm_90 build at COCO from 92 registers (five 4-warp programs per SM) to 168 (two)
# for a few subtractions a chunk (Triton 3.8: 102 -> 108); capped at 128 (four) it keeps 16 bytes of
# stack. The GPU check's profile has the rows to choose by: none and 96 (five, 72 bytes of stack).
# Float32 only: capped, ptxas gave the bfloat16 build 107-115 registers where it took 79-96 without;
# with its rows less the first row too (three tensor-core dots a chunk, ``_dot_less``) it takes 127
# uncapped on Triton 3.6 (four programs per SM, no stack).
GRAM_MAX_REGISTERS = 128
# ``_split_kernel`` runs as two launches per family where groups can have more than 16 members: one
# of SMALL_WARPS warps for the groups of at most 16 (the zero rows and the groups of fewer than two
# too), compiled for the 16-row tile only, and one of NUM_WARPS warps for the rest, which compiles
# every tile its family can reach. Registers are a kernel's, not a branch's: in one launch the
# 64- and 128-row tiles (197-255 registers at 8 warps) held every small group's program alone on
# its SM. The small launch at 4 warps takes 152-168 registers: three programs per SM. 0: one launch.
SMALL_WARPS = 4
# That launch's programs: this many an SM in all (see _big_programs), each looping over the plan's list
# of the family's groups of more than 16 members.
BIG_PROGRAMS_PER_SM = 2
# The smallest tile, which bounds the small-group launch's groups (a compile-time constant of the kernels).
SMALLEST_TILE = tl.constexpr(16)
# The kernels' ADD argument: 0 (False) writes the gradient, 1 (True) adds into it (ID, after CD),
# NO_GRAD writes none (a call without gradient).
NO_GRAD = tl.constexpr(2)
SCALE_ROWS = 16  # gradient rows per program of the backward's scaling
SCALE_BLOCK = 256  # widths per step of it
PLAN_BLOCK = 128  # groups per step of the plan, at least
PLAN_MEMBERS = 32  # members per step of a group count (a 128 x 32 block of flags: no spills at sm_90)
# At most this many flags (or group sizes) a step of the plan: a family of many groups takes up to
# PLAN_FLAGS / members-per-step groups a step (the plan is one program: its registers cost nothing,
# its steps cost latency). On an H100 at OpenImages' 9,605 labels x 16 images, CD's flags read as
# [groups, members] blocks (lanes along the 9,605-byte member stride, a sector a flag) took 64 us in
# steps of 128 labels (run e) and 90.5 in steps of 1,024 (run f): bound by the flags' sectors, not
# by the steps. A family whose groups are the targets' contiguous axis now reads [members, groups]
# blocks, a warp's 32 flags in one sector (_plan_family).
PLAN_FLAGS = 16384
# Groups of up to 64 members, and the tiles of large groups, load each width chunk one chunk ahead, so
# that the loads' latency passes during the previous chunk's products; groups of 17-32 and of 33-64
# members then take tiles of 32 and 64 rows, and every 64-row tile 16-wide chunks (32-wide ones and a
# second chunk in flight leave those loops spilling registers, by the sm_90 compile). Read at each
# launch; False loads one chunk at a time, groups of 17-64 members in one 64-row size and 64-row
# tiles with 32-wide chunks, as in the first H100 runs.
LOAD_AHEAD = True
# A call's launches after its first may start while the one before them ends (programmatic
# dependent launch, sm_90 and later; Triton's ``launch_pdl``): each kernel's programs first wait
# for the previous launch to complete (``gdc_wait``, which also makes its writes visible), then let
# the next launch be scheduled (``gdc_launch_dependents``), so that a launch's start and its
# programs' dispatch pass under the previous launch's last programs. Every program waits, so no
# launch completes before the one before it. False (``L2D_TRITON_EARLY_LAUNCH=0`` in the environment
# when the module is imported): each launch starts once the previous has ended.
EARLY_LAUNCH = os.environ.get("L2D_TRITON_EARLY_LAUNCH", "1") != "0"
# Triton's CPU interpreter multiplies bfloat16 dot operands wrongly; there, the Gram runs in float32
# (exact either way: bfloat16 products are exact in float32). Decided once, like triton.jit itself.
_GRAM_IN_FP32 = tl.constexpr(triton_interpreted())
# The settings above that a call reads: part of the key under which its launches are kept (LaunchCache).
_SETTINGS = ("SMALL_MAX", "TILE", "TILE_BLOCK_D", "NUM_WARPS", "MEMBERS_BLOCK", "SLICE_WIDTH", "MAX_SLICES",
             "SCRATCH_MIN_BYTES", "SCRATCH_MAX_BYTES", "SCRATCH_GRAD_FRACTION", "GRAM_ROWS", "GRAM_D", "GRAM_WARPS",
             "GRAM_MAX_REGISTERS", "SMALL_WARPS", "BIG_PROGRAMS_PER_SM", "SMALLEST_TILE", "SCALE_ROWS", "SCALE_BLOCK",
             "PLAN_BLOCK", "PLAN_MEMBERS", "PLAN_FLAGS", "LOAD_AHEAD", "SUM_BLOCK", "EARLY_LAUNCH")
_FORWARD_LAUNCHES = LaunchCache()
_SCALE_LAUNCHES = LaunchCache()


_settings_of = operator.itemgetter(*_SETTINGS)


def _settings() -> tuple:
    return _settings_of(globals())


@triton.jit
def _follow_previous_launch(GDC: tl.constexpr):
    """With ``GDC`` (a launch in a chain, see EARLY_LAUNCH): wait for the previous launch, then let the
    next one start; first in every kernel, before any memory access. Both are no-ops in a launch
    made without ``launch_pdl``."""
    if GDC:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _compact(flags_ptr, stride, n, out_ptr, count_ptr, BLOCK: tl.constexpr):
    """Write the positions ``k < n`` with ``flags[k * stride] > 0.5`` to ``out_ptr`` in order; store their count."""
    count = tl.program_id(0) * 0
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < n
        flag = tl.load(flags_ptr + offs.to(tl.int64) * stride, mask=inside, other=0).to(tl.float32)
        hit = ((flag > 0.5) & inside).to(tl.int32)
        rank = count + tl.cumsum(hit, axis=0) - hit
        tl.store(out_ptr + rank, offs, mask=hit != 0)
        count += tl.sum(hit, axis=0)
    tl.store(count_ptr, count)


@triton.jit
def _members_kernel(y_ptr, y_sb, y_sc, B, C, cd_idx, cd_cnt, id_idx, id_cnt,
                    CD: tl.constexpr, ID: tl.constexpr, BLOCK: tl.constexpr, GDC: tl.constexpr = False):
    """Member lists of the CD groups (programs 0..C-1, if ``CD``) and then of the ID groups (if ``ID``):
    only the families whose groups can be large need them."""
    _follow_previous_launch(GDC)
    g = tl.program_id(0)
    if CD and g < C:
        _compact(y_ptr + g.to(tl.int64) * y_sc, y_sb, B, cd_idx + g.to(tl.int64) * B, cd_cnt + g, BLOCK)
    elif ID:
        b = g - C if CD else g
        _compact(y_ptr + b.to(tl.int64) * y_sb, y_sc, C, id_idx + b.to(tl.int64) * C, id_cnt + b, BLOCK)


@triton.jit
def _div(a, b):
    """a / b rounded to nearest, as IEEE division and the CUDA kernels give (Triton's ``/`` on float32 is
    an approximate division on GPUs: ``d / mu`` with ``d == mu`` need not be exactly 1, and a group of
    two, whose loss is exactly 0, would get a residue of about 1e-14 where the float64 oracle has 0)."""
    return tl.div_rn(a, b)


@triton.jit
def _huber(x):
    ax = tl.abs(x)
    return tl.where(ax < 1.0, 0.5 * x * x, ax - 0.5)


@triton.jit
def _sum2(x):
    return tl.sum(tl.sum(x, axis=1), axis=0)


@triton.jit
def _load_rows(base, rows, ok, d0, D, s_m, s_d, BLOCK_D: tl.constexpr):
    dd = d0 + tl.arange(0, BLOCK_D)
    ptrs = base + rows[:, None] * s_m + dd[None, :].to(tl.int64) * s_d
    return tl.load(ptrs, mask=ok[:, None] & (dd < D)[None, :], other=0.0)


@triton.jit
def _ref_chunk(base, ref, d0, D, s_m, s_d, BLOCK_D: tl.constexpr):
    """Row ``ref``'s widths d0 .. d0 + BLOCK_D - 1 (0 past D) in float32: what ``_less`` takes off (see
    ``_gram``)."""
    dd = d0 + tl.arange(0, BLOCK_D)
    return tl.load(base + ref * s_m + dd.to(tl.int64) * s_d, mask=dd < D, other=0.0).to(tl.float32)


@triton.jit
def _less(x, r, ok):
    """A chunk of rows less the chunk ``r`` of the reference row, in float32, zero where not ``ok``. The
    difference of two values of one dtype is exact in float32 where they are close (half-precision
    values have 13 or 16 bits to spare there)."""
    return tl.where(ok[:, None], x.to(tl.float32) - r[None, :], 0.0)


@triton.jit
def _first_row(members, hit, rank, k, P, OWN: tl.constexpr):
    """The row of a group's first member (``_block_rows``'s sources), which its Grams are taken less."""
    if OWN:
        return tl.sum(tl.where(hit & (rank == 0), k, 0), axis=0).to(tl.int64)
    else:
        return tl.load(members, mask=P > 0, other=0).to(tl.int64)


@triton.jit
def _dot_nt(a, b, acc):
    """acc + a @ b^T with float32 accumulation (IEEE float32 products for float32 inputs, never TF32)."""
    if _GRAM_IN_FP32:
        return tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
    return tl.dot(a, tl.trans(b), acc, input_precision="ieee")


@triton.jit
def _dot_less(a, ra, ok_a, b, rb, ok_b, acc):
    """acc + (a - ra) @ (b - rb)^T for one width chunk of rows a and b (``_less``), times
    ``_gram_scale`` (float16: 1/4). Float32 rows: one IEEE float32 dot of the differences.
    Half-precision rows: a difference does not fit the rows' dtype, so each is split into a high part
    (the difference rounded to that dtype) and a low part (the rest, rounded to it), and three dots on
    the tensor cores add hi hi, hi lo and lo hi (lo lo, 2^-16 of the product for bfloat16 and 2^-22 for
    float16, is left out). Float16 differences are halved first (exactly), since two values of float16's
    range can lie up to twice its largest value apart. Entry (a, b) and entry (b, a) then add their two
    cross products in opposite orders: ``_symmetric`` makes a tile of one row set exact."""
    da = _less(a, ra, ok_a)
    db = _less(b, rb, ok_b)
    if a.dtype == tl.float32:
        return _dot_nt(da, db, acc)
    else:
        if a.dtype == tl.float16:
            da = da * 0.5
            db = db * 0.5
        ha = da.to(a.dtype)
        hb = db.to(b.dtype)
        acc = _dot_nt(ha, hb, acc)
        acc = _dot_nt(ha, (db - hb.to(tl.float32)).to(b.dtype), acc)
        return _dot_nt((da - ha.to(tl.float32)).to(a.dtype), hb, acc)


@triton.jit
def _gram_scale(g, base):
    """A Gram tile summed by ``_dot_less`` at its true scale: float16 rows' differences were halved."""
    if base.dtype.element_ty == tl.float16:
        return g * 4.0
    else:
        return g


@triton.jit
def _symmetric(g, base):
    """A Gram tile of one row set from ``_gram`` of half-precision rows made exactly symmetric: the mean
    of it and its transpose (identical rows keep identical entries, so their distance stays exactly
    0). Float32 rows' tiles are symmetric as computed, and returned as they are."""
    if base.dtype.element_ty == tl.float32:
        return g
    else:
        return (g + tl.trans(g)) * 0.5


@triton.jit
def _gram(S, T, s_m, s_d, t_m, t_d, rows_i, ok_i, rows_j, ok_j, ref, lo, D,
          BI: tl.constexpr, BJ: tl.constexpr, BLOCK_D: tl.constexpr, SAME: tl.constexpr, AHEAD: tl.constexpr):
    """Student and teacher Gram tiles, rows i x rows j (``SAME``: the j rows are the i rows), over the
    widths ``lo <= d < D``, of the rows less the group's row ``ref`` (``_first_row``; distances are
    shift-invariant, and rows that share a large common part would otherwise lose its square's
    rounding to the Gram form's cancellation: see ``reference.shifted``), by ``_dot_less``. With
    ``AHEAD`` each width chunk's rows are loaded one chunk ahead, so that their memory latency passes
    during the previous chunk's products (the same products in the same order); the load past the last
    chunk is masked off entirely. A ``SAME`` tile is exactly symmetric; so is a tile whose two row sets
    are the same at run time once the caller has applied ``_symmetric``."""
    gs = tl.zeros((BI, BJ), dtype=tl.float32)
    gt = tl.zeros((BI, BJ), dtype=tl.float32)
    if AHEAD:
        # Loaded a chunk ahead as they are (the reference row's chunk too), taken less it when used.
        a = _load_rows(S, rows_i, ok_i, lo, D, s_m, s_d, BLOCK_D)
        ta = _load_rows(T, rows_i, ok_i, lo, D, t_m, t_d, BLOCK_D)
        rs = _ref_chunk(S, ref, lo, D, s_m, s_d, BLOCK_D)
        rt = _ref_chunk(T, ref, lo, D, t_m, t_d, BLOCK_D)
        if not SAME:
            b = _load_rows(S, rows_j, ok_j, lo, D, s_m, s_d, BLOCK_D)
            tb = _load_rows(T, rows_j, ok_j, lo, D, t_m, t_d, BLOCK_D)
        for d0 in range(lo, D, BLOCK_D):
            a_next = _load_rows(S, rows_i, ok_i, d0 + BLOCK_D, D, s_m, s_d, BLOCK_D)
            ta_next = _load_rows(T, rows_i, ok_i, d0 + BLOCK_D, D, t_m, t_d, BLOCK_D)
            rs_next = _ref_chunk(S, ref, d0 + BLOCK_D, D, s_m, s_d, BLOCK_D)
            rt_next = _ref_chunk(T, ref, d0 + BLOCK_D, D, t_m, t_d, BLOCK_D)
            if SAME:
                gs = _dot_less(a, rs, ok_i, a, rs, ok_i, gs)
                gt = _dot_less(ta, rt, ok_i, ta, rt, ok_i, gt)
            else:
                b_next = _load_rows(S, rows_j, ok_j, d0 + BLOCK_D, D, s_m, s_d, BLOCK_D)
                tb_next = _load_rows(T, rows_j, ok_j, d0 + BLOCK_D, D, t_m, t_d, BLOCK_D)
                gs = _dot_less(a, rs, ok_i, b, rs, ok_j, gs)
                gt = _dot_less(ta, rt, ok_i, tb, rt, ok_j, gt)
                b = b_next
                tb = tb_next
            a = a_next
            ta = ta_next
            rs = rs_next
            rt = rt_next
    else:
        for d0 in range(lo, D, BLOCK_D):
            rs = _ref_chunk(S, ref, d0, D, s_m, s_d, BLOCK_D)
            rt = _ref_chunk(T, ref, d0, D, t_m, t_d, BLOCK_D)
            a = _load_rows(S, rows_i, ok_i, d0, D, s_m, s_d, BLOCK_D)
            ta = _load_rows(T, rows_i, ok_i, d0, D, t_m, t_d, BLOCK_D)
            if SAME:
                gs = _dot_less(a, rs, ok_i, a, rs, ok_i, gs)
                gt = _dot_less(ta, rt, ok_i, ta, rt, ok_i, gt)
            else:
                gs = _dot_less(a, rs, ok_i, _load_rows(S, rows_j, ok_j, d0, D, s_m, s_d, BLOCK_D), rs, ok_j, gs)
                gt = _dot_less(ta, rt, ok_i, _load_rows(T, rows_j, ok_j, d0, D, t_m, t_d, BLOCK_D), rt, ok_j, gt)
    gs = _gram_scale(gs, S)
    gt = _gram_scale(gt, T)
    if SAME:
        gs = _symmetric(gs, S)
        gt = _symmetric(gt, T)
    return gs, gt


@triton.jit
def _diagonal(m, BLOCK: tl.constexpr):
    """The diagonal of a square tile, as (column vector, row vector): exact copies of its entries."""
    r = tl.arange(0, BLOCK)
    on_diagonal = tl.where(r[:, None] == r[None, :], m, 0.0)
    return tl.sum(on_diagonal, axis=1), tl.sum(on_diagonal, axis=0)


@triton.jit
def _distances(gram, n_i, n_j):
    """(squared distance before the clamp, clamped distance)."""
    sq = n_i[:, None] + n_j[None, :] - 2.0 * gram
    return sq, tl.sqrt_rn(at_least(sq, 1e-12))


@triton.jit
def _pair_weights(x, ds, sq_s, pair, mu_s, k_sum, p_f, n_pairs):
    """w(a, b) of the module docstring on one tile."""
    g = _div(_div(clamp(x, -1.0, 1.0), mu_s) - _div(k_sum, mu_s * mu_s * n_pairs), p_f)
    return tl.where(pair & (sq_s > 1e-12), _div(g, ds), 0.0)


@triton.jit
def _write_grad(S, s_m, s_d, G, g_m, rows_i, ok_i, rows_j, ok_j, w, rowsum, lo, D, scale,
                ADD: tl.constexpr, BLOCK_D: tl.constexpr, SAME: tl.constexpr, AHEAD: tl.constexpr):
    """grad[rows_i] (+)= scale * (rowsum * S[rows_i] - w @ S[rows_j]) at the widths ``lo <= d < D``, in
    width chunks (``SAME``: j is i; ``AHEAD``: each chunk's rows, and adding the gradient so far,
    loaded one chunk ahead); nothing where ``ADD`` is ``NO_GRAD``."""
    if ADD != NO_GRAD:
        _write_grad_chunks(S, s_m, s_d, G, g_m, rows_i, ok_i, rows_j, ok_j, w, rowsum, lo, D, scale, ADD, BLOCK_D,
                           SAME, AHEAD)


@triton.jit
def _write_grad_chunks(S, s_m, s_d, G, g_m, rows_i, ok_i, rows_j, ok_j, w, rowsum, lo, D, scale,
                       ADD: tl.constexpr, BLOCK_D: tl.constexpr, SAME: tl.constexpr, AHEAD: tl.constexpr):
    if AHEAD:
        si = _load_rows(S, rows_i, ok_i, lo, D, s_m, s_d, BLOCK_D).to(tl.float32)
        if not SAME:
            sj = _load_rows(S, rows_j, ok_j, lo, D, s_m, s_d, BLOCK_D).to(tl.float32)
        if ADD:
            g_cur = _load_rows(G, rows_i, ok_i, lo, D, g_m, 1, BLOCK_D).to(tl.float32)
    for d0 in range(lo, D, BLOCK_D):
        if AHEAD:
            si_next = _load_rows(S, rows_i, ok_i, d0 + BLOCK_D, D, s_m, s_d, BLOCK_D).to(tl.float32)
            if not SAME:
                sj_next = _load_rows(S, rows_j, ok_j, d0 + BLOCK_D, D, s_m, s_d, BLOCK_D).to(tl.float32)
            if ADD:
                g_next = _load_rows(G, rows_i, ok_i, d0 + BLOCK_D, D, g_m, 1, BLOCK_D).to(tl.float32)
        else:
            si = _load_rows(S, rows_i, ok_i, d0, D, s_m, s_d, BLOCK_D).to(tl.float32)
            if not SAME:
                sj = _load_rows(S, rows_j, ok_j, d0, D, s_m, s_d, BLOCK_D).to(tl.float32)
            if ADD:
                g_cur = _load_rows(G, rows_i, ok_i, d0, D, g_m, 1, BLOCK_D).to(tl.float32)
        if SAME:
            out = scale * (rowsum[:, None] * si - tl.dot(w, si, input_precision="ieee"))
        else:
            out = scale * (rowsum[:, None] * si - tl.dot(w, sj, input_precision="ieee"))
        if ADD:
            out += g_cur
        dd = d0 + tl.arange(0, BLOCK_D)
        tl.store(G + rows_i[:, None] * g_m + dd[None, :], out.to(G.dtype.element_ty),
                 mask=ok_i[:, None] & (dd < D)[None, :])
        if AHEAD:
            si = si_next
            if not SAME:
                sj = sj_next
            if ADD:
                g_cur = g_next


@triton.jit
def _block_rows(members, hit, rank, k, P, b, BLOCK: tl.constexpr, OWN: tl.constexpr):
    """Member ranks r of block b (b * BLOCK <= r < (b + 1) * BLOCK), their rows and r < P: from the
    member list, or (``OWN``) from this program's own flags: the r-th member is the position k with a
    hit of rank r."""
    r = b * BLOCK + tl.arange(0, BLOCK)
    ok = r < P
    if OWN:
        chosen = hit[None, :] & (rank[None, :] == r[:, None])
        rows = tl.sum(tl.where(chosen, k[None, :], 0), axis=1).to(tl.int64)
    else:
        rows = tl.load(members + r, mask=ok, other=0).to(tl.int64)
    return r, rows, ok


@triton.jit
def _group_weights(gs, gt, r, ok, P, loss_ptr, STORE_LOSS, BLOCK: tl.constexpr):
    """From a whole group's Gram tiles (student, teacher; member rank r, r < P): the group's loss
    (stored if ``STORE_LOSS``), the pair weights w(a, b) and their row sums."""
    ns_col, ns_row = _diagonal(gs, BLOCK)
    nt_col, nt_row = _diagonal(gt, BLOCK)
    pair = ok[:, None] & ok[None, :] & (r[:, None] != r[None, :])
    sq_s, ds = _distances(gs, ns_col, ns_row)
    _, dt = _distances(gt, nt_col, nt_row)
    p_f = P.to(tl.float32)
    n_pairs = p_f * (p_f - 1.0)
    mu_s = _div(_sum2(tl.where(pair, ds, 0.0)), n_pairs)
    mu_t = _div(_sum2(tl.where(pair, dt, 0.0)), n_pairs)
    x = _div(ds, mu_s) - _div(dt, mu_t)
    if STORE_LOSS:
        tl.store(loss_ptr, _div(_sum2(tl.where(pair, _huber(x), 0.0)), p_f))
    k_sum = _sum2(tl.where(pair, clamp(x, -1.0, 1.0) * ds, 0.0))
    w = _pair_weights(x, ds, sq_s, pair, mu_s, k_sum, p_f, n_pairs)
    return w, tl.sum(w, axis=1)


@triton.jit
def _small_group(S, T, s_m, s_d, t_m, t_d, G, g_m, members, hit, rank, k, P, loss_ptr, D, scale,
                 ADD: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, AHEAD: tl.constexpr,
                 OWN: tl.constexpr):
    """A whole group of at most BLOCK members: one Gram per side, then loss and gradient (``AHEAD``:
    width chunks loaded one ahead, for block sizes whose registers have room for two chunks; ``OWN``:
    members from the program's own flags, see ``_main_kernel``)."""
    r, rows, ok = _block_rows(members, hit, rank, k, P, 0, BLOCK, OWN)
    ref = _first_row(members, hit, rank, k, P, OWN)
    gs, gt = _gram(S, T, s_m, s_d, t_m, t_d, rows, ok, rows, ok, ref, 0, D, BLOCK, BLOCK, BLOCK_D, True, AHEAD)
    w, rowsum = _group_weights(gs, gt, r, ok, P, loss_ptr, True, BLOCK)
    _write_grad(S, s_m, s_d, G, g_m, rows, ok, rows, ok, w, rowsum, 0, D, scale, ADD, BLOCK_D, True, AHEAD)


@triton.jit
def _tile_rows(members, i, P, TILE: tl.constexpr):
    rank = i * TILE + tl.arange(0, TILE)
    ok = rank < P
    rows = tl.load(members + rank, mask=ok, other=0).to(tl.int64)
    return rank, ok, rows


@triton.jit
def _tile_distances(S, T, s_m, s_d, t_m, t_d, members, norms, P, i, j, D, TILE: tl.constexpr, BLOCK_D: tl.constexpr,
                    AHEAD: tl.constexpr):
    """Distances of row tile i against column tile j of a large group, with their pair mask."""
    rank_i, ok_i, rows_i = _tile_rows(members, i, P, TILE)
    rank_j, ok_j, rows_j = _tile_rows(members, j, P, TILE)
    ref = tl.load(members).to(tl.int64)  # _first_row of a listed group
    gs, gt = _gram(S, T, s_m, s_d, t_m, t_d, rows_i, ok_i, rows_j, ok_j, ref, 0, D, TILE, TILE, BLOCK_D, False,
                   AHEAD)
    if i == j:
        gs = _symmetric(gs, S)
        gt = _symmetric(gt, T)
    ns_i = tl.load(norms + 2 * rank_i, mask=ok_i, other=0.0)
    nt_i = tl.load(norms + 2 * rank_i + 1, mask=ok_i, other=0.0)
    ns_j = tl.load(norms + 2 * rank_j, mask=ok_j, other=0.0)
    nt_j = tl.load(norms + 2 * rank_j + 1, mask=ok_j, other=0.0)
    pair = ok_i[:, None] & ok_j[None, :] & (rank_i[:, None] != rank_j[None, :])
    sq_s, ds = _distances(gs, ns_i, ns_j)
    _, dt = _distances(gt, nt_i, nt_j)
    return sq_s, ds, dt, pair, ok_i, rows_i, ok_j, rows_j


@triton.jit
def _group(S, T, G, s_g, t_g, g_g, idx, cnt, N, norms, g):
    """Base pointers of group g (embeddings, gradient, member list, norm scratch) and its size."""
    g64 = g.to(tl.int64)
    return S + g64 * s_g, T + g64 * t_g, G + g64 * g_g, idx + g64 * N, norms + g64 * N * 2, tl.load(cnt + g)


@triton.jit
def _group_members(S, T, G, s_g, t_g, g_g, Y, y_g, y_m, idx, cnt, N, norms, g,
                   LISTS: tl.constexpr, N_PAD: tl.constexpr):
    """Group g's base pointers (embeddings, gradient, member list, norm scratch), its size P and, without
    member lists (at most SMALL_MAX possible members), what ``_block_rows`` needs to find its members
    in the targets: the flags ``hit`` at positions ``k`` and their ranks, by a prefix sum over N_PAD."""
    if LISTS:
        S_g, T_g, G_g, members, norms_g, P = _group(S, T, G, s_g, t_g, g_g, idx, cnt, N, norms, g)
        k = tl.arange(0, 16)  # unused with member lists
        hit = k < 0
        rank = k
    else:
        k = tl.arange(0, N_PAD)
        flags = tl.load(Y + g.to(tl.int64) * y_g + k.to(tl.int64) * y_m, mask=k < N, other=0).to(tl.float32)
        hit = (flags > 0.5) & (k < N)
        rank = tl.cumsum(hit.to(tl.int32), axis=0) - 1
        P = tl.sum(hit.to(tl.int32), axis=0)
        g64 = g.to(tl.int64)
        S_g, T_g, G_g, members, norms_g = S + g64 * s_g, T + g64 * t_g, G + g64 * g_g, idx, norms
    return S_g, T_g, G_g, members, norms_g, P, hit, rank, k


@triton.jit
def _whole_group(S_g, T_g, s_m, s_d, t_m, t_d, G_g, g_m, members, hit, rank, k, P, loss_ptr, D, scale,
                 ADD: tl.constexpr, AHEAD: tl.constexpr, MAX_P: tl.constexpr, OWN: tl.constexpr,
                 SMALL_MAX: tl.constexpr):
    """A group of 2 to SMALL_MAX members, all of its width, in this program (loss 0 for fewer than
    two; nothing for a large group, see the tiled passes). Sizes of tile, so that a group of a few
    members does not pay for a large padded one; a size no group of this launch can reach (MAX_P)
    is not compiled, so that its registers do not weigh on the others."""
    if P < 2:
        tl.store(loss_ptr, 0.0)
    elif P > SMALL_MAX:
        pass
    elif P <= 16:
        _small_group(S_g, T_g, s_m, s_d, t_m, t_d, G_g, g_m, members, hit, rank, k, P, loss_ptr, D,
                     scale, ADD, 16, 64, AHEAD, OWN)
    elif P <= 64:
        if AHEAD:
            if P <= 32:
                if MAX_P >= 32:
                    _small_group(S_g, T_g, s_m, s_d, t_m, t_d, G_g, g_m, members, hit, rank, k, P,
                                 loss_ptr, D, scale, ADD, 32, 16, True, OWN)
            elif MAX_P >= 64:
                _small_group(S_g, T_g, s_m, s_d, t_m, t_d, G_g, g_m, members, hit, rank, k, P,
                             loss_ptr, D, scale, ADD, 64, 16, True, OWN)
        elif MAX_P >= 32:  # one chunk at a time (as before LOAD_AHEAD): 17-64 members in one size
            _small_group(S_g, T_g, s_m, s_d, t_m, t_d, G_g, g_m, members, hit, rank, k, P, loss_ptr,
                         D, scale, ADD, 64, 32, False, OWN)
    elif MAX_P >= 128:
        _small_group(S_g, T_g, s_m, s_d, t_m, t_d, G_g, g_m, members, hit, rank, k, P, loss_ptr, D,
                     scale, ADD, SMALL_MAX, 16, False, OWN)


@triton.jit
def _zero_outside(G_g, g_m, flags, y_m, N, P, m0, lo, D, TILE: tl.constexpr, BLOCK_D: tl.constexpr):
    """Zero gradient at widths lo..D of the rows m0..m0 + TILE - 1 of a group's axis that are in no
    group of two or more (CD writes every row once, so that ID can add into all of them)."""
    m = m0 + tl.arange(0, TILE)
    flag = tl.load(flags + m.to(tl.int64) * y_m, mask=m < N, other=0).to(tl.float32)
    outside = (m < N) & ((flag <= 0.5) | (P < 2))
    zero = tl.zeros((TILE, BLOCK_D), dtype=G_g.dtype.element_ty)
    for d0 in range(lo, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        ptrs = G_g + m[:, None].to(tl.int64) * g_m + dd[None, :]
        tl.store(ptrs, zero, mask=outside[:, None] & (dd < D)[None, :])


@triton.jit
def _main_kernel(
    S, T, s_g, s_m, s_d, t_g, t_m, t_d, G, g_g, g_m,
    Y, y_g, y_m, idx, cnt, N, D, scale, loss_ptr, norms,
    ZERO_OUTSIDE: tl.constexpr, ADD: tl.constexpr, AHEAD: tl.constexpr, MAX_P: tl.constexpr, LARGE: tl.constexpr,
    N_PAD: tl.constexpr,
    SMALL_MAX: tl.constexpr, TILE: tl.constexpr, BLOCK_D: tl.constexpr,
    GDC: tl.constexpr = False,
):
    _follow_previous_launch(GDC)
    g = tl.program_id(0)
    i = tl.program_id(1)
    S_g, T_g, G_g, members, norms_g, P, hit, rank, k = _group_members(
        S, T, G, s_g, t_g, g_g, Y, y_g, y_m, idx, cnt, N, norms, g, LARGE, N_PAD)

    if ZERO_OUTSIDE:
        _zero_outside(G_g, g_m, Y + g.to(tl.int64) * y_g, y_m, N, P, i * TILE, 0, D, TILE, BLOCK_D)

    if i == 0:
        _whole_group(S_g, T_g, s_m, s_d, t_m, t_d, G_g, g_m, members, hit, rank, k, P, loss_ptr + g, D, scale, ADD,
                     AHEAD, MAX_P, not LARGE, SMALL_MAX)
    if LARGE:
        _large_group_norms(S_g, T_g, s_m, s_d, t_m, t_d, members, norms_g, P, i, D, SMALL_MAX, TILE, BLOCK_D, AHEAD)


@triton.jit
def _large_group_norms(S_g, T_g, s_m, s_d, t_m, t_d, members, norms_g, P, i, D,
                       SMALL_MAX: tl.constexpr, TILE: tl.constexpr, BLOCK_D: tl.constexpr, AHEAD: tl.constexpr):
    """A large group's squared norms, row tile i (the tiled passes read them)."""
    if (P > SMALL_MAX) & (i * TILE < P):
        rank, ok, rows = _tile_rows(members, i, P, TILE)
        ref = tl.load(members).to(tl.int64)  # _first_row of a listed group
        gs, gt = _gram(S_g, T_g, s_m, s_d, t_m, t_d, rows, ok, rows, ok, ref, 0, D, TILE, TILE, BLOCK_D, True, AHEAD)
        ns, _ = _diagonal(gs, TILE)
        nt, _ = _diagonal(gt, TILE)
        tl.store(norms_g + 2 * rank, ns, mask=ok)
        tl.store(norms_g + 2 * rank + 1, nt, mask=ok)


@triton.jit
def _sum_pairs(ptr, n):
    """(sum of ptr[2k], sum of ptr[2k + 1]) for k < n, in order."""
    first = tl.zeros((), dtype=tl.float32)
    second = tl.zeros((), dtype=tl.float32)
    for k in range(0, n):
        first += tl.load(ptr + 2 * k)
        second += tl.load(ptr + 2 * k + 1)
    return first, second


@triton.jit
def _means_kernel(
    S, T, s_g, s_m, s_d, t_g, t_m, t_d, G, g_g, idx, cnt, N, D, norms, part1,
    SMALL_MAX: tl.constexpr, TILE: tl.constexpr, BLOCK_D: tl.constexpr, AHEAD: tl.constexpr,
    GDC: tl.constexpr = False,
):
    """Large groups, pass 1: student and teacher distance sums of row tile i."""
    _follow_previous_launch(GDC)
    g = tl.program_id(0)
    i = tl.program_id(1)
    S_g, T_g, G_g, members, norms_g, P = _group(S, T, G, s_g, t_g, g_g, idx, cnt, N, norms, g)
    if (P > SMALL_MAX) & (i * TILE < P):
        sum_s = tl.zeros((), dtype=tl.float32)
        sum_t = tl.zeros((), dtype=tl.float32)
        for j in range(0, tl.cdiv(P, TILE)):
            sq_s, ds, dt, pair, ok_i, rows_i, ok_j, rows_j = _tile_distances(
                S_g, T_g, s_m, s_d, t_m, t_d, members, norms_g, P, i, j, D, TILE, BLOCK_D, AHEAD)
            sum_s += _sum2(tl.where(pair, ds, 0.0))
            sum_t += _sum2(tl.where(pair, dt, 0.0))
        slot = part1 + (g.to(tl.int64) * tl.num_programs(1) + i) * 2
        tl.store(slot, sum_s)
        tl.store(slot + 1, sum_t)


@triton.jit
def _group_scalars(part1, P, TILE: tl.constexpr):
    """Means of a large group from its row tiles' distance sums, with P and the pair count as floats."""
    sum_s, sum_t = _sum_pairs(part1, tl.cdiv(P, TILE))
    p_f = P.to(tl.float32)
    n_pairs = p_f * (p_f - 1.0)
    return _div(sum_s, n_pairs), _div(sum_t, n_pairs), p_f, n_pairs


@triton.jit
def _stats_kernel(
    S, T, s_g, s_m, s_d, t_g, t_m, t_d, G, g_g, idx, cnt, N, D, norms, part1, part2,
    SMALL_MAX: tl.constexpr, TILE: tl.constexpr, BLOCK_D: tl.constexpr, AHEAD: tl.constexpr,
    GDC: tl.constexpr = False,
):
    """Large groups, pass 2: the Huber and K partial sums of row tile i."""
    _follow_previous_launch(GDC)
    g = tl.program_id(0)
    i = tl.program_id(1)
    S_g, T_g, G_g, members, norms_g, P = _group(S, T, G, s_g, t_g, g_g, idx, cnt, N, norms, g)
    if (P > SMALL_MAX) & (i * TILE < P):
        slot = g.to(tl.int64) * tl.num_programs(1) * 2
        mu_s, mu_t, p_f, n_pairs = _group_scalars(part1 + slot, P, TILE)
        huber_sum = tl.zeros((), dtype=tl.float32)
        k_sum = tl.zeros((), dtype=tl.float32)
        for j in range(0, tl.cdiv(P, TILE)):
            sq_s, ds, dt, pair, ok_i, rows_i, ok_j, rows_j = _tile_distances(
                S_g, T_g, s_m, s_d, t_m, t_d, members, norms_g, P, i, j, D, TILE, BLOCK_D, AHEAD)
            x = _div(ds, mu_s) - _div(dt, mu_t)
            huber_sum += _sum2(tl.where(pair, _huber(x), 0.0))
            k_sum += _sum2(tl.where(pair, clamp(x, -1.0, 1.0) * ds, 0.0))
        tl.store(part2 + slot + 2 * i, huber_sum)
        tl.store(part2 + slot + 2 * i + 1, k_sum)


@triton.jit
def _grad_kernel(
    S, T, s_g, s_m, s_d, t_g, t_m, t_d, G, g_g, g_m, idx, cnt, N, D, scale, loss_ptr, norms, part1, part2,
    ADD: tl.constexpr, SMALL_MAX: tl.constexpr, TILE: tl.constexpr, BLOCK_D: tl.constexpr, AHEAD: tl.constexpr,
    GDC: tl.constexpr = False,
):
    """Large groups, pass 3: the gradient of row tile i (and, from tile 0, the group's loss; that alone
    where ``ADD`` is ``NO_GRAD``)."""
    _follow_previous_launch(GDC)
    g = tl.program_id(0)
    i = tl.program_id(1)
    S_g, T_g, G_g, members, norms_g, P = _group(S, T, G, s_g, t_g, g_g, idx, cnt, N, norms, g)
    if (P > SMALL_MAX) & (i * TILE < P):
        slot = g.to(tl.int64) * tl.num_programs(1) * 2
        mu_s, mu_t, p_f, n_pairs = _group_scalars(part1 + slot, P, TILE)
        huber_sum, k_sum = _sum_pairs(part2 + slot, tl.cdiv(P, TILE))
        if i == 0:
            tl.store(loss_ptr + g, _div(huber_sum, p_f))
        # grad = 2 sum_b w(a, b) (s_a - s_b), one column tile at a time, each tile's part kept in that
        # difference form (its own row sums) so that a half-precision gradient stays well conditioned.
        if ADD != NO_GRAD:
            for j in range(0, tl.cdiv(P, TILE)):
                sq_s, ds, dt, pair, ok_i, rows_i, ok_j, rows_j = _tile_distances(
                    S_g, T_g, s_m, s_d, t_m, t_d, members, norms_g, P, i, j, D, TILE, BLOCK_D, AHEAD)
                w = _pair_weights(_div(ds, mu_s) - _div(dt, mu_t), ds, sq_s, pair, mu_s, k_sum, p_f, n_pairs)
                if j == 0:
                    _write_grad(S_g, s_m, s_d, G_g, g_m, rows_i, ok_i, rows_j, ok_j, w, tl.sum(w, axis=1), 0, D,
                                scale, ADD, BLOCK_D, False, AHEAD)
                else:
                    _write_grad(S_g, s_m, s_d, G_g, g_m, rows_i, ok_i, rows_j, ok_j, w, tl.sum(w, axis=1), 0, D,
                                scale, True, BLOCK_D, False, AHEAD)


@triton.jit
def _tile_of(P):
    """The tile of a group of P members (2 <= P <= SMALL_MAX) on the width-split path: the side of its
    squares of partial Grams in the scratch, and the rows of ``_split_kernel``'s program for it."""
    return tl.where(P <= 16, 16, tl.where(P <= 32, 32, tl.where(P <= 64, 64, 128)))


@triton.jit
def _plan_family(Y, y_g, y_m, n_groups, N, cnt, offs, running, cap, big, n_big,
                 LISTS: tl.constexpr, N_S: tl.constexpr, SMALL_MAX: tl.constexpr, BG: tl.constexpr,
                 BM: tl.constexpr, GROUPS_FAST: tl.constexpr):
    """Offsets into the partial-Gram scratch of one family's groups, and the list of its
    groups of more than SMALLEST_TILE members in group order (``big``) with their number (``n_big``):
    the work of ``_split_kernel``'s launch of them (see ``_plan_kernel``).
    ``GROUPS_FAST``: the targets' groups are their contiguous axis (CD of a row-major [B, C]), so the
    flags are read as a [members, groups] block, whose last axis Triton reads coalesced; else as
    [groups, members]."""
    n_listed = tl.zeros((), dtype=tl.int64)
    for g0 in range(0, n_groups, BG):
        gg = g0 + tl.arange(0, BG)
        inside = gg < n_groups
        if LISTS:
            P = tl.load(cnt + gg, mask=inside, other=0)
        else:
            P = tl.zeros((BG,), dtype=tl.int32)
            for m0 in range(0, N, BM):
                mm = m0 + tl.arange(0, BM)
                if GROUPS_FAST:
                    ptrs = Y + mm[:, None].to(tl.int64) * y_m + gg[None, :].to(tl.int64) * y_g
                    flag = tl.load(ptrs, mask=(mm < N)[:, None] & inside[None, :], other=0).to(tl.float32)
                    P += tl.sum((flag > 0.5).to(tl.int32), axis=0)
                else:
                    ptrs = Y + gg[:, None].to(tl.int64) * y_g + mm[None, :].to(tl.int64) * y_m
                    flag = tl.load(ptrs, mask=inside[:, None] & (mm < N)[None, :], other=0).to(tl.float32)
                    P += tl.sum((flag > 0.5).to(tl.int32), axis=1)
        tile = _tile_of(P).to(tl.int64)
        area = tl.where(inside & (P >= 2) & (P <= SMALL_MAX), N_S * 2 * tile * tile, 0)
        end = running + tl.cumsum(area, axis=0)
        tl.store(offs + gg, tl.where((area > 0) & (end <= cap), end - area, -1), mask=inside)
        running += tl.sum(area, axis=0)
        is_big = (inside & (P > SMALLEST_TILE)).to(tl.int64)
        at = n_listed + tl.cumsum(is_big, axis=0) - is_big
        tl.store(big + at, gg.to(tl.int64), mask=is_big > 0)
        n_listed += tl.sum(is_big, axis=0)
    tl.store(n_big, n_listed)
    return running


@triton.jit
def _plan_kernel(Y, y_b, y_c, B, C, cd_cnt, id_cnt, offs, cap, done, big, n_big,
                 CD_LISTS: tl.constexpr, ID_LISTS: tl.constexpr, N_S: tl.constexpr, SMALL_MAX: tl.constexpr,
                 CD_BG: tl.constexpr, ID_BG: tl.constexpr, CD_BM: tl.constexpr, ID_BM: tl.constexpr,
                 CD_FAST: tl.constexpr, ID_FAST: tl.constexpr, GDC: tl.constexpr = False):
    """One program: for every group of 2 to SMALL_MAX members (CD groups 0..C-1, then ID groups), where
    its N_S partial Gram pairs start in the scratch (floats), in group order while they fit in ``cap``;
    -1 for every other group (fewer than 2 members, a large group, or past the scratch); each family's
    groups of more than SMALLEST_TILE members (``big``, ``n_big``); and zero in ``done``, the counter
    of the call's last launch (see ``_finish``)."""
    _follow_previous_launch(GDC)
    tl.store(done, tl.zeros((), dtype=tl.int64))
    running = tl.zeros((), dtype=tl.int64)
    running = _plan_family(Y, y_c, y_b, C, B, cd_cnt, offs, running, cap, big, n_big, CD_LISTS, N_S, SMALL_MAX,
                           CD_BG, CD_BM, CD_FAST)
    _plan_family(Y, y_b, y_c, B, C, id_cnt, offs + C, running, cap, big + C, n_big + 1, ID_LISTS, N_S, SMALL_MAX,
                 ID_BG, ID_BM, ID_FAST)


@triton.jit
def _gram_blocks(S_g, T_g, s_m, s_d, t_m, t_d, members, hit, rank, k, P, part_g, s, lo, hi,
                 BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, AHEAD: tl.constexpr, OWN: tl.constexpr):
    """Slice s (widths lo..hi) of a group's Grams as the s-th [2, tile, tile] block of part_g
    (``_tile_of``), block pair by block pair of BLOCK member rows: the upper triangle of the blocks
    holding members, each also stored transposed, and zeros in the tile's blocks past the members."""
    nb = tl.cdiv(P, BLOCK)
    tile = _tile_of(P)
    square = tile * tile
    base = part_g + s * 2 * square
    ref = _first_row(members, hit, rank, k, P, OWN)
    for bi in range(0, tile // BLOCK):
        ri, rows_i, ok_i = _block_rows(members, hit, rank, k, P, bi, BLOCK, OWN)
        for bj in range(bi, tile // BLOCK):
            rj, rows_j, ok_j = _block_rows(members, hit, rank, k, P, bj, BLOCK, OWN)
            if bj < nb:
                gs, gt = _gram(S_g, T_g, s_m, s_d, t_m, t_d, rows_i, ok_i, rows_j, ok_j, ref, lo, hi, BLOCK, BLOCK,
                               BLOCK_D, False, AHEAD)
                if bj == bi:
                    gs = _symmetric(gs, S_g)
                    gt = _symmetric(gt, T_g)
            else:
                gs = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
                gt = gs
            at = base + ri[:, None] * tile + rj[None, :]
            tl.store(at, gs)
            tl.store(at + square, gt)
            if bj > bi:
                at_t = base + rj[None, :] * tile + ri[:, None]
                tl.store(at_t, gs)
                tl.store(at_t + square, gt)


@triton.jit
def _gram_group(S, T, s_g, s_m, s_d, t_g, t_m, t_d, Y, y_g, y_m, idx, cnt, N, part, off, g, s, lo, hi,
                LISTS: tl.constexpr, N_PAD: tl.constexpr, AHEAD: tl.constexpr, GRAM_ROWS: tl.constexpr,
                GRAM_D: tl.constexpr):
    S_g, T_g, _, members, _, P, hit, rank, k = _group_members(
        S, T, S, s_g, t_g, s_g, Y, y_g, y_m, idx, cnt, N, S, g, LISTS, N_PAD)
    _gram_blocks(S_g, T_g, s_m, s_d, t_m, t_d, members, hit, rank, k, P, part + off, s, lo, hi, GRAM_ROWS,
                 GRAM_D, AHEAD, not LISTS)


@triton.jit
def _gram_kernel(
    S, T, s_b, s_c, s_d, t_b, t_c, t_d, Y, y_b, y_c, B, C, D, offs, part, cd_idx, cd_cnt, id_idx, id_cnt,
    CD_LISTS: tl.constexpr, ID_LISTS: tl.constexpr, CD_N_PAD: tl.constexpr, ID_N_PAD: tl.constexpr,
    AHEAD: tl.constexpr, SLICE: tl.constexpr, GRAM_ROWS: tl.constexpr, GRAM_D: tl.constexpr,
    GDC: tl.constexpr = False,
):
    """Program (g, s): width slice s of the Grams of group g (CD groups 0..C-1, then ID groups), for
    every group the plan gave a place in the scratch. One code path for every group size (blocks of
    GRAM_ROWS rows), so that its registers are those of one small block pair."""
    _follow_previous_launch(GDC)
    g = tl.program_id(0)  # groups on the first axis: up to 2^31 - 1 of them (the others stop at 65535)
    s = tl.program_id(1)
    off = tl.load(offs + g)
    if off >= 0:
        lo = s * SLICE
        hi = tl.minimum(lo + SLICE, D)
        if g < C:
            _gram_group(S, T, s_c, s_b, s_d, t_c, t_b, t_d, Y, y_c, y_b, cd_idx, cd_cnt, B, part, off, g, s, lo, hi,
                        CD_LISTS, CD_N_PAD, AHEAD, GRAM_ROWS, GRAM_D)
        else:
            _gram_group(S, T, s_b, s_c, s_d, t_b, t_c, t_d, Y, y_b, y_c, id_idx, id_cnt, C, part, off, g - C, s,
                        lo, hi, ID_LISTS, ID_N_PAD, AHEAD, GRAM_ROWS, GRAM_D)


@triton.jit
def _slice_grad(S_g, T_g, s_m, s_d, t_m, t_d, G_g, g_m, members, hit, rank, k, P, loss_ptr, part_g, placed, s, lo,
                hi, D, scale, ADD: tl.constexpr, N_S: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                AHEAD: tl.constexpr, OWN: tl.constexpr):
    """Slice s of a split group's gradient in its tile (BLOCK rows): its Grams summed over the N_S
    slices in order, the loss (slice 0 stores it) and weights, then the gradient at widths lo..hi. A
    group not ``placed`` (past the scratch; only its slice-0 program gets here) takes its Grams over
    the whole width instead and writes all of its gradient: one copy of the weights and gradient code
    per tile size for both."""
    r, rows, ok = _block_rows(members, hit, rank, k, P, 0, BLOCK, OWN)
    if placed:
        at = part_g + r[:, None] * BLOCK + r[None, :]
        gs = tl.load(at)
        gt = tl.load(at + BLOCK * BLOCK)
        for q in range(1, N_S):
            gs += tl.load(at + q * (2 * BLOCK * BLOCK))
            gt += tl.load(at + q * (2 * BLOCK * BLOCK) + BLOCK * BLOCK)
        first = lo
        last = hi
    else:
        ref = _first_row(members, hit, rank, k, P, OWN)
        gs, gt = _gram(S_g, T_g, s_m, s_d, t_m, t_d, rows, ok, rows, ok, ref, 0, D, BLOCK, BLOCK, BLOCK_D, True,
                       AHEAD)
        first = lo * 0  # tensors of the same type in both branches
        last = first + D
    w, rowsum = _group_weights(gs, gt, r, ok, P, loss_ptr, s == 0, BLOCK)
    _write_grad(S_g, s_m, s_d, G_g, g_m, rows, ok, rows, ok, w, rowsum, first, last, scale, ADD, BLOCK_D, True,
                AHEAD)


@triton.jit
def _split_group(S_g, T_g, s_m, s_d, t_m, t_d, G_g, g_m, members, hit, rank, k, P, loss_ptr, part_g, placed, s, lo,
                 hi, D, scale, ADD: tl.constexpr, N_S: tl.constexpr, MAX_P: tl.constexpr, AHEAD: tl.constexpr,
                 OWN: tl.constexpr):
    """Slice s of the gradient of a group of 2 to SMALL_MAX members in the tile of its size (16, 32, 64
    or 128 rows; sizes past MAX_P not compiled); a group not ``placed`` is done whole (``_slice_grad``)."""
    if P <= 16:
        _slice_grad(S_g, T_g, s_m, s_d, t_m, t_d, G_g, g_m, members, hit, rank, k, P, loss_ptr, part_g, placed, s,
                    lo, hi, D, scale, ADD, N_S, 16, 64, AHEAD, OWN)
    elif P <= 32:
        if MAX_P >= 32:
            _slice_grad(S_g, T_g, s_m, s_d, t_m, t_d, G_g, g_m, members, hit, rank, k, P, loss_ptr, part_g, placed,
                        s, lo, hi, D, scale, ADD, N_S, 32, 16, AHEAD, OWN)
    elif P <= 64:
        if MAX_P >= 64:
            _slice_grad(S_g, T_g, s_m, s_d, t_m, t_d, G_g, g_m, members, hit, rank, k, P, loss_ptr, part_g, placed,
                        s, lo, hi, D, scale, ADD, N_S, 64, 16, AHEAD, OWN)
    elif MAX_P >= 128:  # 128-row tiles spill with a second chunk in flight: one chunk at a time
        _slice_grad(S_g, T_g, s_m, s_d, t_m, t_d, G_g, g_m, members, hit, rank, k, P, loss_ptr, part_g, placed, s,
                    lo, hi, D, scale, ADD, N_S, 128, 16, False, OWN)


@triton.jit
def _split_program(S, T, s_g, s_m, s_d, t_g, t_m, t_d, G, g_g, g_m, Y, y_g, y_m, idx, cnt, N, D, scale, loss_ptr,
                   norms, offs, part, g, s,
                   ZERO_OUTSIDE: tl.constexpr, ADD: tl.constexpr, AHEAD: tl.constexpr, MAX_P: tl.constexpr,
                   LARGE: tl.constexpr, N_PAD: tl.constexpr, N_S: tl.constexpr, SLICE: tl.constexpr,
                   SIZES: tl.constexpr, SMALL_MAX: tl.constexpr, TILE: tl.constexpr, BLOCK_D: tl.constexpr):
    S_g, T_g, G_g, members, norms_g, P, hit, rank, k = _group_members(
        S, T, G, s_g, t_g, g_g, Y, y_g, y_m, idx, cnt, N, norms, g, LARGE, N_PAD)
    lo = s * SLICE
    hi = tl.minimum(lo + SLICE, D)
    if ZERO_OUTSIDE and SIZES != 2:
        for m0 in range(0, N, TILE):
            _zero_outside(G_g, g_m, Y + g.to(tl.int64) * y_g, y_m, N, P, m0, lo, hi, TILE, BLOCK_D)
    off = tl.load(offs + g)
    placed = off >= 0
    if ADD == NO_GRAD:
        busy = s == 0  # the loss is slice 0's; the other slices only write gradient
    else:
        busy = placed | (s == 0)
    if busy:
        if P < 2:  # never placed: its slice-0 program
            if SIZES != 2:
                tl.store(loss_ptr + g, 0.0)
        elif (P <= SMALL_MAX) & ((SIZES == 0) | ((SIZES == 1) == (P <= SMALLEST_TILE))):
            _split_group(S_g, T_g, s_m, s_d, t_m, t_d, G_g, g_m, members, hit, rank, k, P, loss_ptr + g, part + off,
                         placed, s, lo, hi, D, scale, ADD, N_S, MAX_P, AHEAD, not LARGE)
    if LARGE and SIZES != 1:
        for i in range(s, tl.cdiv(P, TILE), N_S):
            _large_group_norms(S_g, T_g, s_m, s_d, t_m, t_d, members, norms_g, P, i, D, SMALL_MAX, TILE, BLOCK_D,
                               AHEAD)


@triton.jit
def _add_losses(group_loss, C, B, out, total, lambda_cd, lambda_id, BLOCK: tl.constexpr, CACHE: tl.constexpr):
    """The call's sums from the group losses (CD groups, then ID groups), each in a fixed order:
    ``out`` = [lambda_cd * CD + lambda_id * ID, CD, ID], ``total`` = out[0]; ``CACHE``: the loads'
    cache modifier."""
    cd = sum_vector(group_loss, C, BLOCK, CACHE)
    id_ = sum_vector(group_loss + C, B, BLOCK, CACHE)
    weighted = lambda_cd * cd + lambda_id * id_
    tl.store(out, weighted)
    tl.store(out + 1, cd)
    tl.store(out + 2, id_)
    tl.store(total, weighted)


@triton.jit
def _finish(group_loss, C, B, out, total, lambda_cd, lambda_id, done, BLOCK: tl.constexpr):
    """What ``_finalize_kernel`` does, by the last program of the call's last launch to finish, which
    counts itself in ``done`` (zeroed by ``_plan_kernel``) after the program's stores; a fixed order,
    whichever program it is. The group losses of other programs are read at L2 (``.cg``)."""
    tl.debug_barrier()  # every thread's stores of this program before its count
    n_programs = tl.num_programs(0) * tl.num_programs(1)
    before = tl.atomic_add(done, 1, sem="acq_rel", scope="gpu")
    if before == n_programs - 1:
        _add_losses(group_loss, C, B, out, total, lambda_cd, lambda_id, BLOCK, ".cg")


@triton.jit
def _split_kernel(
    S, T, s_g, s_m, s_d, t_g, t_m, t_d, G, g_g, g_m,
    Y, y_g, y_m, idx, cnt, N, D, scale, loss_ptr, norms, offs, big, n_big, part,
    all_loss, n_cd, n_id, out, total, lambda_cd, lambda_id, done,
    ZERO_OUTSIDE: tl.constexpr, ADD: tl.constexpr, AHEAD: tl.constexpr, MAX_P: tl.constexpr, LARGE: tl.constexpr,
    N_PAD: tl.constexpr, N_S: tl.constexpr, SLICE: tl.constexpr, SIZES: tl.constexpr,
    SMALL_MAX: tl.constexpr, TILE: tl.constexpr, BLOCK_D: tl.constexpr, FINAL: tl.constexpr,
    SUM_BLOCK: tl.constexpr,
    GDC: tl.constexpr = False,
):
    """One family on the width-split path, program (g, s): width slice s of group g's gradient (and the
    zero gradient of the rows outside groups, CD); a group the plan left out (past the scratch) is
    done whole by its slice-0 program; a large group's squared norms, row tiles s, s + N_S, ...
    ``SIZES``: 0, every group; 1, groups of at most SMALLEST_TILE members, the zero rows and the
    losses of groups of fewer than two; 2, the others: the plan's list of them (``big``, ``n_big``),
    program (j, s) taking slice s of its groups j, j + (programs on axis 0), ... (see ``SMALL_WARPS``
    and ``_big_programs``). ``FINAL``: the call's last launch, which also adds
    the group losses of both families (``_finish``; else ``_finalize_kernel`` does, and the arguments
    from ``all_loss`` on are not read)."""
    _follow_previous_launch(GDC)
    g = tl.program_id(0)  # groups on the first axis: up to 2^31 - 1 of them (the others stop at 65535)
    s = tl.program_id(1)
    if SIZES == 2:
        for j in range(g, tl.load(n_big).to(tl.int32), tl.num_programs(0)):
            _split_program(S, T, s_g, s_m, s_d, t_g, t_m, t_d, G, g_g, g_m, Y, y_g, y_m, idx, cnt, N, D, scale,
                           loss_ptr, norms, offs, part, tl.load(big + j).to(tl.int32), s, ZERO_OUTSIDE, ADD, AHEAD,
                           MAX_P, LARGE, N_PAD, N_S, SLICE, SIZES, SMALL_MAX, TILE, BLOCK_D)
    else:
        _split_program(S, T, s_g, s_m, s_d, t_g, t_m, t_d, G, g_g, g_m, Y, y_g, y_m, idx, cnt, N, D, scale, loss_ptr,
                       norms, offs, part, g, s, ZERO_OUTSIDE, ADD, AHEAD, MAX_P, LARGE, N_PAD, N_S, SLICE, SIZES,
                       SMALL_MAX, TILE, BLOCK_D)
    if FINAL:
        _finish(all_loss, n_cd, n_id, out, total, lambda_cd, lambda_id, done, SUM_BLOCK)


@triton.jit
def _finalize_kernel(group_loss, C, B, out, total, lambda_cd, lambda_id, BLOCK: tl.constexpr,
                     GDC: tl.constexpr = False):
    _follow_previous_launch(GDC)
    _add_losses(group_loss, C, B, out, total, lambda_cd, lambda_id, BLOCK, "")


def _family_args(es, et, grad, targets, groups_dim: int):
    """One family's geometry: (groups, members, width, embedding strides, gradient strides, target
    strides), with the groups along ``groups_dim`` (1 for CD, whose groups are labels; 0 for ID)."""
    members_dim = 1 - groups_dim
    shape = es.shape
    s_str, t_str, g_str, y_str = es.stride(), et.stride(), grad.stride(), targets.stride()
    strides = (s_str[groups_dim], s_str[members_dim], s_str[2], t_str[groups_dim], t_str[members_dim], t_str[2])
    return (shape[groups_dim], shape[members_dim], shape[2], strides, (grad.stride(groups_dim), g_str[members_dim]),
            (y_str[groups_dim], y_str[members_dim]))


def _max_p(n_members: int) -> int:
    """The largest one-program tile a family's launch compiles: its groups hold at most n_members."""
    return max(16, min(next_power_of_2(n_members), SMALL_MAX))


def _n_pad(n_members: int) -> int:
    """Flags a program reads to find its group's members itself (16, unused, with member lists)."""
    return 16 if n_members > SMALL_MAX else max(16, next_power_of_2(n_members))


def _common():
    # Large groups' tiles: 16-wide chunks when loaded ahead (registers, as for the 64-row small tile).
    return dict(SMALL_MAX=SMALL_MAX, TILE=TILE, BLOCK_D=16 if LOAD_AHEAD else TILE_BLOCK_D, AHEAD=LOAD_AHEAD,
                num_warps=NUM_WARPS)


def _large_passes(launch, es, et, grad, idx, cnt, group_loss, geometry, norms, scale: float, add, common):
    """The three tiled passes of the groups above SMALL_MAX members (a family whose groups can be large);
    ``add``: the gradient's write mode (``ADD``)."""
    n_groups, n_members, width, strides, (g_g, g_m), _ = geometry
    grid = (n_groups, cdiv(n_members, TILE))
    part1 = launch.empty(grid[0] * grid[1] * 2, torch.float32, es.device)
    part2 = launch.empty(part1.shape, torch.float32, es.device)
    launch(_means_kernel, grid, es, et, *strides, grad, g_g, idx, cnt, n_members, width, norms, part1, **common)
    launch(_stats_kernel, grid, es, et, *strides, grad, g_g, idx, cnt, n_members, width, norms, part1, part2,
           **common)
    launch(_grad_kernel, grid, es, et, *strides, grad, g_g, g_m, idx, cnt, n_members, width, scale, group_loss,
           norms, part1, part2, ADD=add, **common)


def _run_family(launch, es, et, grad, targets, idx, cnt, group_loss, groups_dim: int, scale: float, first: bool,
                split=None, with_grad: bool = True):
    """All groups of one family; ``groups_dim`` is 1 for CD (groups are labels), 0 for ID. ``idx`` and
    ``cnt``: the member lists, needed only when a group can exceed SMALL_MAX members (else None).
    ``first``: the family that writes the gradient (CD; ID adds into it); without ``with_grad`` none
    is written, and ``grad`` is any tensor of the embeddings' layout (its pointer is not used).
    ``split``: None (each small group whole in one program, ``_main_kernel``) or the width-split
    path's (plan offsets, list and number of groups of more than 16 members, scratch, slices, slice
    width, ``_finish``'s arguments, whether
    the family's last launch is the call's last), after ``_gram_kernel`` (``_split_kernel``)."""
    geometry = _family_args(es, et, grad, targets, groups_dim)
    n_groups, n_members, width, strides, (g_g, g_m), (y_g, y_m) = geometry
    large = n_members > SMALL_MAX
    common = _common()
    if large:
        norms = launch.empty(n_groups * n_members * 2, torch.float32, es.device)
    else:  # the pointers the kernels do not read without large groups: any tensor will do
        idx = cnt = norms = group_loss
    args = (es, et, *strides, grad, g_g, g_m, targets, y_g, y_m, idx, cnt, n_members, width, scale, group_loss, norms)
    add = (not first) if with_grad else NO_GRAD
    family = dict(ZERO_OUTSIDE=first and with_grad, ADD=add, MAX_P=_max_p(n_members), LARGE=large,
                  N_PAD=_n_pad(n_members))
    if split is None:
        launch(_main_kernel, (n_groups, cdiv(n_members, TILE)), *args, **family, **common)
    else:
        offs, big, n_big, part, n_s, slice_width, finish, final = split
        assert not (final and large), "the large groups' passes come after the split launches"
        grid = (n_groups, n_s)
        split_args = (*args, offs, big, n_big, part, *finish)
        family.update(N_S=n_s, SLICE=slice_width, SUM_BLOCK=SUM_BLOCK)
        if SMALL_WARPS <= 0:  # one launch for every group size
            launch(_split_kernel, grid, *split_args, **family, SIZES=0, FINAL=final, **common)
        else:
            smallest = SMALLEST_TILE.value
            small = {**family, "MAX_P": smallest}
            launch(_split_kernel, grid, *split_args, **small, SIZES=0 if n_members <= smallest else 1,
                   FINAL=final and n_members <= smallest, **{**common, "num_warps": SMALL_WARPS})
            if n_members > smallest:
                launch(_split_kernel, (_big_programs(n_groups, n_s, es.device), n_s), *split_args, **family,
                       SIZES=2, FINAL=final, **common)
    if large:
        _large_passes(launch, es, et, grad, idx, cnt, group_loss, geometry, norms, scale, add, common)


def _big_programs(n_groups: int, n_s: int, device) -> int:
    """Programs per slice of ``_split_kernel``'s launch of the groups of more than SMALLEST_TILE members,
    each taking every such group of the plan's list in turn: BIG_PROGRAMS_PER_SM on every SM in all
    (two on a CPU, where the interpreter runs them), at most one per group. A program per (group,
    slice) made COCO's CD launch 960 programs and ID's 768, one per SM at a time, for the one group of
    36 members (CD) or none (ID): 21.3 and 9.5 us on an H100 (run f)."""
    sms = _sm_count(device.index) if device.type == "cuda" else 2
    return max(1, min(n_groups, cdiv(BIG_PROGRAMS_PER_SM * sms, n_s)))


@functools.lru_cache(maxsize=None)
def _sm_count(index) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_scratch(es, n_s: int) -> int:
    """Floats of partial-Gram scratch for the width-split path: what every group at its family's
    largest tile would need, at most the gradient's bytes / SCRATCH_GRAD_FRACTION, bounded to
    SCRATCH_MIN_BYTES..SCRATCH_MAX_BYTES (groups the plan cannot place are done whole)."""
    B, C, _ = es.shape
    worst = n_s * 2 * (C * _max_p(B) ** 2 + B * _max_p(C) ** 2)
    fraction = es.numel() * grad_dtype(es.dtype).itemsize // SCRATCH_GRAD_FRACTION  # the gradient's bytes
    return min(worst, min(max(SCRATCH_MIN_BYTES, fraction), SCRATCH_MAX_BYTES) // 4)


def _gram_d(slice_width: int) -> int:
    """``_gram_kernel``'s width step: GRAM_D, or a slice's width rounded up to a power of two where that
    is less (the tests' narrow slices)."""
    return min(GRAM_D, max(16, next_power_of_2(slice_width)))


def _plan_members(n_members: int) -> int:
    """Members a step of a group count in ``_plan_kernel`` (a family without member lists)."""
    return min(_n_pad(n_members), PLAN_MEMBERS)


def _plan_block(n_groups: int, n_members: int) -> int:
    """Groups a step of ``_plan_kernel`` for a family: PLAN_BLOCK, or more for a family of more groups,
    up to PLAN_FLAGS flags a step (or PLAN_FLAGS / 16 sizes, with member lists)."""
    return max(PLAN_BLOCK, min(next_power_of_2(n_groups), PLAN_FLAGS // _plan_members(n_members)))


def _plan(targets, cd_cnt, id_cnt, n_s: int, cap: int, launch=JIT_LAUNCH):
    """``_plan_kernel``'s offsets (int64 ``[C + B]``, CD groups then ID groups) for ``n_s`` slices and
    ``cap`` floats, the zeroed counter of the call's last launch (int64 ``[1]``), and each family's
    groups of more than SMALLEST_TILE members (int64 ``[C + B]``: CD's from 0, ID's from C, each in
    group order, the rest unwritten) with their numbers (int64 ``[2]``): views of one buffer."""
    B, C = targets.shape
    plan = launch.empty(2 * (C + B) + 3, torch.int64, targets.device)
    offs, done, big, n_big = plan[: C + B], plan[C + B : C + B + 1], plan[C + B + 1 : 2 * (C + B) + 1], plan[-2:]
    launch(
        _plan_kernel, (1,), targets, targets.stride(0), targets.stride(1), B, C, cd_cnt, id_cnt, offs, cap,
        done, big, n_big, CD_LISTS=B > SMALL_MAX, ID_LISTS=C > SMALL_MAX, N_S=n_s, SMALL_MAX=SMALL_MAX,
        CD_BG=_plan_block(C, B), ID_BG=_plan_block(B, C), CD_BM=_plan_members(B), ID_BM=_plan_members(C),
        CD_FAST=targets.stride(1) < targets.stride(0), ID_FAST=targets.stride(0) < targets.stride(1),
        num_warps=NUM_WARPS)
    return offs, done, big, n_big


def _split_slices(D: int) -> tuple[int, int]:
    """(slices per group, widths per slice) on the split path; one slice: the whole-group path. A slice
    is SLICE_WIDTH widths, or a multiple of it where that would make more than MAX_SLICES slices
    (each program sums every slice's partial Grams)."""
    if SLICE_WIDTH <= 0 or D <= SLICE_WIDTH:
        return 1, D
    width = SLICE_WIDTH * cdiv(cdiv(D, SLICE_WIDTH), MAX_SLICES)
    return cdiv(D, width), width


@triton.jit
def _scale_kernel(grad, y_ptr, y_sb, y_sc, n_rows, C, D, grad_output, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows r of the gradient (row r = (r // C, r % C)), ROWS of them per program, times grad_output
    where the row's target is positive or grad_output is inf or NaN (see led_scale)."""
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    inside = r < n_rows
    s = tl.load(grad_output).to(tl.float32)
    flag = tl.load(y_ptr + (r // C) * y_sb + (r % C) * y_sc, mask=inside, other=0).to(tl.float32)
    finite = tl.abs(s) <= 3.4028234663852886e38  # false for inf and NaN
    chosen = inside & ((flag > 0.5) | (finite == 0))
    end = tl.where(tl.sum(chosen.to(tl.int32), axis=0) > 0, D, 0)  # no row of the block: no width
    for d0 in range(0, end, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        keep = chosen[:, None] & (d < D)[None, :]
        at = grad + r[:, None] * D + d[None, :]
        v = tl.load(at, mask=keep, other=0.0)
        tl.store(at, (v.to(tl.float32) * s).to(grad.dtype.element_ty), mask=keep)


@on_input_device
def led_scale(grad: torch.Tensor, targets: torch.Tensor, grad_output: torch.Tensor) -> None:
    """The backward's ``grad *= grad_output``, in place. Only rows whose target is positive can be
    non-zero (groups are made of them; the forward writes every other row as zero), so with a finite
    grad_output the other rows are not touched: most of the gradient at large label counts. An inf or
    NaN grad_output scales every row (0 * inf is NaN, as in a multiply). SCALE_ROWS rows a program:
    one program a row cost 20 and 51 us at 32 x 1000 and 1024 x 80 on an H100 (run d), for about
    1 MB of rows to scale."""
    B, C, D = grad.shape
    if B * C * D == 0:
        return
    key = (grad.shape, grad.dtype, targets.stride(), targets.dtype, grad_output.dtype,
           alignment_key(grad, targets, grad_output), SCALE_ROWS, SCALE_BLOCK)
    inputs = (grad, targets, grad_output)
    if _SCALE_LAUNCHES.replay(key, grad.device.index, inputs) is not None:
        return
    launch = _SCALE_LAUNCHES.call(key, grad.device.index, inputs)
    launch(_scale_kernel, (cdiv(B * C, SCALE_ROWS),), grad, targets, targets.stride(0), targets.stride(1), B * C, C,
           D, grad_output, ROWS=SCALE_ROWS, BLOCK_D=min(SCALE_BLOCK, next_power_of_2(D)))
    launch.done()


class _Chain:
    """A call's launches as a chain (EARLY_LAUNCH): each kernel waits for the previous launch and then
    lets the next one start (``GDC``), and every launch after the first may start early
    (``launch_pdl``). Buffers and the end of the call as ``launch`` has them."""

    __slots__ = ("_launch", "_started", "empty", "done")

    def __init__(self, launch):
        self._launch, self._started = launch, False
        self.empty, self.done = launch.empty, launch.done

    def __call__(self, fn, grid, *args, **kwargs):
        if self._started:
            kwargs["launch_pdl"] = True
        self._started = True
        return self._launch(fn, grid, *args, GDC=True, **kwargs)


def _early_launches(device) -> bool:
    """Whether a call's launches on ``device`` form a chain (EARLY_LAUNCH): sm_90 and later, not under
    the interpreter. CPU tensors outside the interpreter are the Triton cache tool's, whose stand-in
    driver names the target."""
    if not EARLY_LAUNCH or triton_interpreted():
        return False
    if device.type == "cuda":
        return _capability_major(device.index) >= 9
    from triton.runtime.driver import driver

    target = driver.active.get_current_target()
    return target.backend == "cuda" and int(target.arch) >= 90


@functools.lru_cache(maxsize=None)
def _capability_major(index) -> int:
    return torch.cuda.get_device_capability(index)[0]


@on_input_device
def led_forward(es: torch.Tensor, et: torch.Tensor, targets: torch.Tensor, lambda_cd: float, lambda_id: float,
                with_grad: bool = True):
    """Launch the LED kernels: returns (float32 [total, cd, id], d total / d es in
    ``grad_dtype(es.dtype)``, the total once more as a float32 0-d tensor of its own: no view of the
    sums, and no copy kernel to make one); without ``with_grad``, no gradient is computed or allocated
    (an empty tensor in its place)."""
    B, C, _ = es.shape
    device = es.device
    # Everything that decides this call's launches and their arguments (see LaunchCache).
    key = (es.shape, es.stride(), et.stride(), targets.stride(), es.dtype, et.dtype, targets.dtype,
           alignment_key(es, et, targets), _settings(), with_grad, float(lambda_cd), float(lambda_id))
    inputs = (es, et, targets)
    replayed = _FORWARD_LAUNCHES.replay(key, device.index, inputs)
    if replayed is not None:
        return replayed
    launch = _FORWARD_LAUNCHES.call(key, device.index, inputs)
    if _early_launches(device):
        launch = _Chain(launch)
    grad = launch.empty(es.shape if with_grad else (0,), grad_dtype(es.dtype), device)
    grad_at = grad if with_grad else es  # without the gradient, es stands in for its pointer (never written)
    group_loss = launch.empty(C + B, torch.float32, device)
    out = launch.empty(3, torch.float32, device)
    total = launch.empty((), torch.float32, device)
    cd_idx = cd_cnt = id_idx = id_cnt = None
    cd_lists, id_lists = B > SMALL_MAX, C > SMALL_MAX  # a family whose groups can be large: member lists
    if cd_lists or id_lists:
        lists = launch.empty(2 * B * C + B + C, torch.int32, device)
        cd_idx, id_idx = lists[: B * C], lists[B * C : 2 * B * C]
        cd_cnt, id_cnt = lists[2 * B * C : 2 * B * C + C], lists[2 * B * C + C :]
        launch(
            _members_kernel, (C * cd_lists + B * id_lists,), targets, targets.stride(0), targets.stride(1), B, C,
            cd_idx, cd_cnt, id_idx, id_cnt, CD=cd_lists, ID=id_lists,
            BLOCK=min(MEMBERS_BLOCK, next_power_of_2(max(B, C))))
    n_s, slice_width = _split_slices(es.shape[2])
    split_cd = split_id = None
    finished = False  # whether a split launch adds the group losses
    if n_s > 1:
        # A family without member lists: any tensor for the list pointers, which it does not read.
        given = (cd_idx, cd_cnt, id_idx, id_cnt)
        cd_idx_, cd_cnt_, id_idx_, id_cnt_ = (t if t is not None else group_loss for t in given)
        part = launch.empty(_split_scratch(es, n_s), torch.float32, device)
        offs, done, big, n_big = _plan(targets, cd_cnt_, id_cnt_, n_s, part.numel(), launch)
        launch(
            _gram_kernel, (C + B, n_s), es, et, *es.stride(), *et.stride(), targets, *targets.stride(), B, C,
            es.shape[2], offs, part, cd_idx_, cd_cnt_, id_idx_, id_cnt_, CD_LISTS=cd_lists, ID_LISTS=id_lists,
            CD_N_PAD=_n_pad(B), ID_N_PAD=_n_pad(C), AHEAD=LOAD_AHEAD, SLICE=slice_width, GRAM_ROWS=GRAM_ROWS,
            GRAM_D=_gram_d(slice_width), num_warps=GRAM_WARPS,
            **({"maxnreg": GRAM_MAX_REGISTERS} if GRAM_MAX_REGISTERS and torch.float32 in (es.dtype, et.dtype) else {}))
        # ID's last split launch ends the call unless ID's large groups' passes follow it: then its last
        # program also adds the group losses (_finish), and _finalize_kernel does not run.
        finish = (group_loss, C, B, out, total, float(lambda_cd), float(lambda_id), done)
        finished = not id_lists
        split_cd = (offs[:C], big[:C], n_big[:1], part, n_s, slice_width, finish, False)
        split_id = (offs[C:], big[C:], n_big[1:], part, n_s, slice_width, finish, finished)
    _run_family(launch, es, et, grad_at, targets, cd_idx, cd_cnt, group_loss[:C], 1, 2.0 * lambda_cd, True, split_cd,
                with_grad)
    _run_family(launch, es, et, grad_at, targets, id_idx, id_cnt, group_loss[C:], 0, 2.0 * lambda_id, False,
                split_id, with_grad)
    if not finished:
        launch(_finalize_kernel, (1,), group_loss, C, B, out, total, float(lambda_cd), float(lambda_id),
               BLOCK=SUM_BLOCK)
    launch.done((out, grad, total))
    return out, grad, total


settle_cache_keys(globals())  # see there: the same on-disk cache key in every process
