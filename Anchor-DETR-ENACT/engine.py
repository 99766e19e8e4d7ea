"""Anchor DETR's wiring of the shared loops (detr_common.engine): its model, criterion,
post-processor and the upstream AdamW groups: transformer + heads at --lr, backbone at
--lr_backbone, and a third, linear-projection group at 0.1 x --lr that is empty for Anchor DETR
(kept so optimizer states have upstream's 3 groups, spec §4.1)."""
import anchor_detr
from detr_common.engine import evaluate, train_one_epoch  # noqa: F401  the loops themselves
from detr_common.trainer import Detector, default_param_groups

LINEAR_PROJ_LR_MULT = 0.1  # upstream's lr_linear_proj_mult; no Anchor parameter matches


def param_groups(model, args):
    return default_param_groups(model, args) + [{"params": [], "lr": args.lr * LINEAR_PROJ_LR_MULT}]


DETECTOR = Detector(name="anchor_detr", build=anchor_detr.build, param_groups=param_groups)
