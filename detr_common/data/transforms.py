"""Joint image + target transforms (spec §5).

Every transform is called as ``image, target = t(image, target)``; ``target`` may be None
(inference). Until :class:`Normalize`, ``image`` is a PIL image and ``target["boxes"]`` is a
float32 (n, 4) tensor of ABSOLUTE pixel xyxy boxes in that image; geometric transforms keep
``boxes``, ``labels``, ``area``, ``iscrowd`` consistent and set ``size`` = (h, w) int64.
:class:`ToTensor` gives a float (3, H, W) tensor in [0, 1]; :class:`Normalize` standardises it
and turns boxes into normalised (cx, cy, w, h) relative to the (unpadded) image (h, w).

Randomness comes from torch's global RNG (seeded per DataLoader worker by torch).
"""

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_TRAIN_SIZES = tuple(range(480, 801, 32))  # 480, 512, ..., 800
DEFAULT_EVAL_SIZE = 800
DEFAULT_MAX_SIZE = 1333
PER_BOX_KEYS = ("boxes", "labels", "area", "iscrowd")


def _rand():
    return float(torch.rand(()))


def _randint(lo, hi):
    """Uniform integer in [lo, hi] (both inclusive)."""
    return int(torch.randint(lo, hi + 1, ()))


def _keep(target, keep):
    """Index every per-box field of ``target`` with the bool mask ``keep`` (in place)."""
    for key in PER_BOX_KEYS:
        if key in target:
            target[key] = target[key][keep]


# --------------------------------------------------------------------------- functional ops

def resize_output_size(image_size, size, max_size=None):
    """Spec §5 resize rule. ``image_size`` = (w, h); returns the new (h, w).

    The shorter side becomes ``size``, unless the longer side would then exceed ``max_size``,
    in which case ``size = round(max_size * short / long)`` (Python round). The new long side
    is ``int(size * long / short)`` (truncated). Where that rule would give a short side of 0
    (an extreme aspect ratio, e.g. 3000 x 1), the result is 1 x ``max_size``.
    """
    w, h = image_size
    short, long = (w, h) if w <= h else (h, w)
    if max_size is not None and long / short * size > max_size:
        size = int(round(max_size * short / long))
        if size == 0:
            return (max_size, 1) if w <= h else (1, max_size)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def hflip(image, target):
    """Mirror left-right; boxes (x1, y1, x2, y2) -> (w - x2, y1, w - x1, y2)."""
    w = image.width
    image = image.transpose(Image.FLIP_LEFT_RIGHT)
    if target is not None and "boxes" in target:
        target = dict(target)
        x1, y1, x2, y2 = target["boxes"].unbind(-1)
        target["boxes"] = torch.stack((w - x2, y1, w - x1, y2), dim=-1)
    return image, target


def resize(image, target, size, max_size=None):
    """Resize so the shorter side is ``size`` (rule of :func:`resize_output_size`), bilinear.

    Boxes scale by (new_w / w, new_h / h), area by their product; ``size`` is updated.
    """
    new_h, new_w = resize_output_size(image.size, size, max_size)
    if (new_w, new_h) == image.size:
        image_out = image
    else:
        image_out = image.resize((new_w, new_h), Image.BILINEAR)
    if target is None:
        return image_out, None
    target = dict(target)
    rw, rh = new_w / image.width, new_h / image.height
    if "boxes" in target:
        target["boxes"] = target["boxes"] * torch.tensor([rw, rh, rw, rh], dtype=torch.float32)
    if "area" in target:
        target["area"] = target["area"] * (rw * rh)
    target["size"] = torch.tensor([new_h, new_w], dtype=torch.int64)
    return image_out, target


def crop(image, target, region):
    """Crop ``region`` = (top, left, height, width) (inside the image).

    Boxes are shifted by (-left, -top), clipped to the crop, and boxes with zero width or
    height after clipping are removed (with their labels/area/iscrowd); area is recomputed
    from the clipped boxes.
    """
    top, left, height, width = region
    image = image.crop((left, top, left + width, top + height))
    if target is None:
        return image, None
    target = dict(target)
    target["size"] = torch.tensor([height, width], dtype=torch.int64)
    if "boxes" in target:
        boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        target["boxes"] = boxes
        target["area"] = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        _keep(target, (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))
    return image, target


