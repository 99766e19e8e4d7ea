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
All decoder layers are matched together (one device->host copy) and their losses computed
together on (L, B, Q, ...) stacks (a few dozen kernels per step instead of a few hundred);
per-layer values are the same as one layer at a time.
"""
from typing import Dict, NamedTuple, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy, paired_generalized_box_iou
from .matcher import build_matcher

LOSSES = ("labels", "boxes", "cardinality")


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, num_boxes, alpha: float = 0.25,
                       gamma: float = 2.0) -> Tensor:
    """Focal loss of logits (..., B,Q,C) vs one-hot targets of the same shape (unmatched
    queries all zero) -> (...) (a scalar for (B,Q,C) inputs; one value per layer for (L,B,Q,C)).

    BCE * (1-p_t)^gamma * alpha_t; mean over queries, sum over images and classes,
    / num_boxes. (The detectors multiply this by num_queries, as upstream Conditional DETR.)
    """
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(-2).flatten(-2).sum(-1) / num_boxes


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


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
    """The matched pairs of L decoder layers, on the predictions' device, each (L, K) int64
    (every layer matches all K targets the queries can take): the layer (row index), image
    (batch) and query (pred) of each pair, and its target's index in FlatTargets (tgt)."""
    layer: Tensor
    batch: Tensor
    pred: Tensor
    tgt: Tensor


def flatten_matches(targets: Sequence[Dict[str, Tensor]],
                    matched: Sequence[Sequence[Tuple[Tensor, Tensor]]],
                    device) -> Tuple[FlatTargets, MatchedPairs]:
    """targets (list of {'labels', 'boxes'}) and the matcher's per-layer, per-image CPU
    indices -> (FlatTargets, MatchedPairs). All indices and the per-image target counts travel
    to the device in ONE pinned, non-blocking copy (a plain .to(device) of each small CPU
    tensor would make the host wait for the GPU every time)."""
    lengths = torch.as_tensor([len(t["labels"]) for t in targets], dtype=torch.int64)
    offsets = torch.cumsum(lengths, 0) - lengths
    batch, pred, tgt = [], [], []
    for layer in matched:
        batch.append(torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(layer)]))
        pred.append(torch.cat([src for src, _ in layer]))
        tgt.append(torch.cat([t + offsets[i] for i, (_, t) in enumerate(layer)]))
    n_layers = len(matched)
    host = torch.cat([lengths, torch.stack(batch).flatten(), torch.stack(pred).flatten(),
                      torch.stack(tgt).flatten()])
    if torch.device(device).type == "cuda":
        host = host.pin_memory()
    values = host.to(device, non_blocking=True)
    num_pairs = batch[0].numel()  # the same in every layer
    lengths_d = values[:len(targets)]
    rest = values[len(targets):].view(3, n_layers, num_pairs)
    layer = torch.arange(n_layers, device=device)[:, None].expand_as(rest[0])
    flat = FlatTargets(torch.cat([t["labels"] for t in targets]).to(device),
                       torch.cat([t["boxes"] for t in targets]).to(device), lengths_d)
    return flat, MatchedPairs(layer, *rest.unbind(0))


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

    # -- individual losses over all layers at once: `out` {'pred_logits' (L,B,Q,C'),
    # 'pred_boxes' (L,B,Q,4)}, `flat` FlatTargets, `pairs` MatchedPairs -> {name: (L,) tensor}
    def loss_labels(self, out, flat, pairs, num_boxes) -> Dict[str, Tensor]:
        logits = out["pred_logits"]
        matched_labels = flat.labels[pairs.tgt]                                     # (L, K)
        target_classes = torch.full(logits.shape[:3], self.num_classes, dtype=torch.int64,
                                    device=logits.device)
        target_classes[pairs.layer, pairs.batch, pairs.pred] = matched_labels
        if self.class_loss == "ce":
            # weighted mean per layer, as F.cross_entropy(..., weight) reduces one layer
            nll = F.cross_entropy(logits.flatten(0, 1).transpose(1, 2),
                                  target_classes.flatten(0, 1), self.empty_weight,
                                  reduction="none")                                 # (L*B, Q)
            weights = self.empty_weight[target_classes]                             # (L, B, Q)
            loss = nll.view_as(weights).flatten(1).sum(1) / weights.flatten(1).sum(1)
        else:
            onehot = F.one_hot(target_classes, self.num_classes + 1)[..., :-1].to(logits.dtype)
            loss = sigmoid_focal_loss(logits, onehot, num_boxes, self.focal_alpha,
                                      self.focal_gamma) * logits.shape[2]
        with torch.no_grad():  # logging: top-1 accuracy of the matched queries
            hit = logits[pairs.layer, pairs.batch, pairs.pred].argmax(-1) == matched_labels
            accuracy = 100 * hit.float().sum(1) / max(hit.shape[1], 1)
        return {"loss_ce": loss, "class_error": 100 - accuracy}

    @torch.no_grad()
    def loss_cardinality(self, out, flat, pairs, num_boxes) -> Dict[str, Tensor]:
        """Logging only. Softmax head: queries whose argmax is not no-object; sigmoid head:
        queries with max probability > 0.5 (upstream's argmax rule is meaningless there)."""
        logits = out["pred_logits"]
        if self.class_loss == "ce":
            predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(2)
        else:
            predicted = (logits.sigmoid().amax(-1) > 0.5).sum(2)
        return {"cardinality_error": (predicted.float() - flat.lengths.float()).abs().mean(1)}

    def loss_boxes(self, out, flat, pairs, num_boxes) -> Dict[str, Tensor]:
        src = out["pred_boxes"][pairs.layer, pairs.batch, pairs.pred]               # (L, K, 4)
        tgt = flat.boxes[pairs.tgt].to(src)
        loss_bbox = (src - tgt).abs().flatten(1).sum(1) / num_boxes
        giou = paired_generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt))
        loss_giou = (1 - giou).sum(1) / num_boxes
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def num_boxes(self, targets, device) -> Tensor:
        """Total targets in the batch averaged over workers, clamped >= 1 (fp32 scalar)."""
        n = torch.full((), float(sum(len(t["labels"]) for t in targets)), device=device)
        if _is_dist() and dist.get_world_size() > 1:
            dist.all_reduce(n)
            n = n / dist.get_world_size()
        return n.clamp(min=1)

    def forward(self, outputs: Dict, targets: Sequence[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        device = outputs["pred_logits"].device
        with torch.autocast(device_type=device.type, enabled=False):
            layers = [outputs] + list(outputs.get("aux_outputs") or [])
            out = {k: torch.stack([layer[k] for layer in layers]).float()
                   for k in ("pred_logits", "pred_boxes")}                        # (L, B, Q, .)
            num_boxes = self.num_boxes(targets, device)
            matched = self.matcher.match_layers(out["pred_logits"], out["pred_boxes"], targets)
            flat, pairs = flatten_matches(targets, matched, device)
            fns = {"labels": self.loss_labels, "boxes": self.loss_boxes,
                   "cardinality": self.loss_cardinality}
            losses = {}
            for name in self.losses:
                for key, per_layer in fns[name](out, flat, pairs, num_boxes).items():
                    values = per_layer.unbind(0)
                    losses[key] = values[0]
                    if key != "class_error":
                        losses.update({f"{key}_{i}": v for i, v in enumerate(values[1:])})
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
