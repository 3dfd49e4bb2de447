"""Teacher and student networks with a label-wise embedding head.

A backbone turns an image into a grid of features; ``LabelWiseHead`` gives every label a learned
query that attends over that grid (a single-head, single-layer decoder in the manner of
Query2Label / ML-Decoder), returning one embedding per label, ``[B, C, D]``, and from each
embedding the label's logit, ``[B, C]``. L2D distills both: MLD on the logits, LED on the
embeddings (which is why teacher and student share ``D``).

As in a transformer decoder layer (and ML-Decoder, whose output the L2D authors distill), the query
is added back to what it gathered and the result layer-normed: ``h = LN(q_c + attend(q_c))``, then
``h = LN(h + MLP(h))``; the classifier and LED both read ``h``. Without the query in the sum, the
labels of one image would all be averages of the same feature grid, nearly equal at the start of
training: LED's instance-aware groups would then compare near-duplicate rows, whose normalized
distances have gradients as large as the reciprocal of their spread (measured: 100 times BCE's).
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Channels per stage of the small CNN backbones; "max" marks a 2 x 2 max-pool.
CNN_BACKBONES = {
    "cnn-teacher": [48, 48, "max", 96, 96, "max", 192, 192],
    "cnn-student": [16, "max", 24, "max", 32],
}
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")


def cnn_backbone(stages) -> tuple[nn.Module, int]:
    layers, channels = [], 3
    for stage in stages:
        if stage == "max":
            layers.append(nn.MaxPool2d(2))
            continue
        layers += [nn.Conv2d(channels, stage, 3, padding=1, bias=False), nn.BatchNorm2d(stage), nn.ReLU(inplace=True)]
        channels = stage
    return nn.Sequential(*layers), channels


def resnet_backbone(name: str) -> tuple[nn.Module, int]:
    try:
        import torchvision
    except ImportError as err:
        raise SystemExit(f"backbone {name} needs torchvision: pip install torchvision") from err
    net = getattr(torchvision.models, name)(weights=None)
    channels = net.fc.in_features
    return nn.Sequential(*list(net.children())[:-2]), channels


class LabelWiseHead(nn.Module):
    """Label queries attending over a feature grid: ``[B, K, H, W] -> ([B, C, D] embeddings, [B, C] logits)``."""

    def __init__(self, in_channels: int, num_labels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, 1)
        self.norm_kv = nn.LayerNorm(dim)
        self.queries = nn.Parameter(torch.randn(num_labels, dim))
        self.norm_attn = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm_out = nn.LayerNorm(dim)
        self.classifier_weight = nn.Parameter(torch.randn(num_labels, dim) / math.sqrt(dim))
        self.classifier_bias = nn.Parameter(torch.zeros(num_labels))

    def forward(self, features: torch.Tensor):
        tokens = self.norm_kv(self.proj(features).flatten(2).transpose(1, 2))  # [B, HW, D]
        attention = torch.softmax(self.queries @ tokens.transpose(1, 2) / math.sqrt(tokens.shape[-1]), dim=-1)
        embeddings = self.norm_attn(self.queries + attention @ tokens)  # [B, C, D]
        embeddings = self.norm_out(embeddings + self.mlp(embeddings))
        logits = (embeddings * self.classifier_weight).sum(-1) + self.classifier_bias
        return embeddings, logits


class LabelWiseNet(nn.Module):
    def __init__(self, backbone: str, num_labels: int, dim: int):
        super().__init__()
        if backbone in CNN_BACKBONES:
            self.backbone, channels = cnn_backbone(CNN_BACKBONES[backbone])
        elif backbone in RESNETS:
            self.backbone, channels = resnet_backbone(backbone)
        else:
            raise SystemExit(f"unknown backbone {backbone!r}: use one of {sorted(CNN_BACKBONES) + list(RESNETS)}")
        self.head = LabelWiseHead(channels, num_labels, dim)

    def forward(self, images: torch.Tensor):
        """Returns (label-wise embeddings ``[B, C, D]``, logits ``[B, C]``)."""
        return self.head(self.backbone(images))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
