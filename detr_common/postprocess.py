"""Model outputs -> per-image detections in absolute xyxy of the original image (spec §5).

forward(outputs{'pred_logits' (B,Q,C'), 'pred_boxes' (B,Q,4) normalised cxcywh},
        target_sizes (B,2) (h, w)) -> list of B dicts {scores (K,), labels (K,) int64,
        boxes (K,4) xyxy in pixels}.
"""
from typing import Dict, List

import torch
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy


def _scale_boxes(boxes: Tensor, target_sizes: Tensor) -> Tensor:
    """boxes (B,K,4) normalised cxcywh, target_sizes (B,2) (h,w) -> (B,K,4) absolute xyxy."""
    h, w = target_sizes.to(boxes).unbind(1)
    scale = torch.stack((w, h, w, h), dim=1)[:, None, :]
    return box_cxcywh_to_xyxy(boxes) * scale


class PostProcess(nn.Module):
    """DETR (softmax head, last class = no object): K = Q detections per image; score and
    label = max / argmax of the softmax over the real classes."""

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], target_sizes: Tensor) -> List[Dict[str, Tensor]]:
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        if len(logits) != len(target_sizes):
            raise ValueError(f"{len(logits)} predictions but {len(target_sizes)} target sizes")
        scores, labels = logits.softmax(-1)[..., :-1].max(-1)
        boxes = _scale_boxes(boxes, target_sizes)
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]


class PostProcessTopK(nn.Module):
    """Sigmoid heads (Conditional / Anchor DETR): the top-k (default 100) scores over the
    flattened (queries x classes) sigmoid probabilities; query = idx // C, label = idx % C.
    A query may appear with several labels."""

    def __init__(self, k: int = 100):
        super().__init__()
        self.k = k

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], target_sizes: Tensor) -> List[Dict[str, Tensor]]:
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        if len(logits) != len(target_sizes):
            raise ValueError(f"{len(logits)} predictions but {len(target_sizes)} target sizes")
        bs, num_queries, num_classes = logits.shape
        prob = logits.sigmoid().flatten(1)
        scores, idx = prob.topk(min(self.k, prob.shape[1]), dim=1)
        query = torch.div(idx, num_classes, rounding_mode="floor")
        labels = idx % num_classes
        boxes = torch.gather(boxes, 1, query[..., None].expand(-1, -1, 4))
        boxes = _scale_boxes(boxes, target_sizes)
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]
