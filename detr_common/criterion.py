"""Set-prediction losses of the DETR family (spec §3.1-3.3).

``SetCriterion.forward(outputs, targets)`` matches predictions to targets with the Hungarian
matcher and returns a dict of losses (all fp32 scalars, computed with autocast disabled):
  loss_ce        softmax CE with eos_coef on the no-object class (class_loss="ce"), or the
                 sigmoid focal loss (class_loss="focal", same key as upstream Conditional DETR)
  loss_bbox      L1 on normalised cxcywh, summed over matched pairs / num_boxes
  loss_giou      (1 - GIoU) on xyxy, summed over matched pairs / num_boxes
  class_error    100 - top-1 accuracy of the matched queries (logging only, no gradient)
  cardinality_error  |#predicted objects - #targets| averaged over images (logging only)
Auxiliary decoder outputs get the same losses with suffixes _0 .. _{L-2} (no class_error).
num_boxes = total targets in the batch, averaged over distributed workers, clamped >= 1.
"""
from typing import Dict, List, NamedTuple, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from .matcher import build_matcher

LOSSES = ("labels", "boxes", "cardinality")


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, num_boxes, alpha: float = 0.25,
                       gamma: float = 2.0) -> Tensor:
    """Focal loss of logits (B,Q,C) vs one-hot targets (B,Q,C) (unmatched queries all zero).

    BCE * (1-p_t)^gamma * alpha_t; mean over queries, sum over the rest, / num_boxes. (The
    detectors multiply this by num_queries, as upstream Conditional DETR.)
    """
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_boxes


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _accuracy_top1(logits: Tensor, labels: Tensor) -> Tensor:
    if labels.numel() == 0:
        return torch.zeros((), device=logits.device)
    return (logits.argmax(-1) == labels).float().mean() * 100


def expand_aux_weights(weight_dict: Dict[str, float], num_decoder_layers: int) -> Dict[str, float]:
    """{'loss_ce': w, ...} -> the same plus 'loss_ce_0'..'loss_ce_{L-2}' with the same weights."""
    out = dict(weight_dict)
    for i in range(num_decoder_layers - 1):
        out.update({f"{k}_{i}": v for k, v in weight_dict.items()})
    return out


class FlatTargets(NamedTuple):
    """A batch's targets concatenated in image order, on the predictions' device: labels (T,),
    boxes (T, 4) cxcywh, lengths (B,) targets per image."""
    labels: Tensor
    boxes: Tensor
    lengths: Tensor


class MatchedPairs(NamedTuple):
    """One decoder layer's matched pairs, on the predictions' device, each (K,) int64: the
    image (batch) and query (pred) of each pair and its target's index in FlatTargets (tgt)."""
    batch: Tensor
    pred: Tensor
    tgt: Tensor


def flatten_matches(targets: Sequence[Dict[str, Tensor]],
                    matched: Sequence[Sequence[Tuple[Tensor, Tensor]]],
                    device) -> Tuple[FlatTargets, List[MatchedPairs]]:
    """targets (list of {'labels', 'boxes'}) and the matcher's per-layer, per-image CPU
    indices -> (FlatTargets, one MatchedPairs per layer). All indices and the per-image
    target counts travel to the device in ONE pinned, non-blocking copy (a plain .to(device)
    of each small CPU tensor would make the host wait for the GPU every time)."""
    lengths = torch.as_tensor([len(t["labels"]) for t in targets], dtype=torch.int64)
    offsets = torch.cumsum(lengths, 0) - lengths
    parts, counts = [lengths], []
    for layer in matched:
        batch = [torch.full_like(src, i) for i, (src, _) in enumerate(layer)]
        pred = [src for src, _ in layer]
        tgt = [tgt + offsets[i] for i, (_, tgt) in enumerate(layer)]
        parts += [torch.cat(batch), torch.cat(pred), torch.cat(tgt)]
        counts.append(parts[-1].numel())
    host = torch.cat(parts)
    if torch.device(device).type == "cuda":
        host = host.pin_memory()
    values = host.to(device, non_blocking=True).split([len(targets)] + [c for c in counts
                                                                         for _ in range(3)])
    flat = FlatTargets(torch.cat([t["labels"] for t in targets]).to(device),
                       torch.cat([t["boxes"] for t in targets]).to(device), values[0])
    pairs = [MatchedPairs(*values[1 + 3 * i: 4 + 3 * i]) for i in range(len(matched))]
    return flat, pairs


