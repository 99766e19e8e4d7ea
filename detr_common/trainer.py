"""The training programme shared by the three ``main.py``: data, model, optimiser, resume,
epochs, checkpoints, evaluation and ``log.txt``. A detector plugs in through :class:`Detector`."""
import json
import logging
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from . import checkpoint as ckpt_io
from .backbone import BackboneWeightsError
from .cli import given_flags
from .data import DatasetError, build_dataset
from .data.collate import collate_fn
from .data.seeding import SeededDataset, SeededSampler
from .distributed import get_rank, init_distributed, is_dist, is_main_process
from .engine import NonFiniteLossError, evaluate, train_one_epoch
from .enact_stats import enact_stats
from .logs import append_log, epoch_record, read_log, setup_console_logging

log = logging.getLogger("detr_common")


def default_param_groups(model, args):
    """AdamW groups as upstream: the transformer and heads at ``lr``, the backbone at
    ``lr_backbone`` (parameters whose name contains "backbone")."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if "backbone" not in n]},
            {"params": [p for n, p in named if "backbone" in n], "lr": args.lr_backbone}]


def build_optimizer(detector, model, args, device) -> torch.optim.AdamW:
    """AdamW over ``detector.param_groups`` at ``args.lr`` / ``args.weight_decay``; on CUDA the
    fused implementation (one kernel per parameter group and step instead of a dozen per
    tensor chunk: about 5 ms less host time per DETR training step on an H200 host)."""
    return torch.optim.AdamW(detector.param_groups(model, args), lr=args.lr,
                             weight_decay=args.weight_decay,
                             fused=torch.device(device).type == "cuda")


@dataclass
class Detector:
    """What a detector folder gives the shared programme."""
    name: str                                   # stored in checkpoints ("detr", ...)
    build: Callable                             # args -> (model, criterion, postprocessor)
    param_groups: Callable = default_param_groups


class UsageError(RuntimeError):
    """Flags that cannot work together; the message says which and why."""


def _seed_everything(seed):
    """Seed torch, numpy and random. Called at every epoch start with a seed derived from
    (--seed, epoch, rank); with the data's per-image seeds (data/seeding.py) a resumed run
    repeats the epochs of an uninterrupted one."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def _seed_worker(worker_id):
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


def _loader(dataset, args, train):
    if is_dist():
        sampler = DistributedSampler(dataset, shuffle=train, seed=args.seed)
    elif train:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(args.seed))
    else:
        sampler = SequentialSampler(dataset)
    if train:  # per-image augmentation seeds: the same batches for any --num_workers or resume
        sampler, dataset = SeededSampler(sampler, args.seed), SeededDataset(dataset)
    return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler,
                      collate_fn=collate_fn, num_workers=args.num_workers,
                      worker_init_fn=_seed_worker, persistent_workers=args.num_workers > 0,
                      pin_memory=torch.cuda.is_available())


