"""COCO-format detection dataset (spec §5) over pycocotools, with up-front validation.

A sample is ``(image, target)``; before transforms ``image`` is a PIL RGB image and the target
holds (n = kept annotations of the image, in file order):
  boxes (n, 4) float32 absolute xyxy pixels, clamped to the image; labels (n,) int64 raw
  category ids; image_id int64 scalar; area (n,) float32 (the annotation's ``area``);
  iscrowd (n,) int64 (all 0); orig_size (2,) int64 (h, w); size (2,) int64 (h, w).
The default transforms (:func:`make_transforms`) turn the image into a normalised
(3, H, W) tensor and the boxes into normalised cxcywh (see transforms.py).

Annotations with ``iscrowd = 1`` are removed from the targets (they stay in ``.coco`` for
evaluation). Boxes are converted xywh -> xyxy and clamped to the image; boxes with
x2 <= x1 or y2 <= y1 (zero size, or outside the image) are dropped and counted in
``.num_degenerate`` (one log line per dataset); a negative width or height is an error.
Image files are checked to exist when the dataset is built, and decoded when loaded.
Orientation: an image whose EXIF tag rotates it by 90 degrees is turned upright when the
annotation file's width x height is the upright size (annotation tools that show photos
upright write that), and used as stored otherwise (as COCO's own files are).
"""
import contextlib
import io
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from pycocotools.coco import COCO

from .errors import DatasetError
from .transforms import DEFAULT_EVAL_SIZE, DEFAULT_MAX_SIZE, DEFAULT_TRAIN_SIZES, \
    make_transforms

logger = logging.getLogger(__name__)

LAYOUT = "expected COCO layout: train2017/, val2017/, annotations/instances_{train,val}2017.json"


