"""Conditional DETR's wiring of the shared loops (detr_common.engine): its model, criterion,
post-processor and the upstream AdamW groups (transformer + heads at --lr, backbone at
--lr_backbone)."""
import conditional_detr
from detr_common.engine import evaluate, train_one_epoch  # noqa: F401  the loops themselves
from detr_common.trainer import Detector

DETECTOR = Detector(name="conditional_detr", build=conditional_detr.build)
