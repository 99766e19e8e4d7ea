"""Conditional DETR (+ ENACT encoder) — `build(args) -> (model, criterion, postprocessor)`.

Paper/upstream settings (spec §3.3): sigmoid focal loss (alpha 0.25, gamma 2) and focal matching
cost; loss weights cls 2, L1 5, GIoU 2 (the CLI defaults of Conditional-DETR-ENACT/main.py);
top-100 sigmoid post-processing. ENACT is the encoder self-attention unless args.no_enact.
"""
from detr_common.backbone import Joiner, build_backbone
from detr_common.criterion import SetCriterion, expand_aux_weights
from detr_common.matcher import build_matcher
from detr_common.position_encoding import build_position_encoding
from detr_common.postprocess import PostProcessTopK

from .model import ConditionalDETR
from .transformer import build_transformer

DEFAULT_NUM_CLASSES = 91  # COCO: ids 1..90, used directly as class indices


def build(args):
    num_classes = args.num_classes if getattr(args, "num_classes", None) else DEFAULT_NUM_CLASSES
    aux_loss = getattr(args, "aux_loss", True)
    backbone = Joiner(build_backbone(args), build_position_encoding(args))
    model = ConditionalDETR(backbone, build_transformer(args), num_classes, args.num_queries,
                            aux_loss=aux_loss)
    weight_dict = {"loss_ce": args.cls_loss_coef, "loss_bbox": args.bbox_loss_coef,
                   "loss_giou": args.giou_loss_coef}
    if aux_loss:
        weight_dict = expand_aux_weights(weight_dict, args.dec_layers)
    focal_alpha = getattr(args, "focal_alpha", 0.25)
    criterion = SetCriterion(num_classes, build_matcher(args, class_cost="focal"), weight_dict,
                             ("labels", "boxes", "cardinality"), class_loss="focal",
                             focal_alpha=focal_alpha, focal_gamma=2.0)
    return model, criterion, PostProcessTopK(k=100)
