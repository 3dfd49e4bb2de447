"""mAP, CF1 and OF1 of the training loop against hand-computed values and a plain loop."""

import pytest
import torch

from l2d_kernels.train.metrics import average_precision, evaluate


def test_average_precision_by_hand():
    scores = torch.tensor([[0.9], [0.8], [0.7], [0.6]])
    positives = torch.tensor([[True], [False], [True], [False]])
    # Positives at ranks 1 and 3: precisions 1/1 and 2/3.
    assert average_precision(scores, positives).item() == pytest.approx((1 + 2 / 3) / 2)


def test_average_precision_matches_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(50, 6, generator=g)
    positives = torch.rand(50, 6, generator=g) < 0.3
    got = average_precision(scores, positives)
    for c in range(6):
        order = sorted(range(50), key=lambda i: -scores[i, c].item())
        hits, precisions = 0, []
        for rank, i in enumerate(order, 1):
            if positives[i, c]:
                hits += 1
                precisions.append(hits / rank)
        assert got[c].item() == pytest.approx(sum(precisions) / len(precisions))


def test_perfect_scores_give_one_everywhere():
    targets = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0]], dtype=torch.bool)
    metrics = evaluate(targets.float() + 0.1 * torch.rand(3, 3), targets)
    assert all(metrics[k] == pytest.approx(1.0) for k in ("mAP", "CF1", "OF1", "CP", "CR", "OP", "OR"))


def test_top_k_prediction_by_hand():
    # Image 0 has 1 true label and predicts its top 1 (label 1: wrong); image 1 has 2 and predicts
    # labels 0 and 2 (one right).
    scores = torch.tensor([[0.2, 0.9, 0.1], [0.8, 0.1, 0.7]])
    targets = torch.tensor([[True, False, False], [True, True, False]])
    m = evaluate(scores, targets)
    assert m["OP"] == pytest.approx(1 / 3) and m["OR"] == pytest.approx(1 / 3)
    # Per label: label 0 TP 1 / predicted 1 / true 2; label 1: 0 / 1 / 1; label 2: 0 / 1 / 0.
    assert m["CP"] == pytest.approx((1 + 0 + 0) / 3)
    assert m["CR"] == pytest.approx((0.5 + 0) / 2)
    assert m["CF1"] == pytest.approx(2 * (1 / 3) * 0.25 / (1 / 3 + 0.25))
