"""Joint transforms (spec §5): hand-computed flip / resize / crop / normalise cases, the resize
rule, and boxes that keep covering a distinctively coloured region through random pipelines."""
import numpy as np
import pytest
import torch
from PIL import Image

from detr_common.data import transforms as T

GREY = (128, 128, 128)
MAGENTA = (255, 0, 255)  # label 1
GREEN = (0, 255, 0)      # label 2
MEAN = torch.tensor(T.IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(T.IMAGENET_STD).view(3, 1, 1)


def _target(boxes, labels=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    n = boxes.shape[0]
    return {
        "boxes": boxes,
        "labels": torch.tensor(labels if labels is not None else list(range(1, n + 1))),
        "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
        "iscrowd": torch.zeros(n, dtype=torch.int64),
        "image_id": torch.tensor(1),
    }


def _scene(width=90, height=70):
    """Grey image with a magenta box (label 1) and a green box (label 2), and its target."""
    pixels = np.full((height, width, 3), GREY, np.uint8)
    pixels[15:40, 20:50] = MAGENTA   # xyxy [20, 15, 50, 40]
    pixels[45:66, 60:84] = GREEN     # xyxy [60, 45, 84, 66]
    target = _target([[20, 15, 50, 40], [60, 45, 84, 66]], [1, 2])
    target["size"] = torch.tensor([height, width])
    target["orig_size"] = torch.tensor([height, width])
    return Image.fromarray(pixels), target


def _colour_masks(pixels):
    """uint8 (h, w, 3) -> {label: bool mask of pixels that are more than half that colour}."""
    p = pixels.astype(int)
    return {1: p[:, :, 1] < 64, 2: (p[:, :, 0] < 64) & (p[:, :, 2] < 64)}


def _check_consistent(pixels, boxes_xyxy, labels, tol):
    """Each box covers its colour region (within tol px) and vice versa; dropped boxes leave
    no colour behind."""
    masks = _colour_masks(pixels)
    for label, mask in masks.items():
        rows = [i for i, l in enumerate(labels.tolist()) if l == label]
        assert len(rows) <= 1
        if not rows:
            assert not mask.any(), f"colour {label} visible but its box was dropped"
            continue
        x1, y1, x2, y2 = boxes_xyxy[rows[0]].tolist()
        ys, xs = np.nonzero(mask)
        if x2 - x1 < 2 or y2 - y1 < 2:  # a sliver: at most require colour inside the box
            if len(xs):
                assert xs.min() >= x1 - tol and xs.max() + 1 <= x2 + tol
            continue
        assert len(xs), f"box {label} kept but its colour is gone"
        region = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1],
                              dtype=torch.float32)
        box = torch.tensor([x1, y1, x2, y2])
        assert torch.allclose(region, box, atol=tol), (region, box)


# --------------------------------------------------------------------------- resize rule

@pytest.mark.parametrize("wh, size, max_size, expected_hw", [
    ((640, 480), 800, 1333, (800, 1066)),   # long = int(800 * 640 / 480) = int(1066.67)
    ((480, 640), 800, 1333, (1066, 800)),   # portrait
    ((2000, 500), 800, 1333, (333, 1332)),  # 3200 > 1333: s = round(333.25) = 333; int(1332.0)
    ((100, 100), 50, None, (50, 50)),       # square, no max
    ((160, 90), 128, 160, (90, 160)),       # 227.6 > 160: s = round(90.0) = 90, unchanged
    ((333, 250), 128, 1333, (128, 170)),    # int(170.496) truncates
    ((20, 50), 32, 64, (65, 26)),           # 80 > 64: s = round(25.6) = 26; long int(65.0) = 65
    ((480, 800), 800, 1333, (1333, 800)),   # 1333.3 > 1333: s = round(799.8) = 800; int(1333.3)
    ((3000, 1), 800, 1333, (1, 1333)),      # s = round(0.44) = 0: one pixel by max_size
    ((1, 3000), 800, 1333, (1333, 1)),
])
def test_resize_rule_hand_computed(wh, size, max_size, expected_hw):
    assert T.resize_output_size(wh, size, max_size) == expected_hw


