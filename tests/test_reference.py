"""The eager forms of l2d_kernels.reference against SPEC's formulas in float64, and SPEC 3's properties."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import oracle
from helpers import OpLog, embeddings, logits, rel_err
from l2d_kernels import reference

F64 = torch.float64


def _grad(fn, x, *args, **kwargs):
    x = x.detach().clone().requires_grad_()
    out = fn(x, *args, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    out.sum().backward()
    return out.detach(), x.grad


# ---------------------------------------------------------------- MLD

@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_mld_matches_formula(reduction, temperature):
    zs, zt = logits(7, 11, scale=4.0, dtype=F64)
    loss, grad = _grad(reference.mld, zs, zt, reduction, temperature=temperature)
    want_loss, want_grad = oracle.mld(zs.numpy(), zt.numpy(), reduction, temperature=temperature)
    assert rel_err(loss, want_loss) < 1e-12
    assert rel_err(grad, want_grad) < 1e-12


def test_mld_hand_computed():
    # ps = 1/2, pt = 3/4: 3/4 log(3/2) + 1/4 log(1/2); the gradient is ps - pt = -1/4.
    zs = torch.zeros(1, 1, dtype=F64)
    zt = torch.full((1, 1), math.log(3.0), dtype=F64)
    loss, grad = _grad(reference.mld, zs, zt)
    assert loss.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-14)
    assert grad.item() == pytest.approx(-0.25, rel=1e-14)


def _nearly_agreeing_logits(seed):
    """Teacher logits up to 8 in size and students 0, or 3e-7 to 0.3, away (float32)."""
    g = torch.Generator().manual_seed(seed)
    zt = torch.rand(16, 40, generator=g) * 16 - 8
    gap = torch.cat([torch.zeros(16, 1), 0.3 * 10 ** (-6 * torch.rand(16, 39, generator=g))], dim=1)
    return zt + gap * torch.sign(torch.randn(16, 40, generator=g)), zt


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_mld_float32_keeps_its_digits_where_student_and_teacher_nearly_agree(temperature):
    """Every label's loss and gradient within 1e-5 of SPEC 2 taken to 40 digits, relative to that label's
    own value. As differences of two float32 logs, log pt - log ps and log qt - log qs kept only what
    the gap left of them: labels 3e-7 apart were 7-44% off in loss and 16-43% in gradient, and a batch
    1e-3 apart missed SPEC 5's 1e-4 in gradient at T = 3."""
    zs, zt = _nearly_agreeing_logits(7)
    loss, grad = _grad(reference.mld, zs, zt, "none", temperature=temperature)
    want_loss, want_grad = (torch.from_numpy(a) for a in oracle.mld_digits(zs.numpy(), zt.numpy(),
                                                                            temperature=temperature))
    assert (loss[:, 0] == 0).all() and (grad[:, 0] == 0).all()  # equal logits: exactly 0
    assert ((loss.double() - want_loss).abs() / want_loss.abs())[:, 1:].max() < 1e-5
    assert ((grad.double() - want_grad).abs() / want_grad.abs())[:, 1:].max() < 1e-5


def test_mld_nearly_agreeing_form_has_a_finite_second_derivative():
    """Double backward through both forms, near and apart, clamped and not, and gaps whose exponential
    overflows (the near form, computed there too, must not put 0 * inf into the masked gradient):
    finite, and float64's Hessian-vector product matches the closed form ps (1 - ps) (of T (ps - pt);
    zero where ps is clamped)."""
    zs = torch.tensor([[0.3, 0.3, 5.0, 40.0, -40.0, 2.0, 1e4, -1e4]], dtype=F64, requires_grad=True)
    zt = torch.tensor([[0.3, 0.3 + 1e-9, -5.0, 39.9, 40.0, 2.1, -1e4, 1e4]], dtype=F64)
    (grad,) = torch.autograd.grad(reference.mld(zs, zt, "sum", temperature=2.0), zs, create_graph=True)
    (hvp,) = torch.autograd.grad(grad.sum(), zs)
    ps = torch.sigmoid(zs.detach() / 2.0)
    free = (ps > 1e-8) & (ps < 1 - 1e-8)
    assert torch.isfinite(hvp).all()
    assert rel_err(hvp, torch.where(free, ps * (1 - ps), 0.0)) < 1e-9


def test_mld_authors_form_agrees_where_it_is_finite():
    zs, zt = logits(5, 9, scale=3.0, dtype=F64)
    for reduction in ("batchmean", "sum", "mean"):
        assert rel_err(reference.mld_authors(zs, zt, reduction), reference.mld(zs, zt, reduction)) < 1e-12


