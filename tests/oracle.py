"""SPEC's formulas evaluated in float64 with NumPy, loss and gradient, one group at a time.

Independent of the package (no torch autograd, no shared helpers): the gradients come from SPEC's
closed forms, so a test that agrees with this agrees with the contract, not with our own derivation.
"""

from __future__ import annotations

import numpy as np

EPS_DIST = 1e-12


def _sigmoid(z):
    ez = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + ez), ez / (1.0 + ez))


def mld(zs, zt, reduction="batchmean", eps=1e-8, temperature=1.0):
    """(loss, d loss / d zs) of SPEC 2."""
    zs = np.asarray(zs, np.float64)
    zt = np.asarray(zt, np.float64)
    sig_s = _sigmoid(zs / temperature)
    ps = np.clip(sig_s, eps, 1 - eps)
    pt = np.clip(_sigmoid(zt / temperature), eps, 1 - eps)
    per = temperature**2 * (pt * np.log(pt / ps) + (1 - pt) * np.log((1 - pt) / (1 - ps)))
    grad = np.where((sig_s > eps) & (sig_s < 1 - eps), ps - pt, 0.0) * temperature
    B, C = zs.shape
    if reduction == "none":
        return per, grad
    scale = {"sum": 1.0, "batchmean": 1.0 / B, "mean": 1.0 / (B * C)}[reduction]
    return per.sum() * scale, grad * scale


def mld_digits(zs, zt, eps=1e-8, temperature=1.0, digits=40):
    """(per-label loss, d loss / d zs) of SPEC 2 with ``digits`` significant digits (mpmath), for logits
    so close that float64 keeps too few: at a gap of 3e-7 the two terms of a label's loss are some 1e7
    times their sum, and float64's 16 digits leave it about 9."""
    import mpmath  # a dependency of torch (through sympy)

    ctx = mpmath.mp.clone()
    ctx.dps = digits
    zs = np.asarray(zs, np.float64)
    zt = np.asarray(zt, np.float64)
    loss = np.empty(zs.shape)
    grad = np.empty(zs.shape)
    lo, hi = ctx.mpf(eps), 1 - ctx.mpf(eps)
    t = ctx.mpf(temperature)
    for i in np.ndindex(zs.shape):
        sig_s = 1 / (1 + ctx.exp(-ctx.mpf(float(zs[i])) / t))
        ps = min(max(sig_s, lo), hi)
        pt = min(max(1 / (1 + ctx.exp(-ctx.mpf(float(zt[i])) / t)), lo), hi)
        loss[i] = float(t**2 * (pt * ctx.log(pt / ps) + (1 - pt) * ctx.log((1 - pt) / (1 - ps))))
        grad[i] = float((ps - pt) * t) if lo < sig_s < hi else 0.0
    return loss, grad


def _dist(e):
    sq = (e * e).sum(1)
    raw = sq[:, None] + sq[None, :] - 2 * e @ e.T
    return raw, np.sqrt(np.maximum(raw, EPS_DIST))


def led_group(s, t):
    """(loss, d loss / d s) of one group (SPEC 3), rows [P, D]."""
    P = s.shape[0]
    if P <= 1:
        return 0.0, np.zeros_like(s)
    off = ~np.eye(P, dtype=bool)
    n = P * (P - 1)
    raw_s, ds = _dist(s)
    _, dt = _dist(t)
    mu_s = ds[off].sum() / n
    mu_t = dt[off].sum() / n
    x = np.where(off, ds / mu_s - dt / mu_t, 0.0)
    ax = np.abs(x)
    loss = np.where(off, np.where(ax < 1, 0.5 * x * x, ax - 0.5), 0.0).sum() / P
    hp = np.where(off, np.clip(x, -1, 1), 0.0)
    g = np.where(off, (hp / mu_s - (hp * ds).sum() / (mu_s**2 * n)) / P, 0.0)
    w = np.where(off & (raw_s > EPS_DIST), g / ds, 0.0)
    grad = 2 * (np.diag(w.sum(1)) - w) @ s
    return loss, grad


def led(es, et, y, lambda_cd=100.0, lambda_id=1000.0):
    """(total, cd, id, d total / d es) of SPEC 3, groups chosen by ``y > 0.5``."""
    es = np.asarray(es, np.float64)
    et = np.asarray(et, np.float64)
    pos = np.asarray(y, np.float64) > 0.5
    B, C, _ = es.shape
    grad = np.zeros_like(es)
    cd = id_ = 0.0
    for c in range(C):
        m = np.nonzero(pos[:, c])[0]
        loss, g = led_group(es[m, c], et[m, c])
        cd += loss
        grad[m, c] += lambda_cd * g
    for b in range(B):
        m = np.nonzero(pos[b])[0]
        loss, g = led_group(es[b, m], et[b, m])
        id_ += loss
        grad[b, m] += lambda_id * g
    return lambda_cd * cd + lambda_id * id_, cd, id_, grad


def bce(zs, y, eps=1e-8):
    """(loss, d loss / d zs) of SPEC 4's summed, clamped BCE."""
    zs = np.asarray(zs, np.float64)
    y = np.asarray(y, np.float64)
    p = _sigmoid(zs)
    q = _sigmoid(-zs)
    loss = -(y * np.log(np.maximum(p, eps)) + (1 - y) * np.log(np.maximum(q, eps))).sum()
    grad = -(y * np.where(p > eps, q, 0.0) - (1 - y) * np.where(q > eps, p, 0.0))
    return loss, grad
