"""MLD in one Triton pass: per-label Bernoulli KL, its reduction and ``d loss / d student`` together.

With ``log p = clamp(logsigmoid(z / T), log eps, log1p(-eps))`` and ``log q`` the same of ``-z``
(so ``q = 1 - p`` in exact arithmetic, without forming it), evaluated as two non-negative terms
(see ``reference.mld``)::

    l     = T^2 [pt (log pt - log ps) + qt (log qt - log qs)]
          = T^2 [pt phi(u_p) + qt phi(u_q)],  u_p = log pt - log ps,  u_q = log qt - log qs,
            phi(u) = u + exp(-u) - 1 >= 0
    dl/dz = T [qt sigmoid(zs) - pt sigmoid(-zs)]  where |zs / T| is below the clamp's logit, else 0
          (= T (ps - pt))

Where student and teacher nearly agree, with d = (zs - zt) / T (exact for close logits):
- the gradient's two terms nearly cancel (at zs = 0.0633, zt = 0.0640 their float32 difference kept
  3.7 digits: SPEC 5's 1e-4 was missed for one such label). Their ratio is exp(d), so for |d| < 1/4
  the gradient is ``pt sigmoid(-zs) expm1(d)``, expm1 by a fitted polynomial, to a few ulp; elsewhere
  ``pt sigmoid(-zs) (exp(log qt - log pt + zs / T) - 1)``.
- u_p and u_q, as differences of two logs, keep only the digits the gap leaves (labels 3e-7 apart
  were 4x off in loss, and a batch 1e-4 apart 5e-4 off, for ``reduction="none"``). For |d| < 1/4,
  ``u_q = log1p(pt expm1(d))`` and ``u_p = u_q - d`` (where pt is near 1 and u_p small, its error is
  weighted by qt, which is as small).
"Nearly agreeing" also asks |zs / T| and |zt / T| below ``near_max(eps)``, the logit where the clamp
starts (at most 80): neither side is clamped there. (It asked |zs / T| 0.3 inside it, one compare
fewer: between that and the clamp, the gradient was 6% off at a gap of 1e-6.)

Most of what the near forms cost is won back: each program adds its passes' losses into one value per
column (the sum over a thread's rows is in its registers) instead of a [BLOCK_B, BLOCK_C] block,
which freed the registers the near forms took and left one 5-shuffle reduction at the end instead
of eight; the two "unclamped" tests of the gradient are one compare of |zs / T|.

Each program writes its block's gradient (unless the call needs none) and its partial sum; a
one-program kernel adds the partial sums in a fixed order (skipped when one program covers the whole
input), so the result is bitwise reproducible.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..backends import triton_interpreted
from ..reference import near_max
from .library import grad_dtype
from .triton_common import (LaunchCache, alignment_key, cdiv, clamp, finalize_sum, on_input_device,
                            settle_cache_keys)

BLOCK_B = 8
BLOCK_C = 128
ROWS_SMALL = 64  # up to this batch, one program covers the batch (one launch, no second reduction)
ROWS_LARGE = 32
# Eight 4-warp programs per SM: 4096 x 1000 is 1,024 programs, one wave on 132 SMs. Triton 3.8 takes
# 72 registers without the cap (seven programs: 924, then a tail of 100), 61 with it, with the same
# instructions and no spill; Triton 3.6 takes 64 either way.
MAX_REGISTERS = 64


# The kernel is bound by instruction issue, not memory (about 205 instructions a label on sm_90 with
# tl.exp and tl.log: PERF_NOTES), so its exponentials are single hardware instructions and its
# logarithm a short polynomial. tl.exp compiles to ex2.approx.f32, which sm_90 runs as four to five
# instructions (a check and two scalings for results below 2^-126); ex2.approx.ftz.f32 is one, its
# results below 2^-126 (1.2e-38) flushed to zero, which changes nothing here: those are sigmoids of
# logits below -87, whose probabilities the eps clamp replaces and whose gradient terms are that small.
# The interpreter (CPU tests) has no PTX: it takes tl.exp and a division.
_INTERPRETED = tl.constexpr(triton_interpreted())
_LAUNCHES = LaunchCache()
LOG2_E = tl.constexpr(1.4426950408889634)


@triton.jit
def _exp(x):
    """exp(x) (2 ulp; results below 2^-126 flushed to zero)."""
    if _INTERPRETED:
        return tl.exp(x)
    else:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x * LOG2_E], dtype=tl.float32,
                                         is_pure=True, pack=1)


@triton.jit
def _reciprocal(x):
    """1 / x for x in [1.7, 3] (1 ulp)."""
    if _INTERPRETED:
        return 1.0 / x
    else:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)


# The polynomials below are fitted, not truncated series: coefficients for the least maximum relative
# error over each range (Lawson's iteratively weighted least squares against 40-digit values), the
# constant term held at 1 so that tiny arguments keep every digit. Each is one or two terms shorter
# than a Taylor series of about the same accuracy (an FFMA a term; eight labels a pass).


@triton.jit
def _log1p_unit(u):
    """log(1 + u) for u in [0, 1], to a few ulp also where u is tiny: 2 atanh(s), s = u / (2 + u) in
    [0, 1/3], as 2 s p(s^2) with p of degree 4 fitted over [0, 1/9] (4.5e-9 of the result; the odd
    series needed s^13 for 1.4e-8)."""
    s = u * _reciprocal(2.0 + u)
    t = s * s
    p = 0.14005993499
    p = p * t + 0.14000902616
    p = p * t + 0.20010763621
    p = p * t + 0.33333208143
    p = p * t + 1.0
    return 2.0 * s * p


@triton.jit
def _log1p_near(x):
    """log(1 + x) for x = pt expm1(d), |d| < 1/4, so x in [-0.222, 0.285]: 2 s p(s^2), s = x / (2 + x)
    within 0.1244, p of degree 2 fitted over that (2.1e-8 of the result)."""
    s = x * _reciprocal(2.0 + x)
    t = s * s
    return 2.0 * s * (1.0 + t * (0.33331834656 + t * 0.20311795327))


@triton.jit
def _kl_excess(u):
    """u + exp(-u) - 1 (>= 0), without cancellation for small |u|: for |u| < 1/4 by its series to
    u^6 / 720 (what it leaves out is below 5e-7 of the result; the direct form loses up to 2e-6 at
    1/4, and lost 1.2e-5 at 0.1, where the series stopped before)."""
    series = 0.5 - u * (1.0 / 6 - u * (1.0 / 24 - u * (1.0 / 120 - u * (1.0 / 720))))
    return tl.where(tl.abs(u) < 0.25, u * u * series, u + _exp(-u) - 1.0)


@triton.jit
def _expm1_small(d):
    """exp(d) - 1 for |d| < 1/4: d p(d), p of degree 4 fitted over [-1/4, 1/4] (8.7e-8 of the result;
    the series needed d^6 / 720 for 4.8e-8)."""
    return d * (1.0 + d * (0.49999835941 + d * (0.16666710458 + d * (0.041774192304 + d * 0.0083359397141))))


@triton.jit
def _clamped_log_probs(z, LOG_LO, LOG_HI):
    """(log p, log q, log sigmoid(-z)) with p, q clamped to [eps, 1 - eps] (the last unclamped)."""
    softplus_tail = _log1p_unit(_exp(-tl.abs(z)))
    log_sig_neg = tl.minimum(-z, 0.0) - softplus_tail
    log_p = clamp(tl.minimum(z, 0.0) - softplus_tail, LOG_LO, LOG_HI)
    log_q = clamp(log_sig_neg, LOG_LO, LOG_HI)
    return log_p, log_q, log_sig_neg


@triton.jit
def _mld_kernel(
    zs_ptr, zt_ptr, grad_ptr, out_ptr,
    B, C, zs_sb, zs_sc, zt_sb, zt_sc,
    inv_t, loss_scale, partial_scale, grad_scale, LOG_LO, LOG_HI, FREE_MAX, NEAR_MAX,
    PER_LABEL: tl.constexpr, ROWS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, GRAD: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    rc = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)  # a column's losses so far: a thread's rows add in its registers
    for r0 in range(0, ROWS, BLOCK_B):
        rb = (pid_b * ROWS + r0 + tl.arange(0, BLOCK_B)).to(tl.int64)
        mask = (rb < B)[:, None] & (rc < C)[None, :]
        zs = tl.load(zs_ptr + rb[:, None] * zs_sb + rc[None, :] * zs_sc, mask=mask, other=0.0).to(tl.float32)
        zt = tl.load(zt_ptr + rb[:, None] * zt_sb + rc[None, :] * zt_sc, mask=mask, other=0.0).to(tl.float32)
        # The student's distance from the teacher, taken from the inputs here, where they are at hand
        # (the nearly-agreeing forms, below); 1, never near, where either side is past NEAR_MAX.
        d = tl.where(tl.maximum(tl.abs(zs * inv_t), tl.abs(zt * inv_t)) < NEAR_MAX, (zs - zt) * inv_t, 1.0)
        log_ps, log_qs, log_sig_neg_s = _clamped_log_probs(zs * inv_t, LOG_LO, LOG_HI)
        log_pt, log_qt, _ = _clamped_log_probs(zt * inv_t, LOG_LO, LOG_HI)
        pt = _exp(log_pt)
        qt = _exp(log_qt)
        flat = rb[:, None] * C + rc[None, :]
        close = _expm1_small(d)
        near = tl.abs(d) < 0.25
        # Near: log qt - log qs = log1p(pt expm1(d)) and log pt - log ps = that - d.
        u_q = _log1p_near(pt * close)
        u_p = tl.where(near, u_q - d, log_pt - log_ps)
        u_q = tl.where(near, u_q, log_qt - log_qs)
        if GRAD:
            # qt sigmoid(zs) - pt sigmoid(-zs) = below * (their ratio - 1), 0 where either side is clamped.
            below = pt * _exp(log_sig_neg_s)
            apart = tl.where(tl.abs(zs * inv_t) < FREE_MAX, _exp(log_qt - log_pt + zs * inv_t) - 1.0, 0.0)
            grad = below * tl.where(near, close, apart)
            tl.store(grad_ptr + flat, (grad * grad_scale).to(grad_ptr.dtype.element_ty), mask=mask)
        loss = pt * _kl_excess(u_p) + qt * _kl_excess(u_q)
        if PER_LABEL:
            tl.store(out_ptr + flat, loss * loss_scale, mask=mask)
        else:
            acc += tl.sum(tl.where(mask, loss, 0.0), axis=0)
    if not PER_LABEL:
        partial = tl.sum(acc, axis=0)
        tl.store(out_ptr + pid_b * tl.num_programs(1) + pid_c, partial * partial_scale)


@on_input_device
def mld_forward(zs: torch.Tensor, zt: torch.Tensor, reduction: str, eps: float, temperature: float,
                with_grad: bool = True):
    """Launch the MLD kernel: returns (loss in float32, d loss / d zs in ``grad_dtype(zs.dtype)``); without
    ``with_grad``, the gradient is neither computed nor allocated (an empty tensor in its place)."""
    # Everything that decides this call's launches and their arguments (see LaunchCache).
    key = (zs.shape, zs.stride(), zt.stride(), zs.dtype, zt.dtype, alignment_key(zs, zt), reduction, float(eps),
           float(temperature), ROWS_SMALL, ROWS_LARGE, BLOCK_B, BLOCK_C, MAX_REGISTERS, with_grad)
    inputs = (zs, zt)
    replayed = _LAUNCHES.replay(key, zs.device.index, inputs)
    if replayed is not None:
        return replayed
    B, C = zs.shape
    rows = ROWS_SMALL if B <= ROWS_SMALL else ROWS_LARGE
    grid = (cdiv(B, rows), cdiv(C, BLOCK_C))
    scale = {"sum": 1.0, "batchmean": 1.0 / B, "mean": 1.0 / (B * C), "none": 1.0}[reduction]
    per_label = reduction == "none"
    n_partials = grid[0] * grid[1]
    loss_scale = scale * temperature**2
    # A single partial is the loss itself: allocated 0-dim, so that the loss is no view (autograd
    # refuses in-place changes to a view made inside a custom Function, such as ``loss *= 2``).
    out_shape = (B, C) if per_label else (() if n_partials == 1 else (n_partials,))
    launch = _LAUNCHES.call(key, zs.device.index, inputs)
    grad = launch.empty((B, C) if with_grad else (0,), grad_dtype(zs.dtype), zs.device)
    out = launch.empty(out_shape, torch.float32, zs.device)
    # Without the gradient, zs stands in for its pointer: the kernel compiled with GRAD false never uses it.
    launch(
        _mld_kernel, grid, zs, zt, grad if with_grad else zs, out, B, C, zs.stride(0), zs.stride(1), zt.stride(0),
        zt.stride(1), 1.0 / temperature, loss_scale, loss_scale if n_partials == 1 else 1.0, scale * temperature,
        math.log(eps), math.log1p(-eps), math.log1p(-eps) - math.log(eps), near_max(eps),
        PER_LABEL=per_label, ROWS=rows, BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_C, GRAD=with_grad, maxnreg=MAX_REGISTERS,
    )
    if not per_label and n_partials > 1:
        out = finalize_sum(out, loss_scale, launch)
    launch.done((out, grad))
    return out, grad


settle_cache_keys(globals())  # see there: the same on-disk cache key in every process
