"""Run a trained detector (DETR, Conditional DETR or Anchor DETR; read from the checkpoint) on
an image or a folder of images: writes the images with boxes, class names and scores drawn,
and ``detections.json``.

    python tools/predict.py --checkpoint runs/detr_enact/checkpoint.pth --input img.jpg \\
        --output predictions/ [--threshold 0.5] [--device cpu|cuda] [--coco_path /data/coco]

detections.json: {"checkpoint", "detector", "threshold", "images": [{"file", "output",
"width", "height", "detections": [{"label", "name", "score", "box_xyxy"}]}]} with boxes in
absolute pixels (x1, y1, x2, y2) of the original image (clipped to it; turned upright by its
EXIF orientation, as viewers show it), sorted by decreasing score; "label" is the category id
of the training annotation file; "output" is the drawn image's file name (absent with
--no_images; a name used twice gets "_2", "_3", ...).
Class names: --coco_path / --annotations if given, else the checkpoint's ``class_names``
entry, else the annotation file of the checkpoint's own --coco_path when it is on this
machine, else "class <id>". Expected problems end with "error: ..." and exit status 2.
"""
import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from detr_common.drawing import draw_detections  # noqa: E402
from detr_common.inference import (InferenceError, add_common_arguments,  # noqa: E402
                                   class_name, detect, eval_transform, list_images,
                                   load_detector_from_checkpoint, positive_int,
                                   prepare_output_dir, read_image, resolve_device, run_tool,
                                   unique_stems, write_json)

log = logging.getLogger("predict")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_arguments(p, "checkpoint.pth written by a main.py", "predictions",
                         "folder for the drawn images and detections.json (created)")
    p.add_argument("--threshold", type=float, default=0.5, help="keep detections with score >= "
                   "this (0 keeps all)")
    p.add_argument("--top_k", type=positive_int, default=None,
                   help="at most this many detections per image (the highest scores)")
    p.add_argument("--coco_path", default=None, help="COCO-layout folder to read the class "
                   "names from (annotations/instances_val2017.json)")
    p.add_argument("--annotations", default=None, help="a COCO instances JSON to read the class "
                   "names from (instead of --coco_path)")
    p.add_argument("--skip_unreadable", action="store_true",
                   help="warn and skip unreadable images in a folder instead of stopping")
    p.add_argument("--no_images", action="store_true", help="write only detections.json")
    return p


def output_name(path: Path, stem: str) -> str:
    """img.jpg -> img_pred.jpg (JPEG and PNG keep their format; others become PNG)."""
    suffix = path.suffix.lower() if path.suffix.lower() in (".jpg", ".jpeg", ".png") else ".png"
    return f"{stem}_pred{suffix}"


def run(args):
    if args.coco_path and args.annotations:
        raise InferenceError("give --coco_path or --annotations, not both")
    images = list_images(args.input)[:args.max_images]  # errors early: missing path, empty folder
    device = resolve_device(args.device)
    model, post, margs, names = load_detector_from_checkpoint(
        args.checkpoint, device, annotations=args.annotations or args.coco_path,
        detector=args.detector, enact_impl=args.enact_impl)
    transform = eval_transform(margs, args.eval_size, args.max_size)
    out_dir = prepare_output_dir(args.output)
    records, skipped = [], []
    progress = zip(images, unique_stems(images))
    if len(images) > 1:
        from tqdm import tqdm
        progress = tqdm(progress, total=len(images), desc="predict", unit="img",
                        dynamic_ncols=True)
    for path, stem in progress:
        try:
            image = read_image(path)
        except InferenceError as e:
            if not args.skip_unreadable:
                raise
            log.warning("skipped: %s", e)
            skipped.append(str(path))
            continue
        dets = detect(model, post, image, transform, device, args.threshold)[:args.top_k]
        record = {
            "file": str(path), "width": image.width, "height": image.height,
            "detections": [{"label": label, "name": class_name(names, label),
                            "score": round(score, 5),
                            "box_xyxy": [round(v, 2) for v in box]}
                           for label, score, box in dets]}
        if not args.no_images:
            record["output"] = output_name(path, stem)
            draw_detections(image, dets, names).save(out_dir / record["output"])
        records.append(record)
    result = {"checkpoint": str(args.checkpoint), "detector": margs.detector,
              "threshold": args.threshold, "images": records}
    if skipped:
        result["skipped"] = skipped
    write_json(out_dir / "detections.json", result)
    n = sum(len(r["detections"]) for r in records)
    print(f"{len(records)} image(s), {n} detection(s) with score >= {args.threshold} "
          f"-> {out_dir}/ (detections.json{'' if args.no_images else ' and *_pred images'})")
    return result


def main(argv=None):
    return run_tool(get_parser(), run, argv)


if __name__ == "__main__":
    main()
