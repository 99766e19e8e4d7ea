"""Pictures for the tools: detections drawn on images, heat maps, ENACT regions, panels.

Images are PIL RGB; maps are numpy arrays (H, W) at the feature-grid or image resolution.
Only PIL, numpy and OpenCV (colour maps, resizing) are used: no matplotlib needed.
"""
import colorsys
from typing import Dict, Iterable, List, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLORMAPS = {"inferno": cv2.COLORMAP_INFERNO, "viridis": cv2.COLORMAP_VIRIDIS,
             "magma": cv2.COLORMAP_MAGMA, "jet": cv2.COLORMAP_JET, "turbo": cv2.COLORMAP_TURBO}


def colour(index: int, saturation=0.85, value=0.95) -> Tuple[int, int, int]:
    """A distinct RGB colour for an integer (golden-ratio hue steps: neighbours differ)."""
    hue = (int(index) * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
    return int(r * 255), int(g * 255), int(b * 255)


def font(size: int):
    """PIL's default font at ``size`` px when this Pillow can scale it, else the bitmap one."""
    try:
        return ImageFont.load_default(size=max(8, int(size)))
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _text_size(draw, text, fnt):
    left, top, right, bottom = draw.textbbox((0, 0), text, font=fnt)
    return right - left, bottom - top


def draw_detections(image: Image.Image, detections: Iterable[Tuple[int, float, Sequence[float]]],
                    names: Dict[int, str], line_width=None) -> Image.Image:
    """A copy of ``image`` with each (label, score, xyxy box) drawn: a box in the label's
    colour and a filled tag "name 0.87" above it (inside the box when at the top edge)."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    side = min(out.size)
    width = line_width or max(1, round(side / 200))
    fnt = font(max(10, round(side / 30)))
    for label, score, box in detections:
        rgb = colour(label)
        x1, y1, x2, y2 = [float(v) for v in box]
        draw.rectangle((x1, y1, x2, y2), outline=rgb, width=width)
        text = f"{names.get(int(label), f'class {int(label)}')} {score:.2f}"
        tw, th = _text_size(draw, text, fnt)
        ty = y1 - th - 2 * width if y1 - th - 2 * width >= 0 else y1
        draw.rectangle((x1, ty, x1 + tw + 2 * width, ty + th + 2 * width), fill=rgb)
        lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
        draw.text((x1 + width, ty + width - draw.textbbox((0, 0), text, font=fnt)[1]), text,
                  fill=(0, 0, 0) if lum > 140 else (255, 255, 255), font=fnt)
    return out


def resize_map(grid: np.ndarray, size: Tuple[int, int], nearest=True) -> np.ndarray:
    """(h, w) map -> (H, W) = ``size`` (height, width). Nearest: output row r takes grid row
    floor(r * h / H) (as torch's nearest interpolation, so cells stay blocks; any dtype);
    otherwise bilinear (float32)."""
    height, width = size
    if nearest:
        rows = np.minimum((np.arange(height) * grid.shape[0]) // height, grid.shape[0] - 1)
        cols = np.minimum((np.arange(width) * grid.shape[1]) // width, grid.shape[1] - 1)
        return grid[rows[:, None], cols[None, :]]
    return cv2.resize(grid.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)


def heatmap(values: np.ndarray, valid=None, cmap="inferno") -> Image.Image:
    """(H, W) float map -> RGB image, min-max normalised over ``valid`` pixels (grey where
    not valid)."""
    v = values.astype(np.float64)
    valid = np.ones(v.shape, bool) if valid is None else valid.astype(bool)
    if valid.any():
        lo, hi = v[valid].min(), v[valid].max()
    else:
        lo, hi = 0.0, 1.0
    norm = np.zeros_like(v) if hi <= lo else (v - lo) / (hi - lo)
    u8 = np.clip(np.round(norm * 255), 0, 255).astype(np.uint8)
    rgb = cv2.applyColorMap(u8, COLORMAPS[cmap])[..., ::-1].copy()
    rgb[~valid] = 128
    return Image.fromarray(rgb)


def region_boundaries(labels: np.ndarray) -> np.ndarray:
    """(H, W) integer labels -> bool (H, W), True on a pixel whose right or lower neighbour
    has another label (so a boundary is drawn once, on the upper/left side)."""
    edge = np.zeros(labels.shape, bool)
    edge[:, :-1] |= labels[:, 1:] != labels[:, :-1]
    edge[:-1, :] |= labels[1:, :] != labels[:-1, :]
    return edge


def draw_regions(image: Image.Image, labels: np.ndarray, alpha=0.4,
                 boundary_rgb=(255, 255, 255), thickness=1) -> Image.Image:
    """``image`` with each region (labels (H, W) at image size, -1 = padding) tinted in its own
    colour at ``alpha`` and the region boundaries drawn in ``boundary_rgb``."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    ids = np.unique(labels)
    lut = np.zeros((int(ids.max()) + 2, 3), np.float32)
    for r in ids:
        lut[int(r) + 1] = colour(int(r)) if r >= 0 else (128, 128, 128)
    tint = lut[labels + 1]
    out = base * (1 - alpha) + tint * alpha
    edge = region_boundaries(labels)
    if thickness > 1:
        edge = cv2.dilate(edge.astype(np.uint8), np.ones((thickness, thickness), np.uint8)) > 0
    out[edge] = boundary_rgb
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))


def panel(images: List[Image.Image], titles: List[str], gap=4) -> Image.Image:
    """Images of one height side by side with a title strip above each."""
    height = max(im.height for im in images)
    fnt = font(max(11, min(18, round(height / 14))))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    strip = max(_text_size(probe, t or "Ag", fnt)[1] for t in titles) + 8
    width = sum(im.width for im in images) + gap * (len(images) - 1)
    out = Image.new("RGB", (width, height + strip), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    x = 0
    for im, title in zip(images, titles):
        out.paste(im.convert("RGB"), (x, strip))
        tw, _ = _text_size(draw, title, fnt)
        draw.text((x + max(0, (im.width - tw) // 2), 3), title, fill=(0, 0, 0), font=fnt)
        x += im.width + gap
    return out