class SetCriterion(nn.Module):
    """Hungarian-matched detection losses.

    num_classes: number of real classes C. With class_loss="ce" the logits have C+1 outputs
    (index C = no object); with "focal" they have C outputs (sigmoid).
    weight_dict: loss name -> weight (used by the engine for the total; kept here as an attribute).
    losses: subset of ("labels", "boxes", "cardinality").
    """

    def __init__(self, num_classes: int, matcher: nn.Module, weight_dict: Dict[str, float],
                 losses: Sequence[str] = LOSSES, class_loss: str = "ce", eos_coef: float = 0.1,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        if class_loss not in ("ce", "focal"):
            raise ValueError(f"class_loss must be 'ce' or 'focal', got {class_loss!r}")
        bad = [l for l in losses if l not in LOSSES]
        if bad:
            raise ValueError(f"unknown losses {bad}; choose among {LOSSES}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.losses = tuple(losses)
        self.class_loss = class_loss
        self.eos_coef = eos_coef
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    # -- individual losses: `pairs` a MatchedPairs, `flat` the batch's FlatTargets ----------
    def loss_labels(self, outputs, flat, pairs, num_boxes, log=True) -> Dict[str, Tensor]:
        logits = outputs["pred_logits"]
        matched_labels = flat.labels[pairs.tgt]
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64,
                                    device=logits.device)
        target_classes[pairs.batch, pairs.pred] = matched_labels
        if self.class_loss == "ce":
            loss = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)
        else:
            onehot = F.one_hot(target_classes, self.num_classes + 1)[..., :-1].to(logits.dtype)
            loss = sigmoid_focal_loss(logits, onehot, num_boxes, self.focal_alpha,
                                      self.focal_gamma) * logits.shape[1]
        out = {"loss_ce": loss}
        if log:
            matched_logits = logits[pairs.batch, pairs.pred].detach()
            out["class_error"] = 100 - _accuracy_top1(matched_logits, matched_labels)
        return out

    @torch.no_grad()
    def loss_cardinality(self, outputs, flat, pairs, num_boxes) -> Dict[str, Tensor]:
        """Logging only. Softmax head: queries whose argmax is not no-object; sigmoid head:
        queries with max probability > 0.5 (upstream's argmax rule is meaningless there)."""
        logits = outputs["pred_logits"]
        if self.class_loss == "ce":
            predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        else:
            predicted = (logits.sigmoid().amax(-1) > 0.5).sum(1)
        return {"cardinality_error": F.l1_loss(predicted.float(), flat.lengths.float())}

    def loss_boxes(self, outputs, flat, pairs, num_boxes) -> Dict[str, Tensor]:
        src = outputs["pred_boxes"][pairs.batch, pairs.pred]
        tgt = flat.boxes[pairs.tgt].to(src)
        loss_bbox = F.l1_loss(src, tgt, reduction="none").sum() / num_boxes
        if src.shape[0]:
            giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))
        else:
            giou = src.new_ones(0)
        loss_giou = (1 - giou).sum() / num_boxes
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def _get_loss(self, name, outputs, flat, pairs, num_boxes, **kwargs):
        fn = {"labels": self.loss_labels, "boxes": self.loss_boxes,
              "cardinality": self.loss_cardinality}[name]
        return fn(outputs, flat, pairs, num_boxes, **kwargs)

    def num_boxes(self, targets, device) -> Tensor:
        """Total targets in the batch averaged over workers, clamped >= 1 (fp32 scalar)."""
        n = torch.full((), float(sum(len(t["labels"]) for t in targets)), device=device)
        if _is_dist() and dist.get_world_size() > 1:
            dist.all_reduce(n)
            n = n / dist.get_world_size()
        return n.clamp(min=1)

    @staticmethod
    def _fp32(outputs):
        return {k: v.float() for k, v in outputs.items() if k in ("pred_logits", "pred_boxes")}

    def forward(self, outputs: Dict, targets: Sequence[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        device = outputs["pred_logits"].device
        with torch.autocast(device_type=device.type, enabled=False):
            layers = [self._fp32(outputs)]
            layers += [self._fp32(aux) for aux in outputs.get("aux_outputs") or []]
            num_boxes = self.num_boxes(targets, device)
            matched = self.matcher.match_layers(layers, targets)
            flat, pairs = flatten_matches(targets, matched, device)
            losses = {}
            for i, (out, layer_pairs) in enumerate(zip(layers, pairs)):
                suffix = "" if i == 0 else f"_{i - 1}"
                for name in self.losses:
                    kwargs = {"log": False} if (i and name == "labels") else {}
                    part = self._get_loss(name, out, flat, layer_pairs, num_boxes, **kwargs)
                    losses.update({f"{k}{suffix}": v for k, v in part.items()})
        return losses


def build_criterion(args, num_classes: int, class_loss: str) -> SetCriterion:
    """Matcher + SetCriterion from the flags, for ``class_loss`` "ce" (DETR: softmax class
    cost, ``eos_coef``) or "focal" (Conditional / Anchor DETR: focal class cost,
    ``focal_alpha``). Weights ``cls_loss_coef``, ``bbox_loss_coef``, ``giou_loss_coef``, copied
    to the ``dec_layers - 1`` auxiliary outputs unless ``aux_loss`` is off."""
    weight_dict = {"loss_ce": args.cls_loss_coef, "loss_bbox": args.bbox_loss_coef,
                   "loss_giou": args.giou_loss_coef}
    if getattr(args, "aux_loss", True):
        weight_dict = expand_aux_weights(weight_dict, args.dec_layers)
    matcher = build_matcher(args, class_cost="softmax" if class_loss == "ce" else "focal")
    return SetCriterion(num_classes, matcher, weight_dict, ("labels", "boxes", "cardinality"),
                        class_loss=class_loss, eos_coef=getattr(args, "eos_coef", 0.1),
                        focal_alpha=getattr(args, "focal_alpha", 0.25), focal_gamma=2.0)
