"""Train or evaluate Anchor DETR, with ENACT in the spatial encoder layers (default) or plain
RCDA (--no_enact).

    python Anchor-DETR-ENACT/main.py --coco_path /data/coco --output_dir runs/anchor_enact
    python Anchor-DETR-ENACT/main.py --coco_path /data/coco \
        --resume runs/anchor_enact/checkpoint.pth --eval
"""
from detr_common.cli import get_args_parser
from detr_common.trainer import main
from engine import DETECTOR

# Paper defaults (spec §3.4, §3.6): R50-DC5, batch 4, lr 5e-5, 50 epochs with a drop at 40,
# sigma 5, 300 anchors x 3 patterns, FFN 1024, dropout 0; focal loss and focal matching cost
# with class weight 2; an extra checkpoint every 5 epochs.
DEFAULTS = dict(backbone="resnet50", dilation=True, batch_size=4, lr=5e-5, lr_backbone=1e-5,
                epochs=50, lr_drop=40, smoothing_sigma=5, num_queries=None, dim_feedforward=1024,
                dropout=0.0, set_cost_class=2.0, cls_loss_coef=2.0, checkpoint_every=5)


def get_parser():
    parser = get_args_parser("Anchor DETR with ENACT", enact_attention=False, **DEFAULTS)
    g = parser.add_argument_group("Anchor DETR")
    g.add_argument("--no_dilation", dest="dilation", action="store_false",
                   help="plain C5 backbone instead of DC5 (dilation default: %(default)s)")
    g.add_argument("--num_feature_levels", type=int, choices=[1, 3], default=1,
                   help="3 = C3/C4/C5 at stride 16 with level encoder layers (needs DC5)")
    g.add_argument("--num_query_position", type=int, default=300, help="number of anchors")
    g.add_argument("--num_query_pattern", type=int, default=3, help="patterns per anchor")
    g.add_argument("--spatial_prior", choices=["learned", "grid"], default="learned",
                   help="learned anchors, or a fixed round(sqrt(N))^2 grid of cell centres")
    g.add_argument("--focal_alpha", type=float, default=0.25,
                   help="alpha of the sigmoid focal loss and of the focal matching cost")
    return parser


if __name__ == "__main__":
    main(get_parser(), DETECTOR)
