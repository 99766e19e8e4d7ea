"""Command-line flags shared by the three detectors (upstream names where they exist).

Each detector's ``main.py`` calls :func:`get_args_parser` with its paper defaults
(spec §3.6) and may add a few flags of its own to the returned parser.
"""
import argparse


def _int_list(text):
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def _sigma(text):
    """--smoothing_sigma: an integer in 1..64 (enact_cuda.information.check_sigma)."""
    from enact_cuda.information import check_sigma
    try:
        return check_sigma(int(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


COCO_TRAIN_SIZES = list(range(480, 801, 32))


def get_args_parser(description, num_queries=100, enact_attention=True, **defaults):
    """Return the shared parser; ``defaults`` override the generic defaults below.

    ``num_queries=None`` leaves out ``--num_queries`` (Anchor DETR counts its queries as
    anchors x patterns with flags of its own). ``enact_attention=False`` leaves out
    ``--enact_attn_numerics`` (Anchor DETR's ENACT only clusters for its row-column
    attention)."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=5e-5)
    g.add_argument("--lr_backbone", type=float, default=1e-5,
                   help="0 freezes the whole backbone")
    g.add_argument("--batch_size", type=int, default=8, help="images per GPU / process")
    g.add_argument("--weight_decay", type=float, default=1e-4)
    g.add_argument("--epochs", type=int, default=300)
    g.add_argument("--lr_drop", type=int, default=200, help="StepLR step (epochs), gamma 0.1")
    g.add_argument("--clip_max_norm", type=float, default=0.1, help="0 disables clipping")
    g.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off",
                   help="autocast for the model; matcher and losses always run in fp32")
    g.add_argument("--checkpoint_every", type=int, default=10,
                   help="also keep checkpointNNNN.pth every this many epochs (and at lr_drop)")

    g = p.add_argument_group("backbone")
    g.add_argument("--backbone", choices=["resnet18", "resnet34", "resnet50", "resnet101"],
                   default="resnet50")
    g.add_argument("--dilation", action="store_true",
                   help="replace the stride of the last stage by a dilation (DC5)")
    g.add_argument("--backbone_weights", default="imagenet",
                   help="imagenet (torchvision V1), none (random), or a path: a ResNet "
                        "state_dict or a detector checkpoint (its backbone is taken)")
    g.add_argument("--backbone_train_all", action="store_true",
                   help="train every backbone layer (the stem and layer1 too) with ordinary "
                        "BatchNorm (batch statistics), for training from scratch "
                        "(--backbone_weights none); default: the ImageNet recipe (stem and "
                        "layer1 frozen, frozen BatchNorm)")

    g = p.add_argument_group("transformer")
    g.add_argument("--hidden_dim", type=int, default=256)
    g.add_argument("--nheads", type=int, default=8)
    g.add_argument("--enc_layers", type=int, default=6)
    g.add_argument("--dec_layers", type=int, default=6)
    g.add_argument("--dim_feedforward", type=int, default=2048)
    g.add_argument("--dropout", type=float, default=0.1)
    if num_queries is not None:
        g.add_argument("--num_queries", type=int, default=num_queries)
    g.add_argument("--attn_impl", choices=["sdpa", "eager"], default="sdpa",
                   help="plain attention: fused SDPA, or eager with materialised weights "
                        "(the paper's baseline)")
    g.add_argument("--no_aux_loss", dest="aux_loss", action="store_false",
                   help="disable the auxiliary decoding losses")

    g = p.add_argument_group("ENACT")
    g.add_argument("--no_enact", action="store_true",
                   help="plain encoder self-attention (the baseline detector)")
    g.add_argument("--enact_impl", choices=["auto", "cuda", "torch"], default="auto")
    g.add_argument("--smoothing_sigma", type=_sigma, default=3,
                   help="sigma of ENACT's Gaussian smoothing (integer, 1..64)")
    g.add_argument("--enact_row_breaks", action="store_true",
                   help="also start an ENACT region at every image row (off in the paper)")
    g.add_argument("--enact_mode", choices=["paper_regions", "official_fixed_chunk"],
                   default="paper_regions",
                   help="ENACT's clusters: the paper's regions, or the official code's fixed "
                        "chunks of the regions' mean length (compat; no --enact_row_breaks)")
    g.add_argument("--enact_gauss_taps", choices=["paper", "code"], default="paper",
                   help="length of ENACT's Gaussian: the paper's 6 sigma + 1 taps, or the "
                        "official code's 6 sigma - 1 (compat, for its checkpoints)")
    g.add_argument("--enact_padding", choices=["honour", "ignore"], default="honour",
                   help="ENACT's key-padding mask: honoured (each image clustered alone), or "
                        "ignored as in the official code (padded pixels clustered too, one "
                        "fixed-chunk size per batch; compat, for its checkpoints)")
    g.add_argument("--enact_wait_for_counts", action="store_true",
                   help="ENACT training reads each layer's cluster count back (one wait for "
                        "the GPU per layer) instead of guessing the rows from the layer's "
                        "recent counts and redoing the rare step whose guess falls short "
                        "(the default wherever the fused CUDA clustering runs: the paper's "
                        "regions on a GPU, in fp32 or bf16; --amp fp16 always reads, since "
                        "its GradScaler cannot redo a step). Each forward's outputs and "
                        "gradients are the same; slower where the step is host-bound")
    g.add_argument("--enact_attn_dropout", type=float, default=None,
                   help="dropout on ENACT's clustered attention weights (default: --dropout; "
                        "the official ENACT code applies none, i.e. 0)")
    if enact_attention:
        g.add_argument("--enact_attn_numerics", choices=["standard", "official"],
                       default="standard",
                       help="ENACT's attention: softmax(QK^T / sqrt(d_h)), or the official "
                            "code's softmax(QK^T) / d_h (compat, for training as it did)")

    g = p.add_argument_group("matcher and loss")
    g.add_argument("--set_cost_class", type=float, default=1.0)
    g.add_argument("--set_cost_bbox", type=float, default=5.0)
    g.add_argument("--set_cost_giou", type=float, default=2.0)
    g.add_argument("--cls_loss_coef", type=float, default=1.0)
    g.add_argument("--bbox_loss_coef", type=float, default=5.0)
    g.add_argument("--giou_loss_coef", type=float, default=2.0)

    g = p.add_argument_group("data")
    g.add_argument("--coco_path", help="folder with train2017/, val2017/ and annotations/")
    g.add_argument("--num_classes", type=int, default=None,
                   help="default: largest category id of the annotation file + 1")
    g.add_argument("--train_sizes", type=_int_list, default=COCO_TRAIN_SIZES,
                   help="comma-separated shorter-side sizes for training")
    g.add_argument("--eval_size", type=int, default=800, help="shorter side for evaluation")
    g.add_argument("--max_size", type=int, default=1333, help="longest side after resizing")
    g.add_argument("--num_workers", type=int, default=2)

    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default="", help="where log.txt and checkpoints go")
    g.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--resume", default="", help="checkpoint to continue (model, optimizer, "
                   "scheduler, epoch); with --eval: the weights to evaluate")
    g.add_argument("--pretrained", default="",
                   help="weights only, for fine-tuning (class head re-initialised when the "
                        "number of classes differs)")
    g.add_argument("--start_epoch", type=int, default=0)
    g.add_argument("--eval", action="store_true", help="evaluate only")
    g.add_argument("--print_freq", type=int, default=10, help="progress-bar refresh (steps)")

    p.set_defaults(**defaults)
    return p


_NOT_GIVEN = object()


def given_flags(parser: argparse.ArgumentParser, argv=None) -> set:
    """The dests of the flags given on the command line ``argv`` (None: sys.argv[1:]),
    abbreviations and ``--flag=value`` included: argparse leaves a namespace's existing
    attributes alone unless their flag is given, so every dest starts as a marker."""
    probe = argparse.Namespace(**{a.dest: _NOT_GIVEN for a in parser._actions
                                  if a.dest != argparse.SUPPRESS})
    parser.parse_args(argv, namespace=probe)
    return {name for name, value in vars(probe).items() if value is not _NOT_GIVEN}


def enact_mode(args) -> str:
    """ENACT's clusters, --enact_mode ("paper_regions" for args saved before the flag)."""
    return getattr(args, "enact_mode", "paper_regions")


def enact_row_breaks(args) -> bool:
    """--enact_row_breaks (False for args saved before the flag)."""
    return bool(getattr(args, "enact_row_breaks", False))


def enact_gauss_taps(args) -> str:
    """--enact_gauss_taps ("paper" for args saved before the flag)."""
    return getattr(args, "enact_gauss_taps", "paper")


def enact_waits_for_counts(args) -> bool:
    """Whether ENACT's layers read their cluster counts back in training: with
    --enact_wait_for_counts (False for args saved before the flag: results do not depend on
    it), and always under --amp fp16, whose GradScaler cannot redo a step whose guessed rows
    fell short (engine.train_step)."""
    return getattr(args, "enact_wait_for_counts", False) or getattr(args, "amp", "off") == "fp16"


def enact_padding(args) -> str:
    """--enact_padding ("honour" for args saved before the flag)."""
    return getattr(args, "enact_padding", "honour")


def enact_honours_padding(args) -> bool:
    """--enact_padding honour: ENACT clusters each image's valid pixels only."""
    return enact_padding(args) == "honour"


def enact_attention_numerics(args) -> str:
    """ENACT's attention numerics, --enact_attn_numerics ("standard" where the flag is absent:
    args saved before it, or Anchor DETR)."""
    return getattr(args, "enact_attn_numerics", "standard")


def enact_attention_dropout(args) -> float:
    """Dropout of ENACT's clustered attention weights: --enact_attn_dropout, else --dropout."""
    value = getattr(args, "enact_attn_dropout", None)
    return args.dropout if value is None else value