def _one_line(text, limit=120):
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def load_coco_json(ann_file):
    """Read and validate a COCO instances file; returns the dict (missing optional fields
    filled: annotation ``iscrowd`` = 0, ``area`` = bbox w*h). Raises DatasetError."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise DatasetError(f"{ann_file}: annotation file not found ({LAYOUT})")
    try:
        with open(ann_file, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{ann_file}: invalid JSON: {e.msg} at line {e.lineno} "
                           f"column {e.colno}") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise DatasetError(f"{ann_file}: invalid JSON: {_one_line(e)}") from None
    except OSError as e:
        raise DatasetError(f"{ann_file}: cannot read: {e.strerror or _one_line(e)}") from None
    _validate(data, ann_file)
    return data


def _validate(data, ann_file):
    def fail(msg):
        raise DatasetError(f"{ann_file}: {msg}")

    if not isinstance(data, dict):
        fail(f"top level must be a JSON object with 'images', 'annotations' and "
             f"'categories', got {type(data).__name__}")
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        fail(f"missing key(s) {', '.join(repr(k) for k in missing)} (a COCO instances file "
             f"needs 'images', 'annotations' and 'categories')")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            fail(f"'{key}' must be a list, got {type(data[key]).__name__}")
    if not data["images"]:
        fail("'images' is empty")
    if not data["categories"]:
        fail("'categories' is empty")

    image_ids = set()
    for k, img in enumerate(data["images"]):
        where = f"images[{k}]"
        if not isinstance(img, dict):
            fail(f"{where} must be an object")
        if not _is_int(img.get("id")):
            fail(f"{where}: 'id' must be an integer, got {_one_line(repr(img.get('id')))}")
        where = f"images[{k}] (id {img['id']})"
        if img["id"] in image_ids:
            fail(f"{where}: duplicate image id")
        image_ids.add(img["id"])
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            fail(f"{where}: 'file_name' must be a non-empty string")
        for dim in ("width", "height"):
            if not _is_int(img.get(dim)) or img[dim] <= 0:
                fail(f"{where}: '{dim}' must be a positive integer, "
                     f"got {_one_line(repr(img.get(dim)))}")

    category_ids = set()
    for k, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict):
            fail(f"categories[{k}] must be an object")
        if not _is_int(cat.get("id")) or cat["id"] < 0:
            fail(f"categories[{k}]: 'id' must be a non-negative integer, "
                 f"got {_one_line(repr(cat.get('id')))}")
        if cat["id"] in category_ids:
            fail(f"categories[{k}]: duplicate category id {cat['id']}")
        category_ids.add(cat["id"])

    ann_ids = set()
    for k, ann in enumerate(data["annotations"]):
        where = f"annotations[{k}]"
        if not isinstance(ann, dict):
            fail(f"{where} must be an object")
        if not _is_int(ann.get("id")):
            fail(f"{where}: 'id' must be an integer, got {_one_line(repr(ann.get('id')))}")
        where = f"annotations[{k}] (id {ann['id']})"
        if ann["id"] in ann_ids:
            fail(f"{where}: duplicate annotation id")
        ann_ids.add(ann["id"])
        if not _is_int(ann.get("image_id")) or ann["image_id"] not in image_ids:
            fail(f"{where}: 'image_id' {_one_line(repr(ann.get('image_id')))} is not an "
                 f"image of this file")
        if not _is_int(ann.get("category_id")) or ann["category_id"] not in category_ids:
            fail(f"{where}: 'category_id' {_one_line(repr(ann.get('category_id')))} is not "
                 f"a category of this file")
        bbox = ann.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 \
                or not all(_is_number(v) for v in bbox):
            fail(f"{where}: 'bbox' must be 4 finite numbers [x, y, w, h], "
                 f"got {_one_line(repr(bbox))}")
        if bbox[2] < 0 or bbox[3] < 0:
            fail(f"{where}: 'bbox' width and height must be >= 0, got {_one_line(repr(bbox))} "
                 f"(COCO's evaluation would still count it, against every detector)")
        crowd = ann.setdefault("iscrowd", 0)
        if crowd not in (0, 1) or isinstance(crowd, bool):
            fail(f"{where}: 'iscrowd' must be 0 or 1, got {_one_line(repr(crowd))}")
        area = ann.setdefault("area", float(bbox[2] * bbox[3]))
        if not _is_number(area):
            fail(f"{where}: 'area' must be a finite number, got {_one_line(repr(area))}")


def _make_coco(data):
    """pycocotools COCO over an already loaded dict (its index prints are silenced)."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _image_targets(data):
    """Per image id: (boxes (n,4) float32 xyxy clamped, labels (n,) int64, area (n,) float32)
    of the kept annotations, plus counts of removed crowd and degenerate annotations."""
    sizes = {img["id"]: (img["width"], img["height"]) for img in data["images"]}
    per_image = {img_id: ([], [], []) for img_id in sizes}
    num_crowd = num_degenerate = 0
    for ann in data["annotations"]:
        if ann["iscrowd"]:
            num_crowd += 1
            continue
        w_img, h_img = sizes[ann["image_id"]]
        x, y, w, h = (float(v) for v in ann["bbox"])
        x1, x2 = min(max(x, 0.0), w_img), min(max(x + w, 0.0), w_img)
        y1, y2 = min(max(y, 0.0), h_img), min(max(y + h, 0.0), h_img)
        if x2 <= x1 or y2 <= y1:
            num_degenerate += 1
            continue
        boxes, labels, areas = per_image[ann["image_id"]]
        boxes.append((x1, y1, x2, y2))
        labels.append(ann["category_id"])
        areas.append(float(ann["area"]))
    out = {}
    for img_id, (boxes, labels, areas) in per_image.items():
        out[img_id] = (np.asarray(boxes, np.float32).reshape(-1, 4),
                       np.asarray(labels, np.int64), np.asarray(areas, np.float32))
    return out, num_crowd, num_degenerate


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of a decoded image. Single-channel images of more than 8 bits (modes I;16*,
    I, F) holding values above 255 are scaled from the 16-bit range to 8 bits first: Pillow's
    conversion would clip them at 255, turning nearly every pixel white."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64)
        if values.size and values.max() > 255:
            values = values / 257.0  # 65535 -> 255
        image = Image.fromarray(np.clip(values, 0, 255).round().astype(np.uint8), mode="L")
    return image.convert("RGB")


def load_image(path, width, height, ann_file=None):
    """Open ``path`` as an RGB PIL image and check its size against the annotation file."""
    path = Path(path)
    source = f" (listed in {ann_file})" if ann_file is not None else ""
    if not path.is_file():
        raise DatasetError(f"{path}: image file not found{source}")
    try:
        with Image.open(path) as im:
            if width != height and im.size == (height, width) \
                    and im.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8):
                im = ImageOps.exif_transpose(im)  # annotated upright, as viewers show it
            image = to_rgb(im)  # forces the full decode, so corrupt files fail here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: cannot read image: {_one_line(e)}") from None
    if image.size != (width, height):
        raise DatasetError(f"{path}: image is {image.width}x{image.height} (w x h) but the "
                           f"annotation file says {width}x{height}{source}")
    return image


