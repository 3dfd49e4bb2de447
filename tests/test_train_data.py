"""Data of the training loop: the embedded shapes set, COCO-style lists, VOC 2007, and bad data."""

import json

import numpy as np
import pytest
import torch

from l2d_kernels.train.data import (
    SHAPE_LABELS,
    VOC_CLASSES,
    CocoStyleList,
    DataError,
    Voc2007,
    load_datasets,
    make_shapes,
)

PIL = pytest.importorskip("PIL.Image")


def test_shapes_are_reproducible_and_multi_label():
    images, labels = make_shapes(300, seed=3)
    again, labels_again = make_shapes(300, seed=3)
    assert images.shape == (300, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (300, len(SHAPE_LABELS)) == labels_again.shape
    assert torch.equal(images, again) and torch.equal(labels, labels_again)
    per_image = labels.sum(1).float()
    assert per_image.mean() > 1.5 and per_image.max() >= 3
    assert (labels.sum(0) > 0).all(), "every label occurs"
    assert not torch.equal(make_shapes(10, seed=4)[0], images[:10])


def _png(path, colour):
    PIL.fromarray(np.full((20, 24, 3), colour, np.uint8)).save(path)


@pytest.fixture
def coco_dir(tmp_path):
    for split, files in (("train2014", ["a.png", "b.png", "c.png"]), ("val2014", ["d.png", "e.png"])):
        (tmp_path / split).mkdir()
        for k, name in enumerate(files):
            _png(tmp_path / split / name, (40 * k, 100, 200))
    (tmp_path / "train_anno.json").write_text(json.dumps(
        [{"file_name": "a.png", "labels": [0, 5]}, {"file_name": "b.png", "labels": [79]},
         {"file_name": "c.png", "labels": []}]))
    (tmp_path / "val_anno.json").write_text(json.dumps(
        [{"file_name": "d.png", "labels": [1]}, {"file_name": "e.png", "labels": [0, 1]}]))
    return tmp_path


def test_coco_style_list(coco_dir):
    train, val, names = load_datasets("coco", coco_dir, image_size=16, seed=0, n_train=0, n_val=0)
    assert len(train) == 3 and len(val) == 2 and len(names) == 80
    image, target = train[0]
    assert image.shape == (3, 16, 16) and -1 <= image.min() and image.max() <= 1
    assert target.nonzero().flatten().tolist() == [0, 5]


@pytest.mark.parametrize("content,needle", [
    ("{not json", "malformed annotation file"),
    ('{"file_name": "a.png"}', "expected a non-empty JSON list"),
    ('[{"file_name": "a.png", "labels": "0"}]', "entry 0 needs"),
    ('[{"file_name": "a.png", "labels": [80]}]', "label index 80 out of range"),
])
def test_bad_annotation_files_are_named(coco_dir, content, needle):
    (coco_dir / "train_anno.json").write_text(content)
    with pytest.raises(DataError, match=needle) as err:
        load_datasets("coco", coco_dir, 16, 0, 0, 0)
    assert "train_anno.json" in str(err.value)


def test_missing_and_unreadable_images_are_named(coco_dir):
    (coco_dir / "train2014" / "b.png").write_bytes(b"not an image at all")
    (coco_dir / "train2014" / "c.png").unlink()
    train, _, _ = load_datasets("coco", coco_dir, 16, 0, 0, 0)
    with pytest.raises(DataError, match="cannot read image .*b.png"):
        train[1]
    with pytest.raises(DataError, match="image file not found: .*c.png"):
        train[2]


def test_missing_folders_are_named(tmp_path):
    with pytest.raises(DataError, match="data folder not found: .*nowhere"):
        load_datasets("coco", tmp_path / "nowhere", 16, 0, 0, 0)
    with pytest.raises(DataError, match="needs --data-root"):
        load_datasets("voc", None, 16, 0, 0, 0)
    with pytest.raises(DataError, match="annotation file not found"):
        CocoStyleList(tmp_path / "x.json", tmp_path, 80, 16, train=True)


def _voc(root, split, images):
    base = root / ("VOCtrainval2007" if split == "trainval" else "VOCtest2007") / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for image_id, objects in images.items():
        PIL.fromarray(np.zeros((10, 10, 3), np.uint8)).save(base / "JPEGImages" / f"{image_id}.jpg")
        body = "".join(f"<object><name>{n}</name><difficult>{d}</difficult></object>" for n, d in objects)
        (base / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{body}</annotation>")
    (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(images) + "\n")
    return base


def test_voc_2007(tmp_path):
    _voc(tmp_path, "trainval", {"000005": [("chair", 0), ("person", 1)], "000007": [("car", 0), ("car", 0)]})
    _voc(tmp_path, "test", {"000001": [("dog", 0), ("person", 0)]})
    train, val, names = load_datasets("voc", tmp_path, 8, 0, 0, 0)
    assert names == list(VOC_CLASSES) and len(train) == 2 and len(val) == 1
    assert train[0][1].nonzero().flatten().tolist() == [VOC_CLASSES.index("chair")]  # the person is difficult
    assert val[0][1].nonzero().flatten().tolist() == sorted([VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")])


def test_voc_bad_annotation_is_named(tmp_path):
    base = _voc(tmp_path, "trainval", {"000005": [("chair", 0)]})
    (base / "Annotations" / "000005.xml").write_text("<annotation><object>")
    with pytest.raises(DataError, match="malformed VOC annotation .*000005.xml"):
        Voc2007(base, "trainval", 8, train=True)
    (base / "Annotations" / "000005.xml").write_text("<annotation><object><name>unicorn</name></object></annotation>")
    with pytest.raises(DataError, match="unknown VOC class 'unicorn'"):
        Voc2007(base, "trainval", 8, train=True)
