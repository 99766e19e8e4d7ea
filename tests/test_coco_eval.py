"""COCO evaluation against hand-computed APs."""
import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from detr_common.coco_eval import CocoEvaluator

# Two images, three objects, non-contiguous category ids; boxes are COCO xywh.
GT_BOXES = {1: [(3, [50, 50, 100, 100])], 2: [(7, [10, 20, 120, 110]), (3, [150, 40, 60, 80])]}


@pytest.fixture()
def coco_gt(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "width": 320, "height": 240} for i in GT_BOXES]
    anns = []
    for image_id, objects in GT_BOXES.items():
        for cat, (x, y, w, h) in objects:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat,
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    cats = [{"id": 3, "name": "circle"}, {"id": 7, "name": "star"}]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return COCO(str(path))


def predictions(dx=0.0):
    """Every GT box as a detection with score 0.9, shifted right by ``dx`` pixels (xyxy)."""
    out = {}
    for image_id, objects in GT_BOXES.items():
        boxes = torch.tensor([[x + dx, y, x + w + dx, y + h] for _, (x, y, w, h) in objects],
                             dtype=torch.float32)
        out[image_id] = {"scores": torch.full((len(objects),), 0.9),
                         "labels": torch.tensor([c for c, _ in objects]), "boxes": boxes}
    return out


def test_perfect_detections_give_ap_one(coco_gt):
    ev = CocoEvaluator(coco_gt)
    ev.update(predictions())
    ev.synchronize_between_processes()
    stats = ev.evaluate()
    assert stats[0] == pytest.approx(1.0)
    assert stats[1] == pytest.approx(1.0)
    assert [ap for _, ap in ev.per_class_ap()] == [pytest.approx(1.0), pytest.approx(1.0)]


def test_images_repeated_across_processes_count_once(coco_gt, monkeypatch):
    # DistributedSampler pads the split by repeating images: rank 1 evaluates image 1 again
    # (and within a process, a repeated image is kept once too)
    rank0, rank1 = CocoEvaluator(coco_gt), CocoEvaluator(coco_gt)
    rank0.update({1: predictions()[1]})
    rank0.update({1: predictions()[1]})
    rank1.update({2: predictions()[2]})
    rank1.update({1: predictions()[1]})
    gathered = lambda obj: [(rank0.image_ids, rank0.detections), obj]  # noqa: E731
    monkeypatch.setattr("detr_common.coco_eval.all_gather_object", gathered)
    rank1.synchronize_between_processes()
    assert rank1.image_ids == [1, 2] and len(rank1.detections) == 3
    assert rank1.evaluate()[0] == pytest.approx(1.0)


def test_shifted_detections_give_the_hand_computed_ap(coco_gt):
    # Image 1 alone: one 100x100 box shifted by 20 px, IoU = 80*100 / (2*100*100 - 80*100)
    # = 2/3, so it matches at the IoU thresholds .50 .55 .60 .65 only: AP = 4/10, AP50 = 1,
    # AP75 = 0 (it is a "large" object: area 10000 > 96^2).
    ev = CocoEvaluator(coco_gt)
    ev.update({1: predictions(dx=20.0)[1]})
    stats = ev.evaluate()
    assert stats[0] == pytest.approx(0.4)
    assert stats[1] == pytest.approx(1.0)
    assert stats[2] == pytest.approx(0.0)
    assert stats[5] == pytest.approx(0.4)
    assert dict(ev.per_class_ap())["circle"] == pytest.approx(0.4)


def test_no_detections_gives_zero(coco_gt, tmp_path):
    ev = CocoEvaluator(coco_gt)
    ev.update({1: {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long),
                   "boxes": torch.zeros(0, 4)}})
    assert np.all(ev.evaluate() == 0)
    ev.write(tmp_path / "out", detections=True)
    assert json.loads((tmp_path / "out" / "detections.json").read_text()) == []


def test_write_detections_in_coco_xywh(coco_gt, tmp_path):
    ev = CocoEvaluator(coco_gt)
    ev.update(predictions())
    ev.evaluate()
    ev.write(tmp_path, detections=True)
    dets = json.loads((tmp_path / "detections.json").read_text())
    assert {tuple(d["bbox"]) for d in dets if d["image_id"] == 1} == {(50, 50, 100, 100)}
    assert (tmp_path / "eval" / "latest.pth").is_file()
    assert "circle" in (tmp_path / "per_class_ap.txt").read_text()