def _check_args(args):
    if not args.coco_path:
        raise UsageError("--coco_path is required (a folder with train2017/, val2017/ and "
                         "annotations/)")
    if args.resume and args.pretrained:
        raise UsageError("--resume continues a run (weights, optimizer, epoch) and "
                         "--pretrained loads weights only: give one of them")
    if args.eval and not (args.resume or args.pretrained):
        raise UsageError("--eval needs the weights to evaluate: --resume CKPT")
    if args.amp == "fp16" and args.device == "cpu":
        raise UsageError("--amp fp16 needs a CUDA device; use --amp bf16 on the CPU")
    if getattr(args, "backbone_train_all", False) and args.lr_backbone <= 0:
        raise UsageError("--backbone_train_all trains the backbone: it needs --lr_backbone > 0")
    if args.enact_mode != "paper_regions" and args.enact_row_breaks:
        raise UsageError("--enact_row_breaks applies to --enact_mode paper_regions only (the "
                         "official fixed chunks run over row ends)")
    for flag in ("lr_drop", "checkpoint_every", "epochs", "batch_size", "print_freq"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise UsageError(f"--device {args.device}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}, but torch sees no CUDA GPU here (use "
                         f"--device cpu)")


# Flags that set the optimizer and its schedule: --resume continues the checkpoint's.
_SCHEDULE_FLAGS = ("lr", "lr_backbone", "lr_drop", "weight_decay")


def _check_schedule_flags(ckpt, path, args):
    """--resume restores the optimizer and the StepLR of the checkpoint: the command line
    must give the same schedule, or it would be ignored without a word."""
    saved = ckpt.get("args")
    differ = [f"--{name} {getattr(args, name)} (checkpoint: {getattr(saved, name)})"
              for name in _SCHEDULE_FLAGS
              if getattr(saved, name, None) is not None
              and getattr(saved, name) != getattr(args, name)]
    if differ:
        raise UsageError(f"{path}: --resume continues the checkpoint's optimizer and schedule, "
                         f"but {', '.join(differ)}; give the checkpoint's values, or start a "
                         f"new schedule from its weights with --pretrained")


def _checkpoint_state(model, optimizer, lr_scheduler, scaler, epoch, args, detector,
                      class_names, train_stats):
    """What checkpoint.pth holds; ``train_stats`` (the epoch's train_* figures) let a resume
    complete the epoch's log.txt record when its evaluation was cut short."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch, "args": args,
             "detector": detector.name, "class_names": class_names,
             "train_stats": train_stats}
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    return state


def _build_without_backbone_download(detector, args):
    """detector.build(args); with --resume, or --eval of --pretrained weights, the checkpoint
    holds every weight, so the backbone's ImageNet weights are neither downloaded nor read
    (args keep the flag as given)."""
    if not (args.resume or (args.pretrained and args.eval)):
        return detector.build(args)
    given, args.backbone_weights = args.backbone_weights, "none"
    try:
        return detector.build(args)
    finally:
        args.backbone_weights = given


def _check_output_dir(output_dir, args):
    """UsageError when training would start afresh in the folder of an earlier run: its
    checkpoint.pth would be overwritten and log.txt would mix two runs."""
    if args.eval or args.resume or output_dir is None:
        return
    held = [name for name in ("checkpoint.pth", "log.txt") if (output_dir / name).exists()]
    if held:
        raise UsageError(f"--output_dir {output_dir} already holds a run ({', '.join(held)}): "
                         f"continue it with --resume {output_dir / 'checkpoint.pth'}, or give "
                         f"another --output_dir")


def _complete_log(output_dir, ckpt, path, n_parameters, evaluate_now):
    """When a run continued in its own folder (log.txt there, or the checkpoint resumed from
    it) lacks the record of the epoch ``ckpt`` finished (stopped during that epoch's
    evaluation, after the checkpoint was saved), evaluate it now and append its record, so
    the log keeps one record per trained epoch."""
    if not output_dir or ckpt.get("epoch") is None:
        return
    log_path = output_dir / "log.txt"
    in_place = Path(path).resolve().parent == output_dir.resolve()
    if not (log_path.is_file() or in_place):  # a checkpoint from elsewhere starts a new log
        return
    logged = [r.get("epoch", -1) for r in read_log(log_path)] if log_path.is_file() else []
    if ckpt["epoch"] <= max(logged, default=-1):
        return
    if "train_stats" not in ckpt:
        log.warning("%s: log.txt has no record of epoch %d (stopped during its evaluation) and "
                    "the checkpoint predates train_stats: that record stays missing", path,
                    ckpt["epoch"])
        return
    log.info("log.txt lacks epoch %d (stopped during its evaluation): evaluating it now",
             ckpt["epoch"])
    test_stats = evaluate_now()
    append_log(output_dir, epoch_record(ckpt["epoch"], ckpt["train_stats"], test_stats,
                                        n_parameters))


def _report_eval(evaluator, stats, output_dir):
    """Print the COCO table and per-class APs; write them with the detections and
    ``eval.json`` (the ``test_*`` statistics, as log.txt would name them)."""
    if not is_main_process():
        return
    print(evaluator.summary, flush=True)
    if evaluator.coco_eval is not None:
        print(evaluator.per_class_table(), flush=True)
    if output_dir:
        evaluator.write(output_dir, detections=True)
        (output_dir / "eval.json").write_text(
            json.dumps({f"test_{k}": v for k, v in stats.items()}, indent=1))


def _adopt_checkpoint_flags(args, given):
    """--resume, or --eval of --pretrained weights: the model flags (ckpt_io.ADOPTED_FLAGS)
    that the command line does not give (``given``: cli.given_flags) take the checkpoint's
    saved values, so a checkpoint is evaluated or continued as it was built. Returns
    "--flag value" for each one that changed. Explicit flags win (a mismatch then fails or
    warns on load)."""
    path = args.resume or (args.pretrained if args.eval else "")
    if not path or args.resume and args.pretrained:
        return []
    saved = ckpt_io.saved_args(path)
    if saved is None:
        return []
    adopted = []
    for name in ckpt_io.ADOPTED_FLAGS:
        if name in given or not hasattr(saved, name) or not hasattr(args, name):
            continue
        value = getattr(saved, name)
        if value != getattr(args, name):
            setattr(args, name, value)
            adopted.append(f"--{name} {value}")
    return adopted


def run(args, detector, given=None):
    """Train (or with ``--eval`` evaluate) ``detector`` as the flags say. ``given``: the
    flags on the command line (cli.given_flags); with it, --resume / --eval take the model
    flags left out from the checkpoint."""
    adopted = _adopt_checkpoint_flags(args, given) if given is not None else []
    _check_args(args)
    device = init_distributed(args.device)
    setup_console_logging()
    if adopted:
        log.info("%s: flags from the checkpoint (not on the command line): %s",
                 args.resume or args.pretrained, ", ".join(adopted))
    _seed_everything(args.seed + get_rank())
    output_dir = Path(args.output_dir) if args.output_dir else None
    _check_output_dir(output_dir, args)
    if output_dir and is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)

    dataset_val = build_dataset("val", args)
    dataset_train = None if args.eval else build_dataset("train", args)
    largest = max(d.num_classes for d in (dataset_val, dataset_train) if d is not None)
    if args.num_classes is None:
        args.num_classes = largest
    elif args.num_classes < largest:
        raise UsageError(f"--num_classes {args.num_classes} is too small: the annotations' "
                         f"largest category id is {largest - 1}, so it must be at least "
                         f"{largest} (or leave it out)")
    log.info("%s: %d classes (largest category id + 1), %s train / %d val images",
             detector.name, args.num_classes,
             "-" if dataset_train is None else len(dataset_train), len(dataset_val))

    model, criterion, postprocessor = _build_without_backbone_download(detector, args)
    model.to(device)
    criterion.to(device)
    model_without_ddp = model
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("trainable parameters: %d", n_parameters)

    optimizer = build_optimizer(detector, model, args, device)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None

    if args.pretrained and args.eval:  # evaluating: the weights must fit exactly
        ckpt_io.load_weights(model, args.pretrained, detector.name, args)
    elif args.pretrained:
        ckpt_io.load_pretrained(model, args.pretrained, detector.name, args)
    if args.resume:
        ckpt = ckpt_io.load_weights(model, args.resume, detector.name, args)
        if not args.eval and "optimizer" in ckpt:
            _check_schedule_flags(ckpt, args.resume, args)
            try:
                optimizer.load_state_dict(ckpt["optimizer"])
            except ValueError as e:
                raise ckpt_io.CheckpointError(
                    f"{args.resume}: its optimizer state does not fit this model's parameter "
                    f"groups (a changed --lr_backbone 0 / --backbone_train_all?): {e}") from None
            lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
            if scaler is not None and "scaler" in ckpt:
                scaler.load_state_dict(ckpt["scaler"])
            args.start_epoch = ckpt["epoch"] + 1
            if args.start_epoch >= args.epochs:
                raise UsageError(
                    f"{args.resume}: checkpoint already finished epoch {ckpt['epoch']} and "
                    f"--epochs is {args.epochs}: nothing left to train (raise --epochs, or "
                    f"evaluate with --eval)")

    if is_dist():
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    stats_fn = None if getattr(args, "no_enact", True) else enact_stats
    loader_val = _loader(dataset_val, args, train=False)
    if args.eval:
        stats, evaluator = evaluate(model, criterion, postprocessor, loader_val,
                                    dataset_val.coco, device, amp=args.amp, stats_fn=stats_fn)
        _report_eval(evaluator, stats, output_dir)
        return stats

    loader_train = _loader(dataset_train, args, train=True)
    class_names = {int(c["id"]): c["name"] for d in (dataset_train, dataset_val)
                   for c in d.coco.dataset["categories"]}  # val's names where both have one
    if args.resume:
        _complete_log(output_dir, ckpt, args.resume, n_parameters,
                      lambda: evaluate(model, criterion, postprocessor, loader_val,
                                       dataset_val.coco, device, amp=args.amp,
                                       stats_fn=stats_fn)[0])
    log.info("training epochs %d..%d", args.start_epoch, args.epochs - 1)
    start = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        _seed_everything(args.seed + 1_000_003 * (epoch + 1) + get_rank())
        loader_train.sampler.set_epoch(epoch)
        try:
            train_stats = train_one_epoch(
                model, criterion, loader_train, optimizer, device, epoch,
                clip_max_norm=args.clip_max_norm, amp=args.amp, scaler=scaler,
                print_freq=args.print_freq, stats_fn=stats_fn)
        except NonFiniteLossError as e:
            if output_dir and is_main_process():
                path = _save_nonfinite_step(e, model_without_ddp, args, detector.name,
                                            output_dir)
                e.args = (f"{e} The failing step (weights, batch) is in {path}.",)
            raise
        lr_scheduler.step()
        if output_dir and is_main_process():
            state = _checkpoint_state(model_without_ddp, optimizer, lr_scheduler, scaler,
                                      epoch, args, detector, class_names, train_stats)
            ckpt_io.save_checkpoint(state, output_dir / "checkpoint.pth")
            if (epoch + 1) % args.lr_drop == 0 or (epoch + 1) % args.checkpoint_every == 0:
                ckpt_io.save_checkpoint(state, output_dir / f"checkpoint{epoch:04}.pth")
        test_stats, evaluator = evaluate(model, criterion, postprocessor, loader_val,
                                         dataset_val.coco, device, amp=args.amp,
                                         stats_fn=stats_fn)
        if is_main_process():
            log.info("epoch %d: AP %.3f AP50 %.3f (%.1f min so far)\n%s", epoch,
                     test_stats["coco_eval_bbox"][0], test_stats["coco_eval_bbox"][1],
                     (time.time() - start) / 60, evaluator.summary)
        append_log(output_dir, epoch_record(epoch, train_stats, test_stats, n_parameters))
        if output_dir and is_main_process():
            evaluator.write(output_dir)
    return test_stats


def _save_nonfinite_step(error, model, args, detector_name, output_dir):
    """Write nonfinite_step.pth: the weights the failing step started from, its batch (images
    (B, 3, H, W), mask (B, H, W), targets) and where it happened, to reproduce it."""
    path = output_dir / "nonfinite_step.pth"
    ckpt_io.save_checkpoint(
        {"model": model.state_dict(), "args": args, "detector": detector_name,
         "epoch": error.epoch, "step": error.step, "message": str(error),
         "images": error.images.images.cpu(), "mask": error.images.mask.cpu(),
         "targets": [{k: v.cpu() for k, v in t.items()} for t in error.targets]}, path)
    return path


EXPECTED_ERRORS = (UsageError, DatasetError, ckpt_io.CheckpointError, NonFiniteLossError,
                   BackboneWeightsError)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _interrupted_message(args) -> str:
    ckpt = Path(args.output_dir) / "checkpoint.pth" if args.output_dir else None
    if args.eval:
        return "interrupted"
    if ckpt is not None and ckpt.is_file():
        return (f"interrupted; continue with --resume {ckpt} (it holds the last finished "
                f"epoch)")
    return "interrupted before the first epoch finished: nothing was saved"


def main(parser, detector, argv=None):
    """Parse flags and run; expected failures end with one clear line and exit status 2.
    Ctrl-C or SIGTERM (what job schedulers send) stop with one line saying how to continue,
    exit status 130; a checkpoint being written is never left half-written or as a stray
    temporary file."""
    args = parser.parse_args(argv)
    given = given_flags(parser, argv)
    try:
        previous = signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread: signals stay as they are
        previous = None
    try:
        run(args, detector, given)
    except EXPECTED_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if is_main_process():
            print(_interrupted_message(args), file=sys.stderr)
        sys.exit(130)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if is_dist():
            torch.distributed.destroy_process_group()
