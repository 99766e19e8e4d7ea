"""Hungarian matcher between predictions and targets (spec §3.1-3.3).

Cost per (query, target): cost_class*C_cls + cost_bbox*L1(cxcywh) + cost_giou*(-GIoU(xyxy)).
C_cls: "softmax": -softmax(logits)[target class] (DETR);
       "focal": alpha(1-p)^g(-log(p+1e-8)) - (1-alpha)p^g(-log(1-p+1e-8)), p = sigmoid
                (Conditional / Anchor DETR).
Computed in fp32 with autocast disabled; non-finite costs are replaced by a large finite value so
scipy's linear_sum_assignment always succeeds. One assignment per image on the CPU;
``match_layers`` matches all decoder layers with one device->host copy.
"""
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou

#: replacement for NaN / +inf costs (and -BIG for -inf).
BIG_COST = 1e8


def class_cost_softmax(logits: Tensor, labels: Tensor) -> Tensor:
    """logits (P, C+1), labels (T,) -> (P, T) = -softmax prob of the target class."""
    return -logits.softmax(-1)[:, labels]


def class_cost_focal(logits: Tensor, labels: Tensor, alpha: float = 0.25,
                     gamma: float = 2.0) -> Tensor:
    """logits (P, C), labels (T,) -> (P, T) focal matching cost at the target class."""
    prob = logits.sigmoid()
    neg = (1 - alpha) * prob.pow(gamma) * -(1 - prob + 1e-8).log()
    pos = alpha * (1 - prob).pow(gamma) * -(prob + 1e-8).log()
    return pos[:, labels] - neg[:, labels]


class HungarianMatcher(nn.Module):
    """forward(outputs{'pred_logits' (B,Q,C'), 'pred_boxes' (B,Q,4) cxcywh}, targets[list of
    {'labels' (n,), 'boxes' (n,4) cxcywh}]) -> list of (pred_idx int64 (k,), tgt_idx int64 (k,)),
    k = min(Q, n), both on the CPU."""

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 1.0, cost_giou: float = 1.0,
                 class_cost: str = "softmax", focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        if class_cost not in ("softmax", "focal"):
            raise ValueError(f"class_cost must be 'softmax' or 'focal', got {class_cost!r}")
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matcher costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.class_cost = class_cost
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def cost_matrix(self, logits: Tensor, boxes: Tensor, tgt_labels: Tensor,
                    tgt_boxes: Tensor) -> Tensor:
        """logits (P,C'), boxes (P,4), tgt_labels (T,), tgt_boxes (T,4) -> finite (P,T) fp32."""
        logits, boxes, tgt_boxes = logits.float(), boxes.float(), tgt_boxes.float()
        if self.class_cost == "softmax":
            c_cls = class_cost_softmax(logits, tgt_labels)
        else:
            c_cls = class_cost_focal(logits, tgt_labels, self.focal_alpha, self.focal_gamma)
        c_bbox = torch.cdist(boxes, tgt_boxes, p=1)
        c_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
        cost = self.cost_bbox * c_bbox + self.cost_class * c_cls + self.cost_giou * c_giou
        return torch.nan_to_num(cost, nan=BIG_COST, posinf=BIG_COST, neginf=-BIG_COST)

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor],
                targets: Sequence[Dict[str, Tensor]]) -> List[Tuple[Tensor, Tensor]]:
        return self.match_layers(outputs["pred_logits"][None], outputs["pred_boxes"][None],
                                 targets)[0]

    @torch.no_grad()
    def match_layers(self, logits: Tensor, boxes: Tensor,
                     targets: Sequence[Dict[str, Tensor]]) -> List[List[Tuple[Tensor, Tensor]]]:
        """Match L decoder layers' outputs, logits (L,B,Q,C') and boxes (L,B,Q,4) cxcywh, to
        the same targets -> one ``forward`` result per layer. The cost matrices of all layers
        are computed in one pass and copied to the CPU together: one device->host wait per
        training step."""
        n_layers, bs, num_queries = logits.shape[:3]
        sizes = [len(t["boxes"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [[(empty, empty.clone()) for _ in sizes] for _ in range(n_layers)]
        with torch.autocast(device_type=logits.device.type, enabled=False):
            tgt_labels = torch.cat([t["labels"] for t in targets]).to(logits.device)
            tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(logits.device)
            cost = self.cost_matrix(logits.flatten(0, 2), boxes.flatten(0, 2), tgt_labels,
                                    tgt_boxes)
        # float32 on the host: scipy takes each image's (Q, T_b) block to float64 itself,
        # where converting the whole stack (B times the blocks) cost 1-5 ms per step
        cost = cost.view(n_layers, bs, num_queries, -1).cpu()
        # imported here, on the first matching: scipy.optimize takes about 0.7 s to import, which
        # a command that stops before training (--help, a bad flag or path) need not wait for
        from scipy.optimize import linear_sum_assignment
        result = []
        for layer_cost in cost:
            indices = []
            for i, c in enumerate(layer_cost.split(sizes, dim=-1)):
                if sizes[i] == 0:
                    indices.append((empty, empty.clone()))
                    continue
                rows, cols = linear_sum_assignment(c[i].numpy())
                indices.append((torch.as_tensor(rows, dtype=torch.int64),
                                torch.as_tensor(cols, dtype=torch.int64)))
            result.append(indices)
        return result


def build_matcher(args, class_cost: str = "softmax") -> HungarianMatcher:
    """From args.set_cost_class, args.set_cost_bbox, args.set_cost_giou (and args.focal_alpha
    if present); class_cost "softmax" (DETR) or "focal" (Conditional / Anchor DETR)."""
    return HungarianMatcher(cost_class=args.set_cost_class, cost_bbox=args.set_cost_bbox,
                            cost_giou=args.set_cost_giou, class_cost=class_cost,
                            focal_alpha=getattr(args, "focal_alpha", 0.25))
