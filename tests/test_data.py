"""detr_common.data: COCO targets vs a hand-written annotation file, crowd/degenerate handling,
padding collate, and one clear DatasetError line for every kind of bad input."""
import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from detr_common.data import (CocoDetection, DatasetError, ImageBatch, build_dataset,
                              collate_fn)
from detr_common.data.coco import load_image, to_rgb

COLOUR = (200, 100, 50)
MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])

IMAGES = [  # (id, width, height, file)
    {"id": 7, "file_name": "a.png", "width": 40, "height": 30},
    {"id": 3, "file_name": "b.png", "width": 20, "height": 50},
    {"id": 9, "file_name": "c.png", "width": 16, "height": 16},
]
CATEGORIES = [{"id": 2, "name": "x", "supercategory": "s"},
              {"id": 7, "name": "y", "supercategory": "s"}]
ANNOTATIONS = [
    {"id": 1, "image_id": 7, "category_id": 2, "bbox": [5, 6, 10, 8], "area": 50.0,
     "iscrowd": 0},
    {"id": 2, "image_id": 7, "category_id": 7, "bbox": [30, 20, 20, 20], "area": 400.0,
     "iscrowd": 0},                                        # clamped to [30, 20, 40, 30]
    {"id": 3, "image_id": 7, "category_id": 2, "bbox": [1, 1, 5, 5], "area": 25.0,
     "iscrowd": 1},                                        # crowd: removed
    {"id": 4, "image_id": 7, "category_id": 7, "bbox": [10, 10, 0, 5], "area": 0.0,
     "iscrowd": 0},                                        # zero width: degenerate
    {"id": 5, "image_id": 3, "category_id": 7, "bbox": [-4, -2, 10, 12], "area": 99.5,
     "iscrowd": 0},                                        # clamped to [0, 0, 6, 10]
    {"id": 6, "image_id": 3, "category_id": 2, "bbox": [25, 5, 5, 5], "area": 25.0,
     "iscrowd": 0},                                        # right of the image: degenerate
    {"id": 8, "image_id": 3, "category_id": 2, "bbox": [2.5, 40.25, 10, 3.5]},
    # no area / iscrowd: area filled with w*h = 35, iscrowd 0
]


def _write(root, data=None, images=IMAGES):
    """A tiny dataset in COCO layout: train and val are the same hand-written file."""
    root = Path(root)
    if data is None:
        data = {"images": images, "annotations": ANNOTATIONS, "categories": CATEGORIES}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        folder = root / f"{split}2017"
        folder.mkdir(exist_ok=True)
        for img in images:
            Image.new("RGB", (img["width"], img["height"]), COLOUR).save(folder / img["file_name"])
        text = data if isinstance(data, str) else json.dumps(data)
        (root / "annotations" / f"instances_{split}2017.json").write_text(text)
    return root


def _args(root, **kw):
    kw.setdefault("train_sizes", [32])
    kw.setdefault("eval_size", 60)
    kw.setdefault("max_size", 1000)
    return argparse.Namespace(coco_path=None if root is None else str(root), **kw)


@pytest.fixture
def tiny(tmp_path):
    return _write(tmp_path / "tiny")


def _raw(root, split="val"):
    return CocoDetection(root / f"{split}2017", root / "annotations" /
                         f"instances_{split}2017.json", transforms=None)


# --------------------------------------------------------------------------- targets

def test_raw_targets_match_hand_conversion(tiny):
    ds = _raw(tiny)
    assert ds.ids == [3, 7, 9] and len(ds) == 3
    assert ds.num_classes == 8
    assert ds.num_crowd == 1 and ds.num_degenerate == 2 and ds.num_boxes == 4

    image, t = ds[1]  # image id 7, 40 x 30
    assert image.size == (40, 30) and image.mode == "RGB"
    assert torch.allclose(t["boxes"], torch.tensor([[5., 6., 15., 14.], [30., 20., 40., 30.]]))
    assert t["boxes"].dtype == torch.float32
    assert torch.equal(t["labels"], torch.tensor([2, 7]))
    assert t["labels"].dtype == torch.int64
    assert torch.allclose(t["area"], torch.tensor([50., 400.]))
    assert torch.equal(t["iscrowd"], torch.tensor([0, 0]))
    assert torch.equal(t["image_id"], torch.tensor(7)) and t["image_id"].dtype == torch.int64
    assert torch.equal(t["orig_size"], torch.tensor([30, 40]))
    assert torch.equal(t["size"], torch.tensor([30, 40]))

    _, t = ds[0]  # image id 3, 20 x 50
    assert torch.allclose(t["boxes"], torch.tensor([[0., 0., 6., 10.], [2.5, 40.25, 12.5, 43.75]]))
    assert torch.equal(t["labels"], torch.tensor([7, 2]))
    assert torch.allclose(t["area"], torch.tensor([99.5, 35.0]))
    assert torch.equal(t["orig_size"], torch.tensor([50, 20]))

    _, t = ds[2]  # image id 9: no annotations
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)


