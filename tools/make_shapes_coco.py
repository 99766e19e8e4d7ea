#!/usr/bin/env python
"""Write a deterministic synthetic "shapes" detection dataset in COCO layout.

    python tools/make_shapes_coco.py --out DIR --num_train N --num_val M \
        --min_size S --max_size L --seed K [--workers P]

Layout written under DIR (the same as COCO 2017)::

    train2017/000000000001.jpg ...      val2017/000001000001.jpg ...
    annotations/instances_train2017.json   annotations/instances_val2017.json

What the images contain:
- six shape classes with COCO-like non-contiguous category ids (see CATEGORIES), drawn in
  random colours (the class is the shape, never the colour), rotated, anti-aliased;
- object sizes from tiny (a few pixels) to large (about 70 % of the shorter image side),
  0-4 objects per image, overlapping; later shapes occlude earlier ones and occluded objects
  stay annotated with the box of the whole shape as drawn (clipped to the image when a shape
  is cut by the border);
- textured, noisy backgrounds (smooth colour field + stripes + pixel noise);
- image width and height drawn independently in [min_size, max_size] (varied aspect ratios);
- every tenth image (index 1, 11, 21, ... of each split) has no objects;
- every 25th image (index 2, 27, ...) also holds a "crowd": a tight group of tiny shapes of one
  class annotated by ONE box with ``iscrowd: 1`` (as COCO does), to exercise that path.

Annotations: ``bbox`` [x, y, w, h] floats in pixels (exact extent of the drawn shape, at 1/4
pixel resolution), ``area`` = drawn (anti-aliased) pixel area of the shape, ``iscrowd`` 0/1,
unique ``id`` over both splits; images carry ``id``, ``file_name``, ``width``, ``height``.
Image ids are 1.. for train and 1000001.. for val.

Writing into the folder of an earlier dataset replaces it: that dataset's images which this one
does not have are deleted (only files named as this tool names them).

Determinism: every image has its own RNG seeded from (seed, split, index), so the same seed
gives byte-identical JSON (and images), and an image does not depend on how many others are
generated. Only numpy and Pillow are used for drawing.
"""
import argparse
import contextlib
import json
import math
import multiprocessing
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

# (id, name, supercategory): non-contiguous ids as in COCO.
CATEGORIES = (
    (1, "circle", "round"),
    (3, "square", "polygon"),
    (5, "triangle", "polygon"),
    (8, "star", "polygon"),
    (13, "ellipse", "round"),
    (21, "cross", "polygon"),
)
COLOURS = (
    (230, 40, 40), (40, 200, 60), (50, 90, 235), (245, 215, 40), (225, 60, 220),
    (40, 215, 225), (250, 140, 30), (245, 245, 245), (140, 60, 200),
)
SPLITS = {"train": (0, 1), "val": (1, 1_000_001)}  # split -> (seed stream, first image id)
SS = 4  # supersampling factor for anti-aliased drawing and 1/4-pixel boxes
MAX_OBJECTS = 4
JPEG_QUALITY = 92


def _polygon(kind, size, aspect, angle):
    """Vertices (k, 2) of a shape centred on 0 with 'radius' ``size`` (pixels), rotated."""
    if kind == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * (size / math.sqrt(2))
    elif kind == "triangle":
        a = np.deg2rad([90, 210, 330])
        pts = np.stack([np.cos(a), -np.sin(a)], 1) * size
    elif kind == "star":
        a = np.deg2rad(90 + 36 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42) * size
        pts = np.stack([r * np.cos(a), -r * np.sin(a)], 1)
    elif kind == "cross":
        t = 0.33
        pts = np.array([[-t, -1], [t, -1], [t, -t], [1, -t], [1, t], [t, t], [t, 1], [-t, 1],
                        [-t, t], [-1, t], [-1, -t], [-t, -t]], float) * size
    elif kind in ("circle", "ellipse"):
        a = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        pts = np.stack([np.cos(a), aspect * np.sin(a)], 1) * size
    else:
        raise ValueError(kind)
    c, s = math.cos(angle), math.sin(angle)
    return pts @ np.array([[c, s], [-s, c]])