@pytest.mark.parametrize("magnitude", [17.0, 20.0, 100.0, 1e4])
def test_mld_float32_stays_exact_for_saturated_logits(magnitude):
    # Student and teacher saturated at both ends, plus every mix with moderate logits.
    values = torch.tensor([magnitude, -magnitude, 0.5, -3.0], dtype=F64)
    zs, zt = torch.meshgrid(values, values, indexing="ij")
    zs, zt = zs.reshape(4, 4), zt.reshape(4, 4)
    authors = reference.mld_authors(zs.float(), zt.float(), reduction="none")
    assert not torch.isfinite(authors).all(), "the authors' float32 form should break here"
    for reduction in ("batchmean", "none"):
        loss, grad = _grad(reference.mld, zs.float(), zt.float(), reduction)
        want_loss, want_grad = oracle.mld(zs.numpy(), zt.numpy(), reduction)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        assert rel_err(loss, want_loss) < 1e-5
        assert rel_err(grad, want_grad) < 1e-5


def test_mld_gradcheck():
    zs, zt = logits(3, 4, dtype=F64)
    zs.requires_grad_()
    assert torch.autograd.gradcheck(lambda z: reference.mld(z, zt, "batchmean", temperature=1.7), (zs,))


def test_mld_teacher_gets_no_gradient():
    zs, zt = logits(3, 4, dtype=F64)
    zt.requires_grad_()
    reference.mld(zs.requires_grad_(), zt).backward()
    assert zt.grad is None


# ---------------------------------------------------------------- BCE

def test_bce_matches_formula_and_authors_form():
    zs, _ = logits(6, 10, scale=5.0, dtype=F64)
    y = torch.rand(6, 10, generator=torch.Generator().manual_seed(3)) < 0.3
    loss, grad = _grad(reference.bce, zs, y)
    want_loss, want_grad = oracle.bce(zs.numpy(), y.numpy())
    assert rel_err(loss, want_loss) < 1e-12
    assert rel_err(grad, want_grad) < 1e-12
    assert rel_err(reference.bce_authors(zs, y), want_loss) < 1e-12


def test_bce_finite_for_huge_logits():
    zs = torch.tensor([[1e4, -1e4, 30.0, -30.0]])
    y = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    loss, grad = _grad(reference.bce, zs, y)
    want_loss, want_grad = oracle.bce(zs.double().numpy(), y.numpy())
    assert rel_err(loss, want_loss) < 1e-6 and rel_err(grad, want_grad) < 1e-6


# ---------------------------------------------------------------- LED

LED_FORMS = [reference.led_loops, reference.led_vectorized, reference.led_grouped]


@pytest.mark.parametrize("form", LED_FORMS)
@pytest.mark.parametrize("shape,density", [((6, 5, 7), 0.5), ((9, 4, 3), 0.8), ((16, 80, 12), None)])
def test_led_matches_formula(form, shape, density):
    es, et, y = embeddings(*shape, dtype=F64, density=density)
    x = es.clone().requires_grad_()
    total, cd, id_ = form(x, et, y, 3.0, 7.0, return_components=True)
    total.backward()
    want_total, want_cd, want_id, want_grad = oracle.led(es.numpy(), et.numpy(), y.numpy(), 3.0, 7.0)
    assert rel_err(total, want_total) < 1e-12
    assert rel_err(cd, want_cd) < 1e-12 and rel_err(id_, want_id) < 1e-12
    assert rel_err(x.grad, want_grad) < 1e-10


def test_led_hand_computed():
    # One CD group on a line: student at 0, 1, 3 (distances 1, 3, 2; mean 2), teacher at 0, 2, 4
    # (distances 2, 4, 2; mean 8/3). x = -1/4, 0, 1/4 on each unordered pair: loss = 4 (1/32) / 3.
    es = torch.tensor([[[0.0]], [[1.0]], [[3.0]]], dtype=F64)
    et = torch.tensor([[[0.0]], [[2.0]], [[4.0]]], dtype=F64)
    y = torch.ones(3, 1)
    for form in LED_FORMS:
        total, cd, id_ = form(es, et, y, 1.0, 1.0, return_components=True)
        assert cd.item() == pytest.approx(1 / 24, rel=1e-12)
        assert id_.item() == 0.0 and total.item() == pytest.approx(1 / 24, rel=1e-12)


@pytest.mark.parametrize("form", LED_FORMS)
def test_led_gradcheck(form):
    es, et, y = embeddings(5, 4, 3, dtype=F64, density=0.7, seed=2)
    es.requires_grad_()
    assert torch.autograd.gradcheck(lambda e: form(e, et, y, 2.0, 3.0), (es,))


def test_loops_equal_vectorized_on_coco_targets():
    es, et, y = embeddings(32, 80, 16, dtype=F64, seed=5)
    a, b = es.clone().requires_grad_(), es.clone().requires_grad_()
    la = reference.led_loops(a, et, y)
    lb = reference.led_vectorized(b, et, y)
    la.backward()
    lb.backward()
    assert rel_err(la, lb.item()) < 1e-12
    assert rel_err(a.grad, b.grad) < 1e-10


