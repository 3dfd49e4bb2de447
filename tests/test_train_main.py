"""python -m l2d_kernels.train end to end: the quick run, determinism, checkpoints, real-data
fixtures, bad input, and two gloo processes under torchrun."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from l2d_kernels.train.__main__ import main
from l2d_kernels.train.loop import atomic_save

TINY = ["--train-images", "256", "--val-images", "128", "--teacher-epochs", "1", "--student-epochs", "1",
        "--batch-size", "32"]


def test_help(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_quick_run_writes_results_and_is_reproducible(tmp_path, capsys):
    main(["--quick", "--out", str(tmp_path / "a")])
    table = capsys.readouterr().out
    assert "student, BCE + L2D" in table and "mAP" in table
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    for key in ("teacher_map", "vanilla_map", "l2d_map"):
        assert 0 < results[key] <= 1
    assert results["precision"] == "float32"  # bf16 autocast only on a GPU
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["model"] for r in log] == ["teacher"] * 2 + ["vanilla"] * 2 + ["l2d"] * 2
    for name in ("teacher", "vanilla", "l2d"):
        checkpoint = torch.load(tmp_path / "a" / f"{name}.pt")
        assert checkpoint["epoch"] == 2 and "head.queries" in checkpoint["model"]
    assert not list((tmp_path / "a").glob(".*tmp*"))

    main(["--quick", "--out", str(tmp_path / "b")])
    again = json.loads((tmp_path / "b" / "results.json").read_text())
    assert again["models"] == results["models"]

    # Reusing the teacher changes nothing for the students: each model's data order restarts from the seed.
    main(["--quick", "--out", str(tmp_path / "c"), "--teacher-checkpoint", str(tmp_path / "a" / "teacher.pt")])
    reused = json.loads((tmp_path / "c" / "results.json").read_text())
    assert reused["models"] == results["models"]


def test_atomic_save_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "model.pt"
    atomic_save({"epoch": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"epoch": 2, "x": Unpicklable()}, path)
    assert torch.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def _coco_fixture(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train2014", 12), ("val2014", 6)):
        (root / split).mkdir(parents=True)
        entries = []
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / split / f"{i}.jpg")
            entries.append({"file_name": f"{i}.jpg", "labels": sorted({int(i % 80), int((3 * i) % 80)})})
        (root / f"{split[:-4]}_anno.json").write_text(json.dumps(entries))


def test_real_data_fixture_trains(tmp_path, capsys):
    pytest.importorskip("PIL")
    _coco_fixture(tmp_path / "coco")
    main(["--data", "coco", "--data-root", str(tmp_path / "coco"), "--image-size", "32", "--out",
          str(tmp_path / "run"), "--teacher-epochs", "1", "--student-epochs", "1", "--batch-size", "4"])
    assert json.loads((tmp_path / "run" / "results.json").read_text())["models"]["l2d"]["parameters"] > 0


def test_bad_data_stops_with_the_file_named(tmp_path):
    pytest.importorskip("PIL")
    _coco_fixture(tmp_path / "coco")
    (tmp_path / "coco" / "val_anno.json").write_text('[{"file_name": "0.jpg", "labels": [123]}]')
    with pytest.raises(SystemExit, match=r"label index 123 out of range .*val_anno.json"):
        main(["--data", "coco", "--data-root", str(tmp_path / "coco"), "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit, match="data folder not found"):
        main(["--data", "voc", "--data-root", str(tmp_path / "missing"), "--out", str(tmp_path / "run")])


def test_two_gloo_processes_under_torchrun(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "l2d_kernels.train", "--out", str(tmp_path), *TINY]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["world_size"] == 2 and 0 < results["l2d_map"] <= 1


def test_cached_teacher_outputs_are_the_teachers_on_the_returned_image():
    from l2d_kernels.train.data import TensorImages, make_shapes
    from l2d_kernels.train.loop import cache_teacher_outputs
    from l2d_kernels.train.models import LabelWiseNet

    images, labels = make_shapes(40, seed=1)
    dataset = TensorImages(images, labels, train=True)
    teacher = LabelWiseNet("cnn-student", 20, 8).eval()
    cache_teacher_outputs(teacher, dataset, torch.device("cpu"), batch=16)
    torch.manual_seed(0)
    flips = 0
    for i in range(len(dataset)):
        image, label, emb, logits = dataset[i]
        flips += not torch.equal(image, images[i].float() / 127.5 - 1)
        with torch.no_grad():
            t_emb, t_logits = teacher(image[None])
        torch.testing.assert_close(emb, t_emb[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, t_logits[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(label, labels[i].float())
    assert 0 < flips < len(dataset)  # both orientations were looked up
