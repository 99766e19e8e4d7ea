"""Train or evaluate DETR, with ENACT in the encoder (default) or plain (--no_enact).

    python DETR-ENACT/main.py --coco_path /data/coco --output_dir runs/detr_enact
    python DETR-ENACT/main.py --coco_path /data/coco --resume runs/detr_enact/checkpoint.pth --eval
"""
from detr_common.cli import get_args_parser
from detr_common.trainer import main
from engine import DETECTOR

# Paper defaults (spec §3.6): R50-C5, batch 8, lr 5e-5, 300 epochs with a drop at 200, sigma 3.
DEFAULTS = dict(backbone="resnet50", batch_size=8, lr=5e-5, lr_backbone=1e-5, epochs=300,
                lr_drop=200, smoothing_sigma=3, num_queries=100, dim_feedforward=2048,
                dropout=0.1, set_cost_class=1.0, cls_loss_coef=1.0, checkpoint_every=10)


def get_parser():
    parser = get_args_parser("DETR with ENACT", **DEFAULTS)
    g = parser.add_argument_group("DETR")
    g.add_argument("--eos_coef", type=float, default=0.1,
                   help="relative classification weight of the no-object class")
    g.add_argument("--pre_norm", action="store_true",
                   help="pre-norm transformer layers (plain attention only)")
    return parser


if __name__ == "__main__":
    main(get_parser(), DETECTOR)