def _grad_pair(form_a, form_b, es, et, y):
    a, b = es.clone().requires_grad_(), es.clone().requires_grad_()
    la = form_a(a, et, y, 3.0, 7.0, return_components=True)
    lb = form_b(b, et, y, 3.0, 7.0, return_components=True)
    la[0].backward()
    lb[0].backward()
    return la, lb, a.grad, b.grad


@pytest.mark.parametrize("case", ["coco-rows", "every-size-class", "whole-batch-groups"])
def test_grouped_equals_vectorized(case):
    """led_grouped pads each group to its size class; every class boundary is crossed here."""
    if case == "coco-rows":
        es, et, y = embeddings(32, 80, 16, dtype=F64, seed=5)
    elif case == "every-size-class":
        # Label c has c + 2 positive images (sizes 2 to 41: classes 2-8, 10, 12, ..., 40, 48), and
        # image b is positive for its b % 7 + 2 first labels and for some of the rest.
        B, C = 41, 40
        y = torch.arange(B)[:, None] < torch.arange(C)[None, :] + 2
        y |= torch.arange(C)[None, :] < (torch.arange(B)[:, None] % 7 + 2)
        es, et, _ = embeddings(B, C, 6, dtype=F64, seed=3)
    else:
        # Groups as large as the batch (a padded size past N is cut to N) and as the label set.
        es, et, y = embeddings(9, 10, 5, dtype=F64, density=0.95, seed=4)
        y[:, 0] = True
        y[0, :] = True
    la, lb, ga, gb = _grad_pair(reference.led_vectorized, reference.led_grouped, es, et, y)
    for a, b in zip(la, lb):
        assert rel_err(b, a.item()) < 1e-12
    assert rel_err(gb, ga) < 1e-10


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 40), C=st.integers(1, 40), D=st.integers(1, 9),
       density=st.sampled_from([0.0, 0.1, 0.3, 0.6, 0.9, 1.0]), seed=st.integers(0, 2**16))
def test_grouped_matches_the_formula_on_random_shapes_and_targets(B, C, D, density, seed):
    es, et, y = embeddings(B, C, D, dtype=F64, density=density, seed=seed)
    x = es.clone().requires_grad_()
    total, cd, id_ = reference.led_grouped(x, et, y, 3.0, 7.0, return_components=True)
    total.backward()
    want_total, want_cd, want_id, want_grad = oracle.led(es.numpy(), et.numpy(), y.numpy(), 3.0, 7.0)
    for got, want in ((total, want_total), (cd, want_cd), (id_, want_id)):
        assert got.item() == want == 0 or rel_err(got, want) < 1e-11
    assert rel_err(x.grad, want_grad) < 1e-9 or not want_grad.any() and not x.grad.any()


# Ops whose result a GPU could only give by synchronizing with the host: outputs shaped by the data
# (nonzero, unique, masked_select, boolean-mask indexing) and scalar reads.
SYNCING = ("nonzero", "_local_scalar_dense", "unique", "masked_select", "repeat_interleave")


def _host_reads(log: OpLog) -> list:
    masked = [o.name for o in log.ops if o.name == "index" and any(dt == torch.bool for _, dt, _ in o.inputs[1:])]
    return masked + [o.name for o in log.ops if any(s in o.name for s in SYNCING)]


def test_vectorized_needs_no_host_read_and_grouped_reads_once(monkeypatch):
    """led_vectorized (the "torch" backend's form on GPUs) has no op a GPU would synchronize for,
    forward or backward; led_grouped's only host read is one ``tolist`` of its classes' sizes."""
    es, et, y = embeddings(16, 80, 8, seed=2)
    reads = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or real_tolist(t))
    for form, want_reads in ((reference.led_vectorized, 0), (reference.led_grouped, 1)):
        reads.clear()
        x = es.clone().requires_grad_()
        with OpLog() as log:
            form(x, et, y).backward()
        assert _host_reads(log) == [] and len(reads) == want_reads, (form.__name__, _host_reads(log), reads)


def test_grouped_memory_follows_the_groups_not_the_label_space():
    """At 4 images x 3,000 labels (5 positives each) led_vectorized forms a 4 x 3000 x 3000 relation
    tensor; led_grouped's largest tensor, forward and backward, is the size of the inputs."""
    B, C, D = 4, 3000, 8
    es, et, _ = embeddings(B, C, D, seed=1)
    y = torch.zeros(B, C, dtype=torch.bool)
    y[:, :5] = True  # five labels shared by every image: CD groups of 4, ID groups of 5
    y[torch.arange(B), 100 + torch.arange(B)] = True
    sizes = {}
    for form in (reference.led_grouped, reference.led_vectorized):
        x = es.clone().requires_grad_()
        with OpLog() as log:
            form(x, et, y).backward()
        sizes[form.__name__] = log.largest_output()
    assert sizes["led_grouped"] <= B * C * D
    assert sizes["led_vectorized"] >= B * C * C  # what the test tells apart


