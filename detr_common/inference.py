"""Inference helpers shared by the tools (predict, visualize_entropy): rebuild a detector from a
training checkpoint, find its class names, prepare single images, run and post-process.

Coordinates: the model sees the image after the eval transform (shorter side ``eval_size``,
longer side <= ``max_size``); detections come back as absolute xyxy pixels of the ORIGINAL
image (``target_sizes`` = the original (h, w), spec §5).
"""
import copy
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

import torch
from PIL import Image, ImageOps

from . import checkpoint as ckpt_io
from .data import DatasetError, load_coco_json, make_transforms
from .data.coco import to_rgb
from .data.collate import ImageBatch, pad_images
from .data.transforms import DEFAULT_EVAL_SIZE, DEFAULT_MAX_SIZE

REPO_ROOT = Path(__file__).resolve().parents[1]

# checkpoint["detector"] -> (folder of the repository, package inside it)
DETECTORS = {
    "detr": ("DETR-ENACT", "detr"),
    "conditional_detr": ("Conditional-DETR-ENACT", "conditional_detr"),
    "anchor_detr": ("Anchor-DETR-ENACT", "anchor_detr"),
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class InferenceError(RuntimeError):
    """A problem with the tools' inputs; the message is one line naming the file and problem."""


class LoadedDetector(NamedTuple):
    model: torch.nn.Module          # eval mode, on the requested device
    postprocessor: torch.nn.Module
    args: object                    # the checkpoint's argparse.Namespace (copy; .detector set)
    class_names: Dict[int, str]     # category id -> name ({} when unknown)


# --------------------------------------------------------------------------- detector packages

def import_detector_package(detector: str):
    """Import the model package of ``detector`` ("detr" | "conditional_detr" | "anchor_detr").

    Only the package is imported (its folder is put on sys.path): never the folder's main.py /
    engine.py, whose module names are the same in every detector folder.
    """
    if detector not in DETECTORS:
        raise InferenceError(f"unknown detector {detector!r} (expected one of "
                             f"{', '.join(DETECTORS)})")
    folder, package = DETECTORS[detector]
    path = str(REPO_ROOT / folder)
    if not (REPO_ROOT / folder / package / "__init__.py").is_file():
        raise InferenceError(f"{REPO_ROOT / folder / package}: the {detector} package is missing "
                             f"from this checkout")
    if path not in sys.path:
        sys.path.insert(0, path)
    return importlib.import_module(package)


def guess_detector(state_dict) -> Optional[str]:
    """The detector of a state_dict without a ``detector`` entry, from characteristic keys."""
    keys = list(state_dict)
    if any(k.startswith("transformer.pattern.") for k in keys):
        return "anchor_detr"
    if any("ca_qpos_sine_proj" in k for k in keys):
        return "conditional_detr"
    if any(k.startswith("query_embed.") for k in keys) and any(
            k.startswith("transformer.decoder.") for k in keys):
        return "detr"
    return None


def checkpoint_detector(path, ckpt, override=None) -> str:
    """ckpt["detector"], else ``override``, else a guess from the keys; InferenceError if none,
    or if ``override`` contradicts the checkpoint's own entry."""
    saved = ckpt.get("detector")
    if override is not None and saved is not None and override != saved:
        raise InferenceError(f"{path}: this is a '{saved}' checkpoint, not '{override}' (drop "
                             f"--detector: it is only for checkpoints without a 'detector' "
                             f"entry)")
    name = saved or override or guess_detector(ckpt["model"])
    if name is None:
        raise InferenceError(f"{path}: the checkpoint does not say which detector it is (no "
                             f"'detector' entry): pass --detector "
                             f"{{{','.join(DETECTORS)}}}")
    if name not in DETECTORS:
        raise InferenceError(f"{path}: unknown detector {name!r} (expected one of "
                             f"{', '.join(DETECTORS)})")
    return name


# --------------------------------------------------------------------------- class names

def _names_from_categories(categories) -> Dict[int, str]:
    names = {}
    for cat in categories or []:
        if isinstance(cat, dict) and "id" in cat:
            names[int(cat["id"])] = str(cat.get("name", f"class {cat['id']}"))
    return names


def class_names_from_annotations(path) -> Dict[int, str]:
    """Category id -> name from a COCO instances JSON, or from a COCO root folder (its
    annotations/instances_val2017.json, else instances_train2017.json). Raises
    InferenceError with the reason when neither can be read."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / "annotations" / f"instances_{s}2017.json" for s in ("val", "train")]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise InferenceError(f"{path}: no annotations/instances_val2017.json or "
                                 f"instances_train2017.json to read the class names from")
        path = found[0]
    try:
        data = load_coco_json(path)
    except DatasetError as e:
        raise InferenceError(str(e)) from None
    return _names_from_categories(data["categories"])


def _names_from_checkpoint_entry(entry) -> Dict[int, str]:
    if isinstance(entry, dict):
        return {int(k): str(v) for k, v in entry.items()}
    if isinstance(entry, (list, tuple)):
        if entry and isinstance(entry[0], dict):
            return _names_from_categories(entry)
        return {i: str(n) for i, n in enumerate(entry) if n is not None}
    return {}


def resolve_class_names(ckpt, annotations=None) -> Dict[int, str]:
    """Class names, first found of: ``annotations`` (a COCO JSON file or root folder, given by
    the user), the checkpoint's ``class_names`` entry, the annotation file under the
    checkpoint's own ``args.coco_path`` when it exists on this machine. {} if none."""
    if annotations:
        return class_names_from_annotations(annotations)
    names = _names_from_checkpoint_entry(ckpt.get("class_names"))
    if names:
        return names
    coco_path = getattr(ckpt.get("args"), "coco_path", None)
    if coco_path and Path(coco_path).is_dir():
        try:
            return class_names_from_annotations(coco_path)
        except InferenceError:
            return {}
    return {}


def class_name(names: Dict[int, str], label: int) -> str:
    return names.get(int(label), f"class {int(label)}")


# --------------------------------------------------------------------------- loading

def resolve_device(device: Optional[str]) -> torch.device:
    """``None`` -> cuda when available else cpu; a CUDA device that is absent -> InferenceError."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InferenceError(f"--device {device!r}: not a device (use cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InferenceError(f"--device {device}: CUDA is not available here (use --device cpu)")
    return dev


def load_detector_from_checkpoint(path, device="cpu", annotations=None, detector=None,
                                  enact_impl=None) -> LoadedDetector:
    """Rebuild the detector saved in a training checkpoint and load its weights strictly.

    The checkpoint's ``detector`` picks the package (override with ``detector``); the model is
    built from the saved ``args`` with ``backbone_weights`` = "none" (the checkpoint holds the
    weights, nothing is downloaded) on ``device``. ``enact_impl`` overrides the saved ENACT
    backend; a saved "cuda" becomes "auto" on a CPU device. Returns the model in eval mode.
    Raises InferenceError / CheckpointError (one line) for unusable files.
    """
    path = Path(path)
    ckpt = ckpt_io.load_checkpoint(path)
    name = checkpoint_detector(path, ckpt, detector)
    saved = ckpt.get("args")
    if saved is None:
        raise InferenceError(f"{path}: the checkpoint has no 'args' entry, so the model cannot "
                             f"be rebuilt (was it written by a main.py of this repository?)")
    device = torch.device(device) if not isinstance(device, torch.device) else device
    if enact_impl == "cuda":
        check_enact_cuda(device)
    args = copy.copy(saved)
    args.backbone_weights = "none"
    args.device = str(device)
    args.pretrained = ""
    args.resume = ""
    args.detector = name
    if enact_impl is not None:
        args.enact_impl = enact_impl
    elif getattr(args, "enact_impl", None) == "cuda" and device.type != "cuda":
        args.enact_impl = "auto"
    package = import_detector_package(name)
    model, _criterion, postprocessor = package.build(args)
    ckpt_io.load_model_state(model, path, ckpt, args)
    model.to(device).eval()
    postprocessor.to(device)
    return LoadedDetector(model, postprocessor, args, resolve_class_names(ckpt, annotations))


def check_enact_cuda(device: torch.device):
    """InferenceError unless ENACT's CUDA backend can run on ``device`` (--enact_impl cuda)."""
    if device.type != "cuda":
        raise InferenceError("--enact_impl cuda needs --device cuda (on the CPU use auto or "
                             "torch)")
    from enact_cuda.information import cuda_backend_or_reason
    backend, reason = cuda_backend_or_reason()
    if backend is None:
        raise InferenceError(f"--enact_impl cuda: the CUDA backend is unavailable ({reason}); "
                             f"use --enact_impl auto")


def prepare_output_dir(path) -> Path:
    """Create the output folder ``path``; InferenceError if it is an existing file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InferenceError(f"--output {path}: is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InferenceError(f"--output {path}: cannot create the folder ({e.strerror})") from None
    return path


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


positive_int.__name__ = "integer >= 1"  # argparse names the type in its error message


# --------------------------------------------------------------------------- images

def list_images(paths) -> List[Path]:
    """Image files of ``paths`` (one path or a list): a file is taken as is, a folder gives its
    image files (sorted, not recursive). InferenceError if a path does not exist or a folder
    holds no images."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    images = []
    for path in map(Path, paths):
        if path.is_file():
            images.append(path)
            continue
        if not path.exists():
            raise InferenceError(f"{path}: no such file or folder")
        found = sorted(p for p in path.iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not found:
            raise InferenceError(f"{path}: no images in this folder (looked for "
                                 f"{', '.join(IMAGE_EXTENSIONS)})")
        images += found
    if not images:
        raise InferenceError("no input images given")
    return images


def unique_stems(images: List[Path]) -> List[str]:
    """File stems for output names, all different (also ignoring case, for case-insensitive
    file systems): a stem already used (the same name in two folders, a.jpg and a.png, or a
    renamed one) gets the first free "_2", "_3", ... so no output overwrites another."""
    used, out = set(), []
    for path in images:
        stem, n = path.stem, 1
        while stem.casefold() in used:
            n += 1
            stem = f"{path.stem}_{n}"
        used.add(stem.casefold())
        out.append(stem)
    return out


def read_image(path) -> Image.Image:
    """Open an image as RGB (fully decoded), turned upright by its EXIF orientation tag (as
    viewers show it: phone photos are stored sideways); InferenceError naming the file if
    unreadable. Detections are in this upright image's pixels."""
    try:
        with Image.open(path) as im:
            return to_rgb(ImageOps.exif_transpose(im))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        text = " ".join(str(e).split())
        raise InferenceError(f"{path}: cannot read image ({text})") from None


def eval_transform(args, eval_size=None, max_size=None):
    """The checkpoint's evaluation transform (resize + ToTensor + Normalize, spec §5)."""
    return make_transforms("val", eval_size=eval_size or getattr(args, "eval_size", None)
                           or DEFAULT_EVAL_SIZE,
                           max_size=max_size or getattr(args, "max_size", None)
                           or DEFAULT_MAX_SIZE)


def prepare_image(image: Image.Image, transform, device) -> ImageBatch:
    """PIL image -> ImageBatch of one image (3, H', W') after ``transform``, no padding."""
    tensor, _ = transform(image, None)
    return pad_images([tensor]).to(device)


@torch.no_grad()
def detect(model, postprocessor, image: Image.Image, transform, device, threshold=0.5):
    """Run the detector on one PIL image -> list of (label, score, [x1, y1, x2, y2]) in the
    original image's pixels (clipped to the image), sorted by decreasing score,
    score >= threshold."""
    batch = prepare_image(image, transform, device)
    outputs = model(batch)
    sizes = torch.tensor([[image.height, image.width]], device=device)
    result = postprocessor(outputs, sizes)[0]
    scores, labels, boxes = (result["scores"].float().cpu(), result["labels"].cpu(),
                             result["boxes"].float().cpu())
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, image.width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, image.height)
    keep = scores >= threshold
    order = scores[keep].argsort(descending=True)
    return [(int(l), float(s), [float(v) for v in b])
            for s, l, b in zip(scores[keep][order], labels[keep][order], boxes[keep][order])]


def write_json(path, data):
    Path(path).write_text(json.dumps(data, indent=1))


def add_common_arguments(parser, checkpoint_help: str, output_default: str, output_help: str):
    """The flags predict.py and visualize_entropy.py share: checkpoint, inputs, output folder,
    device, detector override, ENACT backend and input resolution."""
    p = parser
    p.add_argument("--checkpoint", required=True, help=checkpoint_help)
    p.add_argument("--input", required=True, nargs="+",
                   help="image files and/or folders of images")
    p.add_argument("--max_images", type=positive_int, default=None,
                   help="only the first N images (in the order given, folders sorted)")
    p.add_argument("--output", default=output_default, help=output_help)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--detector", choices=sorted(DETECTORS), default=None,
                   help="only for checkpoints without a 'detector' entry")
    p.add_argument("--enact_impl", choices=["auto", "cuda", "torch"], default=None,
                   help="ENACT backend (default: the checkpoint's; cuda becomes auto on the CPU)")
    p.add_argument("--eval_size", type=int, default=None,
                   help="shorter side fed to the model (default: the checkpoint's --eval_size)")
    p.add_argument("--max_size", type=int, default=None,
                   help="longest side fed to the model (default: the checkpoint's --max_size)")


def run_tool(parser, run, argv=None):
    """Parse flags and call ``run(args)``; expected failures end with one ``error:`` line and
    exit status 2."""
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (InferenceError, ckpt_io.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
