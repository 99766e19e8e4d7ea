"""Anchor DETR (+ ENACT in the spatial encoder layers) — ``build(args) -> (model, criterion,
postprocessor)``.

Upstream/paper settings (spec §3.4, §3.6): R50-DC5, 300 anchors x 3 patterns, RCDA, FFN 1024,
dropout 0, sigmoid focal loss (alpha 0.25, gamma 2) with focal matching cost, loss weights cls 2,
L1 5, GIoU 2 (CLI defaults of Anchor-DETR-ENACT/main.py), top-100 sigmoid post-processing.
ENACT (paper mode, DESIGN §4) unless args.no_enact.
"""
from detr_common.backbone import build_backbone
from detr_common.criterion import build_criterion
from detr_common.postprocess import PostProcessTopK

from .model import AnchorDETR
from .transformer import AnchorTransformer, build_transformer

DEFAULT_NUM_CLASSES = 91  # COCO: ids 1..90 used directly as class indices

__all__ = ["AnchorDETR", "AnchorTransformer", "build"]


def build(args):
    num_classes = args.num_classes if getattr(args, "num_classes", None) else DEFAULT_NUM_CLASSES
    levels = getattr(args, "num_feature_levels", 1)
    if levels not in (1, 3):
        raise ValueError(f"--num_feature_levels must be 1 or 3, got {levels}")
    return_layers = ("layer4",) if levels == 1 else ("layer2", "layer3", "layer4")
    aux_loss = getattr(args, "aux_loss", True)
    model = AnchorDETR(build_backbone(args, return_layers=return_layers),
                       build_transformer(args, num_classes), aux_loss=aux_loss)
    criterion = build_criterion(args, num_classes, class_loss="focal")
    return model, criterion, PostProcessTopK(k=100)
