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