def test_coco_keeps_crowd_for_evaluation_and_fills_defaults(tiny):
    ds = _raw(tiny)
    assert isinstance(ds.coco, COCO)
    assert sorted(ds.coco.getAnnIds(imgIds=[7])) == [1, 2, 3, 4]
    assert ds.coco.anns[3]["iscrowd"] == 1
    assert ds.coco.anns[8]["area"] == 35.0 and ds.coco.anns[8]["iscrowd"] == 0
    assert sorted(ds.coco.getCatIds()) == [2, 7]


def test_val_pipeline_targets_are_normalised_cxcywh(tiny):
    ds = build_dataset("val", _args(tiny, eval_size=60, max_size=1000))
    image, t = ds[1]  # 40 x 30 -> shorter side 60: 80 x 60
    assert image.shape == (3, 60, 80)
    expected = torch.tensor([[10 / 40, 10 / 30, 10 / 40, 8 / 30],
                             [35 / 40, 25 / 30, 10 / 40, 10 / 30]])
    assert torch.allclose(t["boxes"], expected, atol=1e-6)
    assert torch.allclose(t["area"], torch.tensor([200., 1600.]))
    assert torch.equal(t["size"], torch.tensor([60, 80]))
    assert torch.equal(t["orig_size"], torch.tensor([30, 40]))
    pixel = (torch.tensor(COLOUR, dtype=torch.float32) / 255 - MEAN) / STD
    assert torch.allclose(image, pixel.view(3, 1, 1).expand(3, 60, 80), atol=1e-5)

    image, t = ds[0]  # 20 x 50 -> 60 x 150
    assert image.shape == (3, 150, 60)
    expected = torch.tensor([[3 / 20, 5 / 50, 6 / 20, 10 / 50],
                             [7.5 / 20, 42 / 50, 10 / 20, 3.5 / 50]])
    assert torch.allclose(t["boxes"], expected, atol=1e-6)


def test_train_pipeline_gives_valid_targets(tiny):
    torch.manual_seed(0)
    ds = build_dataset("train", _args(tiny, train_sizes=[24, 32], max_size=64))
    for _ in range(10):
        for i in range(len(ds)):
            image, t = ds[i]
            h, w = image.shape[1:]
            assert torch.equal(t["size"], torch.tensor([h, w]))
            short, long = min(h, w), max(h, w)
            # shorter side from train_sizes, or the long side capped at max_size (the spec
            # rule rounds the short side, so the cap can be overshot by < long/short/2 + 1)
            assert short in (24, 32) or abs(long - 64) <= long / short / 2 + 1
            assert long <= 64 + long / short / 2 + 1
            b = t["boxes"]
            assert b.shape[0] == t["labels"].shape[0] == t["area"].shape[0]
            assert bool(((b >= 0) & (b <= 1)).all()) and bool((b[:, 2:] > 0).all())


def test_summary_log_line(tiny, caplog):
    with caplog.at_level(logging.INFO, logger="detr_common.data"):
        build_dataset("train", _args(tiny))
    lines = [r.getMessage() for r in caplog.records if "degenerate" in r.getMessage()]
    assert len(lines) == 1
    assert "instances_train2017.json" in lines[0]
    assert "dropped 2 degenerate" in lines[0] and "removed 1 iscrowd" in lines[0]


def test_build_dataset_defaults(tiny):
    ds = build_dataset("val", argparse.Namespace(coco_path=str(tiny)))
    image, _ = ds[2]  # 16 x 16 -> 800 x 800 (eval default 800, max 1333)
    assert image.shape == (3, 800, 800)


# --------------------------------------------------------------------------- collate

