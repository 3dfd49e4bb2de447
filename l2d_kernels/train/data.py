"""Data for the reference training loop.

- ``make_shapes``: the embedded default data set, drawn at run time (no download). Each 32 x 32
  image holds one to four shapes of five kinds (circle, square, triangle, cross, ring) in four
  colours (red, green, blue, yellow): a label is a (kind, colour) pair, 20 labels in all, so a model
  must bind shape to colour. Clutter makes it harder: shapes in other colours, line segments in any
  colour, a noisy gradient background, and overlaps that can hide a shape (a label counts only when
  enough of its shape stays visible).
- ``CocoStyleList``: a COCO-style annotation list, ``[{"file_name": ..., "labels": [...]}]`` (the
  format the L2D authors publish for MS-COCO), with images under a folder.
- ``Voc2007``: a Pascal VOC 2007 folder (``VOCdevkit/VOC2007`` with ``JPEGImages``,
  ``Annotations`` and ``ImageSets/Main``).

Every problem with the data stops with a ``DataError`` naming the file.
"""

from __future__ import annotations

import json
import pathlib
import xml.etree.ElementTree as ET

import numpy as np
import torch

SHAPE_KINDS = ("circle", "square", "triangle", "cross", "ring")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 225), "yellow": (230, 210, 40)}
DISTRACTOR_COLOURS = ((128, 128, 128), (150, 60, 170), (235, 235, 235), (40, 200, 200))
SHAPE_LABELS = [f"{colour} {kind}" for kind in SHAPE_KINDS for colour in COLOURS]
IMAGE_SIZE = 32
MIN_VISIBLE = 0.4

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


class DataError(ValueError):
    """A data folder, annotation file or image that cannot be used; the message names it."""


def _shape_mask(kind: str, yy, xx, cy, cx, r):
    dy, dx = yy - cy, xx - cx
    if kind == "circle":
        return dy * dy + dx * dx <= r * r
    if kind == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if kind == "triangle":
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) * 0.55)
    if kind == "cross":
        arm = max(r / 3, 1.0)
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    if kind == "ring":
        d2 = dy * dy + dx * dx
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    raise ValueError(kind)


