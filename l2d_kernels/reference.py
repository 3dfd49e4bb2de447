"""Eager PyTorch forms of the L2D losses (Yang et al., ICCV 2023, arXiv 2308.06453).

Every function here computes in the dtype it is given, with PyTorch autograd supplying the
gradient. They serve three roles: the ``"torch"`` backend of the public API (on float32 or float64
inputs; LED by ``led_grouped`` on the CPU, ``led_vectorized`` where it fits elsewhere), the eager baselines of the
benchmarks, and the forms the tests check the kernels against.

MLD, per label (Bernoulli KL of teacher and student sigmoid probabilities)::

    ps = clamp(sigmoid(zs / T), eps, 1 - eps),   pt = clamp(sigmoid(zt / T), eps, 1 - eps)
    l  = T^2 * [pt log(pt / ps) + (1 - pt) log((1 - pt) / (1 - ps))]

LED, per group of P rows (a label's positive instances, or an instance's positive labels)::

    d(a, b) = sqrt(max(|s_a|^2 + |s_b|^2 - 2 s_a.s_b, 1e-12)),  a != b
    x(a, b) = d(a, b) / mean(d) - dt(a, b) / mean(dt)
    loss    = (1 / P) * sum_{a != b} huber(x(a, b))

Groups with P <= 1 contribute 0; group losses are summed, and
``LED = lambda_cd * CD + lambda_id * ID``. The teacher is a constant (detached).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DIST_EPS = 1e-12
REDUCTIONS = ("batchmean", "sum", "mean", "none")


def _reduce(per_label: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_label
    total = per_label.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / per_label.shape[0]
    if reduction == "mean":
        return total / per_label.numel()
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _clamped_log_probs(z: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log(clamp(sigmoid(z), eps, 1 - eps)) and log(1 - that), without forming 1 - p."""
    lo, hi = math.log(eps), math.log1p(-eps)
    return F.logsigmoid(z).clamp(lo, hi), F.logsigmoid(-z).clamp(lo, hi)


def kl_excess(u: torch.Tensor) -> torch.Tensor:
    """``u + exp(-u) - 1`` (>= 0), without cancellation for small ``|u|``."""
    series = 1 / 362880
    for n in range(8, 1, -1):  # sum_{n >= 2} (-u)^n / n!, to n = 9: exact to float64 rounding for |u| < 0.1
        series = 1 / math.factorial(n) - u * series
    return torch.where(u.abs() < 0.1, u * u * series, u + torch.expm1(-u))


NEAR_GAP = 0.25  # |zs - zt| / T below which the log-ratios are taken from the gap (see ``mld``)


def near_max(eps: float) -> float:
    """The bound on |zs / T| and |zt / T| below which MLD's nearly-agreeing forms are taken: the logit
    where the eps clamp starts (neither side clamped), at most 80 (exp(-80) is a float32 normal); 0,
    never, for eps of 1/2 or more."""
    return min(max(math.log1p(-eps) - math.log(eps), 0.0), 80.0)


def mld(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    reduction: str = "batchmean",
    eps: float = 1e-8,
    temperature: float = 1.0,
) -> torch.Tensor:
    """MLD in log-sigmoid form: equal to the exact-arithmetic formula, finite for any finite logit.

    With ``a = log pt - log ps`` and ``b = log qt - log qs``, and since ``pt + qt = ps + qs = 1``
    (the clamp keeps both sums), ``pt a + qt b = pt (a + e^-a - 1) + qt (b + e^-b - 1)``: a sum of
    two non-negative terms (where ``pt a + qt b`` loses digits to cancellation).

    Where student and teacher nearly agree, ``a`` and ``b`` as differences of two logs keep only the
    digits their gap leaves (at logits 3e-7 apart, none: the float32 loss was 7-44% off and the
    gradient 16-43%). There, with both sides unclamped and ``g = (zs - zt) / T`` (exact for close
    logits), ``a = log1p(qt expm1(-g))`` and ``b = log1p(pt expm1(g))``, which keep every digit, and
    autograd's gradient through them is a sum of two terms of one sign.
    """
    zs, zt = student_logits, teacher_logits.detach()
    a_s, a_t = zs / temperature, zt / temperature
    log_ps, log_qs = _clamped_log_probs(a_s, eps)
    log_pt, log_qt = _clamped_log_probs(a_t, eps)
    pt, qt = log_pt.exp(), log_qt.exp()
    gap = (zs - zt) / temperature  # not a_s - a_t: each of those is rounded, and the gap may be tiny
    bound = near_max(eps)
    near = (gap.abs() < NEAR_GAP) & (a_s.abs() < bound) & (a_t.abs() < bound)
    # Elsewhere 0, so that the near form (computed there too) has no inf for backward to multiply by 0.
    gap = torch.where(near, gap, torch.zeros_like(gap))
    a = torch.where(near, torch.log1p(qt * torch.expm1(-gap)), log_pt - log_ps)
    b = torch.where(near, torch.log1p(pt * torch.expm1(gap)), log_qt - log_qs)
    per_label = pt * kl_excess(a) + qt * kl_excess(b)
    return _reduce(per_label * temperature**2, reduction)