def test_resize_scales_boxes_area_and_size_exactly():
    image, target = _scene(40, 30)
    target = _target([[4, 3, 20, 15], [0, 0, 40, 30]])
    out, t = T.resize(image, target, 60, 1000)  # 40 x 30 -> 80 x 60: factor 2
    assert out.size == (80, 60)
    assert torch.allclose(t["boxes"], torch.tensor([[8., 6., 40., 30.], [0., 0., 80., 60.]]))
    assert torch.allclose(t["area"], torch.tensor([768., 4800.]))
    assert torch.equal(t["size"], torch.tensor([60, 80]))
    out, t = T.resize(*_scene(90, 70), 35, 1000)  # 90 x 70 -> int(35 * 90 / 70) = 45 x 35
    assert out.size == (45, 35)
    assert torch.allclose(t["boxes"][0], torch.tensor([20 * 45 / 90, 15 * 35 / 70,
                                                       50 * 45 / 90, 40 * 35 / 70]))


def test_resize_keeps_colour_regions_in_boxes():
    for size in (35, 48, 100, 140):
        out, t = T.resize(*_scene(), size, 200)
        _check_consistent(np.asarray(out), t["boxes"], t["labels"], tol=1.0)


# --------------------------------------------------------------------------- flip

def test_hflip_hand_computed():
    pixels = np.arange(4 * 20 * 3, dtype=np.uint8).reshape(4, 20, 3)
    target = _target([[2, 3, 7, 4], [0, 0, 20, 4]])
    out, t = T.hflip(Image.fromarray(pixels), target)
    assert np.array_equal(np.asarray(out), pixels[:, ::-1])
    assert torch.allclose(t["boxes"], torch.tensor([[13., 3., 18., 4.], [0., 0., 20., 4.]]))
    assert torch.equal(t["labels"], target["labels"])
    assert torch.allclose(target["boxes"][0], torch.tensor([2., 3., 7., 4.]))  # input untouched


def test_random_flip_keeps_colour_regions_in_boxes():
    out, t = T.RandomHorizontalFlip(p=1.0)(*_scene())
    assert torch.allclose(t["boxes"], torch.tensor([[40., 15., 70., 40.], [6., 45., 30., 66.]]))
    _check_consistent(np.asarray(out), t["boxes"], t["labels"], tol=0.0)
    image, target = _scene()
    out, t = T.RandomHorizontalFlip(p=0.0)(image, target)
    assert np.array_equal(np.asarray(out), np.asarray(image))
    assert torch.allclose(t["boxes"], target["boxes"])


# --------------------------------------------------------------------------- crop

def test_crop_hand_computed_shift_clip_drop():
    pixels = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    target = _target([[12, 8, 20, 14],   # inside: shifted to [2, 3, 10, 9]
                      [0, 0, 11, 6],     # clipped to [0, 0, 1, 1]
                      [30, 0, 40, 4],    # right of the crop and above it: dropped
                      [5, 20, 30, 29]],  # clipped to [0, 15, 15, 20]
                     [1, 2, 3, 4])
    target["iscrowd"] = torch.tensor([0, 0, 0, 0])
    out, t = T.crop(Image.fromarray(pixels), target, (5, 10, 20, 15))  # top, left, h, w
    assert np.array_equal(np.asarray(out), pixels[5:25, 10:25])
    assert torch.allclose(t["boxes"], torch.tensor([[2., 3., 10., 9.], [0., 0., 1., 1.],
                                                    [0., 15., 15., 20.]]))
    assert torch.equal(t["labels"], torch.tensor([1, 2, 4]))
    assert torch.allclose(t["area"], torch.tensor([48., 1., 75.]))
    assert t["iscrowd"].shape == (3,)
    assert torch.equal(t["size"], torch.tensor([20, 15]))


