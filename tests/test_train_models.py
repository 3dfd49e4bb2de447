"""The networks of the training loop: shapes of their outputs and the label-wise head."""

import pytest
import torch

from l2d_kernels.train.models import RESNETS, LabelWiseHead, LabelWiseNet, parameter_count


@pytest.mark.parametrize("backbone", ["cnn-teacher", "cnn-student"])
def test_outputs(backbone):
    net = LabelWiseNet(backbone, num_labels=7, dim=16)
    emb, logits = net(torch.randn(3, 3, 32, 32))
    assert emb.shape == (3, 7, 16) and logits.shape == (3, 7)


def test_teacher_is_larger_than_student():
    teacher, student = LabelWiseNet("cnn-teacher", 20, 64), LabelWiseNet("cnn-student", 20, 64)
    assert parameter_count(teacher) > 10 * parameter_count(student)


def test_each_label_attends_over_space():
    head = LabelWiseHead(in_channels=5, num_labels=3, dim=8)
    features = torch.randn(2, 5, 4, 4, requires_grad=True)
    emb, logits = head(features)
    logits[0, 1].backward()
    # A label's logit depends on every position of its own image and on nothing of the other image.
    assert (features.grad[0].abs().sum(0) > 0).all() and features.grad[1].abs().sum() == 0


def test_unknown_backbone_is_refused():
    with pytest.raises(SystemExit, match="unknown backbone"):
        LabelWiseNet("vgg", 3, 8)


@pytest.mark.parametrize("name", RESNETS[:1])
def test_resnet_backbone(name):
    pytest.importorskip("torchvision")
    emb, logits = LabelWiseNet(name, 4, 8)(torch.randn(1, 3, 64, 64))
    assert emb.shape == (1, 4, 8) and logits.shape == (1, 4)


def test_labels_of_one_image_start_apart():
    # The query is part of each label's embedding, so LED's instance-aware groups (the labels of one
    # image) do not start as near-duplicate rows, whose normalized distances have huge gradients.
    torch.manual_seed(0)
    emb, _ = LabelWiseHead(in_channels=5, num_labels=6, dim=32)(torch.randn(4, 5, 4, 4))
    for image in emb:
        spread = torch.pdist(image).mean() / image.norm(dim=1).mean()
        assert spread > 0.5
