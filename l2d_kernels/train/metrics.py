"""Multi-label evaluation as in the L2D paper: mAP, and CF1 / OF1 with top-k prediction.

- mAP: the mean over labels (those with at least one positive) of the average precision of the
  label's scores over the images: the mean, over its positive images, of the precision among the
  images scored at least as high.
- Top-k prediction: each image predicts its k highest-scoring labels, k being its number of true
  labels. CP / CR are precision and recall per label, averaged over labels (a label never predicted
  has precision 0); CF1 = 2 CP CR / (CP + CR). OP / OR pool all labels; OF1 = 2 OP OR / (OP + OR).
"""

from __future__ import annotations

import torch


def average_precision(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """AP of each column: ``scores`` and ``positives`` are ``[N, C]``; returns ``[C]`` (NaN without positives)."""
    order = scores.argsort(dim=0, descending=True, stable=True)
    hits = positives.gather(0, order).double()
    ranks = torch.arange(1, len(scores) + 1, dtype=torch.float64)[:, None]
    precision_at_hit = hits.cumsum(0) / ranks * hits
    return precision_at_hit.sum(0) / hits.sum(0)


def evaluate(scores: torch.Tensor, targets: torch.Tensor) -> dict:
    """mAP, CP, CR, CF1, OP, OR, OF1 (as fractions) of ``scores`` against bool ``targets``, both ``[N, C]``."""
    targets = targets.bool()
    ap = average_precision(scores.double(), targets)
    k = targets.sum(1)
    rank = scores.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    predicted = rank < k[:, None]
    tp = (predicted & targets).sum(0).double()
    n_pred = predicted.sum(0).double()
    n_true = targets.sum(0).double()
    cp = torch.where(n_pred > 0, tp / n_pred.clamp(min=1), 0.0).mean()
    cr = torch.where(n_true > 0, tp / n_true.clamp(min=1), 0.0)[n_true > 0].mean()
    op = tp.sum() / n_pred.sum().clamp(min=1)
    or_ = tp.sum() / n_true.sum().clamp(min=1)

    def f1(p, r):
        return (2 * p * r / (p + r)).item() if p + r > 0 else 0.0

    return dict(mAP=ap[~ap.isnan()].mean().item(), CP=cp.item(), CR=cr.item(), CF1=f1(cp, cr),
                OP=op.item(), OR=or_.item(), OF1=f1(op, or_))