def render_shape(kind, cx, cy, size, aspect, angle, width, height):
    """Coverage of one shape on a ``height`` x ``width`` image.

    Returns (alpha, (x0, y0), bbox): ``alpha`` float32 (h, w) in [0, 1] is the anti-aliased
    coverage of the image window starting at pixel (x0, y0); ``bbox`` is the exact [x, y, w, h]
    extent of the drawn shape inside the image (1/4-pixel resolution), or None if nothing of
    it is inside the image.
    """
    pts = _polygon(kind, size, aspect, angle) + (cx, cy)
    x0 = max(int(math.floor(pts[:, 0].min())) - 1, 0)
    y0 = max(int(math.floor(pts[:, 1].min())) - 1, 0)
    x1 = min(int(math.ceil(pts[:, 0].max())) + 1, width)
    y1 = min(int(math.ceil(pts[:, 1].max())) + 1, height)
    if x1 <= x0 or y1 <= y0:
        return None, (x0, y0), None
    canvas = Image.new("L", ((x1 - x0) * SS, (y1 - y0) * SS), 0)
    local = (pts - (x0, y0)) * SS
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in local.tolist()], fill=255)
    hi = np.asarray(canvas) > 0
    if not hi.any():
        return None, (x0, y0), None
    cols = np.flatnonzero(hi.any(0))
    rows = np.flatnonzero(hi.any(1))
    bbox = [x0 + cols[0] / SS, y0 + rows[0] / SS,
            (cols[-1] + 1 - cols[0]) / SS, (rows[-1] + 1 - rows[0]) / SS]
    alpha = hi.reshape(y1 - y0, SS, x1 - x0, SS).mean(axis=(1, 3), dtype=np.float32)
    return alpha, (x0, y0), bbox


def _background(rng, width, height):
    """Textured noisy background, float32 (h, w, 3) in [0, 255]."""
    base = rng.uniform(40, 170, size=3)
    gh, gw = int(rng.integers(2, 6)), int(rng.integers(2, 6))
    field = rng.normal(0, 28, size=(gh, gw, 3))
    img = np.empty((height, width, 3), np.float32)
    for c in range(3):
        small = Image.fromarray(field[:, :, c].astype(np.float32), mode="F")
        img[:, :, c] = np.asarray(small.resize((width, height), Image.BILINEAR))
    img += base
    if rng.random() < 0.6:  # stripes with a random direction and period
        ang = rng.uniform(0, np.pi)
        period = rng.uniform(4, 24)
        yy, xx = np.mgrid[0:height, 0:width]
        phase = (xx * math.cos(ang) + yy * math.sin(ang)) * (2 * np.pi / period)
        img += (rng.uniform(5, 20) * np.sin(phase))[:, :, None]
    img += rng.normal(0, rng.uniform(3, 14), size=img.shape)
    return img


def _sample_object(rng, width, height, kind=None, size=None):
    short = min(width, height)
    if kind is None:
        kind = CATEGORIES[int(rng.integers(len(CATEGORIES)))][1]
    if size is None:  # log-uniform "radius": tiny .. large
        lo, hi = max(2.5, 0.03 * short), 0.35 * short
        size = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    aspect = float(rng.uniform(0.35, 0.65)) if kind == "ellipse" else 1.0
    angle = float(rng.uniform(0, 2 * np.pi))
    cx = float(rng.uniform(0.4 * size, width - 0.4 * size))
    cy = float(rng.uniform(0.4 * size, height - 0.4 * size))
    colour = np.asarray(COLOURS[int(rng.integers(len(COLOURS)))], np.float32)
    colour = np.clip(colour + rng.normal(0, 12, size=3), 0, 255)
    return kind, cx, cy, size, aspect, angle, colour


def _paint(img, alpha, origin, colour):
    x0, y0 = origin
    h, w = alpha.shape
    window = img[y0:y0 + h, x0:x0 + w]
    window += alpha[:, :, None] * (colour - window)


def make_image(rng, width, height, index):
    """Draw one image. Returns (uint8 (h, w, 3) array, list of annotation dicts w/o ids)."""
    img = _background(rng, width, height)
    name_to_id = {name: cid for cid, name, _ in CATEGORIES}
    anns = []
    if index % 25 == 2:  # a crowd: tight group of tiny shapes of one class, one iscrowd box
        kind = CATEGORIES[int(rng.integers(len(CATEGORIES)))][1]
        short = min(width, height)
        gx = float(rng.uniform(0.2 * width, 0.8 * width))
        gy = float(rng.uniform(0.2 * height, 0.8 * height))
        spread = 0.12 * short
        xs0, ys0, xs1, ys1, area = [], [], [], [], 0.0
        for _ in range(int(rng.integers(5, 10))):
            obj = list(_sample_object(rng, width, height, kind, size=max(2.0, 0.03 * short)))
            obj[1] = float(np.clip(gx + rng.uniform(-spread, spread), 0, width - 1))
            obj[2] = float(np.clip(gy + rng.uniform(-spread, spread), 0, height - 1))
            alpha, origin, bbox = render_shape(*obj[:6], width, height)
            if bbox is None:
                continue
            _paint(img, alpha, origin, obj[6])
            xs0.append(bbox[0]); ys0.append(bbox[1])
            xs1.append(bbox[0] + bbox[2]); ys1.append(bbox[1] + bbox[3])
            area += float(alpha.sum())
        if xs0:
            anns.append({"category_id": name_to_id[kind], "iscrowd": 1, "area": area,
                         "bbox": [min(xs0), min(ys0), max(xs1) - min(xs0),
                                  max(ys1) - min(ys0)]})
    n = 0 if index % 10 == 1 else int(rng.integers(1, MAX_OBJECTS + 1))
    for _ in range(n):
        kind, cx, cy, size, aspect, angle, colour = _sample_object(rng, width, height)
        alpha, origin, bbox = render_shape(kind, cx, cy, size, aspect, angle, width, height)
        if bbox is None:
            continue
        _paint(img, alpha, origin, colour)
        anns.append({"category_id": name_to_id[kind], "iscrowd": 0,
                     "area": float(alpha.sum()), "bbox": bbox})
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), anns


