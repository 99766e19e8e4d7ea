"""Train or evaluate Conditional DETR, with ENACT in the encoder (default) or plain (--no_enact).

    python Conditional-DETR-ENACT/main.py --coco_path /data/coco --output_dir runs/cond_enact
    python Conditional-DETR-ENACT/main.py --coco_path /data/coco \
        --resume runs/cond_enact/checkpoint.pth --eval
"""
from detr_common.cli import get_args_parser
from detr_common.trainer import main
from engine import DETECTOR

# Paper defaults (spec §3.3, §3.6): R101-C5, batch 8, lr 5e-5, 50 epochs with a drop at 40,
# sigma 3, 300 queries; focal loss and focal matching cost with class weight 2.
DEFAULTS = dict(backbone="resnet101", batch_size=8, lr=5e-5, lr_backbone=1e-5, epochs=50,
                lr_drop=40, smoothing_sigma=3, num_queries=300, dim_feedforward=2048,
                dropout=0.1, set_cost_class=2.0, cls_loss_coef=2.0, checkpoint_every=10)


def get_parser():
    parser = get_args_parser("Conditional DETR with ENACT", **DEFAULTS)
    g = parser.add_argument_group("Conditional DETR")
    g.add_argument("--focal_alpha", type=float, default=0.25,
                   help="alpha of the sigmoid focal loss and of the focal matching cost")
    return parser


if __name__ == "__main__":
    main(get_parser(), DETECTOR)