def _one_group(P, D, family, seed=0):
    """Embeddings holding exactly one group of P rows (CD: P instances of one label; ID: the reverse)."""
    shape = (P, 1, D) if family == "cd" else (1, P, D)
    g = torch.Generator().manual_seed(seed)
    es = torch.randn(*shape, generator=g, dtype=F64)
    et = torch.randn(*shape, generator=g, dtype=F64)
    return es, et, torch.ones(shape[:2])


@pytest.mark.parametrize("form", LED_FORMS)
@pytest.mark.parametrize("family", ["cd", "id"])
def test_group_of_two_gives_zero_and_zero_gradient(form, family):
    es, et, y = _one_group(2, 5, family)
    loss, grad = _grad(form, es, et, y)
    assert loss.item() == 0.0
    assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("form", LED_FORMS)
@pytest.mark.parametrize("family", ["cd", "id"])
def test_invariant_to_scaling_and_shifting_the_student_group(form, family):
    es, et, y = _one_group(6, 4, family)
    base = form(es, et, y).item()
    assert base > 0
    shift = torch.randn(4, generator=torch.Generator().manual_seed(9), dtype=F64)
    assert form(es * 3.7, et, y).item() == pytest.approx(base, rel=1e-10)
    assert form(es + shift, et, y).item() == pytest.approx(base, rel=1e-10)


@pytest.mark.parametrize("form", LED_FORMS)
def test_identical_student_and_teacher_give_zero(form):
    es, _, y = embeddings(8, 6, 5, dtype=F64, density=0.6)
    loss, grad = _grad(form, es, es, y)
    assert loss.item() == 0.0
    assert grad.abs().max().item() < 1e-12


@pytest.mark.parametrize("form", LED_FORMS)
def test_batch_permutation_changes_nothing(form):
    es, et, y = embeddings(10, 6, 5, dtype=F64, density=0.5)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(1))
    loss, grad = _grad(form, es, et, y)
    loss_p, grad_p = _grad(form, es[perm], et[perm], y[perm])
    assert loss_p.item() == pytest.approx(loss.item(), rel=1e-12)
    assert rel_err(grad_p, grad[perm]) < 1e-12


@pytest.mark.parametrize("form", LED_FORMS)
def test_no_group_of_two_gives_connected_zero(form):
    es, et, _ = embeddings(4, 3, 5, dtype=F64)
    y = torch.eye(4, 3)  # every label and every image has at most one positive
    loss, grad = _grad(form, es, et, y)
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("form", LED_FORMS)
def test_duplicate_rows_stay_finite(form):
    es, et, y = embeddings(6, 4, 5, dtype=torch.float32, density=1.0)
    es[1] = es[0]
    et[2] = et[0]
    loss, grad = _grad(form, es, et, y)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    want_total, _, _, want_grad = oracle.led(es.numpy(), et.numpy(), y.numpy())
    assert rel_err(loss, want_total) < 1e-4
    assert rel_err(grad, want_grad) < 1e-4


@pytest.mark.parametrize("form", LED_FORMS)
def test_nan_in_a_member_row_reaches_the_loss(form):
    es, et, y = embeddings(5, 4, 3, dtype=F64, density=1.0)
    es[2, 1, 0] = float("nan")
    assert torch.isnan(form(es, et, y))


def test_teacher_gets_no_gradient():
    es, et, y = embeddings(5, 4, 3, dtype=F64, density=0.7)
    et.requires_grad_()
    for form in LED_FORMS:
        form(es.requires_grad_(), et, y).backward()
        assert et.grad is None


def test_l2d_authors_objective():
    zs, zt = logits(6, 5, dtype=F64)
    es, et, y = embeddings(6, 5, 4, dtype=F64, density=0.6)
    got = reference.l2d_authors(zs, zt, es, et, y)
    want = oracle.bce(zs.numpy(), y.numpy())[0] + 10 * oracle.mld(zs.numpy(), zt.numpy())[0]
    want += oracle.led(es.numpy(), et.numpy(), y.numpy())[0]
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_targets_of_any_dtype_select_the_same_groups():
    es, et, y = embeddings(6, 5, 4, dtype=F64, density=0.5)
    want = reference.led_vectorized(es, et, y).item()
    for targets in (y.float(), y.long(), y.to(torch.uint8), y.double() * 0.9):
        assert reference.led_vectorized(es, et, targets).item() == pytest.approx(want, rel=1e-14)
    assert np.isfinite(want)