def _draw_image(rng: np.random.Generator):
    size = IMAGE_SIZE
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = rng.uniform(0, 70, size=3)
    slope = rng.uniform(-1.2, 1.2, size=(3, 2))
    image = base[:, None, None] + slope[:, 0, None, None] * yy + slope[:, 1, None, None] * xx
    image = image + rng.normal(0, 14, size=(3, size, size))
    owner = np.full((size, size), -1)

    def paint(mask, colour):
        jitter = rng.normal(0, 18, size=3)
        for ch in range(3):
            image[ch][mask] = colour[ch] + jitter[ch] + rng.normal(0, 8, size=int(mask.sum()))

    for _ in range(rng.integers(1, 4)):  # line segments, in any colour, labels' colours included
        colour = list(COLOURS.values())[rng.integers(0, 4)] if rng.random() < 0.5 else DISTRACTOR_COLOURS[rng.integers(0, 4)]
        y0, x0, y1, x1 = rng.uniform(0, size, 4)
        t = np.linspace(0, 1, 48)
        ys, xs = np.clip((y0 + t * (y1 - y0)).astype(int), 0, size - 1), np.clip((x0 + t * (x1 - x0)).astype(int), 0, size - 1)
        line = np.zeros((size, size), bool)
        line[ys, xs] = True
        paint(line, colour)
    for _ in range(rng.integers(0, 3)):  # shapes in colours that are not labels
        r = rng.uniform(3.5, 7.5)
        mask = _shape_mask(SHAPE_KINDS[rng.integers(0, 5)], yy, xx, rng.uniform(r, size - r), rng.uniform(r, size - r), r)
        paint(mask, DISTRACTOR_COLOURS[rng.integers(0, 4)])
        owner[mask] = -1

    n_objects = rng.choice([1, 2, 3, 4], p=[0.3, 0.35, 0.25, 0.1])
    areas = []
    for k in range(n_objects):
        label = int(rng.integers(0, len(SHAPE_LABELS)))
        kind, colour = SHAPE_KINDS[label // 4], list(COLOURS.values())[label % 4]
        r = rng.uniform(3.5, 8.0)
        mask = _shape_mask(kind, yy, xx, rng.uniform(r, size - r), rng.uniform(r, size - r), r)
        paint(mask, colour)
        owner[mask] = k
        areas.append((label, int(mask.sum())))
    labels = np.zeros(len(SHAPE_LABELS), bool)
    for k, (label, area) in enumerate(areas):
        if area > 0 and (owner == k).sum() >= MIN_VISIBLE * area:
            labels[label] = True
    return np.clip(image, 0, 255).astype(np.uint8), labels


def make_shapes(n_images: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_images`` images (uint8 ``[N, 3, 32, 32]``) and their labels (bool ``[N, 20]``), reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    images = np.empty((n_images, 3, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    labels = np.zeros((n_images, len(SHAPE_LABELS)), bool)
    for i in range(n_images):
        images[i], labels[i] = _draw_image(rng)
    return torch.from_numpy(images), torch.from_numpy(labels)


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """0..255 pixel values (any dtype) as float32 in [-1, 1], the range every model here reads."""
    return pixels.float() / 127.5 - 1


class TensorImages(torch.utils.data.Dataset):
    """Images held in memory as uint8, normalized on access, with horizontal flips when training.

    ``teacher_outputs``, when set (``(embeddings [N, 2, C, D], logits [N, 2, C])``, index 1 of the
    second axis for the flipped image), makes each item ``(image, label, embeddings, logits)``: a
    frozen teacher's outputs for the image as it is returned, so that distillation need not run
    the teacher at every step.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, train: bool):
        self.images, self.labels, self.train = images, labels, train
        self.teacher_outputs = None

    def __len__(self):
        return len(self.images)

    def normalized(self, start: int, stop: int) -> torch.Tensor:
        return to_unit_range(self.images[start:stop])

    def __getitem__(self, i):
        image = to_unit_range(self.images[i])
        flipped = bool(self.train and torch.rand(()) < 0.5)
        if flipped:
            image = image.flip(-1)
        if self.teacher_outputs is None:
            return image, self.labels[i].float()
        embeddings, logits = self.teacher_outputs
        return image, self.labels[i].float(), embeddings[i, int(flipped)], logits[i, int(flipped)]


def _open_image(path: pathlib.Path, size: int, train: bool) -> torch.Tensor:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as err:
        raise DataError("reading images needs Pillow: pip install pillow") from err
    try:
        with Image.open(path) as img:
            img = img.convert("RGB").resize((size, size), Image.BILINEAR)
            array = np.asarray(img, dtype=np.float32)
    except FileNotFoundError as err:
        raise DataError(f"image file not found: {path}") from err
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"cannot read image {path}: {err}") from err
    image = to_unit_range(torch.from_numpy(array).permute(2, 0, 1))
    if train and torch.rand(()) < 0.5:
        image = image.flip(-1)
    return image


class CocoStyleList(torch.utils.data.Dataset):
    """Images listed in a JSON annotation file ``[{"file_name": str, "labels": [int, ...]}, ...]``."""

    def __init__(self, annotation_file, image_dir, num_classes: int, image_size: int, train: bool):
        self.annotation_file = pathlib.Path(annotation_file)
        self.image_dir = pathlib.Path(image_dir)
        self.image_size, self.train, self.num_classes = image_size, train, num_classes
        if not self.annotation_file.is_file():
            raise DataError(f"annotation file not found: {self.annotation_file}")
        if not self.image_dir.is_dir():
            raise DataError(f"image folder not found: {self.image_dir}")
        try:
            entries = json.loads(self.annotation_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"malformed annotation file {self.annotation_file}: {err}") from err
        if not isinstance(entries, list) or not entries:
            raise DataError(f"malformed annotation file {self.annotation_file}: expected a non-empty JSON list")
        self.items = []
        for k, entry in enumerate(entries):
            if not (isinstance(entry, dict) and isinstance(entry.get("file_name"), str)
                    and isinstance(entry.get("labels"), list)
                    and all(isinstance(v, int) and not isinstance(v, bool) for v in entry["labels"])):
                raise DataError(f"malformed annotation file {self.annotation_file}: entry {k} needs "
                                '{"file_name": str, "labels": [int, ...]}')
            bad = [v for v in entry["labels"] if not 0 <= v < num_classes]
            if bad:
                raise DataError(f"label index {bad[0]} out of range [0, {num_classes}) in {self.annotation_file}, "
                                f"entry {k} ({entry['file_name']})")
            self.items.append((entry["file_name"], entry["labels"]))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        name, labels = self.items[i]
        target = torch.zeros(self.num_classes)
        target[labels] = 1.0
        return _open_image(self.image_dir / name, self.image_size, self.train), target


class Voc2007(torch.utils.data.Dataset):
    """Pascal VOC 2007: labels from the XML annotations; objects marked difficult are left out."""

    def __init__(self, root, split: str, image_size: int, train: bool):
        self.root = pathlib.Path(root)
        self.image_size, self.train = image_size, train
        ids_file = self.root / "ImageSets" / "Main" / f"{split}.txt"
        if not self.root.is_dir():
            raise DataError(f"VOC folder not found: {self.root}")
        if not ids_file.is_file():
            raise DataError(f"VOC split file not found: {ids_file}")
        self.items = []
        for image_id in ids_file.read_text().split():
            xml_path = self.root / "Annotations" / f"{image_id}.xml"
            try:
                tree = ET.parse(xml_path)
            except FileNotFoundError as err:
                raise DataError(f"VOC annotation not found: {xml_path}") from err
            except ET.ParseError as err:
                raise DataError(f"malformed VOC annotation {xml_path}: {err}") from err
            labels = set()
            for obj in tree.getroot().iter("object"):
                name = (obj.findtext("name") or "").strip()
                if name not in VOC_CLASSES:
                    raise DataError(f"unknown VOC class {name!r} in {xml_path}")
                if (obj.findtext("difficult") or "0").strip() != "1":
                    labels.add(VOC_CLASSES.index(name))
            self.items.append((image_id, sorted(labels)))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        image_id, labels = self.items[i]
        target = torch.zeros(len(VOC_CLASSES))
        target[labels] = 1.0
        path = self.root / "JPEGImages" / f"{image_id}.jpg"
        return _open_image(path, self.image_size, self.train), target


def load_datasets(kind: str, root, image_size: int, seed: int, n_train: int, n_val: int):
    """(train set, held-out set, label names) for ``kind`` in ``shapes``, ``coco``, ``voc``."""
    if kind == "shapes":
        images, labels = make_shapes(n_train + n_val, seed=10_000 + seed)
        return (TensorImages(images[:n_train], labels[:n_train], train=True),
                TensorImages(images[n_train:], labels[n_train:], train=False), SHAPE_LABELS)
    if root is None:
        raise DataError(f"--data {kind} needs --data-root")
    root = pathlib.Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    if kind == "coco":
        names = [f"label {i}" for i in range(80)]
        return (CocoStyleList(root / "train_anno.json", root / "train2014", 80, image_size, train=True),
                CocoStyleList(root / "val_anno.json", root / "val2014", 80, image_size, train=False), names)
    if kind == "voc":
        return (Voc2007(root / "VOCtrainval2007" / "VOCdevkit" / "VOC2007", "trainval", image_size, train=True),
                Voc2007(root / "VOCtest2007" / "VOCdevkit" / "VOC2007", "test", image_size, train=False),
                list(VOC_CLASSES))
    raise DataError(f"unknown data set {kind!r}: use shapes, coco or voc")


def label_statistics(labels: torch.Tensor) -> str:
    per_image = labels.float().sum(1)
    return (f"{len(labels)} images, {per_image.mean():.2f} labels per image (max {int(per_image.max())}), "
            f"rarest label in {labels.float().mean(0).min():.1%} of images")

