"""Conditional DETR (+ ENACT encoder) — `build(args) -> (model, criterion, postprocessor)`.

Paper/upstream settings (spec §3.3): sigmoid focal loss (alpha 0.25, gamma 2) and focal matching
cost; loss weights cls 2, L1 5, GIoU 2 (the CLI defaults of Conditional-DETR-ENACT/main.py);
top-100 sigmoid post-processing. ENACT is the encoder self-attention unless args.no_enact.
"""
from detr_common.backbone import Joiner, build_backbone
from detr_common.criterion import build_criterion
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
    criterion = build_criterion(args, num_classes, class_loss="focal")
    return model, criterion, PostProcessTopK(k=100)
