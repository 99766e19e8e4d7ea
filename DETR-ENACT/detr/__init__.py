"""Plain DETR (facebookresearch/detr layout, batch-first) on the shared detr_common core.

``build(args) -> (model, criterion, postprocessor)``; see build() for the args it reads.
"""
from detr_common.backbone import Joiner, build_backbone
from detr_common.criterion import build_criterion
from detr_common.encoder import build_encoder_attention
from detr_common.position_encoding import build_position_encoding
from detr_common.postprocess import PostProcess

from .model import DETR
from .transformer import Transformer

__all__ = ["DETR", "Transformer", "build"]

_DEFAULTS = dict(num_queries=100, hidden_dim=256, nheads=8, enc_layers=6, dec_layers=6,
                 dim_feedforward=2048, dropout=0.1, pre_norm=False, aux_loss=True,
                 attn_impl="sdpa", no_enact=False, enact_impl="auto", smoothing_sigma=3,
                 set_cost_class=1.0, set_cost_bbox=5.0, set_cost_giou=2.0, cls_loss_coef=1.0,
                 bbox_loss_coef=5.0, giou_loss_coef=2.0, eos_coef=0.1, backbone="resnet50",
                 dilation=False,
                 lr_backbone=1e-5, backbone_weights="imagenet")


def _with_defaults(args):
    """Fill missing attributes with DETR's defaults (without mutating args)."""
    class _View:
        def __getattr__(self, name):
            if hasattr(args, name):
                return getattr(args, name)
            if name in _DEFAULTS:
                return _DEFAULTS[name]
            raise AttributeError(name)
    return _View()


def build(args):
    """-> (DETR model, SetCriterion, PostProcess), on the CPU (the caller moves them, as for the
    other two detectors).

    Reads: num_classes (required: max category id + 1), hidden_dim, nheads, enc_layers,
    dec_layers, dim_feedforward, dropout, num_queries, pre_norm, aux_loss, backbone, dilation,
    lr_backbone, backbone_weights, attn_impl, no_enact, enact_impl, smoothing_sigma,
    enact_row_breaks, enact_attn_dropout, enact_mode, enact_gauss_taps, enact_padding,
    enact_attn_numerics, set_cost_class/bbox/giou, cls_loss_coef, bbox_loss_coef,
    giou_loss_coef, eos_coef.
    """
    a = _with_defaults(args)
    if getattr(args, "num_classes", None) is None:
        raise ValueError("args.num_classes is not set (max category id + 1; the trainer reads "
                         "it from the annotation file)")
    if a.hidden_dim % a.nheads:
        raise ValueError(f"--hidden_dim {a.hidden_dim} must be divisible by --nheads {a.nheads}")
    backbone = Joiner(build_backbone(a), build_position_encoding(a))
    transformer = Transformer(lambda: build_encoder_attention(a), d_model=a.hidden_dim,
                              nhead=a.nheads, num_encoder_layers=a.enc_layers,
                              num_decoder_layers=a.dec_layers,
                              dim_feedforward=a.dim_feedforward, dropout=a.dropout,
                              normalize_before=a.pre_norm, attn_impl=a.attn_impl)
    model = DETR(backbone, transformer, num_classes=args.num_classes,
                 num_queries=a.num_queries, aux_loss=a.aux_loss)
    criterion = build_criterion(a, args.num_classes, class_loss="ce")
    return model, criterion, PostProcess()