EXIF_ORIENTATION = 0x0112  # values 5-8: the stored raster is turned by 90 degrees


def _check_files_exist(img_folder, data, ann_file):
    """DatasetError naming the first image the annotation file lists that is missing (a stat
    per image, so a missing file stops the run before training, not after an epoch)."""
    for img in data["images"]:
        path = img_folder / img["file_name"]
        if not path.is_file():
            missing = sum(not (img_folder / i["file_name"]).is_file() for i in data["images"])
            raise DatasetError(f"{path}: image file not found (listed in {ann_file}; "
                               f"{missing} of {len(data['images'])} listed images are missing)")


class CocoDetection(torch.utils.data.Dataset):
    """COCO detection split: ``img_folder`` + ``ann_file`` (validated when built).

    Attributes: ``coco`` (pycocotools COCO of the whole file, crowd annotations included),
    ``ids`` (sorted image ids, the sample order), ``num_classes`` (max category id + 1),
    ``num_boxes`` (kept boxes), ``num_degenerate`` (boxes dropped after clamping),
    ``num_crowd`` (iscrowd annotations removed from the targets).
    """

    def __init__(self, img_folder, ann_file, transforms=None):
        self.img_folder = Path(img_folder)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        data = load_coco_json(self.ann_file)
        _check_files_exist(self.img_folder, data, self.ann_file)
        self.coco = _make_coco(data)
        self.ids = sorted(self.coco.imgs)
        self.num_classes = max(cat["id"] for cat in data["categories"]) + 1
        self._targets, self.num_crowd, self.num_degenerate = _image_targets(data)
        self.num_boxes = sum(len(t[1]) for t in self._targets.values())
        logger.info("%s: %d images, %d boxes, %d categories (num_classes %d); removed %d "
                    "iscrowd annotations, dropped %d degenerate boxes", self.ann_file,
                    len(self.ids), self.num_boxes, len(data["categories"]), self.num_classes,
                    self.num_crowd, self.num_degenerate)

    def __len__(self):
        return len(self.ids)

    def raw_target(self, image_id):
        """Target dict of ``image_id`` before transforms (see the module docstring)."""
        info = self.coco.imgs[image_id]
        boxes, labels, area = self._targets[image_id]
        size = torch.tensor([info["height"], info["width"]], dtype=torch.int64)
        return {
            "boxes": torch.from_numpy(boxes.copy()),
            "labels": torch.from_numpy(labels.copy()),
            "image_id": torch.tensor(image_id, dtype=torch.int64),
            "area": torch.from_numpy(area.copy()),
            "iscrowd": torch.zeros(len(labels), dtype=torch.int64),
            "orig_size": size,
            "size": size.clone(),
        }

    def __getitem__(self, idx):
        image_id = self.ids[idx]
        info = self.coco.imgs[image_id]
        image = load_image(self.img_folder / info["file_name"], info["width"], info["height"],
                           self.ann_file)
        target = self.raw_target(image_id)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def build_dataset(image_set, args):
    """``image_set`` "train" | "val" under ``args.coco_path`` (COCO 2017 layout).

    Reads args.coco_path, args.train_sizes (list of ints, default 480..800 step 32),
    args.eval_size (default 800) and args.max_size (default 1333); see make_transforms.
    """
    if image_set not in ("train", "val"):
        raise ValueError(f"unknown image_set {image_set!r} (expected 'train' or 'val')")
    coco_path = getattr(args, "coco_path", None)
    if not coco_path:
        raise DatasetError(f"--coco_path is not set ({LAYOUT})")
    root = Path(coco_path)
    if not root.is_dir():
        raise DatasetError(f"{root}: --coco_path does not exist or is not a folder")
    img_folder = root / f"{image_set}2017"
    ann_file = root / "annotations" / f"instances_{image_set}2017.json"
    if not img_folder.is_dir():
        raise DatasetError(f"{img_folder}: image folder not found ({LAYOUT})")
    if not ann_file.is_file():
        raise DatasetError(f"{ann_file}: annotation file not found ({LAYOUT})")
    train_sizes = getattr(args, "train_sizes", None) or DEFAULT_TRAIN_SIZES
    eval_size = getattr(args, "eval_size", None) or DEFAULT_EVAL_SIZE
    max_size = getattr(args, "max_size", None) or DEFAULT_MAX_SIZE
    transforms = make_transforms(image_set, train_sizes, eval_size, max_size)
    return CocoDetection(img_folder, ann_file, transforms)