def xyxy_to_normalised_cxcywh(boxes, height, width):
    """(n, 4) absolute xyxy -> (n, 4) (cx, cy, w, h) divided by (w, h, w, h)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    out = torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)
    return out / torch.tensor([width, height, width, height], dtype=out.dtype)


# --------------------------------------------------------------------------- transform classes

class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, target=None):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self):
        inner = "".join(f"\n    {t!r}" for t in self.transforms)
        return f"{type(self).__name__}({inner}\n)"


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, image, target=None):
        if _rand() < self.p:
            return hflip(image, target)
        return image, target

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"


class RandomResize:
    """Shorter side to a uniformly chosen entry of ``sizes``, long side capped at max_size."""

    def __init__(self, sizes, max_size=None):
        self.sizes = [int(s) for s in sizes]
        if not self.sizes:
            raise ValueError("RandomResize needs at least one size")
        self.max_size = max_size

    def __call__(self, image, target=None):
        size = self.sizes[_randint(0, len(self.sizes) - 1)]
        return resize(image, target, size, self.max_size)

    def __repr__(self):
        return f"RandomResize(sizes={self.sizes}, max_size={self.max_size})"


class RandomSizeCrop:
    """Random crop of h ~ U[min_size, min(H, max_size)], w ~ U[min_size, min(W, max_size)]
    (integers, inclusive) at a uniform position. If the image side is smaller than min_size,
    that side is kept whole."""

    def __init__(self, min_size, max_size):
        self.min_size, self.max_size = int(min_size), int(max_size)

    def __call__(self, image, target=None):
        w, h = image.size
        ch = _randint(min(self.min_size, h), min(h, self.max_size))
        cw = _randint(min(self.min_size, w), min(w, self.max_size))
        top, left = _randint(0, h - ch), _randint(0, w - cw)
        return crop(image, target, (top, left, ch, cw))

    def __repr__(self):
        return f"RandomSizeCrop(min_size={self.min_size}, max_size={self.max_size})"


class RandomSelect:
    """Apply ``first`` with probability p, otherwise ``second``."""

    def __init__(self, first, second, p=0.5):
        self.first, self.second, self.p = first, second, p

    def __call__(self, image, target=None):
        if _rand() < self.p:
            return self.first(image, target)
        return self.second(image, target)

    def __repr__(self):
        return f"RandomSelect(p={self.p},\n  {self.first!r},\n  {self.second!r})"


class ToTensor:
    """PIL RGB image -> float32 (3, H, W) in [0, 1]."""

    def __call__(self, image, target=None):
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255.0)
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))), target

    def __repr__(self):
        return "ToTensor()"


class Normalize:
    """(x - mean) / std per channel; boxes -> normalised cxcywh w.r.t. the tensor's (H, W)."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image, target=None):
        mean = torch.tensor(self.mean, dtype=image.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=image.dtype).view(-1, 1, 1)
        image = (image - mean) / std
        if target is not None and "boxes" in target:
            target = dict(target)
            h, w = image.shape[-2:]
            target["boxes"] = xyxy_to_normalised_cxcywh(target["boxes"], h, w)
        return image, target

    def __repr__(self):
        return f"Normalize(mean={self.mean}, std={self.std})"


# --------------------------------------------------------------------------- pipelines

def crop_branch_sizes(train_sizes):
    """Sizes of the resize-crop branch, scaled from the upstream COCO constants.

    Upstream (max(train_sizes) = 800): resize shorter side to {400, 500, 600}, then crop
    h, w in [384, 600]. Here every constant is multiplied by f = max(train_sizes) / 800 and
    rounded, so a tiny run (e.g. train_sizes=[128], f = 0.16) crops proportionally
    ({64, 80, 96}, crop in [61, 96]) instead of never cropping. For the COCO default the
    numbers are exactly upstream's. Returns (resize_sizes, (crop_min, crop_max)).
    """
    f = max(train_sizes) / 800.0
    resize_sizes = [max(1, int(round(s * f))) for s in (400, 500, 600)]
    return resize_sizes, (max(1, int(round(384 * f))), max(1, int(round(600 * f))))


def make_transforms(image_set, train_sizes=DEFAULT_TRAIN_SIZES, eval_size=DEFAULT_EVAL_SIZE,
                    max_size=DEFAULT_MAX_SIZE):
    """The spec §5 pipelines.

    train: RandomHorizontalFlip(0.5); RandomSelect(p=0.5) of
      (a) RandomResize(train_sizes, max_size) or
      (b) RandomResize(crop-branch sizes) -> RandomSizeCrop(crop range) ->
          RandomResize(train_sizes, max_size)   (sizes: :func:`crop_branch_sizes`);
      then ToTensor + Normalize (ImageNet mean/std; boxes -> normalised cxcywh).
    val: resize the shorter side to eval_size (long side <= max_size), ToTensor + Normalize.
    """
    finish = [ToTensor(), Normalize()]
    if image_set == "train":
        train_sizes = [int(s) for s in train_sizes]
        crop_resize, (crop_min, crop_max) = crop_branch_sizes(train_sizes)
        return Compose([
            RandomHorizontalFlip(0.5),
            RandomSelect(
                RandomResize(train_sizes, max_size=max_size),
                Compose([RandomResize(crop_resize),
                         RandomSizeCrop(crop_min, crop_max),
                         RandomResize(train_sizes, max_size=max_size)]),
            ),
            *finish,
        ])
    if image_set == "val":
        return Compose([RandomResize([eval_size], max_size=max_size), *finish])
    raise ValueError(f"unknown image_set {image_set!r} (expected 'train' or 'val')")