def test_collate_pads_bottom_right_with_exact_mask():
    a = torch.full((3, 5, 7), 1.0)
    b = torch.full((3, 6, 4), 2.0)
    ta, tb = {"k": 1}, {"k": 2}
    batch, targets = collate_fn([(a, ta), (b, tb)])
    assert isinstance(batch, ImageBatch)
    images, mask = batch
    assert images.shape == (2, 3, 6, 7) and mask.shape == (2, 6, 7) and mask.dtype == torch.bool
    expected_mask = torch.tensor([[[0] * 7] * 5 + [[1] * 7],
                                  [[0] * 4 + [1] * 3] * 6], dtype=torch.bool)
    assert torch.equal(mask, expected_mask)
    expected = torch.zeros(2, 3, 6, 7)
    expected[0, :, :5, :7] = 1.0
    expected[1, :, :6, :4] = 2.0
    assert torch.allclose(images, expected)
    assert targets == (ta, tb)
    moved = batch.to("cpu")
    assert isinstance(moved, ImageBatch) and torch.equal(moved.mask, mask)


def test_dataloader_batches_dataset(tiny):
    ds = build_dataset("val", _args(tiny, eval_size=60))
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_fn)
    batch, targets = next(iter(loader))
    # sizes (h, w): id 3 -> (150, 60), id 7 -> (60, 80), id 9 -> (60, 60)
    assert batch.images.shape == (3, 3, 150, 80)
    valid = (~batch.mask).sum(dim=(1, 2))
    assert torch.equal(valid, torch.tensor([150 * 60, 60 * 80, 60 * 60]))
    assert not batch.mask[1, :60, :80].any() and batch.mask[1, 60:, :].all()
    assert [int(t["image_id"]) for t in targets] == [3, 7, 9]


# --------------------------------------------------------------------------- bad input

def _assert_one_line(err, *needles):
    msg = str(err.value)
    assert "\n" not in msg
    for needle in needles:
        assert str(needle) in msg, (needle, msg)


def test_dataset_error_is_an_exception():
    assert issubclass(DatasetError, Exception)


def test_coco_path_not_set():
    with pytest.raises(DatasetError) as err:
        build_dataset("train", _args(None))
    _assert_one_line(err, "--coco_path")


def test_coco_path_missing(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as err:
        build_dataset("train", _args(missing))
    _assert_one_line(err, missing, "does not exist")


def test_image_folder_missing(tiny):
    (tiny / "val2017" / "a.png").unlink()
    for f in (tiny / "val2017").iterdir():
        f.unlink()
    (tiny / "val2017").rmdir()
    with pytest.raises(DatasetError) as err:
        build_dataset("val", _args(tiny))
    _assert_one_line(err, tiny / "val2017", "not found")


def test_annotation_file_missing(tiny):
    ann = tiny / "annotations" / "instances_train2017.json"
    ann.unlink()
    with pytest.raises(DatasetError) as err:
        build_dataset("train", _args(tiny))
    _assert_one_line(err, ann, "not found")


def _bad(**changes):
    data = {"images": [dict(i) for i in IMAGES], "annotations": [dict(a) for a in ANNOTATIONS],
            "categories": [dict(c) for c in CATEGORIES]}
    for key, fn in changes.items():
        fn(data)
    return data


def _set_ann(index, **fields):
    def change(data):
        data["annotations"][index].update(fields)
    return change


BAD_JSON = {
    "invalid_json": ('{"images": [', "invalid JSON"),
    "not_an_object": ("[1, 2]", "top level"),
    "no_annotations": (_bad(a=lambda d: d.pop("annotations")), "'annotations'"),
    "no_images": (_bad(a=lambda d: d.pop("images")), "'images'"),
    "no_categories": (_bad(a=lambda d: d.pop("categories")), "'categories'"),
    "bbox_three_numbers": (_bad(a=_set_ann(1, bbox=[1, 2, 3])), "bbox"),
    "bbox_string": (_bad(a=_set_ann(1, bbox=[1, 2, "3", 4])), "bbox"),
    "bbox_missing": (_bad(a=lambda d: d["annotations"][0].pop("bbox")), "bbox"),
    "unknown_image": (_bad(a=_set_ann(2, image_id=12345)), "12345"),
    "unknown_category": (_bad(a=_set_ann(0, category_id=99)), "99"),
    "image_without_width": (_bad(a=lambda d: d["images"][0].pop("width")), "width"),
    "duplicate_annotation_id": (_bad(a=_set_ann(1, id=1)), "duplicate"),
}


@pytest.mark.parametrize("case", sorted(BAD_JSON))
def test_malformed_annotation_file(tmp_path, case):
    data, needle = BAD_JSON[case]
    root = _write(tmp_path / case, data)
    ann = root / "annotations" / "instances_train2017.json"
    with pytest.raises(DatasetError) as err:
        build_dataset("train", _args(root))
    _assert_one_line(err, ann, needle)


def test_nan_bbox(tmp_path):
    text = json.dumps(_bad(a=_set_ann(0, bbox=[1, 2, float("nan"), 4])))
    assert "NaN" in text
    root = _write(tmp_path / "nan", text)
    with pytest.raises(DatasetError) as err:
        build_dataset("val", _args(root))
    _assert_one_line(err, root / "annotations" / "instances_val2017.json", "bbox")


def test_missing_image_file_fails_when_the_dataset_is_built(tiny):
    """Listed images are checked to exist up front, not after a training epoch."""
    (tiny / "val2017" / "b.png").unlink()
    (tiny / "val2017" / "c.png").unlink()
    with pytest.raises(DatasetError) as err:
        build_dataset("val", _args(tiny))
    _assert_one_line(err, tiny / "val2017" / "b.png", "not found")
    assert "2 of 3 listed images are missing" in str(err.value)


def test_negative_box_size_is_an_error(tiny):
    """A negative width / height would be dropped from the targets but still scored by COCO's
    evaluation (ground truth no detector can match): refused, naming the annotation."""
    ann = tiny / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    data["annotations"][0]["bbox"][3] = -5
    ann.write_text(json.dumps(data))
    with pytest.raises(DatasetError) as err:
        build_dataset("val", _args(tiny))
    _assert_one_line(err, ann, "width and height must be >= 0")


def test_exif_rotated_image_is_used_upright_when_annotated_upright(tiny):
    """A photo stored sideways with EXIF orientation 6 whose annotation gives the upright size
    is turned upright; annotated with the stored size (COCO's case) it is used as stored."""
    path = tiny / "val2017" / "b.png"
    with Image.open(path) as im:
        upright = im.convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # orientation 6 turns it back
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path.with_suffix(".jpg"), exif=exif, quality=100)
    w, h = upright.size
    assert w != h
    got = load_image(path.with_suffix(".jpg"), w, h)
    assert got.size == (w, h)
    assert np.abs(np.asarray(got, np.float64) - np.asarray(upright, np.float64)).mean() < 8
    assert load_image(path.with_suffix(".jpg"), h, w).size == (h, w)  # as stored