def _round(x):
    return round(float(x), 2)


def _write_image(job):
    """Draw and save one image; returns (COCO image record, its annotations without ids)."""
    folder, seed, stream, first_id, index, min_size, max_size = job
    rng = np.random.default_rng([seed, stream, index])
    width = int(rng.integers(min_size, max_size + 1))
    height = int(rng.integers(min_size, max_size + 1))
    pixels, anns = make_image(rng, width, height, index)
    image_id = first_id + index
    file_name = f"{image_id:012d}.jpg"
    Image.fromarray(pixels).save(folder / file_name, quality=JPEG_QUALITY)
    return {"id": image_id, "file_name": file_name, "width": width, "height": height}, anns


POOL_CHUNK = 16  # images handed to a worker process at a time


@contextlib.contextmanager
def _pool(workers, count):
    """A process pool for ``count`` images: at most ``workers`` processes and no more than
    there are chunks of POOL_CHUNK images; None (draw in this process) when that is 0 or 1."""
    processes = min(workers, -(-count // POOL_CHUNK))
    if processes <= 1:
        yield None
        return
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        yield pool


def generate(out, num_train, num_val, min_size, max_size, seed, workers=0):
    """Write the dataset under ``out`` (see the module docstring). Returns ``Path(out)``.
    ``workers`` > 1 draws the images in that many processes; the files are the same."""
    if not 8 <= min_size <= max_size:
        raise ValueError(f"need 8 <= min_size <= max_size, got {min_size}, {max_size}")
    if workers < 0:
        raise ValueError(f"need workers >= 0, got {workers}")
    if num_train < 0 or num_val < 0:
        raise ValueError(f"need num_train, num_val >= 0, got {num_train}, {num_val}")
    out = Path(out)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": cid, "name": name, "supercategory": sup}
                  for cid, name, sup in CATEGORIES]
    next_ann_id = 1
    for split, count in (("train", num_train), ("val", num_val)):
        stream, first_id = SPLITS[split]
        folder = out / f"{split}2017"
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        jobs = [(folder, seed, stream, first_id, index, min_size, max_size)
                for index in range(count)]
        with _pool(workers, count) as pool:
            written = (pool.imap(_write_image, jobs, chunksize=POOL_CHUNK) if pool
                       else map(_write_image, jobs))
            for image, anns in tqdm(written, total=count, desc=f"shapes {split}", unit="img",
                                    leave=False, disable=count == 0):
                images.append(image)
                for ann in anns:
                    annotations.append({
                        "id": next_ann_id, "image_id": image["id"],
                        "category_id": ann["category_id"],
                        "bbox": [_round(v) for v in ann["bbox"]],
                        "area": _round(ann["area"]), "iscrowd": ann["iscrowd"]})
                    next_ann_id += 1
        data = {
            "info": {"description": "synthetic shapes (tools/make_shapes_coco.py)",
                     "version": "1.0", "seed": seed, "min_size": min_size,
                     "max_size": max_size},
            "licenses": [],
            "images": images, "annotations": annotations, "categories": categories,
        }
        path = out / "annotations" / f"instances_{split}2017.json"
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        _remove_stale_images(folder, {image["file_name"] for image in images})
    return out


def _remove_stale_images(folder: Path, kept):
    """Delete images of an earlier, larger generation into the same folder (names of this
    tool's pattern that this one did not write); other files are left alone."""
    for path in folder.glob("[0-9]" * 12 + ".jpg"):
        if path.name not in kept:
            path.unlink()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (COCO layout)")
    p.add_argument("--num_train", type=int, default=200)
    p.add_argument("--num_val", type=int, default=50)
    p.add_argument("--min_size", type=int, default=96, help="smallest image side (px)")
    p.add_argument("--max_size", type=int, default=160, help="largest image side (px)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0,
                   help="processes drawing the images (0: this one; the files are the same)")
    args = p.parse_args(argv)
    try:
        out = generate(args.out, args.num_train, args.num_val, args.min_size, args.max_size,
                       args.seed, args.workers)
    except ValueError as e:
        p.error(str(e))
    print(f"wrote {args.num_train} train / {args.num_val} val images to {out}")


if __name__ == "__main__":
    sys.exit(main())
