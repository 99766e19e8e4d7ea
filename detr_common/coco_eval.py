"""COCO box evaluation: gather every process's detections, then one pycocotools run."""
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import torch
from pycocotools.cocoeval import COCOeval

from .distributed import all_gather_object

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
              "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


class CocoEvaluator:
    """Collects detections (absolute xyxy boxes in the original image) and scores them."""

    def __init__(self, coco_gt):
        self.coco_gt = coco_gt
        self.detections = []
        self.image_ids = []  # in the order seen, each once
        self._seen = set()   # the same ids, for the membership test of update()
        self.coco_eval = None
        self.summary = ""

    def update(self, predictions):
        """``predictions``: {image_id: {"scores" (Q,), "labels" (Q,), "boxes" (Q, 4) xyxy}}.
        An image seen before is skipped (its detections would count twice)."""
        for image_id, pred in predictions.items():
            image_id = int(image_id)
            if image_id in self._seen:
                continue
            self._seen.add(image_id)
            self.image_ids.append(image_id)
            boxes = pred["boxes"].detach().float().cpu()
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
            for box, score, label in zip(xywh, pred["scores"].tolist(), pred["labels"].tolist()):
                self.detections.append({"image_id": int(image_id), "category_id": int(label),
                                        "bbox": [round(v, 3) for v in box],
                                        "score": round(float(score), 5)})

    def synchronize_between_processes(self):
        """Every process's detections, each image's once: DistributedSampler pads the split
        by repeating images, whose second set of detections would count as false positives."""
        taken, detections = set(), []
        for image_ids, dets in all_gather_object((self.image_ids, self.detections)):
            new = set(image_ids) - taken
            detections += [d for d in dets if d["image_id"] in new]
            taken |= new
        self.detections, self.image_ids, self._seen = detections, sorted(taken), taken

    def evaluate(self):
        """Run COCOeval once over all detections; returns the 12 stats (AP first)."""
        known = set(self.coco_gt.getCatIds())
        detections = [d for d in self.detections if d["category_id"] in known]
        if not detections:
            self.summary = "no detections of a known category: every AP is 0"
            return np.zeros(12)
        with contextlib.redirect_stdout(io.StringIO()) as out:
            coco_dt = self.coco_gt.loadRes([dict(d) for d in detections])
            ev = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
            ev.params.imgIds = self.image_ids
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        self.coco_eval = ev
        self.summary = out.getvalue().strip()
        return np.array(ev.stats)

    def per_class_ap(self):
        """[(category name, AP@[.5:.95] or nan)] over the categories of the annotation file."""
        if self.coco_eval is None:
            return []
        precision = self.coco_eval.eval["precision"]  # (T, R, K, A, M)
        rows = []
        for k, cat_id in enumerate(self.coco_eval.params.catIds):
            p = precision[:, :, k, 0, -1]
            ap = float(np.mean(p[p > -1])) if (p > -1).any() else float("nan")
            rows.append((self.coco_gt.cats[int(cat_id)]["name"], ap))
        return rows

    def per_class_table(self):
        rows = self.per_class_ap()
        width = max([len(n) for n, _ in rows] + [8])
        lines = [f"{'category':<{width}}  AP"]
        lines += [f"{name:<{width}}  {ap * 100:5.1f}" for name, ap in rows]
        return "\n".join(lines)

    def write(self, output_dir, detections=False):
        """Write the per-class table, ``eval/latest.pth`` (the COCOeval ``eval`` dict) and,
        with ``detections``, the detections as a COCO results JSON."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        if detections:
            (output_dir / "detections.json").write_text(json.dumps(self.detections))
        (output_dir / "per_class_ap.txt").write_text(self.per_class_table() + "\n")
        if self.coco_eval is not None:
            (output_dir / "eval").mkdir(exist_ok=True)
            torch.save(self.coco_eval.eval, output_dir / "eval" / "latest.pth")