def mld_authors(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    reduction: str = "batchmean",
    eps: float = 1e-8,
) -> torch.Tensor:
    """MLD as the authors' code computes it: probabilities first, then logs.

    In float32 ``1 - eps`` rounds to 1, so a student logit above about 17 gives ``log(0)``: the
    loss is inf (teacher unsaturated) or NaN (both saturated). Kept as the eager baseline.
    """
    ps = torch.sigmoid(student_logits).clamp(eps, 1 - eps)
    pt = torch.sigmoid(teacher_logits.detach()).clamp(eps, 1 - eps)
    per_label = F.kl_div(ps.log(), pt, reduction="none") + F.kl_div((1 - ps).log(), 1 - pt, reduction="none")
    return _reduce(per_label, reduction)


def bce(student_logits: torch.Tensor, targets: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The authors' summed BCE, ``-sum[y log max(p, eps) + (1 - y) log max(1 - p, eps)]``, in log space."""
    y = targets.to(student_logits.dtype)
    floor = math.log(eps)
    log_p = F.logsigmoid(student_logits).clamp(min=floor)
    log_q = F.logsigmoid(-student_logits).clamp(min=floor)
    return -(y * log_p + (1 - y) * log_q).sum()


def bce_authors(student_logits: torch.Tensor, targets: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The authors' BCE in probability space (the eager baseline of the whole objective)."""
    y = targets.to(student_logits.dtype)
    p = torch.sigmoid(student_logits)
    return -(y * p.clamp(min=eps).log() + (1 - y) * (1 - p).clamp(min=eps).log()).sum()


def huber(x: torch.Tensor) -> torch.Tensor:
    """Smooth L1 with beta = 1: ``0.5 x^2`` for ``|x| < 1``, else ``|x| - 0.5``."""
    ax = x.abs()
    return torch.where(ax < 1, 0.5 * x * x, ax - 0.5)


def pairwise_distances(rows: torch.Tensor) -> torch.Tensor:
    """Gram-form distances of SPEC 3 over the last two dims, ``[..., P, D] -> [..., P, P]``.

    The squared norms are the Gram's own diagonal, so identical rows are exactly 0 apart (norms
    summed separately would differ from the Gram entry by rounding, a spurious distance of about
    ``3e-4 |s|`` in float32). The diagonal is left as computed (1e-6); callers mask it.
    """
    gram = rows @ rows.transpose(-1, -2)
    sq = gram.diagonal(dim1=-2, dim2=-1)
    return (sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2 * gram).clamp(min=DIST_EPS).sqrt()


def led_group(student_rows: torch.Tensor, teacher_rows: torch.Tensor) -> torch.Tensor:
    """Loss of one group of ``P >= 2`` rows (``[P, D]`` each), as the authors compute it."""
    p = student_rows.shape[0]
    off_diagonal = ~torch.eye(p, dtype=torch.bool, device=student_rows.device)
    ds = pairwise_distances(student_rows)[off_diagonal]
    dt = pairwise_distances(teacher_rows.detach())[off_diagonal]
    x = ds / ds.mean() - dt / dt.mean()
    return huber(x).sum() / p


def _positive(targets: torch.Tensor) -> torch.Tensor:
    return targets > 0.5


def connected_zero(t: torch.Tensor) -> torch.Tensor:
    """A zero scalar in autograd's graph of ``t`` whose gradient is zero (never NaN, whatever ``t`` holds)."""
    return torch.where(t.new_zeros(1, dtype=torch.bool), t.flatten()[:1], 0).sum()


def _led_result(cd, id_, lambda_cd, lambda_id, return_components):
    total = lambda_cd * cd + lambda_id * id_
    return (total, cd, id_) if return_components else total


def led_loops(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    targets: torch.Tensor,
    lambda_cd: float = 100.0,
    lambda_id: float = 1000.0,
    return_components: bool = False,
):
    """LED one group at a time, in the order the authors' code visits them (labels, then instances).

    Group members are chosen by the targets. Each group costs a few host syncs and kernel launches:
    this is the slow baseline the fused kernels replace.
    """
    pos = _positive(targets)
    cd = id_ = connected_zero(student_emb)
    for c in range(pos.shape[1]):
        members = pos[:, c].nonzero().squeeze(1)
        if members.numel() > 1:
            cd = cd + led_group(student_emb[members, c], teacher_emb[members, c])
    for b in range(pos.shape[0]):
        members = pos[b].nonzero().squeeze(1)
        if members.numel() > 1:
            id_ = id_ + led_group(student_emb[b, members], teacher_emb[b, members])
    return _led_result(cd, id_, lambda_cd, lambda_id, return_components)


def shifted(rows: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Float32 group rows ``[G, P, D]`` less each group's row ``first`` ``[G]``; rows of other dtypes as
    they are.

    Distances are shift-invariant, but their Gram form is not in floating point: rows that share a
    component ``k`` times their spread lose ``k^2`` times the rounding of a Gram entry to the
    cancellation in ``|s_a|^2 + |s_b|^2 - 2 s_a.s_b`` (in float32, rows whose common part is 30 times
    their spread, a cosine of 0.999, had their LED gradient 4e-4 off float64). Less a member of their
    own group, the rows keep only what sets them apart (the difference of two close float32 values
    is exact), and the Gram's rounding is that of the spread. Half precision is left as it is: a
    difference rounded back to bfloat16 would lose more than the cancellation does. Float64 keeps
    enough digits as it is (1e-12 at 100 times the spread), and a shift can also cost digits: rows
    less a member are farther from the origin than the rows themselves where the group sits near the
    origin and its first member does not (in float64, a pair 1.4e-6 apart in such a group moved the
    gradient 1.8e-7 off the oracle's; in float32, with no common part, such errors stay near 1e-6)."""
    if rows.dtype != torch.float32:
        return rows
    # A masked sum rather than a gather: the gather's backward adds with float atomics on a GPU.
    chosen = torch.arange(rows.shape[1], device=rows.device) == first[:, None]
    return rows - torch.where(chosen[:, :, None], rows, 0).sum(1, keepdim=True)


def _led_family(student: torch.Tensor, teacher: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """Sum of group losses over ``G`` groups at once: rows ``[G, P, D]``, membership ``[G, P]``."""
    p = members.shape[1]
    pairs = members.unsqueeze(2) & members.unsqueeze(1)
    pairs &= ~torch.eye(p, dtype=torch.bool, device=members.device)
    size = members.sum(1).to(torch.promote_types(student.dtype, torch.float32))
    n_pairs = (size * (size - 1)).clamp(min=1)
    grouped = size > 1
    row_mask = members.unsqueeze(2)

    first = members.to(torch.uint8).argmax(1)  # each group's first member (0 for an empty group)

    def normalized(rows):
        # Zero the non-members first, so that nothing from them (not even NaN) reaches a gradient.
        d = torch.where(pairs, pairwise_distances(torch.where(row_mask, shifted(rows, first), 0)), 0)
        mean = torch.where(grouped, d.sum((1, 2)) / n_pairs, 1)
        return d / mean[:, None, None]

    x = normalized(student) - normalized(teacher.detach())
    per_group = torch.where(pairs, huber(x), 0).sum((1, 2)) / size.clamp(min=1)
    return per_group.sum()


def led_vectorized(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    targets: torch.Tensor,
    lambda_cd: float = 100.0,
    lambda_id: float = 1000.0,
    return_components: bool = False,
):
    """LED over all groups of a family at once: no loop over groups, no host sync.

    Materializes a ``C x B x B`` (CD) and a ``B x C x C`` (ID) relation tensor, which is what makes
    this form run out of memory at large label spaces.
    """
    pos = _positive(targets)
    cd = _led_family(student_emb.transpose(0, 1), teacher_emb.transpose(0, 1), pos.t())
    id_ = _led_family(student_emb, teacher_emb, pos)
    return _led_result(cd, id_, lambda_cd, lambda_id, return_components)


def led_vectorized_bytes(B: int, C: int, dtype: torch.dtype = torch.float32) -> int:
    """An upper estimate of the memory :func:`led_vectorized` takes for forward and backward:
    14 values per element of its ``C x B x B`` and ``B x C x C`` relation tensors (peaks measured
    in float32: 30-45 bytes per element on an H100, 46-51 on a CPU)."""
    return 14 * torch.empty((), dtype=dtype).element_size() * (C * B * B + B * C * C)


def _padded_sizes(sizes: torch.Tensor, limit: int) -> torch.Tensor:
    """Rows a group of each size is padded to in :func:`led_grouped`: the size itself up to 8, then
    the next of four steps per octave (10, 12, 14, 16, 20, 24, ...), at most 25% more rows, and at
    most ``limit``; 0 for groups of fewer than two members. A few batched calls then cover every
    group size."""
    # step = 2 ** max(0, bit_length(size - 1) - 3), with integer comparisons only
    powers = 1 << torch.arange(max(limit, 1).bit_length(), device=sizes.device)
    bits = ((sizes - 1).clamp(min=0)[:, None] >= powers).sum(1)
    step = 1 << (bits - 3).clamp(min=0)
    padded = ((sizes + step - 1) // step * step).clamp(max=limit)
    return torch.where(sizes > 1, padded, 0)


def _size_classes(members: torch.Tensor, group_stride: int, member_stride: int):
    """Sorts a family's groups into classes of one padded size, on the device.

    ``members`` is ``[G, N]``; member ``k`` of group ``g`` is row ``g * group_stride + k * member_stride``
    of the flattened ``[B * C, D]`` embeddings. Returns a function that, given the number of groups
    of each padded size (``counts``, ``N + 1`` values read on the host), gives ``(rows, mask)`` per
    class, each ``[G_k, P_k]``: a group's member rows in order, then rows of non-members as padding
    (``mask`` false).
    """
    N = members.shape[1]
    padded = _padded_sizes(members.sum(1), N)
    order = torch.sort(padded, stable=True).indices
    counts = torch.bincount(padded, minlength=N + 1)

    def classes(counts_host: list) -> list:
        out, start = [], counts_host[0]  # groups of fewer than two members come first
        for cap in range(2, N + 1):
            if counts_host[cap]:
                groups = order[start:start + counts_host[cap]]
                start += counts_host[cap]
                chosen = members[groups]
                # A stable sort puts a group's members first, in their order, then its non-members.
                rank = torch.sort(chosen.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :cap]
                out.append((groups[:, None] * group_stride + rank * member_stride, chosen.gather(1, rank)))
        return out

    return counts, classes


def led_grouped(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    targets: torch.Tensor,
    lambda_cd: float = 100.0,
    lambda_id: float = 1000.0,
    return_components: bool = False,
):
    """LED with each group's member rows gathered: memory and work follow the groups' pairs.

    The groups of both families are sorted into classes of one padded size (:func:`_padded_sizes`),
    their rows gathered in one indexing call, and each class computed as :func:`led_vectorized`
    computes a family. Where :func:`led_vectorized` forms ``C x B x B`` and ``B x C x C`` relation
    tensors, this form's tensors hold at most 1.25 times each group's rows and 1.57 times its pairs.
    It reads the classes' sizes on the host, once (a synchronization on a GPU): the ``"torch"`` backend uses
    it for CPU tensors, and on a GPU only where :func:`led_vectorized` would not fit in free memory.
    """
    pos = _positive(targets)
    B, C, D = student_emb.shape
    (cd_counts, cd_classes), (id_counts, id_classes) = _size_classes(pos.t(), 1, C), _size_classes(pos, C, 1)
    counts = torch.cat([cd_counts, id_counts]).tolist()  # the one read on the host
    families = (cd_classes(counts[:B + 1]), id_classes(counts[B + 1:]))  # CD: a label's images; ID: an image's labels
    classes = [c for family in families for c in family]
    if classes:
        index = torch.cat([rows.flatten() for rows, _ in classes])
        counts = [rows.numel() for rows, _ in classes]
        student_rows = student_emb.reshape(B * C, D)[index].split(counts)
        teacher_rows = teacher_emb.detach().reshape(B * C, D)[index].split(counts)
    sums, k = [], 0
    for family in families:
        total = connected_zero(student_emb)
        for rows, mask in family:
            shape = (*rows.shape, D)
            total = total + _led_family(student_rows[k].view(shape), teacher_rows[k].view(shape), mask)
            k += 1
        sums.append(total)
    return _led_result(sums[0], sums[1], lambda_cd, lambda_id, return_components)


def l2d_authors(
    student_logits, teacher_logits, student_emb, teacher_emb, targets,
    lambda_bce=1.0, lambda_mld=10.0, lambda_led=1.0, lambda_cd=100.0, lambda_id=1000.0,
):
    """The whole objective of SPEC 4 as the authors compute it (probability-space BCE and MLD, LED loops)."""
    return (
        lambda_bce * bce_authors(student_logits, targets)
        + lambda_mld * mld_authors(student_logits, teacher_logits)
        + lambda_led * led_loops(student_emb, teacher_emb, targets, lambda_cd, lambda_id)
    )