def test_random_size_crop_ranges_and_colour_regions():
    torch.manual_seed(0)
    crop = T.RandomSizeCrop(30, 60)
    seen_drop = False
    for _ in range(60):
        out, t = crop(*_scene())
        w, h = out.size
        assert 30 <= w <= 60 and 30 <= h <= 60
        assert torch.equal(t["size"], torch.tensor([h, w]))
        _check_consistent(np.asarray(out), t["boxes"], t["labels"], tol=0.0)
        seen_drop |= len(t["labels"]) < 2
    assert seen_drop
    out, _ = T.RandomSizeCrop(100, 200)(*_scene(90, 70))  # smaller than min: whole image
    assert out.size == (90, 70)


def test_crop_branch_sizes_scale_upstream_constants():
    assert T.crop_branch_sizes(T.DEFAULT_TRAIN_SIZES) == ([400, 500, 600], (384, 600))
    assert T.crop_branch_sizes([128]) == ([64, 80, 96], (61, 96))
    assert T.crop_branch_sizes([64, 96]) == ([48, 60, 72], (46, 72))  # f = 0.12


# --------------------------------------------------------------------------- tensor stages

def test_to_tensor_and_normalize_hand_computed():
    pixels = np.random.default_rng(1).integers(0, 256, (10, 20, 3), dtype=np.uint8)
    target = _target([[2, 4, 6, 10], [0, 0, 20, 10]])
    x, t = T.ToTensor()(Image.fromarray(pixels), target)
    expected = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    assert x.shape == (3, 10, 20) and torch.allclose(x, expected)
    y, t = T.Normalize()(x, t)
    assert torch.allclose(y, (expected - MEAN) / STD)
    assert torch.allclose(t["boxes"], torch.tensor([[4 / 20, 7 / 10, 4 / 20, 6 / 10],
                                                    [0.5, 0.5, 1.0, 1.0]]))


def test_random_select_and_random_resize():
    first = lambda im, tg: ("first", tg)   # noqa: E731
    second = lambda im, tg: ("second", tg)  # noqa: E731
    assert T.RandomSelect(first, second, p=1.0)(None, None)[0] == "first"
    assert T.RandomSelect(first, second, p=0.0)(None, None)[0] == "second"
    torch.manual_seed(0)
    shorts = {min(T.RandomResize([30, 40, 50])(*_scene())[0].size) for _ in range(40)}
    assert shorts == {30, 40, 50}


def test_eval_pipeline_and_inference_without_target():
    tf = T.make_transforms("val", eval_size=64, max_size=100)
    x, t = tf(*_scene(100, 70))  # 100 x 70: int(64 * 100 / 70) = 91
    assert x.shape == (3, 64, 91)
    assert torch.equal(t["size"], torch.tensor([64, 91]))
    x, t = tf(_scene(100, 70)[0])
    assert x.shape == (3, 64, 91) and t is None
    with pytest.raises(ValueError):
        T.make_transforms("test")


def test_train_pipeline_keeps_colour_regions_in_boxes():
    tf = T.make_transforms("train", train_sizes=[64, 96], max_size=120)
    torch.manual_seed(0)
    flipped = cropped = 0
    for _ in range(60):
        x, t = tf(*_scene())
        h, w = x.shape[1:]
        assert torch.equal(t["size"], torch.tensor([h, w]))
        pixels = ((x * STD + MEAN) * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        cx, cy, bw, bh = t["boxes"].unbind(-1)
        boxes = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h,
                             (cx + bw / 2) * w, (cy + bh / 2) * h], -1)
        _check_consistent(pixels, boxes, t["labels"], tol=1.5)
        if 1 in t["labels"].tolist() and 2 in t["labels"].tolist():
            i1 = t["labels"].tolist().index(1)
            i2 = t["labels"].tolist().index(2)
            flipped += bool(cx[i1] > cx[i2])  # magenta is left of green unless flipped
        cropped += min(h, w) not in (64, 96) or len(t["labels"]) < 2 or \
            abs(w / h - 90 / 70) > 0.05
    assert flipped > 5 and cropped > 5  # both random branches were exercised