def test_missing_image_file_fails_when_loaded(tiny):
    ds = build_dataset("val", _args(tiny))  # building does not open images
    path = tiny / "val2017" / "b.png"
    path.unlink()
    with pytest.raises(DatasetError) as err:
        ds[0]
    _assert_one_line(err, path, "not found")
    ds[1]  # the other images still load


def test_corrupt_image_file(tiny):
    path = tiny / "val2017" / "b.png"
    path.write_bytes(b"this is not an image at all")
    ds = build_dataset("val", _args(tiny))
    with pytest.raises(DatasetError) as err:
        ds[0]
    _assert_one_line(err, path, "cannot read image")


def test_truncated_image_file(tiny):
    path = tiny / "val2017" / "b.png"
    noise = np.random.default_rng(0).integers(0, 256, (50, 20, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    ds = build_dataset("val", _args(tiny))
    with pytest.raises(DatasetError) as err:
        ds[0]
    _assert_one_line(err, path, "cannot read image")


def test_image_size_disagrees_with_annotation(tiny):
    path = tiny / "val2017" / "b.png"
    Image.new("RGB", (21, 50), COLOUR).save(path)
    ds = build_dataset("val", _args(tiny))
    with pytest.raises(DatasetError) as err:
        ds[0]
    _assert_one_line(err, path, "21x50", "20x50")


def test_error_from_dataloader_worker_stays_one_line(tiny):
    path = tiny / "val2017" / "c.png"
    ds = build_dataset("val", _args(tiny))
    path.unlink()  # after the build's check: the worker meets it
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_fn,
                                         num_workers=1)
    with pytest.raises(DatasetError) as err:
        next(iter(loader))
    _assert_one_line(err, path, "not found")


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    # Pillow's own RGB conversion clips 16-bit values at 255: the image would turn white
    gray = (np.arange(48 * 64).reshape(48, 64) % 256).astype(np.uint8)
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")
        rgb = np.asarray(to_rgb(im))
    assert rgb.shape == (48, 64, 3) and (rgb == gray[..., None]).all()
