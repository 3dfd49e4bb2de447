"""The distillation probe on a few images against an untrained teacher."""

import json

import pytest
import torch

import distill_probe
from l2d_kernels.train.models import LabelWiseNet


@pytest.mark.parametrize("objective", ["bce", "l2d", "cd"])
def test_probe_records_what_it_measured(tmp_path, objective):
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pt"
    torch.save({"model": LabelWiseNet("cnn-teacher", 20, 8).state_dict()}, teacher)
    log = tmp_path / "probe.jsonl"
    args = distill_probe.parse_args(["--teacher", str(teacher), "--objective", objective, "--epochs", "2",
                                     "--train-images", "128", "--val-images", "128", "--json", str(log)])
    record = distill_probe.run(args)
    assert json.loads(log.read_text()) == json.loads(json.dumps(record))
    assert record["dim"] == 8 and len(record["held_out"]) == 2 and 0 <= record["mAP"] <= 1
    assert len(record["grad_norms"]) == 2
    for norms in record["grad_norms"]:
        assert set(norms) == {"bce", "10 mld", "100 cd", "1000 id"} and all(v > 0 for v in norms.values())
    assert all(h["cd"] >= 0 and h["id"] >= 0 and h["mld"] >= 0 for h in record["held_out"])


def _teacher(path, dim=8, seed=0):
    torch.manual_seed(seed)
    torch.save({"model": LabelWiseNet("cnn-teacher", 20, dim).state_dict()}, path)
    return path


def test_probe_with_other_weights_and_augmentation(tmp_path):
    teacher = _teacher(tmp_path / "teacher.pt")
    args = distill_probe.parse_args(["--teacher", str(teacher), "--epochs", "1", "--train-images", "128",
                                     "--val-images", "128", "--lambda-cd", "1", "--lambda-id", "10",
                                     "--augment", "flip+cutout", "--cutout", "8"])
    record = distill_probe.run(args)
    assert (record["lambda_mld"], record["lambda_cd"], record["lambda_id"]) == (10.0, 1.0, 10.0)
    assert record["augment"] == "flip+cutout" and record["cutout"] == 8 and 0 <= record["mAP"] <= 1


def test_augment_flips_and_paints_one_square():
    x = torch.linspace(-1, 1, 2 * 3 * 8 * 8).reshape(2, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    flipped = distill_probe.augment(x, "flip", 4, g)
    for i in range(2):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))
    cut = distill_probe.augment(x, "flip+cutout", 4, torch.Generator().manual_seed(1))
    for i in range(2):
        changed = (cut[i] != x[i]) & (cut[i] != x[i].flip(-1))
        painted = changed.any(0)
        assert painted.any() and painted.sum() <= 5 * 5  # one square of side <= cutout + 1, clipped
        colour = cut[i][:, painted]
        assert torch.equal(colour, colour[:, :1].expand_as(colour))  # one colour


def test_agreement_of_a_teacher_with_itself_is_zero(tmp_path):
    teacher = _teacher(tmp_path / "teacher.pt", dim=64)
    args = distill_probe.parse_args(["--teacher", str(teacher), "--agreement", str(teacher),
                                     "--train-images", "64", "--val-images", "128"])
    record = distill_probe.run(args)
    assert record["teachers_cd"] < 1e-4 and record["teachers_id"] < 1e-4
    assert record["equidistant_cd"] > 0 and record["equidistant_id"] > 0
