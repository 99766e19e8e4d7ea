"""Conditional DETR (+ ENACT encoder) — `build(args) -> (model, criterion, postprocessor)`.

Paper/upstream settings (spec §3.3): sigmoid focal loss (alpha 0.25, gamma 2) and focal matching
cost; loss weights cls 2, L1 5, GIoU 2 (the CLI defaults of Conditional-DETR-ENACT/main.py);
top-100 sigmoid post-processing. ENACT is the encoder self-attention unless args.no_enact.
"""
from detr_common.backbone import Joiner, build_backbone
from detr_common.criterion import SetCriterion
from detr_common.matcher import HungarianMatcher
from detr_common.position_encoding import build_position_encoding
from detr_common.postprocess import PostProcessTopK

from .model import ConditionalDETR
from .transformer import build_transformer

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
DEFAULT_NUM_CLASSES = 91  # COCO: ids 1..90


def build(args):
    num_classes = args.num_classes if getattr(args, "num_classes", None) else DEFAULT_NUM_CLASSES
    backbone = Joiner(build_backbone(args), build_position_encoding(args))
    model = ConditionalDETR(backbone, build_transformer(args), num_classes, args.num_queries,
                            aux_loss=getattr(args, "aux_loss", True))
    matcher = HungarianMatcher(cost_class=args.set_cost_class, cost_bbox=args.set_cost_bbox,
                               cost_giou=args.set_cost_giou, class_cost="focal",
                               focal_alpha=FOCAL_ALPHA, focal_gamma=FOCAL_GAMMA)
    base = {"loss_ce": args.cls_loss_coef, "loss_bbox": args.bbox_loss_coef,
            "loss_giou": args.giou_loss_coef}
    weight_dict = dict(base)
    if getattr(args, "aux_loss", True):
        for i in range(args.dec_layers - 1):
            weight_dict.update({f"{k}_{i}": v for k, v in base.items()})
    criterion = SetCriterion(num_classes, matcher, weight_dict, ["labels", "boxes", "cardinality"],
                             class_loss="focal", focal_alpha=FOCAL_ALPHA, focal_gamma=FOCAL_GAMMA)
    return model, criterion, PostProcessTopK(k=100)
