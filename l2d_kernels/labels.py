"""Realistic multi-label targets from real MS-COCO 2014 label rows (see data/README.md).

Tests, benchmarks and the demo draw targets here so that group sizes have the skew of real data:
most labels positive in a few images of a batch, "person" in about half of them.
"""

from __future__ import annotations

import functools
from importlib import resources

import numpy as np
import torch

COCO_LABELS = 80
ROWS_PER_IMAGE_ABOVE_COCO = 3


@functools.cache
def coco_label_rows() -> np.ndarray:
    """The shipped sample of MS-COCO 2014 val label rows, ``[4096, 80]`` bool."""
    with resources.files("l2d_kernels").joinpath("data/coco2014_val_labels_sample.npz").open("rb") as fh:
        packed = np.load(fh)
        return np.unpackbits(packed["labels"], axis=1)[:, : int(packed["n_classes"])].astype(bool)


def sample_targets(batch: int, labels: int = COCO_LABELS, seed: int = 0, device="cpu") -> torch.Tensor:
    """A ``[batch, labels]`` bool target matrix built from randomly drawn COCO images.

    Up to 80 labels: COCO rows, restricted to the first ``labels`` labels. Beyond 80 (label spaces
    such as OpenImages'): each image takes the positives of three COCO rows (8.7 labels on average),
    each row's 80 labels moved to a randomly chosen block of 80 among the ``labels``.
    """
    rows = coco_label_rows()
    rng = np.random.default_rng(seed)
    if labels <= COCO_LABELS:
        picked = rows[rng.integers(0, len(rows), batch), :labels]
        return torch.from_numpy(picked.copy()).to(device)
    out = np.zeros((batch, labels), dtype=bool)
    blocks = -(-labels // COCO_LABELS)
    for _ in range(ROWS_PER_IMAGE_ABOVE_COCO):
        picked = rows[rng.integers(0, len(rows), batch)]
        b, c = np.nonzero(picked)
        shifted = c + COCO_LABELS * rng.integers(0, blocks, batch)[b]
        keep = shifted < labels
        out[b[keep], shifted[keep]] = True
    return torch.from_numpy(out).to(device)
