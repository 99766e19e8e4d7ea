"""DETR's matcher + SetCriterion wiring (softmax CE with eos_coef, L1, GIoU, aux losses)."""
from detr_common.criterion import SetCriterion, expand_aux_weights
from detr_common.matcher import build_matcher


def build_criterion(args, num_classes: int) -> SetCriterion:
    """Reads set_cost_class/bbox/giou, cls_loss_coef, bbox_loss_coef, giou_loss_coef, eos_coef,
    aux_loss, dec_layers. weight_dict: loss_ce, loss_bbox, loss_giou, plus _0.._{L-2} copies
    with aux."""
    matcher = build_matcher(args, class_cost="softmax")
    weight_dict = {"loss_ce": args.cls_loss_coef, "loss_bbox": args.bbox_loss_coef,
                   "loss_giou": args.giou_loss_coef}
    if getattr(args, "aux_loss", True):
        weight_dict = expand_aux_weights(weight_dict, args.dec_layers)
    return SetCriterion(num_classes, matcher, weight_dict,
                        losses=("labels", "boxes", "cardinality"), class_loss="ce",
                        eos_coef=args.eos_coef)
